"""Feature-alignment heads (connectors): map a student feature to the teacher's shape.

Heads are built from shapes observed in one dry forward pass, so configs only name the kind.
Shapes here exclude the batch dimension.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

HEAD_KINDS = ("identity", "linear", "mlp", "conv1x1", "conv1x1_bn", "conv3x3_bn")


class ShapeMismatchError(ValueError):
    """Student and teacher features that the chosen head cannot align."""


def _shape_error(student: Sequence[int], teacher: Sequence[int], why: str) -> ShapeMismatchError:
    return ShapeMismatchError(
        f"cannot align student feature of shape {list(student)} with teacher feature of shape "
        f"{list(teacher)} (batch dimension excluded): {why}"
    )


class LinearHead(nn.Module):
    """``Linear`` on the last dimension, for ``[B, D]`` vectors and ``[B, N, D]`` tokens."""

    def __init__(self, in_features: int, out_features: int) -> None:
        super().__init__()
        self.proj = nn.Linear(in_features, out_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x)


class MLPHead(nn.Module):
    """Linear-GELU-Linear on the last dimension (the hidden width defaults to the output width)."""

    def __init__(self, in_features: int, out_features: int, hidden_features: int | None = None) -> None:
        super().__init__()
        hidden = hidden_features or out_features
        self.mlp = nn.Sequential(nn.Linear(in_features, hidden), nn.GELU(), nn.Linear(hidden, out_features))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mlp(x)


class ConvHead(nn.Module):
    """Convolution (1x1 or 3x3) on ``[B, C, H, W]`` maps, optionally followed by BatchNorm
    (FitNets' regressor; mdistiller's ``ConvReg`` is the 3x3 + BN variant with a ReLU)."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 1, batch_norm: bool = False) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size, padding=kernel_size // 2, bias=not batch_norm)
        self.norm = nn.BatchNorm2d(out_channels) if batch_norm else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.conv(x))


def build_head(kind: str | None, student_shape: Sequence[int], teacher_shape: Sequence[int]) -> nn.Module:
    """Build the head of ``kind`` mapping ``student_shape`` to ``teacher_shape``.

    ``kind=None`` or ``"identity"`` requires equal shapes. Every other mismatch that the head
    cannot fix raises :class:`ShapeMismatchError` naming both shapes.
    """
    student, teacher = tuple(student_shape), tuple(teacher_shape)
    kind = kind or "identity"
    if kind not in HEAD_KINDS:
        raise ValueError(f"unknown head kind {kind!r}; choose one of {HEAD_KINDS}")
    if kind == "identity":
        if student != teacher:
            raise _shape_error(student, teacher, "shapes differ and no head is set; set head to one of "
                               "'linear', 'mlp' (vectors, tokens) or 'conv1x1', 'conv1x1_bn' (feature maps)")
        return nn.Identity()
    if len(student) != len(teacher):
        raise _shape_error(student, teacher, "the features have different numbers of dimensions")
    if kind in ("linear", "mlp"):
        if student[:-1] != teacher[:-1]:
            raise _shape_error(student, teacher, f"a {kind} head maps the last dimension only; the "
                               "leading dimensions must be equal")
        return LinearHead(student[-1], teacher[-1]) if kind == "linear" else MLPHead(student[-1], teacher[-1])
    if len(student) != 3:
        raise _shape_error(student, teacher, f"a {kind} head needs [C, H, W] feature maps")
    if student[1:] != teacher[1:]:
        raise _shape_error(student, teacher, f"a {kind} head maps channels only; the spatial sizes "
                           f"{list(student[1:])} and {list(teacher[1:])} must be equal. Tap layers of "
                           "the same stride")
    kernel = 3 if kind == "conv3x3_bn" else 1
    return ConvHead(student[0], teacher[0], kernel_size=kernel, batch_norm=kind.endswith("_bn"))


__all__ = ["HEAD_KINDS", "ConvHead", "LinearHead", "MLPHead", "ShapeMismatchError", "build_head"]
