"""Supervised training of one network: teachers and student-alone baselines, and the base of
every ``Distiller`` (same data, metrics, optimisation and checkpoint handling)."""

from __future__ import annotations

import math
import random
import warnings
from typing import Any, Literal, Sequence

import lightning as L
import numpy as np
import torch
import torch.nn.functional as F
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from lightning.pytorch.utilities.warnings import PossibleUserWarning
from torch import nn
from torchmetrics.classification import MulticlassAccuracy

from mmkd.data.mixing import MIX_TARGET


EVAL_MODE_WARNING = r"Found \d+ module\(s\) in eval mode at the start of training"


class DataMismatchError(ValueError):
    """A data module whose batches are not the kind the training module takes."""


class NonFiniteLossError(FloatingPointError):
    """A loss term became NaN or infinite."""


def warmup_cosine(
    step: int, total_steps: int, warmup_steps: float, cosine: bool, floor: float = 0.0, from_zero: bool = False
) -> float:
    """LR factor (of the peak lr) at optimiser step ``step`` (0-based): linear warm-up over
    ``warmup_steps``, then a half cosine from 1 down to ``floor`` at ``total_steps`` (or constant).

    The warm-up gives ``(step + 1) / warmup_steps`` (mmkd's default: the first step already
    trains) or, with ``from_zero``, ``step / warmup_steps``: MAE's
    ``util/lr_sched.adjust_learning_rate``, which G2SD uses unchanged (pengzhiliang/G2SD
    ``G2SD/util/lr_sched.py``, called every optimiser step with the fractional epoch
    ``data_iter_step / len(data_loader) + epoch``): ``lr * epoch / warmup_epochs`` in the warm-up,
    then ``min_lr + (lr - min_lr) * (1 + cos(pi * (epoch - warmup_epochs) / (epochs -
    warmup_epochs))) / 2``, i.e. this factor with ``floor = min_lr / lr`` and the warm-up in
    (fractional) steps.
    """
    if step < warmup_steps:
        return (step if from_zero else step + 1) / warmup_steps
    if not cosine:
        return 1.0
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def input_keys(key: str | Sequence[str]) -> list[str]:
    """A batch key or a list of them, as a list."""
    return [key] if isinstance(key, str) else list(key)


def _channels_last_input(module: nn.Module, args: tuple) -> tuple:
    first = args[0]
    if isinstance(first, torch.Tensor) and first.ndim == 4:
        return (first.contiguous(memory_format=torch.channels_last), *args[1:])
    return args


def to_channels_last(model: nn.Module) -> None:
    """Weights in NHWC memory format, and 4-D inputs converted on the way in (a forward pre-hook)."""
    model.to(memory_format=torch.channels_last)
    model.register_forward_pre_hook(_channels_last_input)


class TrainingModule(L.LightningModule):
    """What every mmkd training recipe shares: the optimiser and its schedule (with optional
    no-decay and layer-decay parameter groups), logging of named loss terms with a stop on NaN,
    and RNG state in checkpoints so that a resumed run continues the same random streams.

    Args:
        optimizer: optimizer factory (``--model.init_args.optimizer=SGD`` or a class_path dict).
        lr_scheduler: scheduler factory, stepped per epoch; when unset, ``lr_schedule`` applies.
        lr_schedule: per-step ``"cosine"`` decay (to ``min_lr``) or ``"constant"``, after warm-up.
        warmup_epochs: linear warm-up length in epochs (fractions allowed).
        min_lr: the learning rate the cosine ends at (MAE's and G2SD's ``--min_lr``), scaled
            like the peak by each group's ``lr_scale``; 0 by default. Not used with ``lr_scheduler``.
        warmup_from_zero: the warm-up starts at 0 in the first step, as MAE's and G2SD's
            ``adjust_learning_rate`` (see :func:`warmup_cosine`); by default it starts at
            ``lr / warmup_steps``.
        no_weight_decay_1d: no weight decay on 1-D parameters (norms, biases), as MAE's
            ``add_weight_decay``.
        layer_decay: layer-wise lr decay (BEiT/MAE fine-tuning): of ``n`` layer groups (embeddings,
            each block, head) group ``i`` gets ``lr * layer_decay ** (n - 1 - i)``, through timm's
            ``param_groups_layer_decay`` and the model's ``group_matcher``. Implies
            ``no_weight_decay_1d``, and no decay on the names in ``model.no_weight_decay()``.
        check_finite: stop training with the name of the term when a loss is NaN/inf.
        shard_teacher: under FSDP2, shard the frozen teacher too (see :meth:`configure_model`).
    """

    def __init__(
        self,
        optimizer: OptimizerCallable = torch.optim.AdamW,
        lr_scheduler: LRSchedulerCallable | None = None,
        lr_schedule: Literal["cosine", "constant"] = "cosine",
        warmup_epochs: float = 0.0,
        no_weight_decay_1d: bool = False,
        layer_decay: float | None = None,
        check_finite: bool = True,
        shard_teacher: bool = False,
        min_lr: float = 0.0,
        warmup_from_zero: bool = False,
    ) -> None:
        super().__init__()
        if min_lr < 0:
            raise ValueError(f"min_lr must be >= 0, got {min_lr}")
        self.shard_teacher = shard_teacher
        self.optimizer, self.lr_scheduler = optimizer, lr_scheduler
        self.lr_schedule, self.warmup_epochs = lr_schedule, warmup_epochs
        self.min_lr, self.warmup_from_zero = min_lr, warmup_from_zero
        self.no_weight_decay_1d, self.layer_decay = no_weight_decay_1d, layer_decay
        self.check_finite = check_finite
        self._rng_to_restore: dict | None = None

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
        # Evaluation losses are averaged over ranks; training losses are logged per step, where a
        # collective per logged value would cost more than it tells.
        train = stage == "train"
        for name, value in losses.items():
            self.log(f"{stage}/loss_{name}", value, on_step=train, on_epoch=True, batch_size=batch_size, sync_dist=not train)
        self.log(f"{stage}/loss", total, on_step=train, on_epoch=True, prog_bar=True, batch_size=batch_size, sync_dist=not train)
        return total

    # -- FSDP2: shard what is trained; the frozen teacher stays whole unless shard_teacher -------
    def configure_model(self) -> None:
        """Under :class:`mmkd.strategies.FSDP2` (``--trainer.strategy=fsdp2``): every trained child
        module (student, heads, predictors) is ``fully_shard``ed, block by block then as a whole;
        a frozen ``teacher`` is sharded the same way only with ``shard_teacher`` (less memory, an
        all-gather per block in each forward), else every process keeps a full copy."""
        mesh = self.device_mesh
        if mesh is None:
            return
        mesh = mesh["data_parallel"]
        for name, child in self.named_children():
            if name == "teacher" and not self.shard_teacher:
                continue
            # a container has no forward to wrap: its members are sharded one by one (MST's MaskNets)
            for member in child.children() if isinstance(child, (nn.ModuleDict, nn.ModuleList)) else [child]:
                self._shard(member, mesh)

    @staticmethod
    def _shard(child: nn.Module, mesh: Any) -> None:
        from torch.distributed.fsdp import fully_shard, register_fsdp_forward_method

        from mmkd.strategies import shard_units

        if not any(True for _ in child.parameters()):
            return
        for unit in shard_units(child):
            fully_shard(unit, mesh=mesh)
        fully_shard(child, mesh=mesh)
        # methods called instead of forward (DistilledViT.forward_heads) must gather the shards too
        for method in getattr(child, "fsdp_forward_methods", ()):
            register_fsdp_forward_method(child, method)

    # -- optimisation --------------------------------------------------------------------------
    def param_groups(self) -> list[dict[str, Any]]:
        """Trainable parameters as optimizer groups. A group without ``weight_decay`` takes the
        optimizer's own; ``lr_scale`` multiplies the optimizer's learning rate."""
        if self.layer_decay is None and not self.no_weight_decay_1d:
            return [{"params": [p for p in self.parameters() if p.requires_grad]}]
        from timm.optim import param_groups_layer_decay, param_groups_weight_decay

        if self.layer_decay is None:
            groups = param_groups_weight_decay(self, weight_decay=1.0)
        else:
            model = self.model
            if not hasattr(model, "group_matcher"):
                raise ValueError(f"layer_decay needs a model with timm's group_matcher(); {type(model).__name__} has none")
            no_decay = set(getattr(model, "no_weight_decay", set)())
            groups = param_groups_layer_decay(model, weight_decay=1.0, no_weight_decay_list=no_decay, layer_decay=self.layer_decay)
            grouped = {id(p) for group in groups for p in group["params"]}
            rest = [p for p in self.parameters() if p.requires_grad and id(p) not in grouped]  # e.g. alignment heads
            groups += [{"params": rest}] if rest else []
        for group in groups:  # 0 for the no-decay groups; the others take the optimizer's value
            if group.get("weight_decay", 0.0) != 0.0:
                del group["weight_decay"]
        return groups

    def configure_optimizers(self) -> Any:
        optimizer = self.optimizer(self.param_groups())
        for group in optimizer.param_groups:
            group["lr"] *= group.get("lr_scale", 1.0)
        if self.lr_scheduler is not None:
            return {"optimizer": optimizer, "lr_scheduler": {"scheduler": self.lr_scheduler(optimizer), "interval": "epoch"}}
        if self.lr_schedule == "constant" and self.warmup_epochs == 0:
            return optimizer
        total_steps = int(self.trainer.estimated_stepping_batches)
        epochs = max(1, self.trainer.max_epochs or 1)
        warmup = self.warmup_epochs * total_steps / epochs
        # MAE's warm-up runs in fractional epochs, so its length in steps is not rounded
        warmup_steps = warmup if self.warmup_from_zero else round(warmup)
        cosine = self.lr_schedule == "cosine"
        peak_lr = optimizer.defaults["lr"]  # the groups' lr_scale multiplies peak and floor alike
        if self.min_lr > peak_lr:
            raise ValueError(f"min_lr={self.min_lr} is above the optimizer's lr={peak_lr}: the cosine would rise")
        floor = self.min_lr / peak_lr if peak_lr > 0 else 0.0
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda step: warmup_cosine(step, total_steps, warmup_steps, cosine, floor, self.warmup_from_zero)
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

    def on_fit_start(self) -> None:
        # Lightning warns of every module in eval mode when training starts; frozen teachers are
        # meant to be, so the warning is silenced when they are the only ones (kept otherwise).
        from mmkd.core.teacher import Teacher

        in_teachers = {id(module) for teacher in self.modules() if isinstance(teacher, Teacher) for module in teacher.modules()}
        others_in_eval = [name for name, module in self.named_modules() if not module.training and id(module) not in in_teachers]
        if in_teachers and not others_in_eval:
            warnings.filterwarnings("ignore", message=EVAL_MODE_WARNING, category=PossibleUserWarning)
            self._eval_mode_filter = warnings.filters[0]

    def on_train_start(self) -> None:
        if getattr(self, "_eval_mode_filter", None) in warnings.filters:  # only Lightning's one check
            warnings.filters.remove(self._eval_mode_filter)
            warnings._filters_mutated()
        # Restored here, not at load time, so the sanity-check validation of the resumed run
        # does not shift the training RNG streams.
        if self._rng_to_restore is not None:
            torch.set_rng_state(self._rng_to_restore["torch"])
            kind, keys, position, has_gauss, cached_gauss = self._rng_to_restore["numpy"]
            np.random.set_state((kind, keys.numpy().astype(np.uint32), position, has_gauss, cached_gauss))
            random.setstate(self._rng_to_restore["python"])
            self._rng_to_restore = None


class Classifier(TrainingModule):
    """Cross-entropy training of ``model`` with accuracy on val/test.

    Batches are dicts with ``input_key`` (default ``"image"``) and ``label_key`` (``"label"``). A
    list of input keys passes several modalities to the model, positionally in that order (a
    fusion net's ``forward(image, audio)``).
    Logged: ``train/loss_ce``, ``train/loss``, ``val/acc``, ``val/loss``, ``test/acc``,
    ``test/loss``.

    Args:
        model: the network (``nn.Module`` returning logits).
        num_classes: number of classes, for the metrics.
        label_smoothing: for the cross-entropy (with ``mixup``, set it there instead).
        mixup: keyword arguments of ``timm.data.Mixup`` (``mixup_alpha``, ``cutmix_alpha``,
            ``label_smoothing``, ...) to mix training batches; the loss becomes soft-target CE.
            A data module that mixes single samples instead (``ImageFilesDataModule``'s
            ``mixup``, which a teacher cache can record) gives its soft targets in the batch
            (``mix_target``), and the training losses take those.
        channels_last: keep the model (and a distiller's teacher) and the 4-D inputs in NHWC
            memory format.
        compile_model: ``nn.Module.compile()`` the model (state-dict keys unchanged).
        **kwargs: optimisation keys of :class:`TrainingModule`.
    """

    def __init__(
        self,
        model: nn.Module,
        num_classes: int = 10,
        label_smoothing: float = 0.0,
        mixup: dict[str, Any] | None = None,
        input_key: str | list[str] = "image",
        label_key: str = "label",
        channels_last: bool = False,
        compile_model: bool = False,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.model = model
        self.channels_last = channels_last
        if channels_last:
            to_channels_last(self.model)
        if compile_model:
            self.model.compile()
        self.num_classes = num_classes
        self.label_smoothing = label_smoothing
        self.mixup = None
        if mixup:
            from timm.data import Mixup

            self.mixup = Mixup(**{"num_classes": num_classes, **mixup})
        self.input_key, self.label_key = input_key, label_key
        if mixup and not isinstance(input_key, str):
            raise ValueError("mixup mixes one input tensor; it cannot be used with several input keys")
        self.val_acc = MulticlassAccuracy(num_classes, average="micro")
        self.test_acc = MulticlassAccuracy(num_classes, average="micro")

    #: training batches are SemiSupervisedDataModule's ``{"labeled", "unlabeled"}`` pairs (DHO)
    semi_supervised_batches = False

    def setup(self, stage: str) -> None:
        datamodule = self._trainer.datamodule if self._trainer else None
        if stage == "fit" and datamodule is not None:
            self.check_training_data(datamodule)

    def check_training_data(self, datamodule: Any) -> None:
        """Raise :class:`DataMismatchError` when ``datamodule``'s training batches are not what this
        module trains on (also run by ``mmkd cache``, which has no trainer)."""
        # data modules declare their batches (``semi_supervised``); the core imports none of them
        name, data = type(self).__name__, type(datamodule).__name__
        semi_supervised = getattr(datamodule, "semi_supervised", False)
        if self.mixup is not None and getattr(datamodule, "mixup", None) is not None:
            raise DataMismatchError(
                f"both model.init_args.mixup and data.init_args.mixup ({data}) mix the training samples: keep one "
                "(the data module's, to train from a teacher cache of views)"
            )
        if self.semi_supervised_batches and not semi_supervised:
            raise DataMismatchError(
                f"{name} trains on labelled + unlabelled batches, but {data} gives labelled batches only: wrap it in "
                "mmkd.data.SemiSupervisedDataModule (its `data` argument), as configs/dho/fmnist.yaml does"
            )
        if not self.semi_supervised_batches and semi_supervised:
            raise DataMismatchError(
                f"{name} trains on labelled batches; SemiSupervisedDataModule's labelled + unlabelled pairs are for DHO: "
                "give the data module it wraps directly"
            )

    def forward(self, *inputs: torch.Tensor) -> torch.Tensor:
        return self.model(*inputs)

    def input_views(self) -> dict[str, Any]:
        """How the model wants its images, by batch key, for data modules that decode files
        (:class:`~mmkd.data.files.ImageFilesDataModule`): the model's own preprocessing (timm's
        pretrained config, open_clip's ``preprocess_cfg``), or ``None`` where it declares none."""
        from mmkd.data.views import view_of_model

        return {self.input_key: view_of_model(self.model)} if isinstance(self.input_key, str) else {}

    def model_inputs(self, batch: dict) -> tuple[torch.Tensor, ...]:
        """The batch entries the model takes, in order."""
        return tuple(batch[key] for key in input_keys(self.input_key))

    # -- training ------------------------------------------------------------------------------
    def ce_loss(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Cross-entropy against class indices or (mixed) class probabilities."""
        return F.cross_entropy(logits.float(), labels, label_smoothing=self.label_smoothing)

    def training_targets(self, batch: dict) -> torch.Tensor:
        """What the training CE takes: the data module's mixed soft targets where it mixes
        samples, else the class indices."""
        return batch[MIX_TARGET] if MIX_TARGET in batch else batch[self.label_key]

    def mix(self, images: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Mixup/CutMix of a training batch when ``mixup`` is set: mixed images and soft targets.
        timm mixes a batch with its reverse, which needs an even size: an odd batch loses its
        last sample."""
        if self.mixup is None:
            return images, labels
        if len(images) % 2:
            images, labels = images[:-1], labels[:-1]
        return self.mixup(images, labels)

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        if self.mixup is None:
            inputs, targets = self.model_inputs(batch), self.training_targets(batch)
        else:
            images, targets = self.mix(batch[self.input_key], batch[self.label_key])
            inputs = (images,)
        return self.total_loss({"ce": self.ce_loss(self(*inputs), targets)}, "train", len(targets))

    # -- evaluation ----------------------------------------------------------------------------
    def evaluation_logits(self, batch: dict, stage: str) -> torch.Tensor:
        """The logits that validation and test score (a model with several heads can log each
        head's metrics here from the same forward pass)."""
        return self(*self.model_inputs(batch))

    def _evaluate(self, batch: dict, metric: MulticlassAccuracy, stage: str) -> torch.Tensor:
        logits = self.evaluation_logits(batch, stage)
        labels = batch[self.label_key]
        metric.update(logits, labels)
        self.log(f"{stage}/loss", self.ce_loss(logits, labels), batch_size=len(labels), sync_dist=True)
        self.log(f"{stage}/acc", metric, prog_bar=True, batch_size=len(labels))
        return logits

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        self._evaluate(batch, self.val_acc, "val")

    def test_step(self, batch: dict, batch_idx: int) -> None:
        self._evaluate(batch, self.test_acc, "test")

    def predict_step(self, batch: dict, batch_idx: int) -> dict[str, torch.Tensor]:
        probs = self(*self.model_inputs(batch)).float().softmax(-1)
        return {"index": batch.get("index"), "probs": probs, "pred": probs.argmax(-1)}

