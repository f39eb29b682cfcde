"""Turning one encoded image into the views that student and teacher take: one crop, drawn from
(seed, epoch, index), decoded once, resized and normalised for each model in its own format.

A view's format (:class:`ViewSpec`) is a model's own preprocessing: timm's
``resolve_data_config`` (size, interpolation, mean/std, crop_pct) or open_clip's
``preprocess_cfg``, or set in the config. Training draws RandomResizedCrop + flip with the hash of
:func:`~mmkd.data.common.sample_randint` (so a resumed run and any worker count see the same
views); timm's RandAugment and random erasing run under a per-sample seed for the same reason.
"""

from __future__ import annotations

import math
import random
from dataclasses import asdict, dataclass
from typing import Any, Sequence

import numpy as np
import torch
from PIL import Image
from torch import nn

from mmkd.data.common import _MASK32, _fmix32

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
_RESAMPLE = {"bilinear": Image.BILINEAR, "bicubic": Image.BICUBIC, "nearest": Image.NEAREST, "lanczos": Image.LANCZOS, "box": Image.BOX}


@dataclass(frozen=True)
class ViewSpec:
    """How one model wants its images: ``size`` (height, width), channels (1 = greyscale),
    interpolation, per-channel mean/std, and ``crop_pct`` of the evaluation centre crop (the
    image's shorter side resized to ``size / crop_pct``, then the centre ``size`` kept)."""

    size: tuple[int, int] = (224, 224)
    mean: tuple[float, ...] = IMAGENET_MEAN
    std: tuple[float, ...] = IMAGENET_STD
    interpolation: str = "bilinear"
    crop_pct: float = 0.875
    channels: int = 3

    def __post_init__(self) -> None:
        size = (self.size, self.size) if isinstance(self.size, int) else tuple(int(s) for s in self.size)
        object.__setattr__(self, "size", size)
        if self.interpolation not in _RESAMPLE:
            raise ValueError(f"interpolation {self.interpolation!r} is not one of {sorted(_RESAMPLE)}")
        for name in ("mean", "std"):
            values = getattr(self, name)
            values = (float(values),) if isinstance(values, (int, float)) else tuple(float(v) for v in values)
            if len(values) != self.channels:  # ImageNet statistics of a greyscale model: their mean
                values = (sum(values) / len(values),) * self.channels if self.channels == 1 or len(values) == 1 else values
            if len(values) != self.channels:
                raise ValueError(f"{name} has {len(values)} values for {self.channels} channels")
            object.__setattr__(self, name, values)

    @property
    def shape(self) -> tuple[int, int, int]:
        return (self.channels, *self.size)

    def as_dict(self) -> dict[str, Any]:
        """Plain values (lists, not tuples): what a JSON fingerprint reads back."""
        return {key: list(value) if isinstance(value, tuple) else value for key, value in asdict(self).items()}


def view_spec(value: ViewSpec | dict | None) -> ViewSpec | None:
    """A ``ViewSpec`` from a config dict (``{size: 224, mean: [...], ...}``)."""
    if value is None or isinstance(value, ViewSpec):
        return value
    return ViewSpec(**value)


def _input_channels(model: nn.Module) -> int | None:
    first_conv = next((m for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Conv1d))), None)
    return first_conv.in_channels if isinstance(first_conv, nn.Conv2d) else None


def view_of_model(model: nn.Module) -> ViewSpec | None:
    """A model's own preprocessing: timm's ``resolve_data_config`` for a model (or the first
    sub-module) with a ``pretrained_cfg``, open_clip's ``preprocess_cfg`` of a CLIP's visual
    tower; ``None`` when the model declares neither."""
    channels = _input_channels(model) or 3
    for module in model.modules():
        cfg = getattr(module, "preprocess_cfg", None)
        if isinstance(cfg, dict) and "size" in cfg:  # open_clip
            size = cfg["size"]
            return ViewSpec(size=size, mean=cfg["mean"], std=cfg["std"], interpolation=cfg.get("interpolation", "bicubic"), crop_pct=1.0, channels=channels)
        if isinstance(getattr(module, "pretrained_cfg", None), dict):  # timm
            from timm.data import resolve_data_config

            config = resolve_data_config(model=module)
            interpolation = config["interpolation"] if config["interpolation"] in _RESAMPLE else "bicubic"
            return ViewSpec(size=tuple(config["input_size"][1:]), mean=config["mean"], std=config["std"],
                            interpolation=interpolation, crop_pct=config["crop_pct"], channels=channels)  # fmt: skip
    return None


# -- random draws from (seed, epoch, index) -------------------------------------------------------
def sample_uniforms(seed: int, epoch: int, index: int, stream: int, count: int) -> list[float]:
    """``count`` floats in [0, 1) that depend only on (seed, epoch, index, stream).

    The hash of :func:`~mmkd.data.common.sample_randint` (int64 arithmetic, products wrapping),
    on numpy arrays: a sample draws these twice, and a dozen torch calls on 40-element tensors
    cost more than the rest of the crop's bookkeeping."""
    state = _fmix32(np.full(count, index, dtype=np.int64) & _MASK32)
    for value in (np.arange(count, dtype=np.int64) + stream * 1000, np.full(count, epoch, dtype=np.int64), np.full(count, seed, dtype=np.int64)):
        state = _fmix32(((state ^ ((value * 0x9E3779B1) & _MASK32)) + 0x7F4A7C15) & _MASK32)
    return (state.astype(np.float64) / 2**32).tolist()


def random_resized_crop_box(
    width: int, height: int, draws: Sequence[float], scale: Sequence[float] = (0.08, 1.0), ratio: Sequence[float] = (3 / 4, 4 / 3)
) -> tuple[float, float, float, float]:
    """torchvision's ``RandomResizedCrop.get_params`` with its random numbers taken from
    ``draws`` (40 floats: 10 tries of area, log-ratio, top, left): the box (left, top, right,
    bottom) of a crop of ``scale`` of the area and aspect ratio in ``ratio``, else the centre
    crop clamped to ``ratio``."""
    area = width * height
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for attempt in range(10):
        u_area, u_ratio, u_top, u_left = draws[4 * attempt : 4 * attempt + 4]
        target_area = area * (scale[0] + (scale[1] - scale[0]) * u_area)
        aspect = math.exp(log_ratio[0] + (log_ratio[1] - log_ratio[0]) * u_ratio)
        w = int(round(math.sqrt(target_area * aspect)))
        h = int(round(math.sqrt(target_area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            top = int(u_top * (height - h + 1))
            left = int(u_left * (width - w + 1))
            return (left, top, left + w, top + h)
    in_ratio = width / height
    if in_ratio < min(ratio):
        w, h = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        w, h = int(round(height * max(ratio))), height
    else:
        w, h = width, height
    top, left = (height - h) // 2, (width - w) // 2
    return (left, top, left + w, top + h)


def center_crop_box(width: int, height: int, view: ViewSpec) -> tuple[float, float, float, float]:
    """The box of timm's evaluation transform in source pixels: the shorter side resized to
    ``size / crop_pct``, then the centre ``size`` crop, expressed as one box to resize from."""
    out_h, out_w = view.size
    scale_size = math.floor(min(out_h, out_w) / view.crop_pct)
    factor = min(width, height) / scale_size  # source pixels per resized pixel
    crop_w, crop_h = min(width, out_w * factor), min(height, out_h * factor)
    left, top = (width - crop_w) / 2, (height - crop_h) / 2
    return (left, top, left + crop_w, top + crop_h)


_AUTO_AUGMENT_KINDS = ("rand", "augmix", "original", "v0", "3a")


@dataclass
class Augment:
    """Training augmentation of the file data modules.

    Args:
        scale, ratio: RandomResizedCrop's area fraction and aspect-ratio range.
        hflip: probability of a horizontal flip.
        auto_augment: a timm RandAugment / AutoAugment string (``"rand-m9-mstd0.5-inc1"``, G2SD's
            and DeiT's), applied to the crop.
        re_prob: random erasing probability (timm ``RandomErasing``, pixel mode, on every view).
    """

    scale: tuple[float, float] = (0.08, 1.0)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    hflip: float = 0.5
    auto_augment: str | None = None
    re_prob: float = 0.0
    re_mode: str = "pixel"

    def __post_init__(self) -> None:  # a config mistake, said at setup rather than as a bad image
        if self.auto_augment and not self.auto_augment.startswith(_AUTO_AUGMENT_KINDS):
            raise ValueError(
                f"auto_augment {self.auto_augment!r} is not a timm RandAugment ('rand-m9-mstd0.5-inc1'), "
                "AutoAugment ('original', 'v0', '3a') or AugMix ('augmix-m5-w4-d2') string"
            )


class _seeded:
    """Python's, numpy's and torch's global RNGs seeded for one sample, restored afterwards (timm's
    RandAugment and RandomErasing draw from them)."""

    def __init__(self, seed: int) -> None:
        self.seed = seed

    def __enter__(self) -> None:
        self.states = random.getstate(), np.random.get_state(), torch.get_rng_state()
        random.seed(self.seed)
        np.random.seed(self.seed % 2**32)
        # the CPU generator only (the draws are on CPU): torch.manual_seed would also queue a seeding
        # of every CUDA device, with a stack trace per call, which cost more than the augmentation
        torch.default_generator.manual_seed(self.seed)

    def __exit__(self, *exc: Any) -> None:
        random.setstate(self.states[0])
        np.random.set_state(self.states[1])
        torch.set_rng_state(self.states[2])


def _to_tensor(image: Image.Image, view: ViewSpec) -> torch.Tensor:
    # HWC uint8 -> contiguous CHW uint8 first (as torchvision's to_tensor does), then the float
    # arithmetic on contiguous memory: the same values, about 3x faster than normalising the
    # channels-last view
    pixels = torch.from_numpy(np.array(image, dtype=np.uint8))
    pixels = pixels[None] if pixels.ndim == 2 else pixels.permute(2, 0, 1).contiguous()
    mean = torch.tensor(view.mean).view(-1, 1, 1)
    std = torch.tensor(view.std).view(-1, 1, 1)
    return pixels.float().div_(255.0).sub_(mean).div_(std)


def decode_views(
    file: Any,
    views: dict[str, ViewSpec],
    train: bool,
    seed: int,
    epoch: int,
    index: int,
    augment: Augment,
    draft: bool = True,
    crop: tuple[Sequence[float], bool] | None = None,
) -> tuple[dict[str, torch.Tensor], tuple[tuple[float, float, float, float], bool]]:
    """One image file into ``{key: [C, H, W] float}``, one tensor per view, all from one crop box,
    and that crop: its box (left, top, right, bottom) in the file's pixels and the flip.

    Training: a RandomResizedCrop box and a flip from (seed, epoch, index), or the given ``crop``
    (a view replayed from a teacher cache); evaluation: the centre-crop box of the first view's
    ``crop_pct``. With ``draft`` a JPEG is decoded at the largest reduction (1/2, 1/4, 1/8, by
    libjpeg's DCT scaling) that still leaves the crop at least as large as every view, which is
    where most of the decoding time goes; the box is scaled to the reduced image. Raises whatever
    PIL raises for a corrupt or truncated file.
    """
    first = next(iter(views.values()))
    with Image.open(file) as image:
        width, height = image.size
        if crop is not None:
            box, flip = tuple(float(v) for v in crop[0]), bool(crop[1])
        elif train:
            box = random_resized_crop_box(width, height, sample_uniforms(seed, epoch, index, 0, 40), augment.scale, augment.ratio)
            flip = sample_uniforms(seed, epoch, index, 1, 1)[0] < augment.hflip
        else:
            box, flip = center_crop_box(width, height, first), False
        drawn = (box, flip)
        largest_h = max(view.size[0] for view in views.values())
        largest_w = max(view.size[1] for view in views.values())
        if draft and image.format == "JPEG":
            reduction = min((box[2] - box[0]) / largest_w, (box[3] - box[1]) / largest_h)
            if reduction >= 2:
                mode = "L" if all(view.channels == 1 for view in views.values()) else "RGB"
                image.draft(mode, (math.ceil(width / reduction), math.ceil(height / reduction)))
                sx, sy = image.size[0] / width, image.size[1] / height
                box = (box[0] * sx, box[1] * sy, box[2] * sx, box[3] * sy)
        image.load()
        decoded = image
        out: dict[str, torch.Tensor] = {}
        canonical = None
        if train and augment.auto_augment:
            # RandAugment works on one picture: the crop at the largest view's size, which every
            # view is then resized from (so the same augmented pixels reach every model)
            canonical = decoded.convert("RGB").resize((largest_w, largest_h), _RESAMPLE[first.interpolation], box=box)
            with _seeded(_sample_seed(seed, epoch, index, 2)):
                canonical = _auto_augment(augment.auto_augment, first)(canonical)
        by_format: dict[tuple, torch.Tensor] = {}
        for key, view in views.items():
            form = (view.size, view.interpolation, view.channels, view.mean, view.std)
            if form in by_format:
                out[key] = by_format[form]
                continue
            mode = "L" if view.channels == 1 else "RGB"
            source = canonical if canonical is not None else decoded
            source_box = (0, 0, *canonical.size) if canonical is not None else box
            picture = (source if source.mode == mode else source.convert(mode)).resize((view.size[1], view.size[0]), _RESAMPLE[view.interpolation], box=source_box)
            if flip:
                picture = picture.transpose(Image.FLIP_LEFT_RIGHT)
            tensor = _to_tensor(picture, view)
            if train and augment.re_prob > 0:
                with _seeded(_sample_seed(seed, epoch, index, 3)):  # the same draws for every view
                    tensor = _random_erasing(augment)(tensor)
            out[key] = by_format[form] = tensor
    return out, drawn


def _sample_seed(seed: int, epoch: int, index: int, stream: int) -> int:
    return int(sample_uniforms(seed, epoch, index, 100 + stream, 1)[0] * 2**31)


_AUTO_AUGMENT_CACHE: dict[tuple, Any] = {}


def _auto_augment(config: str, view: ViewSpec) -> Any:
    """timm's RandAugment / AutoAugment / AugMix transform of ``config``, as ``create_transform``
    builds it (fill colour the view's mean, translations relative to its size)."""
    key = (config, view.size, view.mean)
    if key not in _AUTO_AUGMENT_CACHE:
        from timm.data.auto_augment import augment_and_mix_transform, auto_augment_transform, rand_augment_transform

        hparams = {"translate_const": int(min(view.size) * 0.45), "img_mean": tuple(min(255, round(255 * m)) for m in (view.mean * 3)[:3])}
        if config.startswith("rand"):
            transform = rand_augment_transform(config, hparams)
        elif config.startswith("augmix"):
            transform = augment_and_mix_transform(config, hparams)
        elif config.startswith(("original", "v0", "3a")):
            transform = auto_augment_transform(config, hparams)
        else:
            raise ValueError(f"auto_augment {config!r} is not a timm RandAugment ('rand-...'), AutoAugment ('original', 'v0', '3a') or AugMix ('augmix-...') string")
        _posterize_keeps_zero_bits(transform)
        _AUTO_AUGMENT_CACHE[key] = transform
    return _AUTO_AUGMENT_CACHE[key]


def _posterize_zero_bits_as_black(image: Image.Image, bits_to_keep: int, **kwargs: Any) -> Image.Image:
    """timm's ``posterize`` for any bit count. At full magnitude (``rand-m9-mstd0.5``'s magnitude noise
    reaches the cap of 10 in about 2 % of draws) ``PosterizeIncreasing`` keeps 0 bits, which the Pillow
    of timm's and MAE's days turned into a black image (``i & ~255`` for every level) and Pillow >= 10
    refuses with a ValueError that would stop training."""
    from timm.data.auto_augment import posterize

    if bits_to_keep <= 0:
        return Image.new(image.mode, image.size)  # all channels 0
    return posterize(image, bits_to_keep, **kwargs)


def _posterize_keeps_zero_bits(transform: Any) -> None:
    """Swap :func:`_posterize_zero_bits_as_black` into the posterize ops of a timm RandAugment / AugMix
    (``ops``) or AutoAugment (``policy``, lists of ops)."""
    from timm.data.auto_augment import posterize

    ops = list(getattr(transform, "ops", []) or [])
    for sub_policy in getattr(transform, "policy", []) or []:
        ops += list(sub_policy)
    for op in ops:
        if getattr(op, "aug_fn", None) is posterize:
            op.aug_fn = _posterize_zero_bits_as_black


def _random_erasing(augment: Augment) -> Any:
    from timm.data.random_erasing import RandomErasing

    return RandomErasing(probability=augment.re_prob, mode=augment.re_mode, device="cpu")
