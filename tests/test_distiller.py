"""The Distiller and the CLI end to end on real Fashion-MNIST, with short schedules."""

from __future__ import annotations

import csv
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mmkd.cli import ConfigError, lightning_cli, main
from mmkd.core import NonFiniteLossError, load_state_dict_file
from mmkd.heads import ShapeMismatchError

from conftest import CONFIGS, SHORT, TEACHER_CKPT  # noqa: E402
from test_g2sd import G2SD_STAGES  # noqa: E402  (G2SD's chained recipe is run there)
from test_dfine import DFINE_RECIPES  # noqa: E402  (trained on composed scenes there)
from test_mst import MST_RECIPES  # noqa: E402  (the AV-MNIST recipes are trained there)
from test_recipes import RECIPES as FULL_SIZE_RECIPES  # noqa: E402  (ImageNet/COCO recipes, run on stand-in trees there)
from test_heads_layouts import HEAD_LAYOUT_RECIPES  # noqa: E402  (ViT <-> CNN feature recipes, trained there)


def logged_columns(log_root: Path) -> set[str]:
    [metrics] = list(log_root.rglob("metrics.csv"))
    with open(metrics) as f:
        rows = list(csv.DictReader(f))
    return {key for row in rows for key, value in row.items() if value}


def test_help_lists_all_commands(capsys: pytest.CaptureFixture) -> None:
    main(["--help"])
    out = capsys.readouterr().out
    for command in ("fit", "validate", "test", "predict", "inspect"):
        assert f"  {command}" in out
    entry = subprocess.run([str(Path(sys.executable).parent / "mmkd"), "--help"], capture_output=True, text=True)
    assert entry.returncode == 0 and "inspect" in entry.stdout


def test_inspect_prints_paths_and_shapes(capsys: pytest.CaptureFixture, teacher_in_place: Path) -> None:
    main(["inspect", "resnet10t", "--input-size", "1", "28", "28", "--depth", "1"])
    out = capsys.readouterr().out
    assert "layer2" in out and "[1, 128, 4, 4]" in out and "global_pool" in out
    main(["inspect", "-c", str(CONFIGS / "kd/fmnist_fitnets.yaml"), "--depth", "1"])
    out = capsys.readouterr().out
    assert "student: module paths" in out and "teacher: module paths" in out
    assert "[1, 8, 4, 4]" in out and "[1, 64, 4, 4]" in out  # the FitNets hint layers


CONFIG_TERMS = {
    "teachers/fmnist_resnet10t.yaml": ["train/loss_ce_epoch"],
    "kd/fmnist_student_alone.yaml": ["train/loss_ce_epoch"],
    "kd/fmnist_kd.yaml": ["train/loss_ce_epoch", "train/loss_kd_epoch", "val/teacher_acc"],
    "kd/fmnist_dkd.yaml": ["train/loss_ce_epoch", "train/loss_dkd_epoch", "val/teacher_acc"],
    "kd/fmnist_fitnets.yaml": ["train/loss_ce_epoch", "train/loss_hint_epoch", "val/teacher_acc"],
    "kd/fmnist_at.yaml": ["train/loss_at_layer1_epoch", "train/loss_at_layer2_epoch", "train/loss_at_layer3_epoch"],
    "kd/fmnist_rkd.yaml": ["train/loss_ce_epoch", "train/loss_rkd_epoch", "val/teacher_acc"],
}


DHO_RECIPES = {"dho/clip_fmnist.yaml", "dho/fmnist.yaml"}  # trained in test_dho.py
PRETRAINED_RECIPES = {"kd/pretrained_teacher_folder.yaml"}  # a real ImageNet teacher, run in test_pretrained.py


def test_every_shipped_config_is_covered() -> None:
    # configs/sweeps/ are W&B sweep files, each covered by test_sweeps.py
    shipped = {str(p.relative_to(CONFIGS)) for p in CONFIGS.glob("*/*.yaml") if p.parent.name not in ("models", "sweeps")}
    covered = set(CONFIG_TERMS) | set(G2SD_STAGES) | DHO_RECIPES | MST_RECIPES | DFINE_RECIPES | PRETRAINED_RECIPES
    assert shipped == covered | set(FULL_SIZE_RECIPES) | set(HEAD_LAYOUT_RECIPES)


@pytest.mark.parametrize("config", sorted(CONFIG_TERMS))
def test_shipped_config_trains_and_logs_every_term(config: str, teacher_in_place: Path) -> None:
    lightning_cli(["fit", "-c", str(CONFIGS / config), *SHORT])
    columns = logged_columns(Path("runs/logs"))
    for term in CONFIG_TERMS[config] + ["train/loss_epoch", "val/acc"]:
        assert term in columns, f"{term} not logged by {config}: {sorted(columns)}"


def test_cli_overrides_reach_the_loss(teacher_in_place: Path) -> None:
    cli = lightning_cli(["-c", str(CONFIGS / "kd/fmnist_kd.yaml"), "--model.init_args.temperature=2.5",
                         "--model.init_args.kd_weight=0.7", "--model.init_args.loss_impl=eager"], run=False)  # fmt: skip
    assert cli.model.terms["kd"].loss.temperature == 2.5
    assert cli.model.terms["kd"].loss.loss_weight == 0.7
    assert cli.model.terms["kd"].loss.impl == "eager"


def test_teacher_unchanged_and_not_in_student_checkpoint(teacher_in_place: Path) -> None:
    cli = lightning_cli(["-c", str(CONFIGS / "kd/fmnist_fitnets.yaml"), *SHORT], run=False)
    probe = torch.randn(4, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    teacher_logits = cli.model.teacher(probe)  # its first batch folds its BatchNorms into its convolutions
    before = {k: v.clone() for k, v in cli.model.teacher.model.state_dict().items()}
    student_before = {k: v.clone() for k, v in cli.model.student.state_dict().items()}
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    after = cli.model.teacher.model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)  # BN running stats included
    assert torch.equal(cli.model.teacher(probe), teacher_logits)
    assert all(p.grad is None for p in cli.model.teacher.parameters())
    assert any(not torch.equal(student_before[k], v) for k, v in cli.model.student.state_dict().items())
    head = cli.model.terms["hint"].head
    optimized = {id(p) for group in cli.trainer.optimizers[0].param_groups for p in group["params"]}
    assert {id(p) for p in head.parameters()} <= optimized  # the head trains with the student
    assert head.norm.running_mean.abs().sum() > 0

    checkpoint = torch.load("runs/students/fmnist_fitnets/last.ckpt", weights_only=True)
    assert not any(k.startswith("teacher.") for k in checkpoint["state_dict"])
    reference = checkpoint["mmkd"]["teacher"]
    assert reference["checkpoint"] == TEACHER_CKPT and len(reference["checkpoint_sha256"]) == 64
    assert checkpoint["mmkd"]["feature_shapes"]["student"]["layer2"] == [8, 4, 4]
    # The student weights load on their own, e.g. into the student-alone config's model.
    assert "conv1.0.weight" in load_state_dict_file("runs/students/fmnist_fitnets/last.ckpt")

    lightning_cli(["validate", "-c", str(CONFIGS / "kd/fmnist_fitnets.yaml"), *SHORT,
                   "--ckpt_path=runs/students/fmnist_fitnets/last.ckpt"])  # fmt: skip
    predict = lightning_cli(["-c", str(CONFIGS / "kd/fmnist_fitnets.yaml"), *SHORT, "--trainer.limit_predict_batches=1"], run=False)
    [predictions] = predict.trainer.predict(predict.model, datamodule=predict.datamodule,
                                            ckpt_path="runs/students/fmnist_fitnets/last.ckpt")  # fmt: skip
    assert predictions["probs"].shape == (256, 10) and torch.allclose(predictions["probs"].sum(1), torch.ones(256))
    assert predictions["index"].tolist() == list(range(256))

    other = torch.load(teacher_in_place, weights_only=True)
    other["state_dict"]["model.fc.bias"] += 1.0
    torch.save(other, "other_teacher.ckpt")
    with pytest.raises(RuntimeError, match="trained with another teacher"):
        lightning_cli(["validate", "-c", str(CONFIGS / "kd/fmnist_fitnets.yaml"), *SHORT,
                       "--model.init_args.teacher.init_args.checkpoint=other_teacher.ckpt",
                       "--ckpt_path=runs/students/fmnist_fitnets/last.ckpt"])  # fmt: skip


def test_nan_loss_stops_training_with_the_term_name(teacher_in_place: Path, capsys) -> None:
    broken = torch.load(teacher_in_place, weights_only=True)
    broken["state_dict"]["model.fc.weight"][0, 0] = float("nan")
    torch.save(broken, "nan_teacher.ckpt")
    args = ["fit", "-c", str(CONFIGS / "kd/fmnist_kd.yaml"), *SHORT, "--model.init_args.teacher.init_args.checkpoint=nan_teacher.ckpt"]
    with pytest.raises(NonFiniteLossError, match=r"term 'kd' = nan"):
        lightning_cli(args)
    with pytest.raises(SystemExit) as exit_:  # the command line: the message alone, no traceback
        main(args)
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and "mmkd: error: " in err and "term 'kd' = nan" in err and "Traceback" not in err


def test_unknown_module_path_fails_at_setup_with_nearest_paths(teacher_in_place: Path, capsys) -> None:
    args = ["-c", str(CONFIGS / "kd/fmnist_fitnets.yaml"), "--model.init_args.student_layer=layer22"]
    with pytest.raises(ConfigError, match=r"no module at path 'layer22'. Nearest valid paths: layer2"):
        lightning_cli(args, run=False)
    with pytest.raises(SystemExit):  # the command line prints the cause alone, no traceback
        main(["fit", *args])
    err = capsys.readouterr().err
    assert err.startswith("mmkd: error: cannot build") and "Traceback" not in err and "Namespace" not in err


def test_missing_teacher_weights_from_the_command_line(capsys) -> None:
    with pytest.raises(SystemExit):
        main(["fit", "-c", str(CONFIGS / "kd/fmnist_kd.yaml")])  # no teacher trained in this directory
    assert "teacher weights not found: runs/teachers/fmnist_resnet10t/last.ckpt" in capsys.readouterr().err


def test_shape_mismatch_without_head_names_both_shapes(teacher_in_place: Path) -> None:
    with pytest.raises(ShapeMismatchError, match=r"'hint'.*\[8, 4, 4\].*\[64, 4, 4\]"):
        lightning_cli(["fit", "-c", str(CONFIGS / "kd/fmnist_fitnets.yaml"), *SHORT, "--model.init_args.head=identity"])
    with pytest.raises(ShapeMismatchError, match=r"'kd': the student's logits are \[7\] and the teacher's \[10\]; .* check num_classes"):
        lightning_cli(["fit", "-c", str(CONFIGS / "kd/fmnist_kd.yaml"), *SHORT, "--model.init_args.student.init_args.num_classes=7"])


def test_fit_two_epochs_equals_one_plus_resume(teacher_in_place: Path) -> None:
    """Same final weights (bitwise, CPU) for 2 epochs straight and 1 epoch + resume, with
    dropout in the student so that the RNG state has to survive the checkpoint too."""
    common = [
        "-c", str(CONFIGS / "kd/fmnist_kd.yaml"), "--trainer.limit_train_batches=4", "--trainer.limit_val_batches=2",
        "--trainer.enable_progress_bar=false", "--model.init_args.lr_schedule=constant",
        '--model.init_args.student.init_args.model_args={"channels": [8, 16, 32, 64], "stem_width": 8, "drop_rate": 0.3}',
    ]  # fmt: skip
    lightning_cli(["fit", *common, "--trainer.max_epochs=2", "--trainer.callbacks.init_args.dirpath=straight"])
    lightning_cli(["fit", *common, "--trainer.max_epochs=1", "--trainer.callbacks.init_args.dirpath=resumed"])
    lightning_cli(["fit", *common, "--trainer.max_epochs=2", "--trainer.callbacks.init_args.dirpath=resumed",
                   "--ckpt_path=resumed/last.ckpt"])  # fmt: skip
    straight = torch.load("straight/last.ckpt", weights_only=True)
    resumed = torch.load("resumed/last.ckpt", weights_only=True)
    assert straight["global_step"] == resumed["global_step"] == 8
    for key, value in straight["state_dict"].items():
        assert torch.equal(value, resumed["state_dict"][key]), key
    one_epoch = torch.load("resumed/last.ckpt", weights_only=True)
    assert one_epoch["epoch"] == 1


def test_channels_last_switch_trains_with_nhwc_weights(teacher_in_place: Path) -> None:
    cli = lightning_cli(["-c", str(CONFIGS / "kd/fmnist_fitnets.yaml"), *SHORT, "--model.init_args.channels_last=true"], run=False)
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    for model in (cli.model.student, cli.model.teacher.model):
        conv = next(m for m in model.modules() if isinstance(m, torch.nn.Conv2d) and m.kernel_size != (1, 1) and m.in_channels > 1)
        assert conv.weight.is_contiguous(memory_format=torch.channels_last) and not conv.weight.is_contiguous()
    assert torch.isfinite(cli.trainer.callback_metrics["train/loss"])
