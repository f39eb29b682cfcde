"""The frozen teacher and weight loading from files."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from mmkd.core import Teacher, load_state_dict_file, sha256_file
from mmkd.core.checkpoint import checkpoint_sha256
from mmkd.models import timm_model


def make_model():
    return timm_model("resnet10t", model_args={"channels": [8, 16, 32, 64], "stem_width": 8})


def test_teacher_is_frozen_eval_and_no_grad() -> None:
    teacher = Teacher(make_model())
    assert all(not p.requires_grad for p in teacher.parameters())
    teacher.train()
    assert not teacher.training and not teacher.model.training
    assert all(not m.training for m in teacher.modules())
    x = torch.randn(2, 1, 28, 28, requires_grad=True)
    out = teacher(x)
    assert not out.requires_grad


def test_teacher_bf16_returns_float32() -> None:
    teacher = Teacher(make_model(), bf16=True)
    out = teacher(torch.randn(2, 1, 28, 28))
    assert out.dtype == torch.float32
    reference = Teacher(teacher.model)(torch.randn(2, 1, 28, 28))
    assert reference.shape == out.shape


def test_teacher_loads_safetensors_and_records_sha256(tmp_path: Path) -> None:
    source = make_model()
    path = tmp_path / "teacher.safetensors"
    save_file({k: v.contiguous() for k, v in source.state_dict().items()}, str(path))
    teacher = Teacher(make_model(), checkpoint=str(path))
    for key, value in source.state_dict().items():
        assert torch.equal(teacher.model.state_dict()[key], value)
    reference = teacher.reference()
    assert reference["checkpoint_sha256"] == sha256_file(path)
    assert len(reference["weights_sha256"]) == 64


def test_checkpoint_fingerprint_of_a_folder_covers_every_shard(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    folder = tmp_path / "last.ckpt"  # an FSDP2 checkpoint is a folder of shards
    folder.mkdir()
    for name, content in {".metadata": b"meta", "__0_0.distcp": b"rank0", "__1_0.distcp": b"rank1"}.items():
        (folder / name).write_bytes(content)
    monkeypatch.setenv("HOME", str(tmp_path))
    before = checkpoint_sha256(folder)
    assert checkpoint_sha256("~/last.ckpt") == before and len(before) == 64
    (folder / "__1_0.distcp").write_bytes(b"rank1, other weights")
    assert checkpoint_sha256(folder) != before


def test_weights_saved_under_a_prefix_are_named_in_the_error(tmp_path: Path) -> None:
    source = make_model().state_dict()
    path = tmp_path / "ddp.pt"  # the state dict of a DDP-wrapped model: DDP's module. is stripped
    torch.save({f"module.{k}": v for k, v in source.items()}, path)
    assert all(torch.equal(Teacher(make_model(), checkpoint=str(path)).model.state_dict()[k], v) for k, v in source.items())
    path = tmp_path / "wrapped.pt"  # under another wrapper's prefix: named, with the fix
    torch.save({f"student.{k}": v for k, v in source.items()}, path)
    with pytest.raises(RuntimeError, match="do not fit ResNet: missing keys: .*with the prefix 'student.' in front: load them with checkpoint_prefix"):
        Teacher(make_model(), checkpoint=str(path))


def test_lightning_checkpoint_prefix_is_stripped(tmp_path: Path) -> None:
    source = make_model()
    path = tmp_path / "last.ckpt"
    torch.save({"state_dict": {f"model.{k}": v for k, v in source.state_dict().items()}, "epoch": 3}, path)
    state = load_state_dict_file(path)
    assert set(state) == set(source.state_dict())


def test_missing_teacher_weights_say_what_to_do(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="teacher weights not found.*mmkd fit -c configs/teachers"):
        Teacher(make_model(), checkpoint=str(tmp_path / "nope.ckpt"))


def test_corrupt_checkpoint_is_named(tmp_path: Path) -> None:
    source = make_model()
    path = tmp_path / "teacher.safetensors"
    save_file({k: v.contiguous() for k, v in source.state_dict().items()}, str(path))
    path.write_bytes(path.read_bytes()[:1000])  # an interrupted copy
    with pytest.raises(RuntimeError, match="teacher.safetensors.*corrupt"):
        Teacher(make_model(), checkpoint=str(path))


def test_checkpoint_of_another_architecture_names_keys(tmp_path: Path) -> None:
    wider = timm_model("resnet10t", model_args={"channels": [16, 32, 64, 128], "stem_width": 8})
    path = tmp_path / "wide.pt"
    torch.save(wider.state_dict(), path)
    with pytest.raises(RuntimeError, match=r"shape mismatches: .*file \[.*\] vs model"):
        Teacher(make_model(), checkpoint=str(path))
