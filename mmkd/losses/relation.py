"""Relational KD (Park et al., CVPR 2019): distance and angle relations between samples."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def pairwise_distances(embeddings: torch.Tensor, squared: bool = False, eps: float = 1e-12) -> torch.Tensor:
    """Euclidean distance matrix ``[B, B]`` with a zero diagonal (as the official code)."""
    sq_norms = embeddings.pow(2).sum(1)
    dist = (sq_norms.unsqueeze(1) + sq_norms.unsqueeze(0) - 2 * embeddings @ embeddings.t()).clamp(min=eps)
    if not squared:
        dist = dist.sqrt()
    return dist * (1 - torch.eye(len(embeddings), device=dist.device, dtype=dist.dtype))


def rkd_distance_loss(student_embeddings: torch.Tensor, teacher_embeddings: torch.Tensor) -> torch.Tensor:
    """Smooth-L1 between distance matrices, each divided by its mean off-diagonal distance."""
    student = student_embeddings.float().flatten(1)
    with torch.no_grad():
        teacher_dist = pairwise_distances(teacher_embeddings.float().flatten(1))
        teacher_dist = teacher_dist / teacher_dist[teacher_dist > 0].mean()
    student_dist = pairwise_distances(student)
    student_dist = student_dist / student_dist[student_dist > 0].mean()
    return F.smooth_l1_loss(student_dist, teacher_dist)


def _angles(embeddings: torch.Tensor) -> torch.Tensor:
    differences = F.normalize(embeddings.unsqueeze(0) - embeddings.unsqueeze(1), p=2, dim=2)
    return torch.bmm(differences, differences.transpose(1, 2)).flatten()


def rkd_angle_loss(student_embeddings: torch.Tensor, teacher_embeddings: torch.Tensor) -> torch.Tensor:
    """Smooth-L1 between the cosines of all angles formed by triplets of samples."""
    with torch.no_grad():
        teacher_angles = _angles(teacher_embeddings.float().flatten(1))
    return F.smooth_l1_loss(_angles(student_embeddings.float().flatten(1)), teacher_angles)


class RKDLoss(nn.Module):
    """RKD: ``distance_weight * distance loss + angle_weight * angle loss`` on embeddings
    ``[B, ...]`` (flattened); student and teacher widths may differ.

    Args:
        distance_weight: official default 25.
        angle_weight: official default 50.
        loss_weight: multiplies the sum.
    """

    def __init__(self, distance_weight: float = 25.0, angle_weight: float = 50.0, loss_weight: float = 1.0) -> None:
        super().__init__()
        self.distance_weight, self.angle_weight, self.loss_weight = distance_weight, angle_weight, loss_weight

    def forward(self, student_embeddings: torch.Tensor, teacher_embeddings: torch.Tensor) -> torch.Tensor:
        loss = self.distance_weight * rkd_distance_loss(student_embeddings, teacher_embeddings)
        loss = loss + self.angle_weight * rkd_angle_loss(student_embeddings, teacher_embeddings)
        return self.loss_weight * loss
