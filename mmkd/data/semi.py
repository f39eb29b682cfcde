"""Semi-supervised splits of a labelled data set: a class-balanced labelled part and the
unlabelled rest, trained on side by side (one labelled and one unlabelled batch per step)."""

from __future__ import annotations

import math

import lightning as L
import torch
from lightning.pytorch.utilities import CombinedLoader
from torch.utils.data import DataLoader

from mmkd.data.common import EpochShuffleSampler, ImageTensorDataset, ResumableDataLoader, passthrough_collate
from mmkd.data.images import IDXImageDataModule


def balanced_labeled_split(
    labels: torch.Tensor,
    fraction: float | None = None,
    shots_per_class: int | None = None,
    seed: int = 13,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Indices of a class-balanced labelled subset and of the (disjoint) unlabelled rest.

    ``fraction``: ``ceil(N * fraction)`` labelled samples, the same number per class up to one
    (the extra ones go to classes picked with the seed); ``shots_per_class``: exactly k per class.
    Within a class the samples are drawn with the seed. DHO's ImageNet split (seed 13) also
    balances classes, reaching at least ``N * fraction`` by its own rounding cascade.
    """
    if (fraction is None) == (shots_per_class is None):
        raise ValueError("give exactly one of labeled_fraction and shots_per_class")
    classes = torch.unique(labels)
    generator = torch.Generator().manual_seed(seed)
    if shots_per_class is not None:
        quota = {int(c): shots_per_class for c in classes}
    else:
        if not 0 < fraction < 1:
            raise ValueError(f"labeled_fraction must be in (0, 1), got {fraction}")
        total = math.ceil(len(labels) * fraction)
        base, extra = divmod(total, len(classes))
        lucky = set(classes[torch.randperm(len(classes), generator=generator)[:extra]].tolist())
        quota = {int(c): base + (int(c) in lucky) for c in classes}
    labeled = []
    for c in classes.tolist():
        members = torch.nonzero(labels == c).flatten()
        if quota[c] > len(members):
            raise ValueError(f"class {c} has {len(members)} samples, fewer than the {quota[c]} labelled ones asked for")
        labeled.append(members[torch.randperm(len(members), generator=generator)[: quota[c]]])
    labeled_idx = torch.cat(labeled).sort().values
    is_labeled = torch.zeros(len(labels), dtype=torch.bool)
    is_labeled[labeled_idx] = True
    return labeled_idx, torch.nonzero(~is_labeled).flatten()


class SemiSupervisedDataModule(L.LightningDataModule):
    """A labelled data module turned semi-supervised: its training split becomes a labelled part
    (``labeled_fraction`` or ``shots_per_class``, class-balanced, seeded by ``split_seed``) and an
    unlabelled part holding the rest, whose labels are replaced by -1 so that no training step
    can use them. Validation and test are the wrapped module's.

    Training batches are ``{"labeled": batch, "unlabeled": batch}``. As in DHO's code, an epoch is
    one pass over the unlabelled part; the labelled part is drawn alongside, reshuffled (and
    re-augmented) every time it is used up, so each step has one batch of each. Both positions are
    kept in checkpoints, so a run resumes mid-epoch.

    Args:
        data: the labelled data module (e.g. ``FashionMNISTDataModule``); its ``batch_size`` is
            the unlabelled batch size, its ``seed`` and augmentation apply to both parts.
        labeled_fraction: fraction of the training split that keeps its labels.
        shots_per_class: instead, k labelled samples per class.
        split_seed: seed of the labelled/unlabelled split (DHO uses 13).
        labeled_batch_size: labelled samples per step (default: the unlabelled batch size).
    """

    def __init__(
        self,
        data: IDXImageDataModule,
        labeled_fraction: float | None = 0.01,
        shots_per_class: int | None = None,
        split_seed: int = 13,
        labeled_batch_size: int | None = None,
    ) -> None:
        super().__init__()
        if shots_per_class is not None:
            labeled_fraction = None
        self.data = data
        self.labeled_fraction, self.shots_per_class, self.split_seed = labeled_fraction, shots_per_class, split_seed
        self.labeled_batch_size = labeled_batch_size or data.batch_size
        self.parts: dict[str, ImageTensorDataset] = {}
        self._loaders: dict[str, ResumableDataLoader] = {}
        self._positions: dict | None = None

    # what models and distillers read from a data module
    num_classes = property(lambda self: self.data.num_classes)
    input_shape = property(lambda self: self.data.input_shape)
    class_names = property(lambda self: self.data.class_names)
    mean = property(lambda self: self.data.mean)
    std = property(lambda self: self.data.std)

    def prepare_data(self) -> None:
        self.data.prepare_data()

    def setup(self, stage: str | None = None) -> None:
        if self.parts:
            return
        self.data.setup(stage)
        train = self.data.splits["train"]
        labeled_idx, unlabeled_idx = balanced_labeled_split(train.labels, self.labeled_fraction, self.shots_per_class, self.split_seed)

        def part(indices: torch.Tensor, labels: torch.Tensor) -> ImageTensorDataset:
            return ImageTensorDataset(
                train.images[indices], labels, train.mean, train.std,
                augment=train.augment, pad=train.pad, hflip=train.hflip, seed=train.seed,
            )  # fmt: skip

        self.parts = {
            "labeled": part(labeled_idx, train.labels[labeled_idx]),
            "unlabeled": part(unlabeled_idx, torch.full((len(unlabeled_idx),), -1)),
        }

    def _loader(self, name: str, sampler: EpochShuffleSampler, batch_size: int) -> ResumableDataLoader:
        return ResumableDataLoader(
            self.parts[name], batch_size=batch_size, sampler=sampler, collate_fn=passthrough_collate,
            num_workers=self.data.num_workers, persistent_workers=self.data.num_workers > 0,
            generator=torch.Generator().manual_seed(self.data.seed),
        )  # fmt: skip

    def train_dataloader(self) -> CombinedLoader:
        seed, batch_size = self.data.seed, self.data.batch_size
        unlabeled = EpochShuffleSampler(len(self.parts["unlabeled"]), seed=seed)
        steps = math.ceil(len(unlabeled) / batch_size)
        labeled = EpochShuffleSampler(
            len(self.parts["labeled"]), seed=seed + 1, length=steps * self.labeled_batch_size * unlabeled.num_replicas
        )
        self._loaders = {
            "labeled": self._loader("labeled", labeled, self.labeled_batch_size),
            "unlabeled": self._loader("unlabeled", unlabeled, batch_size),
        }
        if self._positions is not None:
            for name, position in self._positions.items():
                self._loaders[name].load_state_dict(position)
            self._positions = None
        return CombinedLoader(self._loaders, mode="max_size_cycle")

    # See IDXImageDataModule.state_dict: the positions survive loaders built before the restore.
    def state_dict(self) -> dict:
        return {"train_positions": {name: loader.state_dict() for name, loader in self._loaders.items()}} if self._loaders else {}

    def load_state_dict(self, state: dict) -> None:
        self._positions = state.get("train_positions")

    def val_dataloader(self) -> DataLoader:
        return self.data.val_dataloader()

    def test_dataloader(self) -> DataLoader:
        return self.data.test_dataloader()

    def predict_dataloader(self) -> DataLoader:
        return self.data.predict_dataloader()
