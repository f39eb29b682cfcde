"""The frozen teacher and weight loading from files."""

from __future__ import annotations

import copy
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


def _with_running_statistics(model: torch.nn.Module) -> torch.nn.Module:
    """Trained-looking BatchNorms (fresh ones are identities), so a wrong fold cannot pass."""
    generator = torch.Generator().manual_seed(0)
    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            n = module.num_features
            module.running_mean.copy_(torch.randn(n, generator=generator) * 0.5)
            module.running_var.copy_(torch.rand(n, generator=generator) + 0.5)
            module.weight.data.copy_(torch.rand(n, generator=generator) + 0.5)
            module.bias.data.copy_(torch.randn(n, generator=generator) * 0.2)
    return model.eval()


@pytest.mark.parametrize("library", ["torchvision", "timm"])
def test_the_teachers_batchnorms_are_folded_into_its_convolutions_on_the_first_batch(library: str) -> None:
    import timm
    import torchvision

    model = torchvision.models.resnet18(num_classes=10) if library == "torchvision" else timm.create_model("resnet18", num_classes=10)
    model = _with_running_statistics(model)
    unfolded = copy.deepcopy(model)
    bn, conv = unfolded.layer1[0].bn1, unfolded.layer1[0].conv1
    teacher = Teacher(model)
    x = torch.randn(4, 3, 64, 64)
    out = teacher(x)
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in teacher.model.modules())  # every BN follows a conv
    expected = unfolded(x)
    assert (out - expected).abs().max() <= 1e-5 * expected.abs().max()
    # the definition: BN(conv(x)) = gamma (conv(x) - mean) / sqrt(var + eps) + beta, one affine map per channel
    scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
    folded = teacher.model.layer1[0].conv1
    torch.testing.assert_close(folded.weight, conv.weight * scale[:, None, None, None])
    torch.testing.assert_close(folded.bias, bn.bias - bn.running_mean * scale)
    torch.testing.assert_close(teacher(x), out)  # later batches run the folded model
    assert len([m for m in Teacher(copy.deepcopy(unfolded), fold_batchnorm=False).model.modules() if isinstance(m, torch.nn.BatchNorm2d)]) == 20


def test_timms_batchnorm_with_activation_is_folded_and_keeps_its_activation() -> None:
    import timm

    model = _with_running_statistics(timm.create_model("efficientnet_b0", num_classes=10))
    unfolded = copy.deepcopy(model)
    teacher = Teacher(model)
    x = torch.randn(2, 3, 64, 64)
    out = teacher(x)
    expected = unfolded(x)
    assert (out - expected).abs().max() <= 1e-5 * expected.abs().max()
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in teacher.model.modules())
    assert isinstance(teacher.model.bn1, torch.nn.Sequential) and isinstance(teacher.model.bn1[1], torch.nn.SiLU)


class _PreActivation(torch.nn.Module):
    """bn(x + conv(x)): the BatchNorm reads a sum, not the convolution's output."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(4, 4, 3, padding=1)
        self.bn = torch.nn.BatchNorm2d(4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(x + self.conv(x))


class _SharedOutput(torch.nn.Module):
    """The convolution's output feeds its BatchNorm and a residual sum: folding would change the sum."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(4, 4, 3, padding=1)
        self.bn = torch.nn.BatchNorm2d(4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)
        return self.bn(y) + y


def test_batchnorms_that_do_not_read_a_convolution_alone_are_left_as_they_are() -> None:
    x = torch.randn(2, 4, 8, 8)
    pre = _with_running_statistics(_PreActivation())
    expected = copy.deepcopy(pre)(x)
    teacher = Teacher(pre)
    torch.testing.assert_close(teacher(x), expected)
    assert isinstance(teacher.model.bn, torch.nn.BatchNorm2d)

    shared = _with_running_statistics(_SharedOutput())
    weight, bias = shared.conv.weight.clone(), shared.conv.bias.clone()
    expected = copy.deepcopy(shared)(x)
    teacher = Teacher(shared)
    with pytest.warns(UserWarning, match="changed its outputs.*fold_batchnorm=false"):
        out = teacher(x)
    torch.testing.assert_close(out, expected)
    assert isinstance(teacher.model.bn, torch.nn.BatchNorm2d)
    assert torch.equal(teacher.model.conv.weight, weight) and torch.equal(teacher.model.conv.bias, bias)


def test_a_tapped_convolution_keeps_its_batchnorm_and_its_features() -> None:
    import torchvision

    from mmkd.core.taps import FeatureTap

    model = _with_running_statistics(torchvision.models.resnet18(num_classes=10))
    unfolded = copy.deepcopy(model)
    teacher = Teacher(model)
    tap = FeatureTap(teacher.model, ["layer2.0.conv1"])
    x = torch.randn(2, 3, 64, 64)
    teacher(x)
    assert isinstance(teacher.model.layer2[0].bn1, torch.nn.BatchNorm2d)
    assert isinstance(teacher.model.layer2[0].bn2, torch.nn.Identity)  # the rest is folded
    reference = FeatureTap(unfolded, ["layer2.0.conv1"])
    unfolded(x)
    torch.testing.assert_close(tap.pop()["layer2.0.conv1"], reference.pop()["layer2.0.conv1"])
