"""D-FINE end to end on composed Fashion-MNIST scenes: the recipe and its ablation rows through
the CLI, and a detector that overfits a few real images towards mAP 1."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from torchmetrics.detection import MeanAveragePrecision

from conftest import CONFIGS, REPO, SHORT

sys.path.insert(0, str(REPO / "tools"))
import compose_detection  # noqa: E402

from mmkd.data.detection import CocoDetection, detection_predictions, detection_targets  # noqa: E402
from mmkd.distillers.dfine import DFine  # noqa: E402
from mmkd.models.detr import DFineDetector  # noqa: E402

DFINE_RECIPES = {"dfine/fmnist_det.yaml", "dfine/fmnist_det_small.yaml"}
ABLATION = {
    "baseline": ["--model.init_args.model.init_args.box_head=direct", "--model.init_args.go_lsd=false"],
    "fdr": ["--model.init_args.go_lsd=false"],
    "fdr_golsd": [],
}


@pytest.fixture(scope="module")
def scenes(tmp_path_factory: pytest.TempPathFactory, data_root: Path) -> Path:
    return compose_detection.compose(tmp_path_factory.mktemp("det") / "fmnist-det", data_root / "fashion-mnist", {"train": 16, "val": 4, "test": 4})


@pytest.mark.parametrize("variant", sorted(ABLATION))
def test_the_recipe_and_its_ablation_rows_train_and_report_coco_map(scenes: Path, variant: str) -> None:
    from mmkd.cli import lightning_cli

    cli = lightning_cli(["fit", "-c", str(CONFIGS / "dfine/fmnist_det.yaml"), *SHORT, f"--data.init_args.root={scenes}",
                         "--data.init_args.batch_size=4", "--model.init_args.model.init_args.backbone=resnet10t", *ABLATION[variant]])  # fmt: skip
    logged = cli.trainer.callback_metrics
    assert {"train/loss_vfl", "train/loss_bbox", "train/loss_giou", "val/map", "val/map_50"} <= set(logged)
    assert ("train/loss_fgl" in logged) == (variant != "baseline")
    assert ("train/loss_ddf" in logged) == (variant == "fdr_golsd")
    [result] = cli.trainer.test(cli.model, datamodule=cli.datamodule, verbose=False)
    assert 0 <= result["test/map"] <= 1


def test_the_cpu_scale_recipe_of_the_readme_table_trains(scenes: Path) -> None:
    from mmkd.cli import lightning_cli

    cli = lightning_cli(["fit", "-c", str(CONFIGS / "dfine/fmnist_det_small.yaml"), *SHORT, f"--data.init_args.root={scenes}",
                         "--data.init_args.batch_size=4"])  # fmt: skip
    assert {"train/loss_fgl", "train/loss_ddf", "val/map"} <= set(cli.trainer.callback_metrics)
    # the zoo's fmnist-det-dfine (trained without denoising) and the denoising queries' class embedding (10 classes + padding)
    assert sum(p.numel() for p in cli.model.model.parameters()) == 3_118_737 + 11 * 64


def test_go_lsd_needs_the_distribution_head() -> None:
    with pytest.raises(ValueError, match="go_lsd distils edge distributions"):
        DFine(DFineDetector(10, backbone="resnet10t", hidden_dim=32, num_queries=10, box_head="direct"), 10, go_lsd=True)


@pytest.mark.slow
def test_fdr_and_go_lsd_overfit_a_few_real_scenes_towards_map_1(scenes: Path) -> None:
    torch.manual_seed(0)
    batch = CocoDetection(scenes / "train", image_size=64).__getitems__(list(range(8)))
    model = DFineDetector(10, hidden_dim=64, num_queries=30, num_decoder_layers=3, ffn_dim=128, num_denoising=30)  # CDN, fewer groups
    module = DFine(model, 10, go_lsd=True)
    optimizer = torch.optim.AdamW(module.parameters(), 1e-3, weight_decay=1e-4)

    def mean_ap() -> float:
        model.eval()
        with torch.no_grad():
            outputs = model(batch["image"])
        metric = MeanAveragePrecision(box_format="xyxy", iou_type="bbox", backend="pycocotools")
        sizes = torch.stack([target["orig_size"] for target in batch["targets"]])
        metric.update(detection_predictions(outputs["pred_logits"], outputs["pred_boxes"], sizes), detection_targets(batch["targets"]))
        model.train()
        return float(metric.compute()["map"])

    before = mean_ap()
    for _ in range(130):
        losses = module.losses(batch)
        optimizer.zero_grad()
        sum(losses.values()).backward()
        torch.nn.utils.clip_grad_norm_(module.parameters(), 0.1)
        optimizer.step()
    assert losses["ddf"] > 0 and losses["fgl"] > 0  # the self-distillation ran
    assert before < 0.05 and mean_ap() > 0.8
