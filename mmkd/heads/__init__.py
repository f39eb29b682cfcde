"""Feature-alignment heads (connectors): map a student feature to the teacher's shape.

Heads are built from shapes observed in one dry forward pass, so configs only name the kind.
Shapes here exclude the batch dimension.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

HEAD_KINDS = ("identity", "linear", "mlp", "conv1x1", "conv1x1_bn", "conv3x3_bn", "grid")
MAX_PREFIX_TOKENS = 8  # class, distillation and register tokens ahead of a ViT's patch tokens


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


def token_grid(num_tokens: int) -> tuple[int, int]:
    """``(prefix, side)`` of ``num_tokens`` ViT tokens: ``prefix`` class/distillation/register
    tokens ahead of a ``side x side`` grid of patch tokens, the fewest prefix tokens that leave a
    square (197 -> 1 + 14 x 14, 16 -> 0 + 4 x 4). Raises ``ValueError`` when no square grid is
    left by at most ``MAX_PREFIX_TOKENS`` prefix tokens."""
    side = math.isqrt(num_tokens)
    prefix = num_tokens - side * side
    if side == 0 or prefix > MAX_PREFIX_TOKENS:
        raise ValueError(f"{num_tokens} tokens are not a square grid of patch tokens after at most "
                         f"{MAX_PREFIX_TOKENS} class/register tokens")
    return prefix, side


class GridHead(nn.Module):
    """Align features of different layouts or strides: ViT tokens ``[N, D]`` and CNN maps
    ``[C, H, W]``, in any combination.

    The student feature becomes a map (tokens: the prefix tokens set aside, the patch tokens laid
    out row by row as timm's ``PatchEmbed`` flattens its convolution), is resampled to the teacher's
    grid (adaptive average pooling where the teacher's grid is coarser in both directions, bilinear
    interpolation otherwise), its channels projected by a 1x1 convolution, and laid out as the
    teacher's feature. Resampling and projection commute (the resampling weights of each output
    cell sum to 1), so the projection runs on the smaller of the two grids. A teacher's prefix
    tokens (the class token, ...) are predicted by one linear layer from the student's first prefix
    token, or, when the student has none, from the mean of its grid.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        in_grid: tuple[int, int],
        out_grid: tuple[int, int],
        in_prefix: int | None = None,
        out_prefix: int | None = None,
    ) -> None:
        super().__init__()
        self.in_grid, self.out_grid = tuple(in_grid), tuple(out_grid)
        self.in_prefix, self.out_prefix = in_prefix, out_prefix  # None: a [C, H, W] map, else tokens
        self.proj = nn.Conv2d(in_channels, out_channels, 1)
        self.prefix_proj = nn.Linear(in_channels, out_prefix * out_channels) if out_prefix else None
        self.project_first = out_grid[0] * out_grid[1] > in_grid[0] * in_grid[1]

    def resample(self, grid: torch.Tensor) -> torch.Tensor:
        if tuple(grid.shape[-2:]) == self.out_grid:
            return grid
        if all(out <= size for out, size in zip(self.out_grid, grid.shape[-2:])):
            return F.adaptive_avg_pool2d(grid, self.out_grid)
        return F.interpolate(grid, size=self.out_grid, mode="bilinear", align_corners=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.in_prefix is None:
            grid, summary = x, None
        else:
            summary = x[:, 0] if self.in_prefix else None
            grid = x[:, self.in_prefix:].transpose(1, 2).reshape(x.shape[0], x.shape[2], *self.in_grid)
        if self.prefix_proj is not None and summary is None:
            summary = grid.mean(dim=(2, 3))
        grid = self.resample(self.proj(grid)) if self.project_first else self.proj(self.resample(grid))
        if self.out_prefix is None:
            return grid
        tokens = grid.flatten(2).transpose(1, 2)
        if self.prefix_proj is None:
            return tokens
        prefix = self.prefix_proj(summary).reshape(x.shape[0], self.out_prefix, -1)
        return torch.cat([prefix, tokens], dim=1)


def _layout(shape: tuple[int, ...]) -> tuple[int, tuple[int, int], int | None]:
    """``(channels, grid, prefix)`` of a token or map shape; ``prefix`` is None for maps."""
    if len(shape) == 3:
        return shape[0], (shape[1], shape[2]), None
    prefix, side = token_grid(shape[0])
    return shape[1], (side, side), prefix


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
    if kind == "grid":
        if len(student) not in (2, 3) or len(teacher) not in (2, 3):
            raise _shape_error(student, teacher, "a grid head aligns [N, D] tokens and [C, H, W] maps; for "
                               "pooled [D] vectors use head 'linear' (a tap such as 'fc:input' gives the pooled feature)")
        try:
            (in_channels, in_grid, in_prefix), (out_channels, out_grid, out_prefix) = _layout(student), _layout(teacher)
        except ValueError as err:
            raise _shape_error(student, teacher, str(err)) from None
        return GridHead(in_channels, out_channels, in_grid, out_grid, in_prefix, out_prefix)
    if len(student) != len(teacher):
        raise _shape_error(student, teacher, "the features have different numbers of dimensions (tokens and "
                           "feature maps?); head 'grid' aligns tokens with maps")
    if kind in ("linear", "mlp"):
        if student[:-1] != teacher[:-1]:
            raise _shape_error(student, teacher, f"a {kind} head maps the last dimension only; the "
                               "leading dimensions must be equal (head 'grid' resamples token grids)")
        return LinearHead(student[-1], teacher[-1]) if kind == "linear" else MLPHead(student[-1], teacher[-1])
    if len(student) != 3:
        raise _shape_error(student, teacher, f"a {kind} head needs [C, H, W] feature maps")
    if student[1:] != teacher[1:]:
        raise _shape_error(student, teacher, f"a {kind} head maps channels only; the spatial sizes "
                           f"{list(student[1:])} and {list(teacher[1:])} must be equal. Tap layers of "
                           "the same stride, or set head 'grid' (resamples to the teacher's grid)")
    kernel = 3 if kind == "conv3x3_bn" else 1
    return ConvHead(student[0], teacher[0], kernel_size=kernel, batch_norm=kind.endswith("_bn"))


__all__ = ["HEAD_KINDS", "ConvHead", "GridHead", "LinearHead", "MLPHead", "ShapeMismatchError", "build_head", "token_grid"]
