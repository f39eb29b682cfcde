"""W&B: the sweep files in configs/sweeps/, expanded into command lines the way `wandb agent`
builds them, and a run logged offline (no account, no network) with the sweep's metric in its
history and its checkpoints as model artifacts."""

from __future__ import annotations

import base64
import hashlib
import math
import os
import random
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from mmkd.cli import lightning_cli

from conftest import CONFIGS, REPO, SHORT  # noqa: E402

SWEEPS = sorted((CONFIGS / "sweeps").glob("*.yaml"))


def sample(spec: dict, rng: random.Random) -> object:
    """One value of a W&B sweep parameter, from the distributions the sweep files use."""
    if "values" in spec:
        return rng.choice(spec["values"])
    if "value" in spec:
        return spec["value"]
    low, high = spec["min"], spec["max"]
    kind = spec["distribution"]
    if kind == "uniform":
        return rng.uniform(low, high)
    if kind == "log_uniform_values":
        return math.exp(rng.uniform(math.log(low), math.log(high)))
    if kind == "int_uniform":
        return rng.randint(low, high)
    raise AssertionError(f"add a sampler for {kind}")


def agent_command(sweep: dict, values: dict) -> list[str]:
    """The command line `wandb agent` runs for these values, built with W&B's own helpers and
    the macro substitution of wandb_agent.Agent._command_run."""
    from wandb.sdk.launch.sweeps.utils import create_sweep_command, create_sweep_command_args

    macros = create_sweep_command_args({"args": {key: {"value": value} for key, value in values.items()}})
    macros.update(env=["/usr/bin/env"], program=[sweep["program"]], interpreter=["python"])
    command: list[str] = []
    for chunk in map(str, create_sweep_command(list(sweep["command"]))):
        command += (macros.get(chunk[2:-1]) or []) if chunk.startswith("${") and chunk.endswith("}") else [chunk]
    return command


def lookup(config: dict, dotted: str) -> object:
    for key in dotted.split("."):
        config = config[key]
    return config


@pytest.mark.parametrize("path", SWEEPS, ids=[p.stem for p in SWEEPS])
def test_sweep_files_name_real_config_keys(path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    sweep = yaml.safe_load(path.read_text())
    assert sweep["method"] in ("grid", "random", "bayes") and sweep["metric"]["name"].startswith("val/")
    assert "${args}" in sweep["command"] and sweep["command"][1:3] == ["mmkd", "fit"]
    monkeypatch.chdir(REPO)  # where the agent runs, so the config path in the command resolves
    rng = random.Random(path.stem)
    for _ in range(3):
        values = {key: sample(spec, rng) for key, spec in sweep["parameters"].items()}
        command = agent_command(sweep, values)
        assert command[:3] == ["/usr/bin/env", "mmkd", "fit"] and Path(command[command.index("-c") + 1]).is_file()
        with pytest.raises(SystemExit) as exit_:
            lightning_cli([*command[2:], "--print_config"])  # parses (unknown keys are errors), builds nothing
        assert exit_.value.code in (0, None)
        printed = yaml.safe_load(capsys.readouterr().out)
        for key, value in values.items():
            assert lookup(printed, key) == (pytest.approx(value) if isinstance(value, float) else value), key
        assert lookup(printed, "trainer.logger.class_path") == "mmkd.loggers.WandbLogger"


def wandb_records(run_file: Path):
    """The records of a W&B transaction log (``run-*.wandb``: a LevelDB-style log of protobufs)."""
    from wandb.proto import wandb_internal_pb2

    raw, position, pending, block = run_file.read_bytes(), 7, b"", 32768
    assert raw[:4] == b":W&B"
    while position + 7 <= len(raw):
        left = block - position % block
        if left < 7:  # a block's tail too short for a header is padding
            position += left
            continue
        _, length, kind = struct.unpack("<IHB", raw[position : position + 7])
        chunk, position = raw[position + 7 : position + 7 + length], position + 7 + length
        if kind in (1, 4):  # full, or last piece
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending + chunk)
            pending = b""
            yield record
        elif kind in (2, 3):  # first or middle piece
            pending += chunk


def test_a_sweep_run_logs_offline_without_an_account(teacher_in_place: Path, tmp_path: Path) -> None:
    sweep = yaml.safe_load((CONFIGS / "sweeps/kd.yaml").read_text())
    command = agent_command(sweep, {"model.init_args.temperature": 2.0, "model.init_args.kd_weight": 0.8})
    command[command.index("-c") + 1] = str(REPO / command[command.index("-c") + 1])
    mmkd = str(Path(sys.executable).parent / "mmkd")
    env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_")} | {"HOME": str(tmp_path / "home")}  # no key, no netrc
    env |= {"WANDB_SWEEP_ID": "sweep1", "WANDB_RUN_ID": "trial1"}  # what `wandb agent` sets for each trial
    assert '"log_model": true' in " ".join(sweep["command"])  # the checkpoints as artifacts, offline too
    done = subprocess.run([mmkd, *command[2:], *SHORT], capture_output=True, text=True, timeout=600, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    assert list(Path("runs/students").rglob("last.ckpt")) == [Path("runs/students/fmnist_kd/trial1/last.ckpt")]
    assert done.stderr.count("W&B logs offline: no W&B API key") == 1
    [run_file] = Path("runs/wandb/wandb").glob("offline-run-*/run-*.wandb")
    history, config, artifacts = set(), {}, []

    def name(item) -> str:  # W&B writes a "/" in a key as a nested key
        return item.key or "/".join(item.nested_key)

    for record in wandb_records(run_file):
        kind = record.WhichOneof("record_type")
        if kind == "history":
            history |= {name(item) for item in record.history.item}
        elif kind == "config":
            config |= {name(item): yaml.safe_load(item.value_json) for item in record.config.update}
        elif kind == "artifact":
            artifacts.append(record.artifact)
    assert sweep["metric"]["name"] in history  # the metric the sweep optimises is really logged
    assert {"train/loss_kd_epoch", "train/loss_ce_epoch", "val/teacher_acc"} <= history
    assert config["model"]["init_args"]["temperature"] == 2.0  # the resolved config, with the sampled values
    checkpoints = {base64.b64encode(hashlib.md5(p.read_bytes()).digest()).decode() for p in Path("runs").rglob("*.ckpt")}
    assert {"best", "latest"} <= {alias for artifact in artifacts for alias in artifact.aliases}
    for artifact in artifacts:  # the best and the last checkpoint
        [entry] = artifact.manifest.contents
        assert artifact.type == "model" and entry.path == "model.ckpt"
        assert entry.digest in checkpoints  # W&B's md5 of a checkpoint this run wrote
        staged = torch.load(entry.local_path, map_location="cpu", weights_only=True)  # what `wandb sync` uploads
        assert any(key.startswith("model.") for key in staged["state_dict"])  # the student
        assert not any(key.startswith("teacher.") for key in staged["state_dict"])


def test_each_sweep_trial_checkpoints_into_its_own_folder(teacher_in_place: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    folders = []
    for trial in ("a1b2c3", "d4e5f6", None):
        for key, value in (("WANDB_SWEEP_ID", trial and "sweep1"), ("WANDB_RUN_ID", trial)):
            monkeypatch.setenv(key, value) if value else monkeypatch.delenv(key, raising=False)
        cli = lightning_cli(["-c", str(CONFIGS / "kd/fmnist_kd.yaml")], run=False)
        folders.append(Path(cli.trainer.checkpoint_callback.dirpath).relative_to(Path.cwd()))
    assert folders == [Path("runs/students/fmnist_kd/a1b2c3"), Path("runs/students/fmnist_kd/d4e5f6"), Path("runs/students/fmnist_kd")]
