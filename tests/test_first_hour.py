"""The first hour of a user with a pretrained teacher (issue 23): a teacher of another input
format wired from the config (``teacher_input``), setup mistakes that end in one line, no
Lightning warning about the frozen teacher, no empty log folders from failed runs."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import timm
import torch
import torch.nn.functional as F
import yaml
from timm.data import resolve_data_config

from mmkd.cli import lightning_cli, main
from mmkd.core.classifier import DataMismatchError
from mmkd.distillers import KD
from mmkd.models.adapter import teacher_input_adapter

from conftest import CONFIGS, REPO, SHORT, one_error

FMNIST_MEAN, FMNIST_STD = 0.2860, 0.3530


def rgb_teacher() -> torch.nn.Module:
    return timm.create_model("resnet10t", num_classes=10, in_chans=3)


def test_teacher_input_repeats_grey_resizes_and_renormalises() -> None:
    grey = torch.randn(2, 1, 28, 28)
    pixels = grey * FMNIST_STD + FMNIST_MEAN  # what the data's normalisation undoes
    # {channels: 3, size: 32}: only those change; the normalisation stays the data's
    adapter = teacher_input_adapter({"channels": 3, "size": 32}, rgb_teacher(), _Stats())
    expected = (F.interpolate(pixels.repeat(1, 3, 1, 1), size=(32, 32), mode="bilinear", antialias=True) - FMNIST_MEAN) / FMNIST_STD
    torch.testing.assert_close(adapter(grey), expected, rtol=1e-5, atol=1e-5)
    # pretrained: the size, interpolation and normalisation of timm's pretrained config
    teacher = rgb_teacher()
    config = resolve_data_config(model=teacher)
    adapter = teacher_input_adapter("pretrained", teacher, _Stats())
    size = tuple(config["input_size"][1:])
    mean, std = torch.tensor(config["mean"]).view(1, 3, 1, 1), torch.tensor(config["std"]).view(1, 3, 1, 1)
    resized = F.interpolate(pixels.expand(-1, 3, -1, -1), size=size, mode=config["interpolation"], antialias=True)
    torch.testing.assert_close(adapter(grey), (resized - mean) / std, rtol=1e-5, atol=1e-5)
    assert adapter(grey).shape == (2, 3, *size)


class _Stats:
    mean, std = FMNIST_MEAN, FMNIST_STD


def test_teacher_input_errors_name_the_fix() -> None:
    with pytest.raises(ValueError, match=r"unknown keys \['chans'\]"):
        teacher_input_adapter({"chans": 3}, rgb_teacher(), _Stats())
    with pytest.raises(ValueError, match="add input_mean and input_std"):
        teacher_input_adapter({"channels": 3}, rgb_teacher(), object())
    with pytest.raises(ValueError, match="declares no pretrained config"):
        teacher_input_adapter("pretrained", torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3)), _Stats())


def kd_config(tmp_path: Path, **init_args) -> Path:
    """configs/kd/fmnist_kd.yaml with a 3-channel timm teacher loaded from a local file."""
    torch.save(rgb_teacher().state_dict(), tmp_path / "rgb_teacher.pth")
    config = yaml.safe_load((CONFIGS / "kd/fmnist_kd.yaml").read_text())
    model = config["model"]["init_args"]
    model["student"] = str(CONFIGS / "models/fmnist_student.yaml")
    model["teacher"]["init_args"] = {
        "model": {"class_path": "mmkd.models.timm_model", "init_args": {"name": "resnet10t", "num_classes": 10, "in_chans": 3}},
        "checkpoint": str(tmp_path / "rgb_teacher.pth"),
    }
    model.update(init_args)
    path = tmp_path / "kd_rgb_teacher.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def test_rgb_teacher_on_grey_images_from_the_config(tmp_path: Path, data_root: Path, capsys: pytest.CaptureFixture) -> None:
    config = kd_config(tmp_path)
    # without teacher_input: one line naming the option, and no log folder left behind
    error = one_error(capsys, ["fit", "-c", str(config), *SHORT])
    assert "the teacher (ResNet) cannot take the data's inputs {'image': [1, 28, 28]}" in error and "teacher_input" in error
    assert not list(Path("runs/logs").rglob("version_*"))
    # with it: the teacher sees 3-channel 28 px batches, and the frozen teacher raises no eval-mode warning
    seen: list[tuple[int, ...]] = []
    cli = lightning_cli(["-c", str(config), "--model.init_args.teacher_input={channels: 3}", *SHORT], run=False)
    cli.model.teacher.model.register_forward_pre_hook(lambda module, args: seen.append(tuple(args[0].shape[1:])))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    assert seen and set(seen) == {(3, 28, 28)}
    assert not [w for w in caught if "in eval mode" in str(w.message)], [str(w.message) for w in caught]
    assert (Path(cli.trainer.logger.log_dir) / "metrics.csv").is_file()


def test_eval_mode_warning_is_kept_for_modules_outside_the_teacher() -> None:
    student = timm.create_model("resnet10t", num_classes=10, in_chans=1)
    module = KD(student, rgb_teacher(), input_size=[1, 28, 28], teacher_input={"channels": 3, "input_mean": 0.5, "input_std": 0.5})
    filters = list(warnings.filters)
    student.bn1.eval()  # a student module frozen by mistake: Lightning's warning must stay
    module.on_fit_start()
    assert warnings.filters == filters
    student.train()
    module.on_fit_start()  # only the teacher in eval mode: silenced until the check has run
    assert len(warnings.filters) == len(filters) + 1
    module.on_train_start()
    assert warnings.filters == filters


def test_unknown_input_shape_names_input_size() -> None:
    module = KD(timm.create_model("resnet10t", num_classes=10, in_chans=1), timm.create_model("resnet10t", num_classes=10, in_chans=1))
    with pytest.raises(DataMismatchError, match=r"set model.init_args.input_size .* e.g. \[3, 224, 224\]"):
        module.example_batch()


def test_inspect_takes_the_channels_from_input_size(capsys: pytest.CaptureFixture) -> None:
    main(["inspect", "resnet10t", "--input-size", "3", "32", "32"])
    stem = next(line for line in capsys.readouterr().out.splitlines() if "conv1.0 " in line)
    assert "[1, 24, 16, 16]" in stem and "648" in stem  # 24 filters of 3 x 3 x 3: three input channels
    with pytest.raises(SystemExit):
        main(["inspect", "resnet10t", "--input-size", "3", "32", "32", "--in-chans", "1"])
    assert "has 3 channels but --in-chans is 1" in capsys.readouterr().err


def test_package_metadata_declares_ranges_whose_lower_bounds_are_the_tested_pins() -> None:
    """pyproject.toml declares ranges (mmkd installs beside other packages); constraints.txt pins
    what CI tests. Each range's lower bound is its pin, so CI's run is the lowest-versions run."""
    import tomllib

    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    requirements = [Requirement(line) for line in project["dependencies"] + project["optional-dependencies"]["dev"]]
    pins = {}
    for line in (REPO / "constraints.txt").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            name, version = line.split("==")
            pins[canonicalize_name(name)] = version.strip()
    for requirement in requirements:
        specifiers = {spec.operator: spec.version for spec in requirement.specifier}
        assert set(specifiers) == {">=", "<"}, f"{requirement}: declare a range >=tested,<next-major"
        pin = pins[canonicalize_name(requirement.name)]
        assert specifiers[">="] == pin and requirement.specifier.contains(pin), f"{requirement} vs constraints.txt {pin}"


class _Twice(torch.nn.Module):
    """A block run twice per forward (weights shared), between two other layers."""

    def __init__(self) -> None:
        super().__init__()
        self.stem, self.block, self.head = torch.nn.Linear(4, 6), torch.nn.Linear(6, 6), torch.nn.Linear(6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.block(torch.relu(self.block(self.stem(x)))))


def test_taps_on_inputs_and_on_repeated_calls() -> None:
    from mmkd.core.taps import FeatureTap

    model, x = _Twice(), torch.randn(5, 4)
    tap = FeatureTap(model, ["head:input", "block@0", "block", "block:input@1", "stem"])
    model(x)
    taps = tap.pop()
    first = model.block(model.stem(x))  # the definition, computed again by hand
    second = model.block(torch.relu(first))
    torch.testing.assert_close(taps["block@0"], first)
    torch.testing.assert_close(taps["block"], second)  # the default: the last call
    torch.testing.assert_close(taps["head:input"], second)
    torch.testing.assert_close(taps["block:input@1"], torch.relu(first))
    torch.testing.assert_close(taps["stem"], model.stem(x))
    # gradients reach the module through a tapped input
    taps["head:input"].sum().backward()
    assert model.block.weight.grad is not None
    bad = FeatureTap(model, ["block@2"])
    model(x)
    with pytest.raises(RuntimeError, match=r"ran 2 time\(s\) in the last forward pass; choose @0..@1"):
        bad.pop()
    with pytest.raises(ValueError, match="the only suffix is ':input'"):
        FeatureTap(model, ["block:output"])
    with pytest.raises(ValueError, match="after '@' comes the call's index"):
        FeatureTap(model, ["block@last"])


def test_fitnets_on_a_heads_input_through_the_config_path_syntax() -> None:
    """A FitNets hint on the pooled features the classifiers see (``fc:input``) of two timm CNNs."""
    from mmkd.distillers import FitNets

    student = timm.create_model("resnet10t", num_classes=10, in_chans=1, channels=[16, 32, 64, 128], stem_width=8)
    teacher = timm.create_model("resnet18", num_classes=10, in_chans=1)
    module = FitNets(student, teacher, student_layer="fc:input", teacher_layer="fc:input", head="linear", input_size=[1, 28, 28])
    module.setup("fit")
    assert module.feature_shapes["student"]["fc:input"] == [128] and module.feature_shapes["teacher"]["fc:input"] == [512]
    losses = module.distillation_losses({"image": torch.randn(4, 1, 28, 28), "label": torch.arange(4)})
    losses["hint"].backward()
    assert torch.isfinite(losses["hint"]) and student.layer4[0].conv1.weight.grad is not None
