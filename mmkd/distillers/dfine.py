"""D-FINE (Peng et al., ICLR 2025): a DETR whose last decoder layer teaches its shallower layers.

FDR (``box_head="fdr"`` of :class:`~mmkd.models.detr.DFineDetector`) predicts every box edge as a
distribution over the 33 bins of W(n) and refines the same layer-0 box layer after layer;
FGL trains those distributions. GO-LSD (``go_lsd=True``) adds the self-distillation: the DDF loss
(KL at T = 5) from the final layer's edge distributions to every shallower layer over all
queries, with the localisation losses on the union of every layer's Hungarian matching
(:class:`~mmkd.losses.detection.DFINECriterion` holds the formulas).

The paper's ablation is three configs of this one module: the direct L1/GIoU box regression
(``box_head="direct"``, ``go_lsd=False``), ``+FDR`` (``box_head="fdr"``, ``go_lsd=False``) and
``+FDR+GO-LSD`` (both on, the default).

The detector trains with contrastive denoising queries (CDN, ``num_denoising`` of the detector,
on by default as in the official configs), which get the same losses on their known matching.

Differences from the official training recipe: no EMA and no two-stage augmentation schedule (see
the README); the criterion runs in fp32 as the official code does under AMP.
"""

from __future__ import annotations

import math
from collections import defaultdict
from typing import Any

import torch
from torch import nn
from torchmetrics.detection import MeanAveragePrecision

from mmkd.core.classifier import TrainingModule
from mmkd.core.teacher import to_float
from mmkd.data.detection import detection_predictions, detection_targets
from mmkd.losses.detection import DFINECriterion

MAP_KEYS = ("map", "map_50", "map_75", "map_small", "map_medium", "map_large")


@torch.no_grad()
def corner_entropy(outputs: dict[str, Any]) -> dict[str, torch.Tensor]:
    """How sharp FDR's edge distributions are: per decoder layer (0 first, the last is the GO-LSD
    teacher) the mean entropy over all queries and edges, divided by ``log(bins)`` (1: uniform, 0: one bin),
    as ``train/corner_entropy_<layer>``."""
    layers = [out.get("pred_corners") for out in outputs.get("aux_outputs") or []] + [outputs["pred_corners"]]
    entropies = {}
    for i, corners in enumerate(layers):
        if corners is not None:
            bins = corners.shape[-1] // 4
            probs = corners.detach().float().reshape(-1, bins).softmax(-1)
            entropies[f"train/corner_entropy_{i}"] = -(probs * probs.clamp_min(1e-12).log()).sum(-1).mean() / math.log(bins)
    return entropies


class DFine(TrainingModule):
    """Trains a :class:`~mmkd.models.detr.DFineDetector` with the D-FINE criterion and evaluates
    COCO mAP.

    Batches are ``{"image": [B, 3, H, W], "targets": [{"labels", "boxes" (cxcywh, normalised),
    "orig_size"}, ...]}`` (:class:`~mmkd.data.detection.CocoDetectionDataModule`).

    ``model`` may also be a detector that returns the official D-FINE layout (``enc_aux_outputs`` and
    ``enc_meta`` instead of ``enc_outputs``, plus ``up`` and ``reg_scale``): the criterion reads both layouts
    (:meth:`~mmkd.losses.detection.DFINECriterion.canonical_outputs`) and refuses outputs it has no losses for.

    Logged: ``train/loss_{vfl,bbox,giou,fgl,ddf}`` (each summed over the decoder layers, the pre
    head and the encoder proposals, weights applied), ``train/loss``; ``val/map``, ``val/map_50``,
    ``val/map_75``, ``val/map_small``, ``val/map_medium``, ``val/map_large`` (torchmetrics'
    ``MeanAveragePrecision``, pycocotools backend) and the same under ``test/``.

    Args:
        model: the detector.
        num_classes: object classes (no background class).
        go_lsd: GO-LSD self-distillation: DDF from the last layer to the others, and the
            localisation losses on the union matching. Needs ``box_head="fdr"``.
        weights: loss weights (official: vfl 1, bbox 5, giou 2, fgl 0.15, ddf 1.5).
        ddf_temperature: T of the DDF's KL (official 5).
        max_detections: detections kept per image for the mAP (top-k over queries x classes).
        **kwargs: optimisation keys of :class:`~mmkd.core.classifier.TrainingModule`.
    """

    input_key = "image"  # the detector's input in a batch (export and the zoo read it)

    def __init__(
        self,
        model: nn.Module,
        num_classes: int,
        go_lsd: bool = True,
        weights: dict[str, float] | None = None,
        ddf_temperature: float = 5.0,
        max_detections: int = 100,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.model = model
        fdr = getattr(model, "box_head", "fdr") == "fdr"
        if go_lsd and not fdr:
            raise ValueError("go_lsd distils edge distributions, which only the FDR box head has: set box_head: fdr or go_lsd: false")
        criterion_args = {"weights": weights} if weights else {}
        self.criterion = DFINECriterion(
            num_classes, reg_max=model.reg_max, reg_scale=float(model.reg_scale), up=float(model.up),
            ddf_temperature=ddf_temperature, union_matching=go_lsd, use_ddf=go_lsd, **criterion_args,
        )  # fmt: skip
        self.num_classes, self.max_detections = num_classes, max_detections
        self.val_map = MeanAveragePrecision(box_format="xyxy", iou_type="bbox", backend="pycocotools")
        self.test_map = MeanAveragePrecision(box_format="xyxy", iou_type="bbox", backend="pycocotools")

    def setup(self, stage: str) -> None:
        data_classes = getattr(self.trainer.datamodule, "num_classes", None)
        if data_classes is not None and data_classes != self.num_classes:
            raise ValueError(
                f"the data has {data_classes} object classes but the detector is built for {self.num_classes}: "
                "set model.init_args.num_classes and model.init_args.model.init_args.num_classes to it"
            )

    def forward(self, images: torch.Tensor) -> dict[str, Any]:
        return self.model(images)

    def losses(self, batch: dict) -> dict[str, torch.Tensor]:
        """The criterion's weighted terms, summed per kind over all outputs (layers, pre, encoder)."""
        # a detector with denoising queries builds them from the ground truth (training only)
        denoising = self.model.training and getattr(self.model, "num_denoising", 0) > 0
        outputs = self.model(batch["image"], batch["targets"]) if denoising else self.model(batch["image"])
        with torch.autocast(device_type=batch["image"].device.type, enabled=False):  # fp32, as the official criterion
            terms = self.criterion(to_float(outputs), batch["targets"])
        by_kind: dict[str, torch.Tensor] = defaultdict(lambda: torch.zeros((), device=batch["image"].device))
        for name, value in terms.items():
            kind = name.removeprefix("loss_").split("_")[0]
            by_kind[kind] = by_kind[kind] + value
        if self._trainer is not None and outputs.get("pred_corners") is not None:  # for `mmkd plot`
            self.log_dict(corner_entropy(outputs), on_step=False, on_epoch=True, batch_size=len(batch["image"]))
        return dict(by_kind)

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        return self.total_loss(self.losses(batch), "train", len(batch["image"]))

    # -- evaluation ----------------------------------------------------------------------------
    def _evaluate(self, batch: dict, metric: MeanAveragePrecision) -> None:
        metric.update(self.predict_step(batch, 0), detection_targets(batch["targets"]))

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        self._evaluate(batch, self.val_map)

    def test_step(self, batch: dict, batch_idx: int) -> None:
        self._evaluate(batch, self.test_map)

    def _log_map(self, metric: MeanAveragePrecision, split: str) -> None:
        values = metric.compute()
        metric.reset()
        for name in MAP_KEYS:
            self.log(f"{split}/{name}", values[name].float(), prog_bar=name == "map")

    def on_validation_epoch_end(self) -> None:
        self._log_map(self.val_map, "val")

    def on_test_epoch_end(self) -> None:
        self._log_map(self.test_map, "test")

    def predict_step(self, batch: dict, batch_idx: int) -> list[dict[str, torch.Tensor]]:
        """Detections per image (``boxes`` xyxy in pixels of the original image, ``scores``, ``labels``)."""
        outputs = self.model(batch["image"])
        sizes = torch.stack([target["orig_size"] for target in batch["targets"]]).to(batch["image"].device)
        return detection_predictions(outputs["pred_logits"].float(), outputs["pred_boxes"].float(), sizes, self.max_detections)

