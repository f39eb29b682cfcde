"""Supervised training of one network: teachers and student-alone baselines, and the base of
every ``Distiller`` (same data, metrics, optimisation and checkpoint handling)."""

from __future__ import annotations

import math
import random
from typing import Any, Literal

import lightning as L
import numpy as np
import torch
import torch.nn.functional as F
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torch import nn
from torchmetrics.classification import MulticlassAccuracy


class NonFiniteLossError(FloatingPointError):
    """A loss term became NaN or infinite."""


def warmup_cosine(step: int, total_steps: int, warmup_steps: int, cosine: bool) -> float:
    """LR factor: linear warm-up over ``warmup_steps``, then cosine decay to 0 (or constant)."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if not cosine:
        return 1.0
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def _channels_last_input(module: nn.Module, args: tuple) -> tuple:
    first = args[0]
    if isinstance(first, torch.Tensor) and first.ndim == 4:
        return (first.contiguous(memory_format=torch.channels_last), *args[1:])
    return args


def to_channels_last(model: nn.Module) -> None:
    """Weights in NHWC memory format, and 4-D inputs converted on the way in (a forward pre-hook)."""
    model.to(memory_format=torch.channels_last)
    model.register_forward_pre_hook(_channels_last_input)


class Classifier(L.LightningModule):
    """Cross-entropy training of ``model`` with accuracy on val/test.

    Batches are dicts with ``input_key`` (default ``"image"``) and ``label_key`` (``"label"``).
    Logged: ``train/loss_ce``, ``train/loss``, ``val/acc``, ``val/loss``, ``test/acc``,
    ``test/loss``.

    Args:
        model: the network (``nn.Module`` returning logits).
        num_classes: number of classes, for the metrics.
        optimizer: optimizer factory (``--model.init_args.optimizer=SGD`` or a class_path dict).
        lr_scheduler: scheduler factory, stepped per epoch; when unset, ``lr_schedule`` applies.
        lr_schedule: per-step ``"cosine"`` decay to zero or ``"constant"``, after warm-up.
        warmup_epochs: linear warm-up length in epochs (fractions allowed).
        label_smoothing: for the cross-entropy.
        check_finite: stop training with the name of the term when a loss is NaN/inf.
        channels_last: keep the model (and a distiller's teacher) and the 4-D inputs in NHWC
            memory format.
        compile_model: ``nn.Module.compile()`` the model (state-dict keys unchanged).
    """

    def __init__(
        self,
        model: nn.Module,
        num_classes: int = 10,
        optimizer: OptimizerCallable = torch.optim.AdamW,
        lr_scheduler: LRSchedulerCallable | None = None,
        lr_schedule: Literal["cosine", "constant"] = "cosine",
        warmup_epochs: float = 0.0,
        label_smoothing: float = 0.0,
        check_finite: bool = True,
        input_key: str = "image",
        label_key: str = "label",
        channels_last: bool = False,
        compile_model: bool = False,
    ) -> None:
        super().__init__()
        self.model = model
        self.channels_last = channels_last
        if channels_last:
            to_channels_last(self.model)
        if compile_model:
            self.model.compile()
        self.num_classes = num_classes
        self.optimizer, self.lr_scheduler = optimizer, lr_scheduler
        self.lr_schedule, self.warmup_epochs = lr_schedule, warmup_epochs
        self.label_smoothing, self.check_finite = label_smoothing, check_finite
        self.input_key, self.label_key = input_key, label_key
        self.val_acc = MulticlassAccuracy(num_classes, average="micro")
        self.test_acc = MulticlassAccuracy(num_classes, average="micro")
        self._rng_to_restore: dict | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)

    # -- training ------------------------------------------------------------------------------
    def ce_loss(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(logits.float(), labels, label_smoothing=self.label_smoothing)

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        logits = self(batch[self.input_key])
        labels = batch[self.label_key]
        return self.total_loss({"ce": self.ce_loss(logits, labels)}, "train", len(labels))

    def total_loss(self, losses: dict[str, torch.Tensor], stage: str, batch_size: int) -> torch.Tensor:
        """Sum the named (already weighted) terms, log each as ``{stage}/loss_{name}``, and stop
        on a non-finite value with the name of the term that caused it."""
        total = torch.stack([loss.float() for loss in losses.values()]).sum()
        if self.check_finite and not torch.isfinite(total):
            bad = {name: float(value.detach()) for name, value in losses.items() if not torch.isfinite(value)}
            raise NonFiniteLossError(
                f"non-finite loss at epoch {self.current_epoch}, step {self.global_step}: "
                + ", ".join(f"term '{name}' = {value}" for name, value in bad.items())
                + ". Training stopped; the last checkpoint is untouched. Lower the learning rate or "
                "that term's weight, or check the inputs."
            )
        for name, value in losses.items():
            self.log(f"{stage}/loss_{name}", value, on_step=stage == "train", on_epoch=True, batch_size=batch_size)
        self.log(f"{stage}/loss", total, on_step=stage == "train", on_epoch=True, prog_bar=True, batch_size=batch_size)
        return total

    # -- evaluation ----------------------------------------------------------------------------
    def _evaluate(self, batch: dict, metric: MulticlassAccuracy, stage: str) -> torch.Tensor:
        logits = self(batch[self.input_key])
        labels = batch[self.label_key]
        metric.update(logits, labels)
        self.log(f"{stage}/loss", self.ce_loss(logits, labels), batch_size=len(labels))
        self.log(f"{stage}/acc", metric, prog_bar=True, batch_size=len(labels))
        return logits

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        self._evaluate(batch, self.val_acc, "val")

    def test_step(self, batch: dict, batch_idx: int) -> None:
        self._evaluate(batch, self.test_acc, "test")

    def predict_step(self, batch: dict, batch_idx: int) -> dict[str, torch.Tensor]:
        probs = self(batch[self.input_key]).float().softmax(-1)
        return {"index": batch.get("index"), "probs": probs, "pred": probs.argmax(-1)}

    # -- optimisation --------------------------------------------------------------------------
    def configure_optimizers(self) -> Any:
        optimizer = self.optimizer([p for p in self.parameters() if p.requires_grad])
        if self.lr_scheduler is not None:
            return {"optimizer": optimizer, "lr_scheduler": {"scheduler": self.lr_scheduler(optimizer), "interval": "epoch"}}
        if self.lr_schedule == "constant" and self.warmup_epochs == 0:
            return optimizer
        total_steps = int(self.trainer.estimated_stepping_batches)
        epochs = max(1, self.trainer.max_epochs or 1)
        warmup_steps = round(self.warmup_epochs * total_steps / epochs)
        cosine = self.lr_schedule == "cosine"
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda step: warmup_cosine(step, total_steps, warmup_steps, cosine)
        )
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    # -- checkpoints ---------------------------------------------------------------------------
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # Lightning restores loops, optimizers and schedulers but not the global RNGs; without
        # them a resumed run draws different dropout masks than an uninterrupted one. Stored as
        # tensors and ints only, so the checkpoint still loads with torch.load(weights_only=True).
        kind, keys, position, has_gauss, cached_gauss = np.random.get_state()
        checkpoint.setdefault("mmkd", {})["rng"] = {
            "torch": torch.get_rng_state(),
            "numpy": (kind, torch.from_numpy(keys.astype(np.int64)), position, has_gauss, cached_gauss),
            "python": random.getstate(),
        }

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self._rng_to_restore = checkpoint.get("mmkd", {}).get("rng")

    def on_train_start(self) -> None:
        # Restored here, not at load time, so the sanity-check validation of the resumed run
        # does not shift the training RNG streams.
        if self._rng_to_restore is not None:
            torch.set_rng_state(self._rng_to_restore["torch"])
            kind, keys, position, has_gauss, cached_gauss = self._rng_to_restore["numpy"]
            np.random.set_state((kind, keys.numpy().astype(np.uint32), position, has_gauss, cached_gauss))
            random.setstate(self._rng_to_restore["python"])
            self._rng_to_restore = None
