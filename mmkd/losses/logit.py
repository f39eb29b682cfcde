"""Losses on logits: Hinton KD and decoupled KD (DKD)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from mmkd.losses.fused import LossImpl, fused_kd_loss


def kd_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    temperature: float = 4.0,
    reverse: bool = False,
) -> torch.Tensor:
    """Hinton et al. 2015: ``T^2 * KL(p_t^T || p_s^T)``, summed over classes, mean over rows.

    ``reverse=True`` gives ``KL(p_s^T || p_t^T)``. Logits are ``[N, C]``; any leading dims are
    flattened into rows (batchmean over all of them).
    """
    num_classes = student_logits.shape[-1]
    log_p_student = F.log_softmax(student_logits.reshape(-1, num_classes).float() / temperature, dim=-1)
    log_p_teacher = F.log_softmax(teacher_logits.reshape(-1, num_classes).float() / temperature, dim=-1)
    if reverse:
        log_p_student, log_p_teacher = log_p_teacher, log_p_student
    kl = F.kl_div(log_p_student, log_p_teacher, reduction="batchmean", log_target=True)
    return kl * temperature**2


def dkd_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    labels: torch.Tensor,
    alpha: float = 1.0,
    beta: float = 8.0,
    temperature: float = 4.0,
) -> torch.Tensor:
    """Decoupled KD (Zhao et al., CVPR 2022), as in mdistiller's ``dkd_loss``.

    ``alpha * TCKD + beta * NCKD``: TCKD is the KL between the binary (target, non-target)
    distributions, NCKD the KL between the distributions over non-target classes; both
    ``T^2``-scaled and divided by the batch size. The official code takes ``log`` of the binary
    probabilities; here it is clamped at 1e-12 so a saturated student gives a finite loss.
    """
    student_logits, teacher_logits = student_logits.float(), teacher_logits.float()
    gt_mask = F.one_hot(labels, student_logits.shape[-1]).bool()
    batch = student_logits.shape[0]

    def binary(logits: torch.Tensor) -> torch.Tensor:
        probs = F.softmax(logits / temperature, dim=1)
        target = (probs * gt_mask).sum(1, keepdim=True)
        return torch.cat([target, (probs * ~gt_mask).sum(1, keepdim=True)], dim=1)

    p_student, p_teacher = binary(student_logits), binary(teacher_logits)
    tckd = F.kl_div(p_student.clamp_min(1e-12).log(), p_teacher, reduction="sum") * temperature**2 / batch
    # Masking the target class with -1000 before the softmax, exactly as the official code.
    log_p_student_nt = F.log_softmax(student_logits / temperature - 1000.0 * gt_mask, dim=1)
    p_teacher_nt = F.softmax(teacher_logits / temperature - 1000.0 * gt_mask, dim=1)
    nckd = F.kl_div(log_p_student_nt, p_teacher_nt, reduction="sum") * temperature**2 / batch
    return alpha * tckd + beta * nckd


class KDLoss(nn.Module):
    """Hinton KD (see :func:`kd_loss`).

    Args:
        temperature: softmax temperature T; the loss is scaled by T^2.
        reverse: KL(student || teacher) instead of KL(teacher || student).
        loss_weight: multiplies the loss.
        impl: ``"auto"`` (Triton on CUDA; on CPU compiled for large inputs, eager for small),
            ``"triton"``, ``"compiled"``, ``"chunked"`` or ``"eager"``; see :mod:`mmkd.losses.fused`.
    """

    requires_equal_shapes = True

    def __init__(self, temperature: float = 4.0, reverse: bool = False, loss_weight: float = 1.0, impl: LossImpl = "auto") -> None:
        super().__init__()
        self.temperature, self.reverse, self.loss_weight, self.impl = temperature, reverse, loss_weight, impl

    def forward(self, student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
        return self.loss_weight * fused_kd_loss(student_logits, teacher_logits, self.temperature, self.reverse, self.impl)


class DKDLoss(nn.Module):
    """Decoupled KD (see :func:`dkd_loss`); needs the labels.

    Args:
        alpha: weight of TCKD (official default 1.0).
        beta: weight of NCKD (official default 8.0 on CIFAR-100, 0.5 on ImageNet).
        temperature: softmax temperature (official default 4.0, 1.0 on ImageNet).
        loss_weight: multiplies the loss.
    """

    requires_equal_shapes = True
    needs_labels = True

    def __init__(self, alpha: float = 1.0, beta: float = 8.0, temperature: float = 4.0, loss_weight: float = 1.0) -> None:
        super().__init__()
        self.alpha, self.beta, self.temperature, self.loss_weight = alpha, beta, temperature, loss_weight

    def forward(self, student_logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return self.loss_weight * dkd_loss(student_logits, teacher_logits, labels, self.alpha, self.beta, self.temperature)
