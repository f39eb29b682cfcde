"""`mmkd export`: students to ONNX, run with onnxruntime against PyTorch; DHO's head mix and
G2SD's mean of heads (the zoo's G2SD student's too) inside the exported graph; a detector's two
outputs."""

from __future__ import annotations

import sys
from pathlib import Path

import onnxruntime
import pytest
import torch
from timm.models.vision_transformer import VisionTransformer

from mmkd import zoo
from mmkd.cli import lightning_cli, main
from mmkd.distillers import DualHeadStudent
from mmkd.distillers.dho import mix_log_probs
from mmkd.export import export_onnx, onnx_max_difference
from mmkd.models import DistilledViT, timm_model

from conftest import CONFIGS, REPO, SHORT  # noqa: E402

sys.path.insert(0, str(REPO / "tools"))
import compose_detection  # noqa: E402


def run_onnx(path: Path, images: torch.Tensor) -> torch.Tensor:
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return torch.from_numpy(session.run(None, {"image": images.numpy()})[0])


def test_export_command_writes_a_student_that_onnxruntime_runs_like_pytorch(data_root: Path, capsys: pytest.CaptureFixture) -> None:
    config = str(CONFIGS / "kd/fmnist_student_alone.yaml")
    lightning_cli(["fit", "-c", config, *SHORT, "--trainer.callbacks.init_args.dirpath=student"])
    main(["export", "-c", config, "--ckpt_path", "student/last.ckpt", "--out", "student.onnx"])
    assert "max |diff|" in capsys.readouterr().out
    cli = lightning_cli(["test", "-c", config, *SHORT, "--ckpt_path=student/last.ckpt"])  # the same weights in PyTorch
    cli.datamodule.setup("test")
    images = next(iter(cli.datamodule.test_dataloader()))["image"][:50]
    with torch.no_grad():
        expected = cli.model.model.eval()(images)
    torch.testing.assert_close(run_onnx(Path("student.onnx"), images), expected, rtol=1e-4, atol=1e-4)
    with pytest.raises(SystemExit) as exit_:
        main(["export", "-c", config, "--ckpt_path", "missing.ckpt"])
    assert exit_.value.code == 2 and "checkpoint not found: missing.ckpt" in capsys.readouterr().err
    written = Path("student.onnx").stat().st_mtime_ns
    with pytest.raises(SystemExit) as exit_:  # no tolerance: the check fails, the checked file stays
        main(["export", "-c", config, "--ckpt_path", "student/last.ckpt", "--out", "student.onnx", "--atol", "-1"])
    assert exit_.value.code == 1 and "student.onnx was not written" in capsys.readouterr().err
    assert Path("student.onnx").stat().st_mtime_ns == written and sorted(p.name for p in Path(".").glob("*.onnx*")) == ["student.onnx"]


def test_export_refuses_a_model_that_is_not_a_predictor(data_root: Path, capsys: pytest.CaptureFixture) -> None:
    config = str(CONFIGS / "g2sd/mae_pretrain.yaml")  # an MAE returns its reconstruction and mask
    lightning_cli(["fit", "-c", config, *SHORT, "--trainer.callbacks.init_args.dirpath=mae"])
    with pytest.raises(SystemExit) as exit_:
        main(["export", "-c", config, "--ckpt_path", "mae/last.ckpt", "--out", "mae.onnx"])
    assert exit_.value.code == 2 and "MaskedAutoencoder returns MAEOutput, not a tensor or a dict of tensors" in capsys.readouterr().err
    assert not list(Path(".").glob("*onnx*"))


def test_export_of_a_zoo_student_takes_its_own_input(data_root: Path, capsys: pytest.CaptureFixture) -> None:
    main(["export", "--zoo", "avmnist-audiocnn-mst", "--out", "audio.onnx"])  # checked on an AV-MNIST validation batch
    assert "max |diff|" in capsys.readouterr().out
    assert [i.name for i in onnxruntime.InferenceSession("audio.onnx").get_inputs()] == ["audio"]
    with pytest.raises(SystemExit) as exit_:
        main(["export", "--zoo", "fmnist-resnet10t", "--out", "x.onnx"])
    assert exit_.value.code == 2 and "no zoo model named 'fmnist-resnet10t'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["export", "--zoo", "fmnist-resnet10t-kd", "-c", str(CONFIGS / "kd/fmnist_kd.yaml")])


def test_export_of_the_zoo_g2sd_student_averages_its_heads(data_root: Path, capsys: pytest.CaptureFixture) -> None:
    main(["export", "--zoo", "fmnist-vit-g2sd", "--data-root", str(data_root), "--out", "vit.onnx"])
    assert "max |diff|" in capsys.readouterr().out
    data = zoo.evaluation_data("fmnist-vit-g2sd", root=str(data_root))
    data.setup("test")
    images = next(iter(data.test_dataloader()))["image"][:64]
    with torch.no_grad():
        cls_logits, dist_logits = zoo.load("fmnist-vit-g2sd").forward_heads(images)
    torch.testing.assert_close(run_onnx(Path("vit.onnx"), images), (cls_logits + dist_logits) / 2, rtol=1e-4, atol=1e-4)


def test_export_of_the_zoo_detector_has_one_output_per_prediction(data_root: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    # its evaluation data is composed scenes: a few validation scenes, in a folder given by --data-root
    scenes = compose_detection.compose(tmp_path / "scenes", data_root / "fashion-mnist", {"val": 8})
    main(["export", "--zoo", "fmnist-det-dfine", "--data-root", str(scenes), "--out", "detector.onnx"])  # checked against PyTorch there
    assert "max |diff|" in capsys.readouterr().out
    session = onnxruntime.InferenceSession("detector.onnx", providers=["CPUExecutionProvider"])
    assert [o.name for o in session.get_outputs()] == ["pred_logits", "pred_boxes"]


def test_dho_mix_is_in_the_exported_graph() -> None:
    torch.manual_seed(0)
    backbone = timm_model("resnet10t", num_classes=0, in_chans=1, model_args={"channels": [4, 8, 16, 32], "stem_width": 4})
    student = DualHeadStudent(backbone, 10, alpha=0.2, beta=2.0).eval()
    images = torch.randn(5, 1, 28, 28)
    export_onnx(student, images[:2], "dho.onnx")
    with torch.no_grad():
        ce_logits, kd_logits = student.forward_heads(images)
    exported = run_onnx(Path("dho.onnx"), images)  # another batch size than at export
    torch.testing.assert_close(exported, mix_log_probs(ce_logits, kd_logits, 0.2, 2.0), rtol=1e-4, atol=1e-5)
    assert not torch.allclose(exported, mix_log_probs(ce_logits, kd_logits, 0.5, 0.5), atol=1e-3)


def test_g2sd_mean_of_heads_is_in_the_exported_graph() -> None:
    torch.manual_seed(0)
    encoder = VisionTransformer(img_size=28, patch_size=7, in_chans=1, num_classes=10, embed_dim=32, depth=2, num_heads=2)
    student = DistilledViT(encoder).eval()
    images = torch.randn(3, 1, 28, 28)
    export_onnx(student, images, "vit.onnx")
    with torch.no_grad():
        cls_logits, dist_logits = student.forward_heads(images)
    torch.testing.assert_close(run_onnx(Path("vit.onnx"), images), (cls_logits + dist_logits) / 2, rtol=1e-4, atol=1e-5)
    assert onnx_max_difference(student, "vit.onnx", [images, images[:1]]) < 1e-4
