"""Mixup and CutMix of single training samples, each with a partner and a ratio drawn from
(seed, epoch, index), so that a teacher cache can record every mixed view and training can
replay it (:mod:`mmkd.core.cache`).

This is timm's ``Mixup`` in its ``mode="elem"`` (one ratio per sample, and for each sample a
switch between mixup and CutMix), moved from the batch into the data set. Two differences, both
forced by a draw that may depend on nothing but (seed, epoch, index):

* the partner is any other sample of the training split, drawn at random; timm pairs sample
  ``i`` of a batch with sample ``B - 1 - i`` of the same (shuffled) batch, which is a random
  partner as well, but one that depends on the batch's composition;
* each sample is mixed on its own (``elem``), never the whole batch with one ratio (timm's
  default ``mode="batch"``, which G2SD's official fine-tuning uses): a shared ratio would
  depend on which samples share the batch.

The partner is decoded with its own crop and augmentation of the same epoch, the pixels it has
as a sample of its own. A mixed sample costs two decodes.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

#: batch entries of a mixed training sample: its soft target [num_classes], its partner's index,
#: and the draw (ratio, CutMix or not, the CutMix box centre as fractions of height and width)
MIX_TARGET, MIX_PARTNER, MIX_PARAMS = "mix_target", "mix_partner", "mix_params"
_MIX_STREAM = 0x6D6978  # "mix": the draws of mixing, apart from every other draw of a sample


@dataclass(frozen=True)
class SampleMixup:
    """Sample-level Mixup / CutMix, timm ``Mixup``'s arguments and defaults (``mode="elem"``).

    Args:
        mixup_alpha: Beta(alpha, alpha) of the mixup ratio (0: no mixup).
        cutmix_alpha: Beta(alpha, alpha) of the CutMix ratio (0: no CutMix).
        prob: probability that a sample is mixed at all.
        switch_prob: with both alphas set, probability of CutMix rather than mixup.
        label_smoothing: of the one-hot targets before they are mixed.
        correct_lam: CutMix's ratio from the area of its box once clipped to the image (timm's).
    """

    mixup_alpha: float = 1.0
    cutmix_alpha: float = 0.0
    prob: float = 1.0
    switch_prob: float = 0.5
    label_smoothing: float = 0.1
    correct_lam: bool = True

    def __post_init__(self) -> None:
        if self.mixup_alpha < 0 or self.cutmix_alpha < 0 or not (self.mixup_alpha or self.cutmix_alpha):
            raise ValueError(f"mixup: mixup_alpha and cutmix_alpha must be >= 0 and one of them > 0, got {self.mixup_alpha}, {self.cutmix_alpha}")
        if not (0 <= self.prob <= 1 and 0 <= self.switch_prob <= 1 and 0 <= self.label_smoothing < 1):
            raise ValueError(f"mixup: prob and switch_prob must be in [0, 1] and label_smoothing in [0, 1), got {self.prob}, {self.switch_prob}, {self.label_smoothing}")

    def draw(self, seed: int, epoch: int, index: int, num_samples: int) -> tuple[int, np.ndarray]:
        """The partner of sample ``index`` (another sample, where there is one) and the draw
        ``[ratio, cutmix, centre_y, centre_x]`` in float32 (ratio 1: not mixed), the order of
        timm's ``_params_per_elem``: the switch, the ratio, whether to mix."""
        rng = np.random.default_rng([seed, epoch, index, _MIX_STREAM])
        partner = index
        if num_samples > 1:
            partner = int(rng.integers(num_samples - 1))
            partner += partner >= index
        cutmix = self.cutmix_alpha > 0 and (self.mixup_alpha == 0 or rng.random() < self.switch_prob)
        ratio = rng.beta(self.cutmix_alpha, self.cutmix_alpha) if cutmix else rng.beta(self.mixup_alpha, self.mixup_alpha)
        if rng.random() >= self.prob:
            ratio = 1.0
        return partner, np.array([ratio, cutmix, *rng.random(2)], dtype=np.float32)

    def mix(self, own: dict[str, torch.Tensor], partner: dict[str, torch.Tensor], params: np.ndarray) -> tuple[dict[str, torch.Tensor], float]:
        """Every view of a sample mixed with the same view of its partner, and the ratio of the
        sample's own target (CutMix's from the first view's box with ``correct_lam``). Each view
        is cut at its own size, the box centred at the same fractions of height and width."""
        ratio, cutmix, centre_y, centre_x = (float(v) for v in params)
        if ratio >= 1.0:
            return own, 1.0
        mixed, target_ratio = {}, None
        for key, image in own.items():
            if cutmix:
                height, width = image.shape[-2:]
                top, bottom, left, right = cutmix_box(height, width, ratio, centre_y, centre_x)
                image = image.clone()
                image[..., top:bottom, left:right] = partner[key][..., top:bottom, left:right]
                view_ratio = 1.0 - (bottom - top) * (right - left) / (height * width) if self.correct_lam else ratio
            else:
                image = image * ratio + partner[key] * (1.0 - ratio)
                view_ratio = ratio
            mixed[key] = image
            target_ratio = view_ratio if target_ratio is None else target_ratio
        return mixed, target_ratio

    def target(self, label: int, partner_label: int, ratio: float, num_classes: int) -> torch.Tensor:
        """timm's ``mixup_target`` for one sample: smoothed one-hot targets, mixed by ``ratio``."""
        off = self.label_smoothing / num_classes
        own, other = torch.full((num_classes,), off), torch.full((num_classes,), off)
        own[label] = other[partner_label] = 1.0 - self.label_smoothing + off
        return own * ratio + other * (1.0 - ratio)


def cutmix_box(height: int, width: int, ratio: float, centre_y: float, centre_x: float) -> tuple[int, int, int, int]:
    """timm's ``rand_bbox`` (no margin; timm 1.0's, whose box is ``cut // 2`` above the centre and
    ``(cut + 1) // 2`` below) with its centre ``randint(0, H)``, ``randint(0, W)`` taken as
    ``floor(fraction * size)``: a box of ``sqrt(1 - ratio)`` of each side, clipped to the image;
    ``(top, bottom, left, right)``."""
    side = np.sqrt(1.0 - ratio)
    cut_h, cut_w = int(height * side), int(width * side)
    cy, cx = min(int(centre_y * height), height - 1), min(int(centre_x * width), width - 1)
    top, bottom = int(np.clip(cy - cut_h // 2, 0, height)), int(np.clip(cy + (cut_h + 1) // 2, 0, height))
    left, right = int(np.clip(cx - cut_w // 2, 0, width)), int(np.clip(cx + (cut_w + 1) // 2, 0, width))
    return top, bottom, left, right
