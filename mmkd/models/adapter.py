"""Showing one batch to a model with another input format (a teacher with its own resolution,
channels and normalisation)."""

from __future__ import annotations

from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import nn


def _per_channel(values: float | Sequence[float]) -> torch.Tensor:
    return torch.tensor([values] if isinstance(values, (int, float)) else list(values), dtype=torch.float32).view(1, -1, 1, 1)


class ImageAdapter(nn.Module):
    """Re-expresses a normalised image batch in a model's own format: undo the data's
    normalisation, repeat greyscale to ``channels``, resize to ``size`` and normalise with the
    model's ``mean``/``std``.

    Applied to the batch the student sees, it gives the teacher the *same* (randomly cropped,
    flipped) image at its own resolution. DHO's training script instead resizes one crop, taken
    at the teacher's resolution, to both sizes: the same view, but with the source's detail
    where the source is larger than the student's input (see :class:`~mmkd.distillers.DHO`). The data's normalisation (``input_mean``/``input_std``) may be set later with
    :meth:`set_input_normalization` (distillers take it from the data module at setup); nothing
    here is a buffer, so a teacher's weight fingerprint does not depend on it.

    Args:
        size: output height and width (an int for square); ``None`` keeps the input's.
        mean, std: the model's per-channel normalisation.
        channels: the model's input channels.
        input_mean, input_std: the normalisation the batches arrive with.
        interpolation: ``"bicubic"`` (CLIP's), ``"bilinear"`` or ``"nearest"``.
    """

    def __init__(
        self,
        size: int | Sequence[int] | None,
        mean: float | Sequence[float],
        std: float | Sequence[float],
        channels: int = 3,
        input_mean: float | Sequence[float] | None = None,
        input_std: float | Sequence[float] | None = None,
        interpolation: str = "bicubic",
    ) -> None:
        super().__init__()
        self.size = (size, size) if isinstance(size, int) else tuple(size) if size is not None else None
        self.mean, self.std = _per_channel(mean), _per_channel(std)
        self.channels, self.interpolation = channels, interpolation
        self.input_mean = self.input_std = None
        if input_mean is not None and input_std is not None:
            self.set_input_normalization(input_mean, input_std)

    def set_input_normalization(self, mean: float | Sequence[float], std: float | Sequence[float]) -> None:
        self.input_mean, self.input_std = _per_channel(mean), _per_channel(std)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if self.input_mean is None:
            raise RuntimeError(
                "ImageAdapter does not know how the input batches are normalised: set input_mean/input_std "
                "(or use a distiller that takes them from the data module's mean/std)"
            )
        device = images.device
        pixels = images.float() * self.input_std.to(device) + self.input_mean.to(device)
        if pixels.shape[1] != self.channels:
            if pixels.shape[1] != 1:
                raise ValueError(f"cannot turn {pixels.shape[1]}-channel images into {self.channels} channels")
            pixels = pixels.expand(-1, self.channels, -1, -1)
        if self.size is not None and tuple(pixels.shape[-2:]) != self.size:
            antialias = self.interpolation in ("bilinear", "bicubic")
            pixels = F.interpolate(pixels, size=self.size, mode=self.interpolation, align_corners=False if antialias else None, antialias=antialias)
        return (pixels - self.mean.to(device)) / self.std.to(device)


def set_input_normalization(module: nn.Module, datamodule: Any, view: str | None = None) -> None:
    """Give every :class:`ImageAdapter` under ``module`` that lacks one the data module's
    ``mean``/``std``, or those of its ``view`` (e.g. ``teacher_image``) where it gives one: a
    file data module's teacher view is already at the teacher's size and normalisation, so the
    adapter then changes nothing."""
    views = getattr(datamodule, "views", None) if view is not None else None
    chosen = views.get(view) if isinstance(views, dict) else None
    for adapter in module.modules():
        if isinstance(adapter, ImageAdapter) and adapter.input_mean is None:
            mean, std = (chosen.mean, chosen.std) if chosen is not None else (getattr(datamodule, "mean", None), getattr(datamodule, "std", None))
            if mean is None or std is None:
                raise ValueError(f"{type(datamodule).__name__} has no mean/std; set input_mean/input_std of the ImageAdapter")
            adapter.set_input_normalization(mean, std)


TEACHER_INPUT_KEYS = ("size", "channels", "mean", "std", "interpolation", "input_mean", "input_std")


def teacher_input_adapter(spec: str | dict[str, Any], teacher: nn.Module, datamodule: Any = None) -> ImageAdapter:
    """The :class:`ImageAdapter` a distiller's ``teacher_input`` option asks for.

    ``spec`` is ``"pretrained"``: the teacher's own size, interpolation and normalisation, from
    timm's ``pretrained_cfg`` or open_clip's ``preprocess_cfg`` (an ImageNet teacher at 224 px,
    mean 0.5, on 28 px grey images); or a dict of any of ``size``, ``channels``, ``mean``,
    ``std``, ``interpolation``, where a key left out leaves that property as the data has it
    (``{channels: 3}`` only repeats grey to RGB). ``channels`` defaults to the teacher's first
    convolution's either way. ``input_mean``/``input_std`` (how the batches are normalised)
    default to the data module's ``mean``/``std``."""
    from mmkd.data.views import _input_channels, view_of_model

    if spec == "pretrained":
        view = view_of_model(teacher)
        if view is None:
            raise ValueError(
                f"teacher_input: pretrained, but the teacher ({type(teacher).__name__}) declares no pretrained config "
                "(timm pretrained_cfg or open_clip preprocess_cfg): give teacher_input as {size: ..., channels: ..., mean: ..., std: ...}"
            )
        spec = {"size": list(view.size), "channels": view.channels, "mean": list(view.mean), "std": list(view.std), "interpolation": view.interpolation}
    if not isinstance(spec, dict):
        raise ValueError(f"teacher_input must be 'pretrained' or a dict of {list(TEACHER_INPUT_KEYS)}, got {spec!r}")
    unknown = sorted(set(spec) - set(TEACHER_INPUT_KEYS))
    if unknown:
        raise ValueError(f"teacher_input has unknown keys {unknown}; the keys are {list(TEACHER_INPUT_KEYS)}")
    input_mean = spec.get("input_mean", getattr(datamodule, "mean", None))
    input_std = spec.get("input_std", getattr(datamodule, "std", None))
    if input_mean is None or input_std is None:
        raise ValueError(
            f"teacher_input needs the data's normalisation: {type(datamodule).__name__} has no mean/std; "
            "add input_mean and input_std to teacher_input"
        )
    return ImageAdapter(
        size=spec.get("size"), mean=spec.get("mean", input_mean), std=spec.get("std", input_std),
        channels=int(spec.get("channels") or _input_channels(teacher) or 3), input_mean=input_mean, input_std=input_std,
        interpolation=spec.get("interpolation", "bilinear"),
    )  # fmt: skip
