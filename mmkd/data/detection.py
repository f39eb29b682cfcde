"""Object detection data in COCO format, and the conversions that COCO mAP needs.

Batches are ``{"image": [B, 3, H, W] float (ImageNet mean/std), "targets": [B dicts], "index":
[B]}``; each target is ``{"labels": [n] long (0-based, contiguous), "boxes": [n, 4] float, cxcywh
normalised to [0, 1] by the image size, "image_id": int (the COCO id), "orig_size": [2] long
(h, w) of the stored image}``. Images without objects are kept (``n = 0``).

``detection_predictions`` and ``detection_targets`` turn model outputs and targets into the
per-image dicts (xyxy boxes in pixels of the stored image) of torchmetrics'
``MeanAveragePrecision(box_format="xyxy", iou_type="bbox")``, which computes COCO AP with
pycocotools.

The composed set of ``tools/compose_detection.py`` (Fashion-MNIST objects on textured noise) is
the one the tests and benchmarks use; any COCO-format folder with the same layout works, and so
does the COCO 2017 download (``annotations/instances_train2017.json`` + ``train2017/``).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, NamedTuple, Sequence

import numpy as np
import torch
from lightning.pytorch.utilities import rank_zero_info
from PIL import Image
from torch.utils.data import Dataset
from torchvision import tv_tensors
from torchvision.ops import box_convert
from torchvision.transforms import v2

from mmkd.data.common import SplitsDataModule, default_data_root, sample_randint
from mmkd.data.sources import StringArena

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
SPLITS = ("train", "val", "test")
BUILD_COMMAND = "python tools/compose_detection.py --out {root}"
_BOX_TOLERANCE = 1e-3  # pixels a box may pass the image edge by (rounding in json writers)
_GREY_WEIGHTS = torch.tensor([0.299, 0.587, 0.114])[None, :, None, None]  # ITU-R 601, as torchvision's rgb_to_grayscale


def _read_instances(path: Path) -> dict:
    if not path.is_file():
        if path.name.startswith("instances_"):  # the COCO download's annotations/instances_<split>2017.json
            raise FileNotFoundError(f"{path} not found: unpack COCO's annotations_trainval2017.zip into {path.parent.parent}")
        raise FileNotFoundError(f"{path} not found; build the composed set with: {BUILD_COMMAND.format(root=path.parent.parent)}")
    try:
        instances = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{path} is not valid JSON ({err}): the file is corrupt; build it again") from err
    missing = [key for key in ("images", "annotations", "categories") if key not in instances]
    if missing:
        raise ValueError(f"{path} is not a COCO instances file: it lacks {missing}")
    return instances


def read_categories(path: str | Path) -> list[dict]:
    """The ``categories`` of a COCO ``instances.json``, sorted by id."""
    return sorted(_read_instances(Path(path))["categories"], key=lambda category: category["id"])


class CocoIndex(NamedTuple):
    """The annotations of one COCO split, held compactly: a few numpy arrays (DataLoader workers
    forked from the main process read them without copying them, unlike a list of per-image dicts
    whose reference counts every access writes to) and the file names in one
    :class:`~mmkd.data.sources.StringArena`.

    Image ``i`` has the objects ``box_offsets[i]:box_offsets[i + 1]`` of ``boxes`` ([M, 4] float32
    ``[x, y, w, h]`` in pixels of the stored image) and ``labels`` ([M] int64, 0-based).
    """

    file_names: StringArena
    image_ids: np.ndarray  # [N] int64, the COCO ids
    sizes: np.ndarray  # [N, 2] int64, (height, width) as instances.json states them
    box_offsets: np.ndarray  # [N + 1] int64
    boxes: np.ndarray  # [M, 4] float32
    labels: np.ndarray  # [M] int64

    @property
    def nbytes(self) -> int:
        return self.file_names.nbytes + sum(a.nbytes for a in (self.image_ids, self.sizes, self.box_offsets, self.boxes, self.labels))


def index_instances(instances: dict, path: Path, categories: list[dict]) -> CocoIndex:
    """The compact :class:`CocoIndex` of a parsed instances file (crowd annotations left out).

    An annotation whose ``image_id`` or ``category_id`` is not listed, or whose box is empty or
    outside its image, is a ``ValueError`` naming it (the first such one)."""
    images = instances["images"]
    image_ids = np.fromiter((info["id"] for info in images), dtype=np.int64, count=len(images))
    sizes = np.array([(info["height"], info["width"]) for info in images], dtype=np.int64).reshape(-1, 2)
    position = {int(image_id): i for i, image_id in enumerate(image_ids)}
    label_of = {category["id"]: label for label, category in enumerate(categories)}
    kept = [annotation for annotation in instances["annotations"] if not annotation.get("iscrowd", 0)]
    for annotation in kept:
        if annotation["image_id"] not in position or annotation["category_id"] not in label_of:
            raise ValueError(
                f"{path}: annotation {annotation['id']} has image_id {annotation['image_id']} / category_id "
                f"{annotation['category_id']}, not listed in images / categories"
            )
    owners = np.fromiter((position[a["image_id"]] for a in kept), dtype=np.int64, count=len(kept))
    labels = np.fromiter((label_of[a["category_id"]] for a in kept), dtype=np.int64, count=len(kept))
    boxes = np.array([a["bbox"] for a in kept], dtype=np.float64).reshape(-1, 4)
    x, y, w, h = boxes.T
    height, width = sizes[owners, 0], sizes[owners, 1]
    tol = _BOX_TOLERANCE
    bad = np.nonzero((w <= 0) | (h <= 0) | (x < -tol) | (y < -tol) | (x + w > width + tol) | (y + h > height + tol))[0]
    if len(bad):
        annotation, info = kept[int(bad[0])], images[int(owners[bad[0]])]
        raise ValueError(
            f"{path}: annotation {annotation['id']} has bbox [x, y, w, h] = {annotation['bbox']}, which is empty or "
            f"outside its image {info['file_name']} ({info['width']}x{info['height']})"
        )
    order = np.argsort(owners, kind="stable")  # grouped by image, in the file's order within each
    offsets = np.zeros(len(images) + 1, dtype=np.int64)
    offsets[1:] = np.cumsum(np.bincount(owners, minlength=len(images)))
    return CocoIndex(
        StringArena(info["file_name"] for info in images), image_ids, sizes, offsets,
        boxes[order].astype(np.float32), labels[order],
    )  # fmt: skip


class CocoDetection(Dataset):
    """A COCO-format split: an instances file (``folder/instances.json`` by default, or
    ``annotations``) and the images it names, paths relative to ``folder`` (COCO 2017:
    ``annotations/instances_train2017.json`` with ``train2017/``).

    Items are ``(image, target)``: the image as [3, H, W] float, normalised with ImageNet mean/std,
    and the target of the module docstring (cxcywh boxes normalised by the image size;
    ``orig_size`` is the stored image's). Category ids are mapped to 0-based labels in id order.
    Crowd annotations (``iscrowd`` 1) are left out.

    Images are decoded on access (in the DataLoader's worker processes), unless ``preload``
    decodes them all here. The annotations are a :class:`CocoIndex` of numpy arrays, so an index
    of COCO's 860 k boxes costs a few tens of MB once, not a copy in every worker.

    Geometry runs per image with torchvision's v2 functionals on the image and its
    ``tv_tensors.BoundingBoxes``, so the boxes follow: a resize to ``image_size`` squared, and
    with ``augment`` a horizontal flip (p = 0.5). The rest runs on the whole batch: float,
    with ``augment`` a mild photometric jitter (brightness, contrast, saturation, each a factor in
    [0.8, 1.2], in that order), and the normalisation. Every random draw is a hash of (seed,
    epoch, index) (:func:`~mmkd.data.common.sample_randint`): keys are indices or ``(index,
    epoch)`` pairs from an :class:`~mmkd.data.common.EpochShuffleSampler`, so augmentation
    survives a resume and does not depend on the worker count. ``__getitems__`` returns a
    collated batch (:func:`collate`); use ``collate_fn=passthrough_collate`` with a DataLoader.

    Raises at construction: ``FileNotFoundError`` for a missing instances file or image file
    (named; image files are checked with ``check_files``), ``ValueError`` for a corrupt json
    (named), a box outside its image or an empty box; with ``preload``, ``OSError`` for an image
    that cannot be decoded. Without ``preload`` that error comes when the image is read.

    Args:
        folder: the split's image folder (the paths in the instances file are relative to it).
        image_size: side of the square images are resized to; ``None`` keeps the stored size
            (then a batch needs images of one size).
        augment: random horizontal flip and photometric jitter.
        seed: seed of the augmentation.
        preload: decode every image once, here, and keep them in memory as uint8.
        annotations: the instances file (default ``folder/instances.json``).
        check_files: check here that every image file exists (one ``stat`` per image).
    """

    def __init__(
        self,
        folder: str | Path,
        image_size: int | None = None,
        augment: bool = False,
        seed: int = 0,
        preload: bool = False,
        annotations: str | Path | None = None,
        check_files: bool = True,
    ) -> None:
        self.folder = Path(folder)
        self.image_size, self.augment, self.seed = image_size, augment, seed
        self.annotations = path = Path(annotations) if annotations is not None else self.folder / "instances.json"
        instances = _read_instances(path)
        self.categories = sorted(instances["categories"], key=lambda category: category["id"])
        self.class_names = tuple(category["name"] for category in self.categories)
        self.index = index_instances(instances, path, self.categories)
        del instances  # the parsed json (GBs of Python objects for COCO train) is not kept
        if check_files:
            names = self.index.file_names
            missing = [names[i] for i in range(len(names)) if not os.path.isfile(self.folder / names[i])]
            if missing:
                raise FileNotFoundError(f"{path} names {len(missing)} image file(s) missing under {self.folder}, first {self.folder / missing[0]}")
        self.images = [self._read_image(i) for i in range(len(self))] if preload else None

    def __len__(self) -> int:
        return len(self.index.image_ids)

    def _read_image(self, i: int) -> torch.Tensor:
        path = self.folder / self.index.file_names[i]
        try:
            with Image.open(path) as image:
                array = np.asarray(image.convert("RGB"))
        except (OSError, SyntaxError) as err:  # PIL: truncated or not an image (SyntaxError for some broken PNGs)
            raise OSError(f"cannot read image {path} ({err}): it is corrupt or cut short; re-create the data set "
                          "(tools/compose_detection.py for the composed scenes) or replace the file") from None  # fmt: skip
        height, width = (int(v) for v in self.index.sizes[i])
        if array.shape[:2] != (height, width):
            raise ValueError(f"{path} is {array.shape[1]}x{array.shape[0]} but {self.annotations.name} says {width}x{height}")
        return torch.from_numpy(np.ascontiguousarray(array.transpose(2, 0, 1)))

    def target_boxes(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        """Image ``i``'s boxes ``[n, 4]`` (``[x, y, w, h]``, pixels of the stored image) and labels ``[n]``."""
        start, stop = self.index.box_offsets[i], self.index.box_offsets[i + 1]
        return self.index.boxes[start:stop], self.index.labels[start:stop]

    def __getitem__(self, key: int | tuple[int, int]) -> tuple[torch.Tensor, dict[str, Any]]:
        batch = self.__getitems__([key])
        return batch["image"][0], batch["targets"][0]

    def __getitems__(self, keys: list) -> dict[str, Any]:
        pairs = [key if isinstance(key, tuple) else (key, 0) for key in keys]
        indices = torch.tensor([index for index, _ in pairs], dtype=torch.long)
        epochs = torch.tensor([epoch for _, epoch in pairs], dtype=torch.long)
        flips = sample_randint(self.seed, epochs, indices, 3, 2).bool() if self.augment else torch.zeros(len(pairs), dtype=torch.bool)
        samples = [self._geometry(int(index), bool(flip)) for index, flip in zip(indices, flips)]
        batch = collate(samples, indices.tolist())
        images = batch["image"].float().div_(255.0)
        if self.augment:
            images = self._photometric(images, indices, epochs)
        mean, std = torch.tensor(IMAGENET_MEAN)[:, None, None], torch.tensor(IMAGENET_STD)[:, None, None]
        batch["image"] = images.sub_(mean).div_(std)
        return batch

    def _geometry(self, index: int, flip: bool) -> tuple[torch.Tensor, dict[str, Any]]:
        """The uint8 image after resize and flip, and its target with the boxes moved along."""
        pixels = self.images[index] if self.images is not None else self._read_image(index)
        height, width = pixels.shape[-2:]
        xywh, labels = self.target_boxes(index)
        image = tv_tensors.Image(pixels)
        boxes = tv_tensors.BoundingBoxes(torch.tensor(xywh), format="XYWH", canvas_size=(height, width))
        if self.image_size and (height, width) != (self.image_size, self.image_size):
            size = [self.image_size, self.image_size]
            image, boxes = v2.functional.resize(image, size, antialias=True), v2.functional.resize(boxes, size)
        if flip:
            image, boxes = v2.functional.horizontal_flip(image), v2.functional.horizontal_flip(boxes)
        out_height, out_width = image.shape[-2:]
        cxcywh = v2.functional.convert_bounding_box_format(boxes, new_format="CXCYWH").as_subclass(torch.Tensor)
        scale = torch.tensor([out_width, out_height, out_width, out_height], dtype=torch.float32)
        return image.as_subclass(torch.Tensor), {
            "labels": torch.tensor(labels, dtype=torch.long),
            "boxes": cxcywh / scale,
            "image_id": int(self.index.image_ids[index]),
            "orig_size": torch.tensor([height, width], dtype=torch.long),
        }

    def _photometric(self, images: torch.Tensor, indices: torch.Tensor, epochs: torch.Tensor) -> torch.Tensor:
        """Brightness, contrast and saturation factors in [0.8, 1.2] per image, as ``ColorJitter``
        applies them to images in [0, 1]."""

        def factor(stream: int) -> torch.Tensor:
            return (0.8 + sample_randint(self.seed, epochs, indices, stream, 401).float() / 1000)[:, None, None, None]

        images = (images * factor(4)).clamp_(0, 1)
        mean_grey = (images * _GREY_WEIGHTS).sum(1, keepdim=True).mean((2, 3), keepdim=True)
        images = ((images - mean_grey) * factor(5) + mean_grey).clamp_(0, 1)
        grey = (images * _GREY_WEIGHTS).sum(1, keepdim=True)
        return ((images - grey) * factor(6) + grey).clamp_(0, 1)


def collate(samples: Sequence[tuple[torch.Tensor, dict]], indices: Sequence[int]) -> dict[str, Any]:
    """``(image, target)`` samples into ``{"image": [B, 3, H, W], "targets": [B dicts], "index": [B]}``
    (images of one size; targets stay a list, as their box counts differ)."""
    return {
        "image": torch.stack([image for image, _ in samples]),
        "targets": [target for _, target in samples],
        "index": torch.tensor(list(indices), dtype=torch.long),
    }


LAYOUTS = ("auto", "splits", "coco2017")
COCO2017_FOLDERS = {"train": "train2017", "val": "val2017", "test": "val2017"}  # test2017 has no public annotations


def detect_layout(root: Path) -> str:
    """``"coco2017"`` when ``root/annotations/instances_train2017.json`` exists, else ``"splits"``."""
    return "coco2017" if (root / "annotations" / "instances_train2017.json").is_file() else "splits"


def split_location(root: Path, layout: str, split: str) -> tuple[Path, Path]:
    """``(image folder, instances file)`` of ``split`` in ``layout``: ``root/<split>/`` +
    ``root/<split>/instances.json`` (``"splits"``, the composed scenes), or ``root/<split>2017/``
    + ``root/annotations/instances_<split>2017.json`` (``"coco2017"``, where ``test`` is
    ``val2017``: COCO's test images have no public annotations, and detectors report val2017)."""
    if layout == "coco2017":
        folder = COCO2017_FOLDERS[split]
        return root / folder, root / "annotations" / f"instances_{folder}.json"
    return root / split, root / split / "instances.json"


class CocoDetectionDataModule(SplitsDataModule):
    """Train/val/test splits of a COCO-format detection set, read from disk by DataLoader workers.

    Two layouts under ``root`` (``layout="auto"`` tells them apart):

    - ``"splits"``: ``train/``, ``val/`` and ``test/``, each with ``instances.json`` and its
      images (the layout of ``tools/compose_detection.py``);
    - ``"coco2017"``: the COCO 2017 download, ``annotations/instances_{train,val}2017.json``
      with ``train2017/*.jpg`` and ``val2017/*.jpg``; ``test`` is ``val2017`` (COCO's test
      images have no public annotations; D-FINE and the other detectors report val2017).

    Images are decoded lazily in the workers (``preload`` decodes them all at setup instead),
    resized to ``image_size`` squared and normalised with ImageNet mean/std; each split's
    annotations are a compact :class:`CocoIndex` (numpy arrays, file names in one buffer). The
    training order and augmentation keys come from an :class:`~mmkd.data.common.EpochShuffleSampler`
    (a run resumes mid-epoch; the worker count changes nothing).

    Args:
        root: the set's folder; default ``$MMKD_DATA/fmnist-det``.
        batch_size: training batch size.
        eval_batch_size: batch size for val/test/predict (default: 2x ``batch_size``).
        image_size: side of the square the images are resized to.
        augment: random horizontal flip and mild colour jitter on the training split.
        seed: seed of the training order and augmentation.
        num_workers: DataLoader worker processes (decoding runs there).
        preload: decode every image into memory at setup (small sets on slow disks).
        layout: ``"auto"``, ``"splits"`` or ``"coco2017"``.
        check_files: check at setup that every image file exists.
    """

    splits: dict[str, CocoDetection]
    mean, std = IMAGENET_MEAN, IMAGENET_STD  # the normalisation of every split

    def __init__(
        self,
        root: str | None = None,
        batch_size: int = 16,
        eval_batch_size: int | None = None,
        image_size: int = 128,
        augment: bool = True,
        seed: int = 0,
        num_workers: int = 2,
        preload: bool = False,
        layout: str = "auto",
        check_files: bool = True,
    ) -> None:
        super().__init__(batch_size=batch_size, eval_batch_size=eval_batch_size, seed=seed, num_workers=num_workers)
        if layout not in LAYOUTS:
            raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
        self.root = Path(root).expanduser() if root else default_data_root() / "fmnist-det"
        self.image_size, self.augment, self.preload, self.check_files = image_size, augment, preload, check_files
        self._layout = layout
        self.input_shape = (3, image_size, image_size)
        self._categories: list[dict] | None = None

    @property
    def layout(self) -> str:
        """The layout of ``root``: the one given, or the one found there (``"auto"``)."""
        return detect_layout(self.root) if self._layout == "auto" else self._layout

    def location(self, split: str) -> tuple[Path, Path]:
        """``(image folder, instances file)`` of a split."""
        return split_location(self.root, self.layout, split)

    @property
    def categories(self) -> list[dict]:
        """The COCO categories, sorted by id: the training split's once set up; before that read
        from the smallest instances file (every split must have the same ones)."""
        if self.splits:
            return self.splits["train"].categories
        if self._categories is None:
            files = [self.location(split)[1] for split in SPLITS]
            found = [path for path in files if path.is_file()]
            self._categories = read_categories(min(found, key=lambda path: path.stat().st_size) if found else files[0])
        return self._categories

    @property
    def num_classes(self) -> int:
        return len(self.categories)

    @property
    def class_names(self) -> tuple[str, ...]:
        return tuple(category["name"] for category in self.categories)

    def prepare_data(self) -> None:
        layout = self.layout
        missing = [split for split in SPLITS if not self.location(split)[1].is_file()]
        if not missing:
            return
        if layout == "coco2017":
            raise FileNotFoundError(
                f"{type(self).__name__}: {', '.join(str(self.location(s)[1]) for s in missing)} not found under the COCO 2017 "
                f"folder {self.root}: it needs annotations/instances_train2017.json and instances_val2017.json with train2017/ "
                "and val2017/ (the COCO download: annotations_trainval2017.zip, train2017.zip, val2017.zip)"
            )
        raise FileNotFoundError(
            f"{type(self).__name__}: no {'/'.join(missing)} split (instances.json) under {self.root}. Build the "
            f"composed Fashion-MNIST detection set with: {BUILD_COMMAND.format(root=self.root)}; or, for COCO 2017, "
            "point root at the folder with annotations/ and train2017/ (layout coco2017)"
        )

    def setup(self, stage: str | None = None) -> None:
        if self.splits:
            return
        self.prepare_data()
        splits: dict[str, CocoDetection] = {}
        built: dict[tuple[Path, Path, bool], CocoDetection] = {}
        for split in SPLITS:
            folder, annotations = self.location(split)
            train = self.augment and split == "train"
            key = (folder, annotations, train)
            if key not in built:  # COCO 2017's test is its val: indexed once
                built[key] = CocoDetection(folder, self.image_size, augment=train, seed=self.seed, preload=self.preload,
                                           annotations=annotations, check_files=self.check_files)  # fmt: skip
            splits[split] = built[key]
        reference = splits["train"].categories
        for split, dataset in splits.items():
            if dataset.categories != reference:
                raise ValueError(f"{dataset.annotations} has other categories than the train split's")
        self.splits = splits
        sizes = ", ".join(f"{split} {len(dataset)}" for split, dataset in splits.items())
        index_mib = sum(dataset.index.nbytes for dataset in built.values()) / 2**20
        rank_zero_info(f"{type(self).__name__}: {self.root} ({self.layout}), {len(reference)} classes; {sizes} images; index {index_mib:.1f} MiB")


def detection_predictions(
    pred_logits: torch.Tensor, pred_boxes: torch.Tensor, orig_sizes: torch.Tensor, top_k: int = 100
) -> list[dict[str, torch.Tensor]]:
    """D-FINE's post-processing, for COCO mAP: per image the ``top_k`` highest sigmoid scores
    over all (query, class) pairs jointly (a query may give several classes; no NMS).

    Args:
        pred_logits: [B, Q, C] class logits.
        pred_boxes: [B, Q, 4] boxes, cxcywh normalised.
        orig_sizes: [B, 2] (h, w) the boxes are scaled to.
        top_k: detections per image (at most Q * C).

    Returns:
        B dicts ``{"boxes": [k, 4] xyxy pixels, "scores": [k], "labels": [k] long}``, by score.
    """
    batch, queries, classes = pred_logits.shape
    scores, flat = pred_logits.sigmoid().flatten(1).topk(min(top_k, queries * classes), dim=1)
    labels, query = flat % classes, flat // classes
    height, width = orig_sizes[:, 0:1].float(), orig_sizes[:, 1:2].float()
    scale = torch.cat([width, height, width, height], dim=1)[:, None, :]
    boxes = box_convert(pred_boxes, "cxcywh", "xyxy") * scale
    boxes = boxes.gather(1, query[..., None].expand(-1, -1, 4))
    return [{"boxes": boxes[i], "scores": scores[i], "labels": labels[i]} for i in range(batch)]


def detection_targets(targets: Sequence[dict[str, torch.Tensor]]) -> list[dict[str, torch.Tensor]]:
    """Targets (cxcywh normalised, ``orig_size`` (h, w)) as ``{"boxes": [n, 4] xyxy pixels,
    "labels": [n]}`` for ``MeanAveragePrecision``."""
    converted = []
    for target in targets:
        height, width = target["orig_size"].to(target["boxes"]).unbind()  # the boxes' device and dtype: no sync
        scale = torch.stack([width, height, width, height])
        converted.append({"boxes": box_convert(target["boxes"], "cxcywh", "xyxy") * scale, "labels": target["labels"]})
    return converted
