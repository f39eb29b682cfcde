"""Semi-supervised splits of a labelled data set: a class-balanced labelled part and the
unlabelled rest, trained on side by side (one labelled and one unlabelled batch per step)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.utilities import CombinedLoader
from torch.utils.data import DataLoader, Dataset

from mmkd.data.common import EpochShuffleSampler, ResumableDataLoader


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
    and an unlabelled part whose labels are replaced by -1, so that no training step can use
    them. Validation and test are the wrapped module's.

    The labelled part is ``labeled_fraction`` or ``shots_per_class`` of the training split
    (class-balanced, seeded by ``split_seed``), or the samples that ``labeled_list`` names; the
    unlabelled part is the rest, or the images at ``unlabeled`` (another location, read by the
    wrapped file data module, e.g. a folder of images without classes).

    Training batches are ``{"labeled": batch, "unlabeled": batch}``. As in DHO's code, an epoch is
    one pass over the unlabelled part; the labelled part is drawn alongside, reshuffled (and
    re-augmented) every time it is used up, so each step has one batch of each. Both positions are
    kept in checkpoints, so a run resumes mid-epoch.

    Works over any data module whose training split has ``labels`` and ``subset(indices,
    labels)`` (the in-memory sets and :class:`~mmkd.data.files.ImageFilesDataModule`).

    Args:
        data: the labelled data module (e.g. ``FashionMNISTDataModule``); its ``batch_size`` is
            the unlabelled batch size, its ``seed`` and augmentation apply to both parts.
        labeled_fraction: fraction of the training split that keeps its labels.
        shots_per_class: instead, k labelled samples per class.
        split_seed: seed of the labelled/unlabelled split (DHO uses 13).
        labeled_list: instead, a text file naming the labelled training samples, one per line
            (a path relative to the training split, or just the file name; a shard key; a row
            number), as the split files of DHO and of the semi-supervised ImageNet benchmarks.
        unlabeled: the unlabelled images from another location instead of the rest of the
            training split (needs a data module with ``open_location``, as the file modules).
        labeled_batch_size: labelled samples per step (default: the unlabelled batch size).
    """

    semi_supervised = True  # what Classifier.setup checks: batches are {"labeled", "unlabeled"} pairs

    def __init__(
        self,
        data: L.LightningDataModule,
        labeled_fraction: float | None = 0.01,
        shots_per_class: int | None = None,
        split_seed: int = 13,
        labeled_list: str | None = None,
        unlabeled: str | None = None,
        labeled_batch_size: int | None = None,
    ) -> None:
        super().__init__()
        if shots_per_class is not None or labeled_list is not None:
            labeled_fraction = None
        if getattr(data, "mixup", None) is not None:  # a partner's label could come from the unlabelled part
            raise ValueError("SemiSupervisedDataModule cannot wrap a data module that mixes samples: remove data.init_args.data.init_args.mixup")
        self.data = data
        self.labeled_fraction, self.shots_per_class, self.split_seed = labeled_fraction, shots_per_class, split_seed
        self.labeled_list, self.unlabeled = labeled_list, unlabeled
        self.labeled_batch_size = labeled_batch_size or data.batch_size
        self.parts: dict[str, Any] = {}
        self._loaders: dict[str, ResumableDataLoader] = {}
        self._positions: dict | None = None
        self._unlabeled_rows_from: int | None = None  # where the unlabelled part's rows of a teacher cache start

    # what models and distillers read from a data module
    num_classes = property(lambda self: self.data.num_classes)
    input_shape = property(lambda self: self.data.input_shape)
    class_names = property(lambda self: self.data.class_names)
    mean = property(lambda self: self.data.mean)
    std = property(lambda self: self.data.std)
    views = property(lambda self: self.data.views)

    def prepare_data(self) -> None:
        self.data.prepare_data()

    def views_for(self, module: Any) -> None:
        if hasattr(self.data, "views_for"):
            self.data.views_for(module)

    def _listed(self, train: Any) -> torch.Tensor:
        """Positions in ``train`` of the samples ``labeled_list`` names (an unknown name is an error)."""
        path = Path(self.labeled_list).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"labeled_list {path} does not exist")
        position: dict[str, int] = {}
        for i in range(len(train)):
            key = train.sample_key(i)
            position[key] = i
            position.setdefault(key.rsplit("/", 1)[-1], i)
        chosen = []
        for number, line in enumerate(path.read_text().splitlines(), 1):
            name = line.strip().split(",")[0].split()[0] if line.strip() else ""
            if not name or name.startswith("#"):
                continue
            if name not in position:
                raise ValueError(f"{path}:{number}: {name!r} is not a sample of the training split (first sample: {train.sample_key(0)!r})")
            chosen.append(position[name])
        if not chosen:
            raise ValueError(f"labeled_list {path} names no samples")
        return torch.tensor(sorted(set(chosen)), dtype=torch.long)

    def setup(self, stage: str | None = None) -> None:
        if self.parts:
            return
        self.data.trainer = self.trainer  # the wrapped module's views come from the model too
        self.data.setup(stage)
        train = self.data.splits["train"]
        if self.labeled_list is not None:
            labeled_idx = self._listed(train)
            is_labeled = torch.zeros(len(train), dtype=torch.bool)
            is_labeled[labeled_idx] = True
            unlabeled_idx = torch.nonzero(~is_labeled).flatten()
        else:
            labeled_idx, unlabeled_idx = balanced_labeled_split(train.labels, self.labeled_fraction, self.shots_per_class, self.split_seed)
        self.parts = {"labeled": train.subset(labeled_idx)}
        if self.unlabeled is not None:
            if not hasattr(self.data, "open_location"):
                raise ValueError(f"unlabeled={self.unlabeled!r} needs a data module that reads files; {type(self.data).__name__} does not")
            source = self.data.open_location(self.unlabeled, "predict")
            self.parts["unlabeled"] = self.data.dataset(source.subset(range(len(source)), torch.full((len(source),), -1).numpy()), train=True)
        else:
            self.parts["unlabeled"] = train.subset(unlabeled_idx, torch.full((len(unlabeled_idx),), -1))
        if len(self.parts["unlabeled"]) == 0:
            raise ValueError("the unlabelled part is empty: every training sample is labelled")

    # -- teacher cache: the labelled part's rows, then the unlabelled part's -------------------
    def teacher_cache_dataset(self, views: int | None = None) -> tuple[Dataset, dict]:
        """Both parts for a teacher cache of recorded views (see :mod:`mmkd.core.cache`): rows
        ``0 .. L-1`` the labelled part's samples, ``L ..`` the unlabelled part's, each view drawn
        as training draws it for that part; the fingerprint is the wrapped module's and the
        parts'. File data modules only, and with views: semi-supervised training augments."""
        from mmkd.core.cache import TeacherCacheError

        if views is None:
            raise TeacherCacheError("semi-supervised training augments both parts: record their views with `mmkd cache --views V`")
        if not all(hasattr(part, "recording") for part in self.parts.values()) or not hasattr(self.data, "teacher_cache_dataset"):
            raise TeacherCacheError(f"{type(self.data).__name__} cannot record augmented views for a teacher cache: read the images with mmkd.data.ImageFilesDataModule")
        _, fingerprint = self.data.teacher_cache_dataset(views)
        fingerprint["semi_supervised"] = {name: part.source.fingerprint() for name, part in self.parts.items()}
        return _Rows([self.parts["labeled"].recording(), self.parts["unlabeled"].recording()]), fingerprint

    def replay_views(self, recorded: dict) -> None:
        """Cut both parts with a cache's recorded views, and give the unlabelled batches their
        rows of the cache as ``index``."""
        boundary = len(self.parts["labeled"])
        self.parts["labeled"].replay = {name: array[:, :boundary] for name, array in recorded.items()}
        self.parts["unlabeled"].replay = {name: array[:, boundary:] for name, array in recorded.items()}
        self._unlabeled_rows_from = boundary

    def on_before_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        if self._unlabeled_rows_from is not None and isinstance(batch, dict) and set(batch) == {"labeled", "unlabeled"}:
            batch["unlabeled"]["index"] = batch["unlabeled"]["index"] + self._unlabeled_rows_from
        hook = getattr(self.data, "on_before_batch_transfer", None)
        if hook is None:
            return batch
        if isinstance(batch, dict) and set(batch) == {"labeled", "unlabeled"}:
            return {name: hook(part, dataloader_idx) for name, part in batch.items()}
        return hook(batch, dataloader_idx)

    def _loader(self, name: str, sampler: EpochShuffleSampler, batch_size: int) -> ResumableDataLoader:
        return ResumableDataLoader(
            self.parts[name], batch_size=batch_size, sampler=sampler, collate_fn=self.data.collate_fn,
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

    # See SplitsDataModule.state_dict: the positions survive loaders built before the restore.
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


class _Rows(Dataset):
    """Datasets one after the other, keys ``(row, view)``; each item's ``index`` is its row."""

    def __init__(self, parts: list[Dataset]) -> None:
        self.parts, self.starts = parts, [0]
        for part in parts:
            self.starts.append(self.starts[-1] + len(part))

    def __len__(self) -> int:
        return self.starts[-1]

    def __getitem__(self, key: tuple[int, int]) -> dict:
        row, view = key
        part = next(i for i in range(len(self.parts)) if row < self.starts[i + 1])
        item = self.parts[part][(row - self.starts[part], view)]
        if "index" in item:  # not in an item left out as a bad file
            item["index"] = row
        return item
