"""Pieces shared by the data modules: data root, resumable shuffling, in-memory image datasets."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Iterator

import torch
from torch.utils.data import Dataset, Sampler


def default_data_root() -> Path:
    """``$MMKD_DATA`` when set, else ``~/.cache/mmkd/data``."""
    env = os.environ.get("MMKD_DATA")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "mmkd" / "data"


def sample_generator(seed: int, epoch: int, index: int) -> torch.Generator:
    """A generator that depends only on (seed, epoch, index), so augmentation survives a resume
    and does not depend on worker count or on the order in which samples are drawn."""
    return torch.Generator().manual_seed((seed * 1_000_003 + epoch) * 10_000_019 + index)


class EpochShuffleSampler(Sampler[tuple[int, int]]):
    """Shuffles with a permutation derived from (seed, epoch) and yields ``(index, epoch)``.

    Lightning calls ``set_epoch`` at the start of every epoch, so a run resumed from a checkpoint
    sees exactly the order (and, through the epoch in each key, the augmentation) of an
    uninterrupted run. Unlike ``RandomSampler`` nothing depends on the global RNG.
    """

    def __init__(self, num_samples: int, seed: int = 0) -> None:
        self.num_samples = num_samples
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Iterator[tuple[int, int]]:
        generator = torch.Generator().manual_seed(self.seed * 7919 + self.epoch)
        for index in torch.randperm(self.num_samples, generator=generator).tolist():
            yield index, self.epoch

    def __len__(self) -> int:
        return self.num_samples


class ImageTensorDataset(Dataset):
    """Greyscale images held in memory as uint8, normalised on access.

    Items are dicts ``{"image": [1, H, W] float, "label": int, "index": int}``; ``index`` is the
    position in the underlying split, the key a teacher-output cache uses. With ``augment`` a
    random shift (zero padding of ``pad`` pixels, random crop) and, if ``hflip``, a horizontal flip
    are drawn from a generator seeded by (seed, epoch, index).
    """

    def __init__(
        self,
        images: torch.Tensor,
        labels: torch.Tensor,
        mean: float,
        std: float,
        augment: bool = False,
        pad: int = 2,
        hflip: bool = True,
        seed: int = 0,
    ) -> None:
        if images.dtype != torch.uint8 or images.ndim != 3:
            raise ValueError(f"expected uint8 images [N, H, W], got {images.dtype} {list(images.shape)}")
        if len(images) != len(labels):
            raise ValueError(f"{len(images)} images but {len(labels)} labels")
        self.images, self.labels = images, labels.long()
        self.mean, self.std = mean, std
        self.augment, self.pad, self.hflip, self.seed = augment, pad, hflip, seed

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, key: int | tuple[int, int]) -> dict:
        index, epoch = key if isinstance(key, tuple) else (key, 0)
        image = self.images[index].float().div_(255.0)
        if self.augment:
            image = self._augment(image, sample_generator(self.seed, epoch, index))
        image = (image - self.mean) / self.std
        return {"image": image.unsqueeze(0), "label": self.labels[index], "index": index}

    def _augment(self, image: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        height, width = image.shape
        if self.pad:
            padded = torch.nn.functional.pad(image, (self.pad,) * 4)
            top, left = torch.randint(0, 2 * self.pad + 1, (2,), generator=generator).tolist()
            image = padded[top : top + height, left : left + width]
        if self.hflip and torch.rand((), generator=generator) < 0.5:
            image = image.flip(-1)
        return image.contiguous()
