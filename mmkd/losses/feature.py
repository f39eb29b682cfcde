"""Losses on intermediate features: FitNets hints, MSE / smooth-L1 / cosine with optional
parameter-free LayerNorm of the target, and attention transfer."""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from mmkd.losses.fused import LossImpl, fused_feature_loss

FeatureLossKind = Literal["mse", "smooth_l1", "cosine"]


def _channel_dim(x: torch.Tensor) -> int:
    """Feature dimension: channels of ``[B, C, H, W]`` maps, the last dim of vectors and tokens."""
    return 1 if x.ndim == 4 else -1


def normalize_target(target: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Parameter-free LayerNorm over the feature dimension (as MAE's ``norm_pix_loss`` and G2SD)."""
    dim = _channel_dim(target)
    mean = target.mean(dim, keepdim=True)
    var = target.var(dim, keepdim=True, unbiased=False)
    return (target - mean) / torch.sqrt(var + eps)


def feature_loss(
    pred: torch.Tensor,
    target: torch.Tensor,
    kind: FeatureLossKind = "mse",
    normalize: bool = False,
    beta: float = 1.0,
) -> torch.Tensor:
    """Distance between a (head-aligned) student feature and the teacher feature.

    ``mse`` and ``smooth_l1`` (with ``beta``) are means over all elements; ``cosine`` is the mean
    of ``1 - cos`` along the feature dimension. ``normalize`` applies :func:`normalize_target` to
    the target first. The target never receives gradients.
    """
    if pred.shape != target.shape:
        raise ValueError(f"feature shapes differ: student {list(pred.shape)} vs teacher {list(target.shape)}")
    target = target.detach().float()
    pred = pred.float()
    if normalize:
        target = normalize_target(target)
    if kind == "mse":
        return F.mse_loss(pred, target)
    if kind == "smooth_l1":
        return F.smooth_l1_loss(pred, target, beta=beta)
    if kind == "cosine":
        return (1.0 - F.cosine_similarity(pred, target, dim=_channel_dim(pred))).mean()
    raise ValueError(f"unknown feature loss kind {kind!r}; choose 'mse', 'smooth_l1' or 'cosine'")


def fitnets_loss(student_hint: torch.Tensor, teacher_hint: torch.Tensor) -> torch.Tensor:
    """FitNets (Romero et al. 2015) hint loss: MSE between the regressed student feature and the
    teacher's hint feature (mean over elements, as mdistiller)."""
    return feature_loss(student_hint, teacher_hint, "mse")


def attention_map(feature: torch.Tensor, p: float = 2.0) -> torch.Tensor:
    """Zagoruyko & Komodakis 2017: ``normalize(mean_c |f|^p)`` flattened to ``[B, H*W]``."""
    return F.normalize(feature.float().pow(p).mean(1).flatten(1), dim=1)


def attention_transfer_loss(student_feature: torch.Tensor, teacher_feature: torch.Tensor, p: float = 2.0) -> torch.Tensor:
    """Attention transfer between ``[B, C, H, W]`` maps of any channel counts, as mdistiller:
    the larger map is average-pooled to the smaller's spatial size, then the mean squared
    difference of the attention maps."""
    if student_feature.ndim != 4 or teacher_feature.ndim != 4:
        raise ValueError(
            f"attention transfer needs [B, C, H, W] maps, got student {list(student_feature.shape)} "
            f"and teacher {list(teacher_feature.shape)}"
        )
    s_size, t_size = student_feature.shape[-2:], teacher_feature.shape[-2:]
    if s_size[0] > t_size[0]:
        student_feature = F.adaptive_avg_pool2d(student_feature, t_size)
    elif s_size[0] < t_size[0]:
        teacher_feature = F.adaptive_avg_pool2d(teacher_feature, s_size)
    return (attention_map(student_feature, p) - attention_map(teacher_feature.detach(), p)).pow(2).mean()


class FeatureLoss(nn.Module):
    """Feature distillation loss (see :func:`feature_loss`).

    Args:
        kind: ``"mse"``, ``"smooth_l1"`` or ``"cosine"``.
        normalize_target: parameter-free LayerNorm on the teacher feature.
        beta: smooth-L1 transition point.
        loss_weight: multiplies the loss.
        impl: ``"auto"`` (Triton on CUDA; on CPU compiled for large inputs, eager for small),
            ``"triton"``, ``"compiled"``, ``"chunked"`` or ``"eager"``; see :mod:`mmkd.losses.fused`.
    """

    requires_equal_shapes = True

    def __init__(
        self,
        kind: FeatureLossKind = "mse",
        normalize_target: bool = False,
        beta: float = 1.0,
        loss_weight: float = 1.0,
        impl: LossImpl = "auto",
    ) -> None:
        super().__init__()
        self.kind, self.normalize_target, self.beta, self.loss_weight, self.impl = kind, normalize_target, beta, loss_weight, impl

    def forward(self, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return self.loss_weight * fused_feature_loss(pred, target, self.kind, self.normalize_target, self.beta, self.impl)


class FitNetsLoss(nn.Module):
    """FitNets hint loss (see :func:`fitnets_loss`).

    Args:
        loss_weight: multiplies the loss (mdistiller's default is 100).
        impl: as :class:`FeatureLoss`.
    """

    requires_equal_shapes = True

    def __init__(self, loss_weight: float = 100.0, impl: LossImpl = "auto") -> None:
        super().__init__()
        self.loss_weight, self.impl = loss_weight, impl

    def forward(self, student_hint: torch.Tensor, teacher_hint: torch.Tensor) -> torch.Tensor:
        return self.loss_weight * fused_feature_loss(student_hint, teacher_hint, "mse", impl=self.impl)


class ATLoss(nn.Module):
    """Attention transfer (see :func:`attention_transfer_loss`).

    Args:
        p: power of the activations (2 in the paper and mdistiller).
        loss_weight: multiplies the loss (mdistiller's default is 1000).
    """

    def __init__(self, p: float = 2.0, loss_weight: float = 1000.0) -> None:
        super().__init__()
        self.p, self.loss_weight = p, loss_weight

    def forward(self, student_feature: torch.Tensor, teacher_feature: torch.Tensor) -> torch.Tensor:
        return self.loss_weight * attention_transfer_loss(student_feature, teacher_feature, self.p)
