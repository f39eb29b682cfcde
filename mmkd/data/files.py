"""Image classification data on disk: image folders, file lists, webdataset shards and Hugging
Face datasets, decoded lazily in DataLoader workers into the views the student and the teacher
take (:mod:`mmkd.data.views`)."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from PIL import Image
from torch.utils.data import DataLoader, Dataset, default_collate

from mmkd.data.common import SplitsDataModule
from mmkd.data.sources import (
    UNLABELED, DataSourceError, FileSource, ImageSource, StringArena, expand_shards, file_list, hf_source, hf_splits,
    image_folder, is_hf_dataset, is_image_file, scan_folder, tar_shards,
)  # fmt: skip
from mmkd.data.mixing import MIX_PARAMS, MIX_PARTNER, MIX_TARGET, SampleMixup
from mmkd.data.views import Augment, ViewSpec, decode_views, view_spec

BAD_FILES = "bad_files"  # batch entry: names of the samples a skipping loader left out


class ImageDecodeError(OSError):
    """An image file that cannot be decoded (corrupt, truncated, not an image)."""


class ImageFileDataset(Dataset):
    """The samples of an :class:`~mmkd.data.sources.ImageSource`, decoded on access into one
    tensor per view (``{"image": ..., "teacher_image": ..., "label", "index"}``).

    Keys are indices or ``(index, epoch)`` pairs (from an
    :class:`~mmkd.data.common.EpochShuffleSampler`); with ``train`` the crop and flip are drawn
    from (seed, epoch, index). A file that cannot be decoded raises :class:`ImageDecodeError`
    naming it, or with ``on_bad_file="skip"`` is left out of its batch (:func:`collate_samples`)
    and its name reported in the batch's ``bad_files`` entry.

    Views of a teacher cache (:mod:`mmkd.core.cache`): with ``record_views`` each item also
    carries the crop it was cut with (``crop_box``, ``flip``) and its ``view`` (the epoch of its
    key); with ``replay`` (``{"crop_box": [V, N, 4], "flip": [V, N]}``, a cache's recorded views)
    epoch ``e`` is cut with view ``e % V``'s recorded crop, and every other random draw
    (RandAugment, random erasing) is taken with ``e % V`` as the epoch, so the pixels are those
    the teacher saw when the cache was built.

    With ``mixup`` (a :class:`~mmkd.data.mixing.SampleMixup`) every training sample is mixed with
    a partner drawn from (seed, epoch, index), decoded with its own draws of that epoch, and the
    item carries the soft target ``mix_target``; a recording item also carries ``mix_partner``
    and ``mix_params``, which replaying then takes from the cache.
    """

    def __init__(
        self,
        source: ImageSource,
        views: dict[str, ViewSpec],
        train: bool = False,
        augment: Augment | None = None,
        seed: int = 0,
        on_bad_file: str = "raise",
        draft: bool = True,
        mixup: SampleMixup | None = None,
        num_classes: int | None = None,
    ) -> None:
        if on_bad_file not in ("raise", "skip"):
            raise ValueError(f"on_bad_file must be 'raise' or 'skip', got {on_bad_file!r}")
        if mixup is not None and not num_classes:
            raise ValueError("mixing samples needs num_classes, for the mixed targets")
        self.source, self.views, self.train = source, views, train
        self.augment, self.seed, self.on_bad_file, self.draft = augment or Augment(), seed, on_bad_file, draft
        self.mixup, self.num_classes = mixup, num_classes
        self.record_views = False
        self.replay: dict[str, np.ndarray] | None = None

    def __len__(self) -> int:
        return len(self.source)

    @property
    def labels(self) -> torch.Tensor:
        return torch.from_numpy(self.source.labels).long()

    def sample_key(self, i: int) -> str:
        return self.source.key(i)

    def subset(self, indices: Sequence[int] | np.ndarray | torch.Tensor, labels: Any = None) -> "ImageFileDataset":
        """The samples at ``indices`` (re-indexed from 0), with other ``labels`` if given."""
        indices = np.asarray(indices, dtype=np.int64)
        labels = None if labels is None else np.asarray(labels, dtype=np.int64)
        return self._like(self.source.subset(indices, labels), self.train)

    def recording(self) -> "ImageFileDataset":
        """These samples read augmented, as training reads them, each with the crop it was cut
        with (what a teacher cache of views records)."""
        copy = self._like(self.source, True)
        copy.record_views = True
        return copy

    def _like(self, source: ImageSource, train: bool) -> "ImageFileDataset":
        """A dataset of ``source`` decoded as this one (views, augmentation, mixing), recording and replaying nothing."""
        return ImageFileDataset(source, self.views, train, self.augment, self.seed, self.on_bad_file, self.draft, self.mixup, self.num_classes)

    def __getitem__(self, key: int | tuple[int, int]) -> dict[str, Any]:
        index, epoch = key if isinstance(key, tuple) else (key, 0)
        if self.replay is not None:
            epoch %= len(self.replay["flip"])
        mixing = self.mixup is not None and self.train
        decoding = index
        try:
            views, (box, flip) = self._decode(index, epoch)
            if mixing:
                if self.replay is not None:
                    partner, params = int(self.replay[MIX_PARTNER][epoch, index]), np.asarray(self.replay[MIX_PARAMS][epoch, index])
                else:
                    partner, params = self.mixup.draw(self.seed, epoch, index, len(self))
                ratio = 1.0
                if params[0] < 1.0:  # mixed (a ratio of 1 is a sample left as it is)
                    decoding = partner
                    views, ratio = self.mixup.mix(views, self._decode(partner, epoch)[0], params)
        except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as err:
            name = self.source.name(decoding)
            if self.on_bad_file == "skip":
                return {BAD_FILES: f"{name} ({type(err).__name__}: {err})"}
            partner_of = f", the mixing partner of sample {index}" if decoding != index else ""
            raise ImageDecodeError(
                f"cannot decode image {name} (sample {decoding}{partner_of}): {type(err).__name__}: {err}. Replace or remove the file, "
                "or set --data.init_args.on_bad_file=skip to leave such files out (they are counted and logged)"
            ) from None
        label = int(self.source.labels[index])
        item = {**views, "label": label, "index": index}
        if mixing:
            item[MIX_TARGET] = self.mixup.target(label, int(self.source.labels[partner]), ratio, self.num_classes)
        if self.record_views or self.replay is not None:
            item["view"] = epoch
        if self.record_views:
            item.update(crop_box=torch.tensor(box, dtype=torch.float32), flip=flip)
            if mixing:
                item.update({MIX_PARTNER: partner, MIX_PARAMS: torch.from_numpy(params)})
        return item

    def _decode(self, index: int, epoch: int) -> tuple[dict[str, torch.Tensor], tuple[Any, bool]]:
        """Sample ``index``'s views in ``epoch`` (cut with its recorded crop when replaying)."""
        crop = None if self.replay is None else (self.replay["crop_box"][epoch, index], self.replay["flip"][epoch, index])
        with self.source.read(index) as file:
            return decode_views(file, self.views, self.train, self.seed, epoch, index, self.augment, self.draft, crop)


def collate_samples(samples: list[dict[str, Any]]) -> dict[str, Any]:
    """Stack the samples that decoded; the names of those that did not go into ``bad_files``."""
    good = [sample for sample in samples if BAD_FILES not in sample]
    bad = [sample[BAD_FILES] for sample in samples if BAD_FILES in sample]
    if not good:
        raise ImageDecodeError(f"no image of a batch of {len(samples)} could be decoded, e.g. {bad[0]}: the data looks corrupt")
    batch = default_collate(good)
    if bad:
        batch[BAD_FILES] = bad
    return batch


def report_bad_files(datamodule: Any, batch: Any, what: str) -> Any:
    """Take the names of the samples a skipping loader left out of ``batch``: warned about,
    added to ``datamodule.bad_files`` and logged as their running count, ``data/bad_files``."""
    if isinstance(batch, dict) and BAD_FILES in batch:
        bad = batch.pop(BAD_FILES)
        datamodule.bad_files += bad
        for name in bad:
            rank_zero_warn(f"skipped {what} that cannot be decoded: {name}")
        trainer = datamodule.trainer
        if trainer is not None and trainer.logger is not None:
            trainer.logger.log_metrics({"data/bad_files": len(datamodule.bad_files)}, step=trainer.global_step)
    return batch


class ImageFilesDataModule(SplitsDataModule):
    """Image classification from files on disk, read lazily by DataLoader workers.

    Each split is a folder, a file or a pattern in one of four layouts, told apart by what is there:

    1. an ImageFolder tree: ``<split>/<class name>/**/*.jpg`` (classes are the training split's
       sub-folders, sorted; val and test use the same list);
    2. a file list, ``<split>.csv`` (header ``path,label``) or ``<split>.jsonl`` (``{"path",
       "label"}``), paths relative to the list, labels class names or indices;
    3. webdataset tar shards, ``KEY.jpg`` + ``KEY.cls`` per sample: a folder of ``*.tar``, a glob
       or a brace pattern (``shards/train-{000000..000127}.tar``);
    4. a Hugging Face dataset saved on disk (``save_to_disk``, or a folder of parquet files,
       ``train-*.parquet``): ``root`` itself, its splits named ``train``, ``validation`` (or
       ``val``) and ``test``; labels from its ``ClassLabel`` column, images from its ``Image``
       column.

    By default a split is found under ``root``: ``root/train`` (folder), ``root/train.csv`` or
    ``root/train.jsonl``; ``train``/``val``/``test``/``predict`` name other locations. Without a
    validation split, ``val_size`` samples of the training split are held out (seeded).

    **Views.** Every sample is decoded once and cropped once; each model gets that crop resized
    and normalised its own way. By default the student's view (``image``) is its model's own
    preprocessing (timm's pretrained config, open_clip's ``preprocess_cfg``), and a distiller
    whose teacher wants another one adds ``teacher_image`` with the teacher's (see
    ``input_views`` of :class:`~mmkd.core.Classifier` and :class:`~mmkd.core.Distiller`).
    ``image_size``, ``mean``, ``std``, ``interpolation``, ``crop_pct`` and ``channels`` override
    the student's view, ``teacher_view`` the teacher's, and ``views`` sets them all
    (``{image: {size: 224, ...}, teacher_image: {...}}``). Training: RandomResizedCrop + flip, and
    optionally timm's RandAugment and random erasing, every draw a function of (seed, epoch,
    index); evaluation: timm's resize + centre crop (``crop_pct``). JPEGs are decoded at a reduced
    size when the crop allows it (``draft``).

    Nothing is preloaded: the index of each split is a few numpy arrays (see
    :mod:`mmkd.data.sources`), shared by forked workers without copies.

    Args:
        root: the data set's folder (or a Hugging Face dataset folder).
        train, val, test, predict: locations of the splits, relative to ``root`` or absolute; for
            ``predict`` also a folder of images without classes or one image file.
        classes: class names in label order (default: from the training split).
        batch_size, eval_batch_size: batch sizes (eval default: 2x ``batch_size``).
        num_workers: DataLoader worker processes (decoding runs there).
        seed: seed of the training order, the augmentation and the held-out validation split.
        augment: random crops and flips on the training split (off: the evaluation transform).
        scale, ratio, hflip, auto_augment, re_prob: see :class:`~mmkd.data.views.Augment`.
        mixup: Mixup / CutMix of each training sample with a partner drawn from (seed, epoch,
            index), timm ``Mixup``'s arguments (``{mixup_alpha: 0.8, cutmix_alpha: 1.0,
            label_smoothing: 0.1}``; see :class:`~mmkd.data.mixing.SampleMixup`): batches then
            carry soft targets (``mix_target``) that the training losses use. Unlike a model's
            ``mixup`` (timm's, on the batch), a teacher cache of views records these mixed views.
        val_size: samples of the training split held out when there is no validation split.
        on_bad_file: ``"raise"`` (an error naming the file) or ``"skip"`` (left out, counted in
            ``data/bad_files`` and warned about).
        check_files: check at setup that every file of a file list exists.
        draft: decode JPEGs at reduced size when the crop allows it.
        image_column, label_column: columns of a Hugging Face dataset (default: by feature type).
    """

    def __init__(
        self,
        root: str | None = None,
        train: str | None = None,
        val: str | None = None,
        test: str | None = None,
        predict: str | None = None,
        classes: list[str] | None = None,
        batch_size: int = 64,
        eval_batch_size: int | None = None,
        num_workers: int = 2,
        seed: int = 0,
        views: dict[str, dict] | None = None,
        image_size: int | list[int] | None = None,
        mean: float | list[float] | None = None,
        std: float | list[float] | None = None,
        interpolation: str | None = None,
        crop_pct: float | None = None,
        channels: int | None = None,
        teacher_view: dict | None = None,
        augment: bool = True,
        scale: tuple[float, float] = (0.08, 1.0),
        ratio: tuple[float, float] = (3 / 4, 4 / 3),
        hflip: float = 0.5,
        auto_augment: str | None = None,
        re_prob: float = 0.0,
        mixup: dict[str, Any] | None = None,
        val_size: int | None = None,
        on_bad_file: str = "raise",
        check_files: bool = True,
        draft: bool = True,
        image_column: str | None = None,
        label_column: str | None = None,
    ) -> None:
        super().__init__(batch_size=batch_size, eval_batch_size=eval_batch_size, seed=seed, num_workers=num_workers)
        self.root = Path(root).expanduser() if root else None
        self.locations = {"train": train, "val": val, "test": test, "predict": predict}
        self.classes = list(classes) if classes is not None else None
        self.view_overrides = {
            key: value for key, value in dict(size=image_size, mean=mean, std=std, interpolation=interpolation, crop_pct=crop_pct, channels=channels).items()
            if value is not None
        }  # fmt: skip
        self.explicit_views = {key: view_spec(value) for key, value in (views or {}).items()}
        self.teacher_view = view_spec(teacher_view)
        self.augment = augment
        self.augmentation = Augment(tuple(scale), tuple(ratio), hflip, auto_augment, re_prob)
        self.mixup = SampleMixup(**mixup) if mixup else None
        if self.mixup is not None and not augment:
            raise ValueError("data.init_args.mixup mixes the augmented training samples: it needs augment=true")
        self.val_size, self.on_bad_file, self.check_files, self.draft = val_size, on_bad_file, check_files, draft
        self.image_column, self.label_column = image_column, label_column
        if on_bad_file not in ("raise", "skip"):
            raise ValueError(f"on_bad_file must be 'raise' or 'skip', got {on_bad_file!r}")
        self._views: dict[str, ViewSpec] | None = None
        self._model_for_views: Any = None
        self._hf: dict[str, Any] | None = None
        self.bad_files: list[str] = []

    collate_fn = staticmethod(collate_samples)

    # -- views ---------------------------------------------------------------------------------
    @property
    def views(self) -> dict[str, ViewSpec]:
        """The views of each sample, by batch key (the first is the student's)."""
        if self._views is None:
            self._views = self._resolve_views()
        return self._views

    def _resolve_views(self) -> dict[str, ViewSpec]:
        if self.explicit_views:
            return dict(self.explicit_views)
        module = self._model_for_views or (self.trainer.lightning_module if self.trainer is not None else None)
        wanted: dict[str, ViewSpec | None] = module.input_views() if module is not None and hasattr(module, "input_views") else {}
        student_key = next(iter(wanted), "image")
        student = wanted.get(student_key) or ViewSpec()
        overrides = dict(self.view_overrides)
        if "channels" in overrides and "mean" not in overrides:  # re-derive per-channel statistics
            overrides.update(mean=student.mean, std=student.std)
        views = {student_key: dataclasses.replace(student, **overrides) if overrides else student}
        for key, view in list(wanted.items())[1:]:
            if key == "teacher_image" and self.teacher_view is not None:
                view = self.teacher_view
            if view is not None:
                views[key] = view
        if self.teacher_view is not None and "teacher_image" not in views:
            views["teacher_image"] = self.teacher_view
        return views

    def views_for(self, module: Any) -> None:
        """Take the default views from ``module`` (its ``input_views()``) when no trainer attaches
        one: ``mmkd cache``, ``export`` and ``inspect`` build the data module alone."""
        self._model_for_views, self._views = module, None

    @property
    def input_shape(self) -> tuple[int, ...] | dict[str, tuple[int, ...]]:
        views = self.views
        if len(views) == 1:
            return next(iter(views.values())).shape
        return {key: view.shape for key, view in views.items()}

    @property
    def mean(self) -> tuple[float, ...]:
        return next(iter(self.views.values())).mean

    @property
    def std(self) -> tuple[float, ...]:
        return next(iter(self.views.values())).std

    @property
    def class_names(self) -> tuple[str, ...]:
        if self.classes is None:
            self._open_split("train")
        return tuple(self.classes or ())

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    # -- locating the splits -------------------------------------------------------------------
    def _hf_splits(self) -> dict[str, Any] | None:
        if self._hf is None and self.root is not None and is_hf_dataset(self.root):
            self._hf = hf_splits(self.root)
        return self._hf

    def _location(self, split: str) -> Path | str | None:
        given = self.locations[split]
        if given is not None:
            path = Path(given).expanduser()
            if self.root is not None and not path.is_absolute() and not Path(given).exists():
                path = self.root / path
            return path if not any(c in str(given) for c in "*?{") else str(path)
        if self.root is None:
            return None
        names = ("val", "validation") if split == "val" else (split,)
        for name in names:
            for candidate in (self.root / name, self.root / f"{name}.csv", self.root / f"{name}.jsonl"):
                if candidate.exists():
                    return candidate
        return None

    def _open_split(self, split: str) -> ImageSource | None:
        """The index of ``split``, or None where the data set has none."""
        hf = self._hf_splits()
        if hf is not None and self.locations[split] is None:
            from mmkd.data.sources import HF_SPLIT_NAMES

            name = next((name for name in HF_SPLIT_NAMES.get(split, (split,)) if name in hf), None)
            if name is None:
                return None
            source, classes = hf_source(hf[name], f"{self.root}:{name}", self.classes, self.image_column, self.label_column)
            self._set_classes(classes, f"{self.root}:{name}")
            return source
        location = self._location(split)
        if location is None:
            if self.root is None and split == "train":
                raise DataSourceError(f"{type(self).__name__}: set root (the data set's folder) or train (its training split)")
            return None
        return self.open_location(location, split)

    def open_location(self, location: Path | str, split: str = "train") -> ImageSource:
        """The index of the images at ``location``, in whichever layout they are."""
        path = Path(location)
        text = str(location)
        if not any(c in text for c in "*?{") and not path.exists():
            raise FileNotFoundError(f"{split} split not found: {path} does not exist. Set --data.init_args.root or --data.init_args.{split}")
        if any(c in text for c in "*?{") or path.suffix == ".tar" or (path.is_dir() and any(path.glob("*.tar"))):
            shards = expand_shards(text)
            missing = [shard for shard in shards if not os.path.isfile(shard)]
            if not shards or missing:
                raise FileNotFoundError(f"{split} split: no shard files for {text}" + (f" (missing: {missing[:3]})" if missing else ""))
            source = tar_shards(shards, self.classes)
            if self.classes is None and split == "train":
                top = int(source.labels.max()) if len(source) else -1
                self._set_classes([str(i) for i in range(top + 1)], text)
            return source
        if path.is_file() and path.suffix.lower() in (".csv", ".jsonl"):
            source, classes = file_list(path, self.classes, self.check_files)
            if classes is None and split == "train":
                classes = [str(i) for i in range(int(source.labels.max()) + 1)]
            self._set_classes(classes, str(path))
            return source
        if path.is_file() and is_image_file(path.name):
            return FileSource(path.parent, StringArena([path.name]), np.array([UNLABELED]))
        if path.is_dir() and is_hf_dataset(path):
            splits = hf_splits(path)
            name = "train" if "train" in splits else next(iter(splits))
            source, classes = hf_source(splits[name], f"{path}:{name}", self.classes, self.image_column, self.label_column)
            self._set_classes(classes, str(path))
            return source
        if path.is_dir():
            if split == "predict":  # any images, with or without class folders
                names = scan_folder(path)
                if not names:
                    raise DataSourceError(f"{path} holds no image files ({', '.join(('.jpg', '.png', '...'))})")
                return FileSource(path, StringArena(names), np.full(len(names), UNLABELED))
            source, classes = image_folder(path, self.classes)
            self._set_classes(classes, str(path))
            return source
        raise DataSourceError(
            f"{split} split {path}: not an image folder, a .csv/.jsonl file list, .tar shards, a Hugging Face dataset or an image"
        )

    def _set_classes(self, classes: list[str] | None, where: str) -> None:
        if classes is not None and self.classes is None:
            self.classes = list(classes)
        elif classes is not None and list(classes) != self.classes:
            raise DataSourceError(f"{where} has other classes ({len(classes)}: {classes[:5]}...) than the training split ({len(self.classes)}: {self.classes[:5]}...)")

    # -- splits --------------------------------------------------------------------------------
    def dataset(self, source: ImageSource, train: bool) -> ImageFileDataset:
        """A dataset over ``source`` with this module's views and (for training) augmentation."""
        mixup = self.mixup if train else None  # the class count is read only then (predicting files has no classes)
        return ImageFileDataset(source, self.views, train=train and self.augment, augment=self.augmentation, seed=self.seed,
                                on_bad_file=self.on_bad_file, draft=self.draft, mixup=mixup, num_classes=self.num_classes if mixup else None)  # fmt: skip

    def setup(self, stage: str | None = None) -> None:
        if self.splits:
            return
        sources = {split: self._open_split(split) for split in ("train", "val", "test", "predict")}
        train = sources["train"]
        if train is None:
            raise FileNotFoundError(f"{type(self).__name__}: no training split under {self.root}: expected train/, train.csv or train.jsonl")
        if len(train) == 0:
            raise DataSourceError(f"the training split {self._location('train') or self.root} holds no samples")
        if sources["val"] is None and self.val_size:
            if not 0 < self.val_size < len(train):
                raise ValueError(f"val_size={self.val_size} must be in (0, {len(train)})")
            order = torch.randperm(len(train), generator=torch.Generator().manual_seed(self.seed)).numpy()
            sources["val"], train = train.subset(np.sort(order[: self.val_size])), train.subset(np.sort(order[self.val_size :]))
        self.splits = {"train": self.dataset(train, train=True)}
        self.splits.update({split: self.dataset(source, train=False) for split, source in sources.items() if split != "train" and source is not None})
        sizes = ", ".join(f"{split} {len(dataset)}" for split, dataset in self.splits.items())
        views = "; ".join(f"{key} {list(view.shape)} {view.interpolation} mean {view.mean}" for key, view in self.views.items())
        rank_zero_info(f"{type(self).__name__}: {len(self.class_names)} classes; {sizes} samples; views: {views}")

    def _loader(self, split: str, batch_size: int, sampler: Any = None) -> DataLoader:
        if split not in self.splits:
            raise FileNotFoundError(f"{type(self).__name__} has no {split} split: set --data.init_args.{split} or add {split}/ under {self.root}")
        return super()._loader(split, batch_size, sampler)

    def val_dataloader(self) -> DataLoader | list:
        return self._loader("val", self.eval_batch_size) if "val" in self.splits else []

    # -- bad files: counted, warned about, logged ----------------------------------------------
    def on_before_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        return report_bad_files(self, batch, "an image")

    # -- teacher cache -------------------------------------------------------------------------
    def teacher_cache_dataset(self, views: int | None = None) -> tuple[Dataset, dict]:
        """The training split for a teacher cache (see :mod:`mmkd.core.cache`) and its
        fingerprint (index, views, augmentation). Without ``views`` the split must be read
        without random augmentation; with ``views`` it is read augmented, keys ``(index, view)``,
        each item with the crop it was cut with."""
        from mmkd.core.cache import TeacherCacheError, refuse_random_augmentation

        if views is None:
            refuse_random_augmentation(self)
        train = self.splits["train"]
        fingerprint = {
            "data": type(self).__name__, **train.source.fingerprint(),
            "views": {key: view.as_dict() for key, view in self.views.items()}, "draft": self.draft,
            "augment": dataclasses.asdict(self.augmentation) | {"seed": self.seed} if views else False,
        }  # fmt: skip
        if self.mixup is not None:
            fingerprint["mixup"] = dataclasses.asdict(self.mixup)
        if views:
            if not self.augment:
                raise TeacherCacheError("a cache of augmented views needs the training split augmented: set --data.init_args.augment=true")
            if self.augmentation.auto_augment:
                import timm

                fingerprint["timm"] = timm.__version__  # RandAugment's draws are timm's
            train = train.recording()
        return train, fingerprint

    def replay_views(self, recorded: dict[str, np.ndarray]) -> None:
        """Cut the training split with a teacher cache's recorded views from now on (see
        :class:`ImageFileDataset`)."""
        self.splits["train"].replay = recorded
