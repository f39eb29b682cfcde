"""G2SD (Huang et al., CVPR 2023): generic-to-specific distillation of a masked autoencoder.

Generic stage (:class:`G2SDGeneric`, task-agnostic): teacher and student MAE see the *same* 75 %
mask; the student's light decoder, through an MLP predictor, regresses the teacher decoder's hidden
states after block ``target_block`` (4 of 8 officially), normalised by a parameter-free LayerNorm,
with smooth-L1 (beta 2) on all tokens (cls, visible, masked)::

    L_GD = SmoothL1_beta=2( predictor(student_decoder(x, mask)), LN(teacher_decoder[:k](x, mask)) )

Specific stage (:class:`G2SDSpecific`, classification): the student ViT, initialised from the
generic stage's encoder, gets a distillation token (:class:`~mmkd.models.vit.DistilledViT`) and is
trained on mixup/cutmix batches with::

    L_SD = 1/2 SoftTargetCE(class_head, mixed targets) + 1/2 CE(dist_head, argmax teacher(mixed images))

and predicts with the mean of the two heads.

Differences from the official code, on purpose: the generic stage's zero-weighted encoder-feature
term is not computed (it only costs time and needs ``find_unused_parameters``); the teacher runs
under ``no_grad`` in eval mode (it has no dropout, so targets are the same); a teacher MAE without
decoder weights is an error instead of a silently random decoder.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn
from torchmetrics.classification import MulticlassAccuracy

from mmkd.core import Distiller, Teacher
from mmkd.core.classifier import TrainingModule
from mmkd.core.distiller import LOGITS
from mmkd.core.teacher import check_teacher, record_teacher
from mmkd.losses import FeatureLoss
from mmkd.losses.fused import LossImpl, fused_kd_loss
from mmkd.models.mae import MaskedAutoencoder, feature_predictor


class G2SDGeneric(TrainingModule):
    """G2SD generic distillation: a small MAE learns to predict a big MAE's decoder features.

    Logged: ``train/loss_gd`` and ``val/loss_gd`` (validation masks seeded by batch index).

    Args:
        student: the student :class:`~mmkd.models.mae.MaskedAutoencoder` (light decoder).
        teacher: a ``Teacher`` wrapping the teacher MAE with its full encoder + decoder weights.
        target_block: how many teacher decoder blocks run; the target is their output, before the
            decoder norm (default: half the teacher decoder, 4 of 8 as the official code).
        supervise: ``"all"`` tokens (official) or only the ``"masked"`` patches.
        loss: ``"smooth_l1"`` (official) or ``"mse"``.
        beta: smooth-L1 transition point (2.0).
        loss_impl: implementation of the feature loss (see :mod:`mmkd.losses.fused`).
        export_dir: when set, the student's encoder and decoder (+ predictor) are written there
            at the end of fit as ``encoder.safetensors`` (timm ``VisionTransformer`` keys) and
            ``decoder.safetensors``, for task heads to start from.
        input_key: image key of the batches (labels are not used).
        min_lr, warmup_from_zero: the official schedule (``main_distill.py`` ``--min_lr 2.5e-6``,
            MAE's ``util/lr_sched.py``): warm-up from 0, half cosine down to ``min_lr``; see
            :func:`~mmkd.core.classifier.warmup_cosine`.
        **kwargs: optimisation keys of :class:`~mmkd.core.classifier.TrainingModule` (official:
            AdamW betas (0.9, 0.95), weight decay 0.05 with ``no_weight_decay_1d``, 10 warm-up
            epochs of 300).
    """

    def __init__(
        self,
        student: MaskedAutoencoder,
        teacher: nn.Module,
        target_block: int | None = None,
        supervise: Literal["all", "masked"] = "all",
        loss: Literal["smooth_l1", "mse"] = "smooth_l1",
        beta: float = 2.0,
        loss_impl: LossImpl = "auto",
        export_dir: str | None = None,
        input_key: str = "image",
        min_lr: float = 2.5e-6,
        warmup_from_zero: bool = True,
        **kwargs: Any,
    ) -> None:
        super().__init__(min_lr=min_lr, warmup_from_zero=warmup_from_zero, **kwargs)
        self.teacher = teacher if isinstance(teacher, Teacher) else Teacher(teacher)
        teacher_mae = self.teacher.model
        for role, model in (("student", student), ("teacher", teacher_mae)):
            if not isinstance(model, MaskedAutoencoder):
                raise TypeError(f"G2SD's {role} must be an mmkd.models.MaskedAutoencoder, got {type(model).__name__}")
        if student.mask_ratio != teacher_mae.mask_ratio:
            raise ValueError(f"student and teacher must mask the same share of patches: mask_ratio {student.mask_ratio} vs {teacher_mae.mask_ratio}")
        if student.num_patches != teacher_mae.num_patches:
            raise ValueError(
                f"student and teacher must cut images into the same patches to share a mask: student "
                f"{student.grid_size} grid, teacher {teacher_mae.grid_size}"
            )
        depth = len(teacher_mae.decoder.blocks)
        self.target_block = depth // 2 if target_block is None else target_block
        if not 1 <= self.target_block <= depth:
            raise ValueError(f"target_block must be in 1..{depth} (the teacher decoder's depth), got {target_block}")
        if supervise not in ("all", "masked"):
            raise ValueError(f"supervise must be 'all' or 'masked', got {supervise!r}")
        self.student = student
        # The student's decoder norm and pixel head are not on the generic stage's path; frozen,
        # DDP needs no find_unused_parameters (the official code needs it for this reason).
        student.decoder.norm.requires_grad_(False)
        student.decoder.pred.requires_grad_(False)
        self.predictor = feature_predictor(student.decoder_dim, teacher_mae.decoder_dim)
        self.loss = FeatureLoss(loss, normalize_target=True, beta=beta, impl=loss_impl)
        self.supervise, self.export_dir, self.input_key = supervise, export_dir, input_key

    def generic_loss(self, images: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """The G2SD generic loss for one batch under the mask given by ``noise`` ``[B, N]``."""
        target, mask = self.teacher(images, noise, self.target_block, head=False)
        hidden, _ = self.student(images, noise, head=False)
        prediction = self.predictor(hidden)
        if self.supervise == "masked":
            masked = mask.bool()
            prediction, target = prediction[:, 1:][masked], target[:, 1:][masked]
        return self.loss(prediction, target)

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        images = batch[self.input_key]
        noise = self.student.mask_noise(len(images), images.device)  # one mask for both
        return self.total_loss({"gd": self.generic_loss(images, noise)}, "train", len(images))

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        images = batch[self.input_key]
        noise = self.student.mask_noise(len(images), images.device, seed=batch_idx)
        self.total_loss({"gd": self.generic_loss(images, noise)}, "val", len(images))

    def on_fit_end(self) -> None:
        if self.export_dir:
            self.export(self.export_dir)

    def export(self, folder: str) -> None:
        """Write ``encoder.safetensors`` and ``decoder.safetensors`` (decoder + predictor). Under
        FSDP2 every process must call it (the shards are gathered); the first one writes."""
        from safetensors.torch import save_file
        from torch.distributed.tensor import DTensor

        parts = {
            "encoder": self.student.encoder.state_dict(),
            "decoder": {**self.student.decoder.state_dict(prefix="decoder."), **self.predictor.state_dict(prefix="predictor.")},
        }
        parts = {name: {k: (v.full_tensor() if isinstance(v, DTensor) else v) for k, v in state.items()} for name, state in parts.items()}
        if self._trainer is not None and not self.trainer.is_global_zero:
            return
        out = Path(folder)
        out.mkdir(parents=True, exist_ok=True)
        for name, state in parts.items():
            tmp = out / f".{name}.safetensors.tmp"
            save_file({k: v.detach().cpu().contiguous() for k, v in state.items()}, str(tmp))
            tmp.replace(out / f"{name}.safetensors")

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_save_checkpoint(checkpoint)
        record_teacher(checkpoint, self.teacher)

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_load_checkpoint(checkpoint)
        check_teacher(checkpoint, self.teacher)


class G2SDSpecific(Distiller):
    """G2SD specific distillation for classification (DeiT-style hard distillation token).

    Loss: ``(1 - distill_weight) * CE(class head, mixed targets) + distill_weight * CE(dist head,
    argmax of the teacher on the same mixed images)``; ``distill_weight = 0.5`` is the official
    ``(loss_gt + loss_dis) / 2``. ``distillation="soft"`` uses ``T^2 KL`` at ``temperature`` on the
    distillation head instead (DeiT's soft variant). Mixup/cutmix come from ``mixup`` (timm's
    ``Mixup`` arguments; official: mixup 0.8, cutmix 1.0, label smoothing 0.1), or from the data
    module's ``mixup`` (:mod:`mmkd.data.mixing`: each sample mixed on its own with a partner drawn
    from (seed, epoch, index), timm's ``mode="elem"`` where the official code mixes each batch
    with one ratio); only the latter can train from a teacher cache of views, which records the
    mixed views and the teacher's logits on them.

    Logged besides :class:`~mmkd.core.Distiller`'s: ``train/loss_dist``, and ``val/acc_cls`` and
    ``val/acc_dist`` for each head (``val/acc`` is their mean, the model's prediction).

    Args:
        student: a :class:`~mmkd.models.vit.DistilledViT` (``encoder_checkpoint`` pointing at the
            generic stage's checkpoint for G2SD; none for the "specific stage only" baseline).
        teacher: the task teacher (a fine-tuned MAE encoder), frozen.
        distill_weight: weight of the distillation head's loss (0.5).
        distillation: ``"hard"`` (official) or ``"soft"``.
        temperature: for ``"soft"``.
        min_lr, warmup_from_zero: the official schedule (``main_finetune_dis.py`` ``--min_lr
            1e-6``, MAE's ``util/lr_sched.py``): warm-up from 0, half cosine down to ``min_lr``; see
            :func:`~mmkd.core.classifier.warmup_cosine`.
        **kwargs: :class:`~mmkd.core.Distiller`/``Classifier`` keys (``mixup``, ``layer_decay``, ...).
    """

    supports_mixup = True

    def __init__(
        self,
        student: nn.Module,
        teacher: nn.Module,
        distill_weight: float = 0.5,
        distillation: Literal["hard", "soft"] = "hard",
        temperature: float = 1.0,
        min_lr: float = 1e-6,
        warmup_from_zero: bool = True,
        **kwargs: Any,
    ) -> None:
        if not hasattr(student, "forward_heads"):
            raise TypeError(f"G2SD's specific stage needs a student with a distillation head (mmkd.models.DistilledViT), got {type(student).__name__}")
        if kwargs.get("teacher_cache") and kwargs.get("mixup"):
            raise ValueError(
                "model.init_args.mixup mixes each batch in the training step, which a teacher cache cannot record: "
                "mix in the data module instead (data.init_args.mixup, the same arguments) and build the cache with it"
            )
        if distillation not in ("hard", "soft"):
            raise ValueError(f"distillation must be 'hard' or 'soft', got {distillation!r}")
        super().__init__(
            student, teacher, terms=[], ce_weight=1.0 - distill_weight, min_lr=min_lr, warmup_from_zero=warmup_from_zero, **kwargs
        )
        self.distill_weight, self.distillation, self.temperature = distill_weight, distillation, temperature
        self.val_acc_cls = MulticlassAccuracy(self.num_classes, average="micro")
        self.val_acc_dist = MulticlassAccuracy(self.num_classes, average="micro")

    def distillation_losses(self, batch: dict) -> dict[str, torch.Tensor]:
        if self.mixup is None:  # unmixed, or mixed by the data module: the teacher's logits may come from a cache of the views
            images, targets = batch[self.input_key], self.training_targets(batch)
            teacher_logits = self.teacher_outputs(batch)[LOGITS]
        else:
            images, targets = self.mix(batch[self.input_key], batch[self.label_key])
            teacher_logits = self.map_teacher_logits(self.teacher(images))
        cls_logits, dist_logits = self.model.forward_heads(images)
        if self.distillation == "hard":
            dist_loss = F.cross_entropy(dist_logits.float(), teacher_logits.argmax(-1))
        else:
            dist_loss = fused_kd_loss(dist_logits, teacher_logits, self.temperature)
        return {"ce": self.ce_weight * self.ce_loss(cls_logits, targets), "dist": self.distill_weight * dist_loss}

    def evaluation_logits(self, batch: dict, stage: str) -> torch.Tensor:
        cls_logits, dist_logits = self.model.forward_heads(batch[self.input_key])
        if stage == "val":
            labels = batch[self.label_key]
            for name, metric, logits in (("cls", self.val_acc_cls, cls_logits), ("dist", self.val_acc_dist, dist_logits)):
                metric.update(logits, labels)
                self.log(f"val/acc_{name}", metric, batch_size=len(labels))
        return (cls_logits + dist_logits) / 2  # DistilledViT.forward's prediction, from the same pass
