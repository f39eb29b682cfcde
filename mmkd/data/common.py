"""Pieces shared by the data modules: data root, resumable shuffling, in-memory datasets and the
loaders over them."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Iterator

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler


def default_data_root() -> Path:
    """``$MMKD_DATA`` when set, else ``~/.cache/mmkd/data``."""
    env = os.environ.get("MMKD_DATA")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "mmkd" / "data"


_MASK32 = 0xFFFFFFFF


def _fmix32(h: torch.Tensor) -> torch.Tensor:
    """MurmurHash3's 32-bit finaliser on int64 tensors or numpy arrays (products wrap; the low 32 bits are exact)."""
    h = h ^ (h >> 16)
    h = (h * 0x85EBCA6B) & _MASK32
    h = h ^ (h >> 13)
    h = (h * 0xC2B2AE35) & _MASK32
    return h ^ (h >> 16)


def sample_randint(seed: int, epochs: torch.Tensor, indices: torch.Tensor, stream: int, high: int) -> torch.Tensor:
    """Integers in ``[0, high)`` that depend only on (seed, epoch, index, stream).

    A hash, vectorised over a batch: augmentation needs no per-sample generator, survives a
    resume, and does not depend on worker count or on the order in which samples are drawn.
    """
    state = _fmix32(indices.long() & _MASK32)
    for value in (stream, epochs.long(), seed):
        state = _fmix32((state ^ ((value * 0x9E3779B1) & _MASK32)) + 0x7F4A7C15 & _MASK32)
    return state % high


def passthrough_collate(batch: dict) -> dict:
    """``collate_fn`` for datasets whose ``__getitems__`` already returns a collated batch."""
    return batch


class EpochShuffleSampler(DistributedSampler):
    """Shuffles with a permutation derived from (seed, epoch) and yields ``(index, epoch)``.

    Lightning calls ``set_epoch`` at the start of every epoch, so a run resumed from a checkpoint
    sees exactly the order (and, through the epoch in each key, the augmentation) of an
    uninterrupted run. Unlike ``RandomSampler`` nothing depends on the global RNG.

    Under ``torch.distributed`` each of ``num_replicas`` ranks takes every ``num_replicas``-th
    entry of the permutation, padded to a multiple of ``num_replicas`` as ``DistributedSampler``
    does. Being a ``DistributedSampler``, Lightning uses it as it is instead of wrapping it (a
    wrapper would not forward ``set_epoch``, and every epoch would repeat the first one's order).

    With ``length`` larger than the data set, an epoch is that many draws: successive passes,
    each its own permutation, and each pass its own augmentation key (a small labelled set
    cycled alongside a large unlabelled one).
    """

    def __init__(
        self,
        num_samples: int,
        seed: int = 0,
        num_replicas: int | None = None,
        rank: int | None = None,
        length: int | None = None,
    ) -> None:
        distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
        num_replicas = num_replicas if num_replicas is not None else (torch.distributed.get_world_size() if distributed else 1)
        rank = rank if rank is not None else (torch.distributed.get_rank() if distributed else 0)
        super().__init__(range(num_samples), num_replicas=num_replicas, rank=rank, shuffle=True, seed=seed)
        self.dataset_size = num_samples
        self.passes = 1
        if length is not None and length > self.total_size:
            self.num_samples = -(-length // num_replicas)
            self.total_size = self.num_samples * num_replicas
            self.passes = -(-self.total_size // num_samples)

    resume_epoch, resume_skip = -1, 0  # set by resume_at

    def resume_at(self, epoch: int, skip: int) -> None:
        """Leave out the first ``skip`` entries of this rank's share the next time ``epoch`` is
        iterated (a checkpoint taken after them). When the run goes on with a later epoch
        instead (the checkpoint closed its epoch), nothing is skipped."""
        self.resume_epoch, self.resume_skip = epoch, skip

    def __iter__(self) -> Iterator[tuple[int, int]]:
        # One permutation per pass, kept as int64 tensors (a list of a million Python ints costs
        # ~36 MB); this rank's positions index them, the padding wrapping round to the start.
        seed = self.seed * 7919 + self.epoch
        perms = [
            torch.randperm(self.dataset_size, generator=torch.Generator().manual_seed(seed * 1_000_003 + pass_ if pass_ else seed))
            for pass_ in range(self.passes)
        ]
        order = perms[0] if self.passes == 1 else torch.cat(perms)
        skip = self.resume_skip if self.epoch == self.resume_epoch else 0
        self.resume_epoch, self.resume_skip = -1, 0
        first, step = self.rank + skip * self.num_replicas, self.num_replicas
        for start in range(first, self.total_size, 4096 * step):  # a few thousand Python ints at a time
            positions = torch.arange(start, min(start + 4096 * step, self.total_size), step) % len(order)
            keys = self.epoch * self.passes + positions // self.dataset_size  # the pass a position falls in
            yield from zip(order[positions].tolist(), keys.tolist())


class ResumableDataLoader(DataLoader):
    """A ``DataLoader`` over an :class:`EpochShuffleSampler` whose position in the epoch goes into
    Lightning's checkpoints (Lightning calls ``state_dict`` / ``load_state_dict`` on training
    loaders that have them). A run resumed from a mid-epoch checkpoint then continues with the
    next batch of the same epoch, instead of replaying the epoch's first batches; the skipped
    samples are left out by the sampler, never loaded.

    The count is of batches handed out; Lightning does not prefetch from loaders with a length,
    so at a checkpoint that is the number of batches trained on.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if not isinstance(self.sampler, EpochShuffleSampler):
            raise TypeError("ResumableDataLoader needs an EpochShuffleSampler")
        self.batches_yielded = 0

    def __iter__(self) -> Iterator[Any]:
        sampler = self.sampler
        resuming = sampler.epoch == sampler.resume_epoch
        self.batches_yielded = sampler.resume_skip // self.batch_size if resuming else 0
        for batch in super().__iter__():
            self.batches_yielded += 1
            yield batch

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.sampler.epoch, "batches_yielded": self.batches_yielded}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.sampler.resume_at(state["epoch"], state["batches_yielded"] * self.batch_size)


class ImageTensorDataset(Dataset):
    """Greyscale images held in memory as uint8, normalised on access.

    Items are dicts ``{"image": [1, H, W] float, "label": int, "index": int}``; ``index`` is the
    position in the underlying split, the key a teacher-output cache uses. Keys are indices or
    ``(index, epoch)`` pairs (from :class:`EpochShuffleSampler`). ``__getitems__`` builds a whole
    batch with tensor operations (use ``collate_fn=passthrough_collate``). With ``augment``, a
    random shift (zero padding of ``pad`` pixels, random crop) and, if ``hflip``, a horizontal
    flip are drawn by :func:`sample_randint` from (seed, epoch, index).

    Also with ``augment``, as timm's ``create_transform`` orders them (and the file data modules,
    :mod:`mmkd.data.views`): ``auto_augment``, a timm RandAugment / AutoAugment string
    (``"rand-m9-mstd0.5-inc1"``, G2SD's specific stage), on the shifted image, and random erasing
    with probability ``re_prob`` (timm ``RandomErasing``, pixel mode) on the normalised one. Both
    run per sample under a seed drawn from (seed, epoch, index), so they repeat on resume.
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
        auto_augment: str | None = None,
        re_prob: float = 0.0,
    ) -> None:
        from mmkd.data.views import Augment  # here: views imports this module

        if images.dtype != torch.uint8 or images.ndim != 3:
            raise ValueError(f"expected uint8 images [N, H, W], got {images.dtype} {list(images.shape)}")
        if len(images) != len(labels):
            raise ValueError(f"{len(images)} images but {len(labels)} labels")
        self.images, self.labels = images, labels.long()
        self.mean, self.std = mean, std
        self.augment, self.pad, self.hflip, self.seed = augment, pad, hflip, seed
        self.auto_augment, self.re_prob = auto_augment, re_prob
        self._timm_augment = Augment(auto_augment=auto_augment, re_prob=re_prob)  # checks the string now

    def __len__(self) -> int:
        return len(self.images)

    def subset(self, indices: torch.Tensor, labels: torch.Tensor | None = None) -> "ImageTensorDataset":
        """The samples at ``indices`` (re-indexed from 0), with other ``labels`` if given."""
        indices = torch.as_tensor(indices, dtype=torch.long)
        labels = self.labels[indices] if labels is None else torch.as_tensor(labels)
        return ImageTensorDataset(
            self.images[indices], labels, self.mean, self.std, self.augment, self.pad, self.hflip, self.seed, self.auto_augment, self.re_prob
        )

    def sample_key(self, i: int) -> str:
        """A sample's name in a list of labelled samples: its position."""
        return str(i)

    def __getitem__(self, key: int | tuple[int, int]) -> dict:
        batch = self.__getitems__([key])
        return {"image": batch["image"][0], "label": batch["label"][0], "index": int(batch["index"][0])}

    def __getitems__(self, keys: list) -> dict:
        pairs = [key if isinstance(key, tuple) else (key, 0) for key in keys]
        indices = torch.tensor([index for index, _ in pairs], dtype=torch.long)
        epochs = torch.tensor([epoch for _, epoch in pairs], dtype=torch.long)
        images = self.images[indices].float().div_(255.0)
        if self.augment:
            images = self._augment(images, indices, epochs)
            if self.auto_augment:
                images = self._auto_augment(images, indices, epochs)
        images = (images - self.mean) / self.std
        if self.augment and self.re_prob > 0:
            images = self._random_erasing(images, indices, epochs)
        return {"image": images.unsqueeze(1), "label": self.labels[indices], "index": indices}

    def _auto_augment(self, images: torch.Tensor, indices: torch.Tensor, epochs: torch.Tensor) -> torch.Tensor:
        """timm's RandAugment per image, on its RGB copy as the file data modules run it (grey
        in, grey out: the three channels stay equal, and PIL's luma of equal channels is exact)."""
        import numpy as np
        from PIL import Image

        from mmkd.data.views import ViewSpec, _auto_augment, _seeded

        view = ViewSpec(size=tuple(images.shape[1:]), mean=(self.mean,), std=(self.std,), channels=1)
        transform = _auto_augment(self.auto_augment, view)
        seeds = sample_randint(self.seed, epochs, indices, 4, 2**31)
        pixels = images.mul(255.0).round_().to(torch.uint8).numpy()
        out = torch.empty_like(images)
        for i, (picture, seed) in enumerate(zip(pixels, seeds.tolist())):
            with _seeded(seed):
                augmented = transform(Image.fromarray(picture).convert("RGB")).convert("L")
            out[i] = torch.from_numpy(np.array(augmented, dtype=np.uint8)).float()
        return out.div_(255.0)

    def _random_erasing(self, images: torch.Tensor, indices: torch.Tensor, epochs: torch.Tensor) -> torch.Tensor:
        """timm's RandomErasing per normalised image ``[H, W]`` (as ``[1, H, W]``)."""
        from mmkd.data.views import _random_erasing, _seeded

        erase = _random_erasing(self._timm_augment)
        seeds = sample_randint(self.seed, epochs, indices, 5, 2**31)
        images = images.clone()
        for i, seed in enumerate(seeds.tolist()):
            with _seeded(seed):
                images[i] = erase(images[i].unsqueeze(0))[0]
        return images

    def _augment(self, images: torch.Tensor, indices: torch.Tensor, epochs: torch.Tensor) -> torch.Tensor:
        count, height, width = images.shape
        if self.pad:
            span = 2 * self.pad + 1
            top = sample_randint(self.seed, epochs, indices, 0, span)
            left = sample_randint(self.seed, epochs, indices, 1, span)
            padded = torch.nn.functional.pad(images, (self.pad,) * 4)
            rows = (top[:, None] + torch.arange(height))[:, :, None]
            cols = (left[:, None] + torch.arange(width))[:, None, :]
            images = padded[torch.arange(count)[:, None, None], rows, cols]
        if self.hflip:
            flip = sample_randint(self.seed, epochs, indices, 2, 2).bool()
            images = torch.where(flip[:, None, None], images.flip(-1), images)
        return images


class SplitsDataModule(L.LightningDataModule):
    """Loaders over ``self.splits`` (``"train"``, ``"val"``, ``"test"``, optionally
    ``"predict"``), which a subclass fills in ``setup``. Training order and augmentation keys come
    from an :class:`EpochShuffleSampler`; the position in the training epoch goes into
    checkpoints, so a run resumes mid-epoch. Batches are collated by ``collate_fn`` (by default
    the datasets' own ``__getitems__``, see :func:`passthrough_collate`).

    Args:
        batch_size: training batch size.
        eval_batch_size: batch size for val/test/predict (default: 2x ``batch_size``).
        seed: seed of the training order (subclasses also use it for their splits).
        num_workers: DataLoader workers (the data is in memory; 0 is usually fastest on CPU).
    """

    def __init__(self, batch_size: int = 128, eval_batch_size: int | None = None, seed: int = 0, num_workers: int = 0) -> None:
        super().__init__()
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size or 2 * batch_size
        self.seed, self.num_workers = seed, num_workers
        self.splits: dict[str, Dataset] = {}
        self._train_loader: ResumableDataLoader | None = None
        self._train_position: dict | None = None

    collate_fn = staticmethod(passthrough_collate)

    def _loader(self, split: str, batch_size: int, sampler: EpochShuffleSampler | None = None) -> DataLoader:
        return (ResumableDataLoader if sampler is not None else DataLoader)(
            self.splits[split],
            batch_size=batch_size,
            sampler=sampler,
            collate_fn=self.collate_fn,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
            pin_memory=torch.cuda.is_available(),
            # Its own generator: creating an iterator would otherwise draw a worker seed from the
            # global RNG, which a resumed run draws at another moment than an uninterrupted one.
            generator=torch.Generator().manual_seed(self.seed),
        )

    def train_dataloader(self) -> DataLoader:
        sampler = EpochShuffleSampler(len(self.splits["train"]), seed=self.seed)
        self._train_loader = self._loader("train", self.batch_size, sampler)
        if self._train_position is not None:
            self._train_loader.load_state_dict(self._train_position)
            self._train_position = None
        return self._train_loader

    # Lightning restores a data module before it builds the loaders, and a loader's own state
    # only when the loaders are built after the loop state is restored; a scheduler that asks for
    # ``estimated_stepping_batches`` builds them before. Keeping the position here covers both.
    def state_dict(self) -> dict:
        return {"train_position": self._train_loader.state_dict()} if self._train_loader is not None else {}

    def load_state_dict(self, state: dict) -> None:
        self._train_position = state.get("train_position")

    def val_dataloader(self) -> DataLoader:
        return self._loader("val", self.eval_batch_size)

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", self.eval_batch_size)

    def predict_dataloader(self) -> DataLoader:
        return self._loader("predict" if "predict" in self.splits else "test", self.eval_batch_size)


class InMemoryDataModule(SplitsDataModule):
    """A :class:`SplitsDataModule` whose splits are tensors held in memory, batched by the
    datasets' ``__getitems__`` (the demo and test-bed data sets)."""
