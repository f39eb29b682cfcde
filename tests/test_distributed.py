"""Distributed training and fault tolerance, launched as a user would (`mmkd fit ...` in a
subprocess): DDP with two CPU processes (gloo), and a run killed with SIGKILL then resumed."""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from mmkd.cli import lightning_cli, main
from mmkd.core import load_state_dict_file

from conftest import CONFIGS, DATA_ROOT, REPO, SHORT  # noqa: E402

sys.path.insert(0, str(REPO / "tools"))
import compose_detection  # noqa: E402

MMKD = str(Path(sys.executable).parent / "mmkd")
DDP = ["--trainer.accelerator=cpu", "--trainer.strategy=ddp", "--trainer.devices=2"]


def mmkd_fit(config: str, *overrides: str, returncode: int = 0) -> None:
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parent)}  # for kill_callback
    done = subprocess.run([MMKD, "fit", "-c", str(CONFIGS / config), *SHORT, *overrides], capture_output=True, text=True, timeout=600, env=env)
    assert done.returncode == returncode, done.stderr[-3000:]


def weights(path: str) -> dict[str, torch.Tensor]:
    return torch.load(path, map_location="cpu", weights_only=True)["state_dict"]


def killed_and_resumed_equals_straight(config: str, *overrides: str) -> None:
    """``mmkd fit`` of 2 epochs of 6 steps (checkpoints every 2) straight through, and again killed
    after step 5 (its last checkpoint at step 4, mid-epoch) then resumed: the same final weights."""
    common = [*overrides, "--trainer.max_epochs=2", "--trainer.limit_train_batches=6", "--trainer.callbacks.init_args.every_n_train_steps=2"]
    mmkd_fit(config, *common, "--trainer.callbacks.init_args.dirpath=straight")
    kill = '--trainer.callbacks+={"class_path": "kill_callback.KillAtStep", "init_args": {"step": 5}}'
    mmkd_fit(config, *common, "--trainer.callbacks.init_args.dirpath=killed", kill, returncode=-9)
    interrupted = torch.load("killed/last.ckpt", map_location="cpu", weights_only=True)
    assert interrupted["global_step"] == 4 and interrupted["epoch"] == 0
    mmkd_fit(config, *common, "--trainer.callbacks.init_args.dirpath=killed", "--ckpt_path=last")
    straight, resumed = weights("straight/last.ckpt"), weights("killed/last.ckpt")
    assert torch.load("killed/last.ckpt", weights_only=True)["global_step"] == 12
    for key in straight:
        assert torch.equal(resumed[key], straight[key]), key


def random_clip_teacher() -> None:
    """Randomly initialised CLIP weights where configs/dho/fmnist.yaml looks for its teacher."""
    from safetensors.torch import save_file

    from mmkd.models import create_clip

    Path("runs/dho").mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in create_clip("mmkd-clip-tiny").state_dict().items()}, "runs/dho/clip_fmnist.safetensors")


@pytest.mark.slow
def test_every_distiller_trains_under_ddp(teacher_in_place: Path) -> None:
    mmkd_fit("kd/fmnist_kd.yaml", *DDP, "--trainer.callbacks.init_args.dirpath=kd")
    # G2SD: its teachers by the shipped recipe (one process, a few steps), then both stages under DDP
    for config in ("g2sd/mae_pretrain.yaml", "g2sd/teacher_finetune.yaml"):
        lightning_cli(["fit", "-c", str(CONFIGS / config), *SHORT])
    mmkd_fit("g2sd/generic.yaml", *DDP)
    mmkd_fit("g2sd/specific.yaml", *DDP)
    random_clip_teacher()
    mmkd_fit("dho/fmnist.yaml", *DDP, "--model.init_args.mix=search")  # the search gathers both ranks' logits
    # MST-Distill: each stage leaves some networks without gradients, so DDP must look for them
    mst_ddp = [*DDP[:1], "--trainer.strategy=ddp_find_unused_parameters_true", *DDP[2:]]
    mmkd_fit("mst/avmnist.yaml", *mst_ddp, "--model.init_args.stage_epochs=[1,1,1]", "--trainer.max_epochs=3")
    assert Path("runs/mst/avmnist/mst_stage3.ckpt").is_file()
    # D-FINE on a few composed scenes (the criterion averages its box counts over the processes)
    compose_detection.compose(Path("runs/data/fmnist-det"), DATA_ROOT / "fashion-mnist", {"train": 16, "val": 4, "test": 4})
    mmkd_fit("dfine/fmnist_det.yaml", *DDP, "--data.init_args.batch_size=4", "--model.init_args.model.init_args.backbone=resnet10t")
    assert Path("runs/dfine/fmnist/last.ckpt").is_file()
    for folder in ("kd", "runs/g2sd/generic", "runs/g2sd/specific", "runs/dho/fmnist"):
        checkpoint = torch.load(f"{folder}/last.ckpt", map_location="cpu", weights_only=True)
        assert checkpoint["global_step"] == 3 and not any(k.startswith("teacher.") for k in checkpoint["state_dict"])
    assert Path("runs/g2sd/generic/export/encoder.safetensors").is_file()  # written once, by rank 0


KILLED_RUNS = [
    pytest.param("g2sd/vit_alone.yaml", [{"epoch": 0, "batches_yielded": 4}], [], id="vit"),
    # DHO: two loaders side by side, the labelled one on its first pass of the epoch (the key is
    # epoch * passes + pass) and the unlabelled one; the searched (alpha, beta) come back too
    pytest.param("dho/fmnist.yaml", [{"epoch": 0, "batches_yielded": 4}] * 2, ["--model.init_args.mix=search"], id="dho", marks=pytest.mark.slow),
    # MST-Distill: killed in stage 1 (co-training), resumed through stage 2 (MaskNets, the best kept)
    pytest.param("mst/avmnist.yaml", [{"epoch": 0, "batches_yielded": 4}], ["--model.init_args.stage_epochs=[1,1,0]"], id="mst", marks=pytest.mark.slow),
]


@pytest.mark.parametrize(("config", "positions", "extra"), KILLED_RUNS)
def test_a_run_killed_mid_epoch_resumes_to_the_same_weights(data_root: Path, config: str, positions: list[dict], extra: list[str]) -> None:
    # 2 epochs of 6 steps, a checkpoint every 2 steps; the run is killed after step 5, so it
    # resumes from step 4, in the middle of the first epoch (mixup draws from numpy's RNG, whose
    # state comes back from the checkpoint too).
    common = ["--trainer.max_epochs=2", "--trainer.limit_train_batches=6", "--trainer.callbacks.init_args.every_n_train_steps=2", *extra]
    if config.startswith("dho"):
        random_clip_teacher()
    mmkd_fit(config, *common, "--trainer.callbacks.init_args.dirpath=straight")
    kill = '--trainer.callbacks+={"class_path": "kill_callback.KillAtStep", "init_args": {"step": 5}}'
    mmkd_fit(config, *common, "--trainer.callbacks.init_args.dirpath=killed", kill, returncode=-9)
    interrupted = torch.load("killed/last.ckpt", map_location="cpu", weights_only=True)
    assert interrupted["global_step"] == 4 and interrupted["epoch"] == 0
    assert interrupted["loops"]["fit_loop"]["state_dict"]["combined_loader"] == positions
    mmkd_fit(config, *common, "--trainer.callbacks.init_args.dirpath=killed", "--ckpt_path=last")
    straight, resumed = weights("straight/last.ckpt"), weights("killed/last.ckpt")
    assert torch.load("killed/last.ckpt", weights_only=True)["global_step"] == 12
    for key in straight:
        assert torch.equal(resumed[key], straight[key]), key


def test_a_kill_while_saving_leaves_the_previous_last_checkpoint_whole(data_root: Path) -> None:
    common = ["--trainer.limit_train_batches=6", "--trainer.callbacks.init_args.every_n_train_steps=2", "--trainer.callbacks.init_args.dirpath=ckpts"]
    kill = '--trainer.callbacks+={"class_path": "kill_callback.KillDuringSave", "init_args": {"step": 4}}'
    mmkd_fit("kd/fmnist_student_alone.yaml", *common, kill, returncode=-9)
    assert torch.load("ckpts/last.ckpt", weights_only=True)["global_step"] == 2  # the save of step 4 died half-way
    assert len(list(Path("ckpts").glob(".last.ckpt.tmp-*"))) == 1  # its partial file, beside it
    mmkd_fit("kd/fmnist_student_alone.yaml", *common, "--ckpt_path=last")
    assert torch.load("ckpts/last.ckpt", weights_only=True)["global_step"] == 6
    assert not list(Path("ckpts").glob(".last.ckpt.tmp-*"))


COLLECTIVE_FAILED = "mmkd: error: process 0 stopped because another training process died"
LAUNCHER_SAW_IT = re.compile(r"mmkd: error: training process 1 on this machine \(PID \d+\) was killed by SIGKILL \(the kernel's out-of-memory killer")


@pytest.mark.slow
@pytest.mark.parametrize("stall_seconds", [0, 12])
def test_a_dead_rank_stops_the_other_within_seconds(data_root: Path, stall_seconds: int) -> None:
    # Rank 1 SIGKILLs itself at step 1. Rank 0 reports it from whichever notices first: its next
    # gloo collective (fails at once), or Lightning's launcher, which polls its child processes
    # every 5 s and then SIGKILLs them all and itself; mmkd makes it say why first. With rank 0
    # stalled for 12 s the launcher always comes first.
    kill = f'--trainer.callbacks+={{"class_path": "kill_callback.KillAtStep", "init_args": {{"step": 1, "rank": 1, "stall_seconds": {stall_seconds}}}}}'
    start = time.monotonic()
    done = subprocess.run([MMKD, "fit", "-c", str(CONFIGS / "g2sd/vit_alone.yaml"), *SHORT, *DDP, "--trainer.limit_train_batches=50", kill],
                          capture_output=True, text=True, timeout=600, env={**os.environ, "PYTHONPATH": str(Path(__file__).parent)})  # fmt: skip
    assert done.returncode != 0
    assert time.monotonic() - start < 120  # not gloo's 30-minute collective timeout
    launcher_saw_it = LAUNCHER_SAW_IT.search(done.stderr)
    if stall_seconds:
        assert launcher_saw_it, done.stderr[-3000:]
    else:
        assert launcher_saw_it or COLLECTIVE_FAILED in done.stderr, done.stderr[-3000:]


def test_the_launcher_says_which_process_died_and_how_before_it_stops_the_others(capsys: pytest.CaptureFixture) -> None:
    from lightning.fabric.strategies.launchers import subprocess_script

    from mmkd.strategies import ExplainingChildObserver, explain_dead_processes

    explain_dead_processes()
    assert subprocess_script._ChildProcessObserver is ExplainingChildObserver  # what Lightning's launcher starts
    # a stand-in for the main process (the observer SIGKILLs it last), a process that failed, one that was killed
    main_process = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    failed = subprocess.Popen([sys.executable, "-c", "raise SystemExit(3)"])
    killed = subprocess.Popen([sys.executable, "-c", "import os, signal; os.kill(os.getpid(), signal.SIGKILL)"])
    failed.wait(), killed.wait()
    assert ExplainingChildObserver(main_pid=main_process.pid, child_processes=[failed, killed])._run()  # True: done watching
    assert main_process.wait(timeout=10) == -9
    err = capsys.readouterr().err
    assert f"training process 1 on this machine (PID {failed.pid}) exited with code 3 (its error is printed above)" in err
    assert LAUNCHER_SAW_IT.search(err) is None  # that is process 2
    assert f"training process 2 on this machine (PID {killed.pid}) was killed by SIGKILL" in err
    assert "--ckpt_path=last" in err


FSDP2_SINGLE_FILE = ["--trainer.accelerator=cpu", "--trainer.devices=2",
                     '--trainer.strategy={"class_path": "mmkd.strategies.FSDP2", "init_args": {"save_distributed_checkpoint": false}}']  # fmt: skip


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def launch_nodes(commands: list[list[str]], envs: list[dict[str, str]]) -> None:
    """One process per simulated node, all at once (they rendezvous on loopback)."""
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parent)}
    nodes = [subprocess.Popen(command, env={**env, **extra}, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True) for command, extra in zip(commands, envs)]
    errors = [node.communicate(timeout=600)[1] for node in nodes]
    for node, error in zip(nodes, errors):
        assert node.returncode == 0, error[-3000:]


@pytest.mark.slow
def test_ddp_matches_one_process_and_fsdp2_torchrun_and_slurm_match_ddp(data_root: Path) -> None:
    # A LayerNorm ViT (no BatchNorm statistics per rank), no mixup (timm pairs samples within a
    # batch) and SGD (Adam's normalised steps would amplify float noise in near-zero gradients).
    config = "g2sd/vit_alone.yaml"
    common = ["--trainer.limit_train_batches=4", "--model.init_args.mixup=null", "--model.init_args.optimizer.class_path=torch.optim.SGD",
              "--model.init_args.optimizer.init_args.lr=0.05"]  # fmt: skip
    mmkd_fit(config, *common, *DDP, "--data.init_args.batch_size=32", "--trainer.callbacks.init_args.dirpath=ddp")
    mmkd_fit(config, *common, "--data.init_args.batch_size=64", "--trainer.callbacks.init_args.dirpath=single")
    mmkd_fit(config, *common, *FSDP2_SINGLE_FILE, "--data.init_args.batch_size=32", "--trainer.callbacks.init_args.dirpath=fsdp2")
    # The README's multi-node commands, as two nodes of one process each on loopback: the same
    # config with --trainer.num_nodes=2, launched by torchrun, then as SLURM tasks (srun's variables).
    two_nodes = [MMKD, "fit", "-c", str(CONFIGS / config), *SHORT, *common, "--data.init_args.batch_size=32",
                 "--trainer.accelerator=cpu", "--trainer.strategy=ddp", "--trainer.devices=1", "--trainer.num_nodes=2"]  # fmt: skip
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nnodes=2", "--nproc_per_node=1", "--master_addr=127.0.0.1", f"--master_port={free_port()}"]
    launch_nodes([[*torchrun, f"--node_rank={node}", *two_nodes, "--trainer.callbacks.init_args.dirpath=torchrun"] for node in (0, 1)], [{}, {}])
    slurm = {"SLURM_JOB_ID": "4242", "SLURM_JOB_NAME": "mmkd", "SLURM_NTASKS": "2", "SLURM_NNODES": "2", "SLURM_NTASKS_PER_NODE": "1",
             "SLURM_NODELIST": "127.0.0.1", "SLURM_LOCALID": "0", "MASTER_PORT": str(free_port())}  # fmt: skip
    tasks = [slurm | {"SLURM_PROCID": str(node), "SLURM_NODEID": str(node)} for node in (0, 1)]
    launch_nodes([[*two_nodes, "--trainer.callbacks.init_args.dirpath=slurm"]] * 2, tasks)

    ddp, single = weights("ddp/last.ckpt"), weights("single/last.ckpt")
    initial = lightning_cli(["-c", str(CONFIGS / config), *SHORT], run=False).model.state_dict()
    assert any(not torch.equal(single[k], initial[k]) for k in single)  # it trained
    for key in single:
        torch.testing.assert_close(ddp[key], single[key], rtol=1e-4, atol=1e-6, msg=key)
    for launched in ("fsdp2", "torchrun", "slurm"):
        other = weights(f"{launched}/last.ckpt")
        assert set(other) == set(ddp), launched  # FSDP2 keeps the parameter names
        for key in ddp:
            torch.testing.assert_close(other[key], ddp[key], rtol=1e-4, atol=1e-6, msg=f"{launched}: {key}")


@pytest.mark.slow
def test_fsdp2_checkpoints_resume_and_load_into_one_process(teacher_in_place: Path) -> None:
    fsdp2 = ["--trainer.accelerator=cpu", "--trainer.devices=2", "--trainer.strategy=fsdp2"]
    mmkd_fit("g2sd/vit_alone.yaml", *fsdp2, "--trainer.callbacks.init_args.dirpath=fsdp2")
    assert Path("fsdp2/last.ckpt/.metadata").is_file()  # a folder of shards
    mmkd_fit("g2sd/vit_alone.yaml", *fsdp2, "--trainer.callbacks.init_args.dirpath=fsdp2", "--trainer.max_epochs=2", "--ckpt_path=last")
    assert not list(Path("fsdp2").glob(".last.ckpt*"))  # saved over the old folder by staging and swapping, nothing left over
    main(["consolidate", "fsdp2/last.ckpt", "--out", "student.ckpt"])
    consolidated = torch.load("student.ckpt", weights_only=True)
    assert consolidated["global_step"] == 6 and "model.blocks.0.attn.qkv.weight" in consolidated["state_dict"]
    shutil.copytree("fsdp2/last.ckpt", "cut.ckpt")  # a folder whose shard was cut short
    shard = sorted(Path("cut.ckpt").glob("*.distcp"))[0]
    shard.write_bytes(shard.read_bytes()[:200])
    with pytest.raises(SystemExit) as exit_:
        main(["consolidate", "cut.ckpt", "--out", "student.ckpt"])
    assert exit_.value.code == 2 and torch.load("student.ckpt", weights_only=True)["global_step"] == 6  # the old file whole
    tested = lightning_cli(["test", "-c", str(CONFIGS / "g2sd/vit_alone.yaml"), *SHORT, "--ckpt_path=student.ckpt"])
    assert 0.0 <= float(tested.trainer.callback_metrics["test/acc"]) <= 1.0
    # distillers: KD with the teacher replicated, G2SD's stages with the teacher sharded too
    mmkd_fit("kd/fmnist_kd.yaml", *fsdp2, "--trainer.callbacks.init_args.dirpath=kd")
    for config in ("g2sd/mae_pretrain.yaml", "g2sd/teacher_finetune.yaml"):
        lightning_cli(["fit", "-c", str(CONFIGS / config), *SHORT])
    for config in ("g2sd/generic.yaml", "g2sd/specific.yaml"):
        mmkd_fit(config, *fsdp2, "--model.init_args.shard_teacher=true")
    random_clip_teacher()
    mmkd_fit("dho/fmnist.yaml", *fsdp2, "--model.init_args.mix=search")
    compose_detection.compose(Path("runs/data/fmnist-det"), DATA_ROOT / "fashion-mnist", {"train": 16, "val": 4, "test": 4})
    mmkd_fit("dfine/fmnist_det.yaml", *fsdp2, "--data.init_args.batch_size=4", "--model.init_args.model.init_args.backbone=resnet10t")
    assert Path("runs/dfine/fmnist/last.ckpt/.metadata").is_file()
    # MST-Distill: each network and each MaskNet sharded on its own; the selected weights are gathered
    mmkd_fit("mst/avmnist.yaml", *fsdp2, "--model.init_args.stage_epochs=[1,1,1]", "--trainer.max_epochs=3")
    assert Path("runs/mst/avmnist/mst_stage3.ckpt/.metadata").is_file()
    assert Path("runs/g2sd/generic/export/encoder.safetensors").is_file() and Path("runs/g2sd/specific/last.ckpt/.metadata").is_file()
    encoder = lightning_cli(["-c", str(CONFIGS / "g2sd/specific.yaml"), *SHORT], run=False).model.model.encoder  # read from the folder
    torch.testing.assert_close(encoder.state_dict()["blocks.0.attn.qkv.weight"], load_state_dict_file("runs/g2sd/generic/export/encoder.safetensors")["blocks.0.attn.qkv.weight"])
