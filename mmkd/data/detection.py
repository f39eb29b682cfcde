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
the one the tests and benchmarks use; any COCO-format folder with the same layout works.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset
from torchvision import tv_tensors
from torchvision.ops import box_convert
from torchvision.transforms import v2

from mmkd.data.common import InMemoryDataModule, default_data_root, sample_randint

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
SPLITS = ("train", "val", "test")
BUILD_COMMAND = "python tools/compose_detection.py --out {root}"
_BOX_TOLERANCE = 1e-3  # pixels a box may pass the image edge by (rounding in json writers)
_GREY_WEIGHTS = torch.tensor([0.299, 0.587, 0.114])[None, :, None, None]  # ITU-R 601, as torchvision's rgb_to_grayscale


def _read_instances(path: Path) -> dict:
    if not path.is_file():
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


class CocoDetection(Dataset):
    """A COCO-format split: ``folder/instances.json`` and the images it names (paths relative
    to ``folder``).

    Items are ``(image, target)``: the image as [3, H, W] float, normalised with ImageNet mean/std,
    and the target of the module docstring (cxcywh boxes normalised by the image size;
    ``orig_size`` is the stored image's). Category ids are mapped to 0-based labels in id order.
    Crowd annotations (``iscrowd`` 1) are left out.

    Geometry runs per image with torchvision's v2 functionals on the image and its
    ``tv_tensors.BoundingBoxes``, so the boxes follow: a resize to ``image_size`` squared, and
    with ``augment`` a horizontal flip (p = 0.5). The rest runs on the whole batch: float,
    with ``augment`` a mild photometric jitter (brightness, contrast, saturation, each a factor in
    [0.8, 1.2], in that order), and the normalisation. Every random draw is a hash of (seed,
    epoch, index) (:func:`~mmkd.data.common.sample_randint`): keys are indices or ``(index,
    epoch)`` pairs from an :class:`~mmkd.data.common.EpochShuffleSampler`, so augmentation
    survives a resume and does not depend on the worker count. ``__getitems__`` returns a
    collated batch (:func:`collate`); use ``collate_fn=passthrough_collate`` with a DataLoader.

    Raises at construction: ``FileNotFoundError`` for a missing ``instances.json`` or image file
    (named), ``ValueError`` for a corrupt json (named), a box outside its image or an empty box.

    Args:
        folder: the split's folder.
        image_size: side of the square images are resized to; ``None`` keeps the stored size
            (then a batch needs images of one size).
        augment: random horizontal flip and photometric jitter.
        seed: seed of the augmentation.
        preload: decode every image once, here, and keep them in memory as uint8.
    """

    def __init__(
        self, folder: str | Path, image_size: int | None = None, augment: bool = False, seed: int = 0, preload: bool = False
    ) -> None:
        self.folder = Path(folder)
        self.image_size, self.augment, self.seed = image_size, augment, seed
        path = self.folder / "instances.json"
        instances = _read_instances(path)
        self.categories = sorted(instances["categories"], key=lambda category: category["id"])
        label_of = {category["id"]: label for label, category in enumerate(self.categories)}
        self.class_names = tuple(category["name"] for category in self.categories)
        self.images_info = instances["images"]
        position = {info["id"]: i for i, info in enumerate(self.images_info)}
        boxes: list[list[list[float]]] = [[] for _ in self.images_info]
        labels: list[list[int]] = [[] for _ in self.images_info]
        for annotation in instances["annotations"]:
            if annotation.get("iscrowd", 0):
                continue
            if annotation["image_id"] not in position or annotation["category_id"] not in label_of:
                raise ValueError(
                    f"{path}: annotation {annotation['id']} has image_id {annotation['image_id']} / category_id "
                    f"{annotation['category_id']}, not listed in images / categories"
                )
            i = position[annotation["image_id"]]
            info = self.images_info[i]
            x, y, w, h = (float(v) for v in annotation["bbox"])
            tol = _BOX_TOLERANCE
            if w <= 0 or h <= 0 or x < -tol or y < -tol or x + w > info["width"] + tol or y + h > info["height"] + tol:
                raise ValueError(
                    f"{path}: annotation {annotation['id']} has bbox [x, y, w, h] = {annotation['bbox']}, which is empty or "
                    f"outside its image {info['file_name']} ({info['width']}x{info['height']})"
                )
            boxes[i].append([x, y, w, h])
            labels[i].append(label_of[annotation["category_id"]])
        self.boxes = [torch.tensor(b, dtype=torch.float32).reshape(-1, 4) for b in boxes]
        self.labels = [torch.tensor(lab, dtype=torch.long) for lab in labels]
        missing = [info["file_name"] for info in self.images_info if not (self.folder / info["file_name"]).is_file()]
        if missing:
            raise FileNotFoundError(f"{path} names {len(missing)} image file(s) missing under {self.folder}, first {self.folder / missing[0]}")
        self.images = [self._read_image(i) for i in range(len(self))] if preload else None

    def __len__(self) -> int:
        return len(self.images_info)

    def _read_image(self, i: int) -> torch.Tensor:
        info = self.images_info[i]
        path = self.folder / info["file_name"]
        try:
            with Image.open(path) as image:
                array = np.asarray(image.convert("RGB"))
        except (OSError, SyntaxError) as err:  # PIL: truncated or not an image (SyntaxError for some broken PNGs)
            raise OSError(f"cannot read image {path} ({err}): it is corrupt or cut short; re-create the data set "
                          "(tools/compose_detection.py for the composed scenes) or replace the file") from None  # fmt: skip
        if array.shape[:2] != (info["height"], info["width"]):
            raise ValueError(f"{path} is {array.shape[1]}x{array.shape[0]} but instances.json says {info['width']}x{info['height']}")
        return torch.from_numpy(np.ascontiguousarray(array.transpose(2, 0, 1)))

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
        image = tv_tensors.Image(pixels)
        boxes = tv_tensors.BoundingBoxes(self.boxes[index], format="XYWH", canvas_size=(height, width))
        if self.image_size and (height, width) != (self.image_size, self.image_size):
            size = [self.image_size, self.image_size]
            image, boxes = v2.functional.resize(image, size, antialias=True), v2.functional.resize(boxes, size)
        if flip:
            image, boxes = v2.functional.horizontal_flip(image), v2.functional.horizontal_flip(boxes)
        out_height, out_width = image.shape[-2:]
        cxcywh = v2.functional.convert_bounding_box_format(boxes, new_format="CXCYWH").as_subclass(torch.Tensor)
        scale = torch.tensor([out_width, out_height, out_width, out_height], dtype=torch.float32)
        return image.as_subclass(torch.Tensor), {
            "labels": self.labels[index],
            "boxes": cxcywh / scale,
            "image_id": int(self.images_info[index]["id"]),
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


class CocoDetectionDataModule(InMemoryDataModule):
    """Train/val/test splits of a COCO-format detection set, images decoded into memory at setup.

    ``root`` holds ``train/``, ``val/`` and ``test/``, each with ``instances.json`` and its
    images (the layout of ``tools/compose_detection.py``). Images are resized to ``image_size``
    squared and normalised with ImageNet mean/std; the training order and augmentation keys come
    from an :class:`~mmkd.data.common.EpochShuffleSampler` (a run resumes mid-epoch).

    Args:
        root: the set's folder; default ``$MMKD_DATA/fmnist-det``.
        batch_size: training batch size.
        eval_batch_size: batch size for val/test/predict (default: 2x ``batch_size``).
        image_size: side of the square the images are resized to.
        augment: random horizontal flip and mild colour jitter on the training split.
        seed: seed of the training order and augmentation.
        num_workers: DataLoader workers (the images are in memory; 0 is usually fastest on CPU).
    """

    splits: dict[str, CocoDetection]

    def __init__(
        self,
        root: str | None = None,
        batch_size: int = 16,
        eval_batch_size: int | None = None,
        image_size: int = 128,
        augment: bool = True,
        seed: int = 0,
        num_workers: int = 0,
    ) -> None:
        super().__init__(batch_size=batch_size, eval_batch_size=eval_batch_size, seed=seed, num_workers=num_workers)
        self.root = Path(root).expanduser() if root else default_data_root() / "fmnist-det"
        self.image_size, self.augment = image_size, augment
        self.input_shape = (3, image_size, image_size)
        self._categories: list[dict] | None = None

    @property
    def categories(self) -> list[dict]:
        """The training split's COCO categories, sorted by id (read once, before setup too)."""
        if self._categories is None:
            self._categories = read_categories(self.root / "train" / "instances.json")
        return self._categories

    @property
    def num_classes(self) -> int:
        return len(self.categories)

    @property
    def class_names(self) -> tuple[str, ...]:
        return tuple(category["name"] for category in self.categories)

    def prepare_data(self) -> None:
        missing = [split for split in SPLITS if not (self.root / split / "instances.json").is_file()]
        if missing:
            raise FileNotFoundError(
                f"{type(self).__name__}: no {'/'.join(missing)} split (instances.json) under {self.root}. Build the "
                f"composed Fashion-MNIST detection set with: {BUILD_COMMAND.format(root=self.root)}"
            )

    def setup(self, stage: str | None = None) -> None:
        if self.splits:
            return
        self.prepare_data()
        self.splits = {
            split: CocoDetection(
                self.root / split, self.image_size, augment=self.augment and split == "train", seed=self.seed, preload=True
            )
            for split in SPLITS
        }
        for split, dataset in self.splits.items():
            if dataset.categories != self.categories:
                raise ValueError(f"{self.root / split / 'instances.json'} has other categories than the train split's")


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
