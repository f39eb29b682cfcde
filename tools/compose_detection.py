"""Composes a COCO-format object detection set from real Fashion-MNIST objects.

Every image (default 128x128 RGB) holds 1 to 6 Fashion-MNIST garments. Each is cut to the tight
box of its pixels, scaled so that its longer side is 16 to 64 px, tinted with a random colour
(its grey levels kept as shading) and pasted at a random position. Objects are pasted largest
first, and a position is accepted only when the object's box has IoU <= 0.3 with every box
already placed, so a later (smaller) object covers at most about half of an earlier box. An
object for which 50 tries find no such position is left out. The background is textured noise:
smoothed random colour noise at two scales plus a fine grain, all seeded. No real background
images are available offline, so the scenes are not photographs; the objects are real.

Boxes are exact: the tight box of the pasted object's alpha mask (the pixels it was blended
into, whether or not a later object covers part of them), so each edge row and column of a box
holds object pixels and no object pixel lies outside it. The alpha is the scaled grey level,
zero below 0.1 and opaque from 0.4 on.

Splits use disjoint objects: train objects come from the Fashion-MNIST training file; the
10,000 objects of its test file are split in two halves (seeded) for val and test.

Output (written to a temporary folder beside ``--out`` and renamed at the end)::

    OUT/{train,val,test}/images/000000.png ...
    OUT/{train,val,test}/instances.json     # COCO: images, annotations, categories

or, with ``--layout coco2017``, the layout of the COCO 2017 download (train and val only: COCO's
test images have no public annotations)::

    OUT/annotations/instances_{train,val}2017.json
    OUT/{train,val}2017/000000000001.jpg ...   # 12-digit image ids, as COCO's file names

``--format jpg`` writes JPEG (quality 95) instead of PNG; the boxes are the same (they come from
the masks), the pixels differ by the JPEG error. The COCO 2017 layout defaults to JPEG, as COCO.

Annotations have ``bbox`` [x, y, w, h] in pixels (integers: pixel edges), ``area`` = w * h,
``iscrowd`` 0, ``category_id`` 1..10 (Fashion-MNIST label + 1), and ``source_index``, the
object's index in its Fashion-MNIST file. Every image is a function of (seed, split, index)
only, so a larger set starts with the images of a smaller one.

    python tools/compose_detection.py --out $MMKD_DATA/fmnist-det            # 4000/500/500
    python tools/compose_detection.py --out /tmp/fmnist-det-quick --quick    # 20/5/5
    python tools/compose_detection.py --out /tmp/coco-standin --layout coco2017 --train 8 --val 4

Importable: ``compose(out, fmnist_root, sizes)``; ``object_pools``, ``image_rng`` and
``compose_image`` rebuild any single image with its object masks.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from mmkd.data.common import default_data_root  # noqa: E402
from mmkd.data.idx import read_idx  # noqa: E402
from mmkd.data.images import FASHION_MNIST_CLASSES, find_data_file  # noqa: E402

SPLITS = ("train", "val", "test")
LAYOUTS = ("splits", "coco2017")
FORMATS = {"png": "PNG", "jpg": "JPEG"}
JPEG_QUALITY = 95
DEFAULT_SIZES = {"train": 4000, "val": 500, "test": 500}
QUICK_SIZES = {"train": 20, "val": 5, "test": 5}
OBJECT_SCALE = (16, 64)  # longer side of a pasted object, in pixels, both ends included
MAX_OBJECTS = 6
MAX_IOU = 0.3
PLACEMENT_TRIES = 50
ALPHA_THRESHOLD = 0.1  # grey level (0..1) below which a scaled object pixel is not pasted
ALPHA_SATURATION = 0.4  # grey level from which a pixel is pasted opaque
MIN_CONTRAST = 64  # least difference of mean grey between an object's tint and the background's base


@dataclass
class ObjectPool:
    """The Fashion-MNIST objects one split draws from: ``images`` [N, 28, 28] uint8, ``labels``
    [N] (0..9), and ``indices`` [N], their positions in the IDX file named ``source``."""

    images: np.ndarray
    labels: np.ndarray
    indices: np.ndarray
    source: str


@dataclass
class ComposedImage:
    """One composed image: ``image`` [H, W, 3] uint8 and per object its COCO ``bbox`` [x, y, w, h]
    (pixels), ``category_id`` (1..10), ``source_index`` and ``mask`` ([H, W] bool, the pixels it
    was blended into)."""

    image: np.ndarray
    bboxes: list[list[int]]
    category_ids: list[int]
    source_indices: list[int]
    masks: list[np.ndarray]


def _idx_file(folder: Path, name: str) -> Path:
    found = find_data_file(folder, (".",), name)
    if found is None:
        raise FileNotFoundError(f"{folder / name}.gz not found: point --fmnist at the folder with the Fashion-MNIST IDX files")
    return found


def object_pools(fmnist_root: Path, seed: int = 0) -> dict[str, ObjectPool]:
    """The object pools of the three splits: train from the training file, val and test from the
    two seeded halves of the test file (disjoint)."""
    fmnist_root = Path(fmnist_root)
    pools = {}
    for prefix, source in (("train", "train"), ("t10k", "t10k")):
        images = read_idx(_idx_file(fmnist_root, f"{prefix}-images-idx3-ubyte"))
        labels = read_idx(_idx_file(fmnist_root, f"{prefix}-labels-idx1-ubyte")).astype(np.int64)
        if source == "train":
            pools["train"] = ObjectPool(images, labels, np.arange(len(images)), source)
            continue
        order = np.random.default_rng([seed, 1]).permutation(len(images))
        half = len(order) // 2
        for split, chosen in (("val", np.sort(order[:half])), ("test", np.sort(order[half:]))):
            pools[split] = ObjectPool(images[chosen], labels[chosen], chosen, source)
    return pools


def image_rng(seed: int, split: str, index: int) -> np.random.Generator:
    """The generator of image ``index`` of ``split``: each image depends on these three only."""
    return np.random.default_rng([seed, SPLITS.index(split), index])


def textured_background(rng: np.random.Generator, size: int) -> np.ndarray:
    """[size, size, 3] float noise around a random base colour: bicubic-upsampled random colour
    at 4x4 and 16x16, plus a fine grain."""
    base = rng.uniform(30, 225, size=3)
    background = np.broadcast_to(base, (size, size, 3)).astype(np.float32)
    for cells, amplitude in ((4, 45.0), (16, 20.0)):
        noise = rng.integers(0, 256, size=(cells, cells, 3), dtype=np.uint8)
        smooth = np.asarray(Image.fromarray(noise).resize((size, size), Image.BICUBIC), dtype=np.float32)
        background = background + amplitude * (smooth / 127.5 - 1.0)
    return background + rng.normal(0.0, 4.0, size=(size, size, 3)).astype(np.float32)


def _scaled_alpha(crop: np.ndarray, longer: int) -> np.ndarray:
    """The object scaled so that its longer side is ``longer`` px, as grey levels in [0, 1]."""
    height, width = crop.shape
    ratio = longer / max(height, width)
    new_size = (max(1, round(width * ratio)), max(1, round(height * ratio)))
    return np.asarray(Image.fromarray(crop).resize(new_size, Image.BILINEAR), dtype=np.float32) / 255.0


def _iou(a: list[int], b: list[int]) -> float:
    ix = max(0, min(a[0] + a[2], b[0] + b[2]) - max(a[0], b[0]))
    iy = max(0, min(a[1] + a[3], b[1] + b[3]) - max(a[1], b[1]))
    inter = ix * iy
    return inter / (a[2] * a[3] + b[2] * b[3] - inter)


def compose_image(pool: ObjectPool, rng: np.random.Generator, image_size: int = 128) -> ComposedImage:
    """One image: a textured background and 1 to ``MAX_OBJECTS`` objects of ``pool`` (see the
    module docstring for the scaling, tint, placement and box rules)."""
    if image_size < OBJECT_SCALE[1]:
        raise ValueError(f"image_size={image_size} is smaller than the largest object ({OBJECT_SCALE[1]} px)")
    canvas = textured_background(rng, image_size)
    base_grey = float(canvas.mean())
    count = int(rng.integers(1, MAX_OBJECTS + 1))
    picks = rng.integers(0, len(pool.images), size=count)
    longer_sides = rng.integers(OBJECT_SCALE[0], OBJECT_SCALE[1] + 1, size=count)
    result = ComposedImage(np.empty(0), [], [], [], [])
    for slot in np.argsort(-longer_sides, kind="stable"):  # largest first
        obj = pool.images[picks[slot]]
        rows, cols = np.nonzero(obj)
        crop = obj[rows.min() : rows.max() + 1, cols.min() : cols.max() + 1]
        grey = _scaled_alpha(crop, int(longer_sides[slot]))
        alpha = np.clip(grey / ALPHA_SATURATION, 0.0, 1.0) * (grey >= ALPHA_THRESHOLD)
        ys, xs = np.nonzero(alpha)
        if len(ys) == 0:
            continue
        top, left, bottom, right = ys.min(), xs.min(), ys.max() + 1, xs.max() + 1
        alpha, grey = alpha[top:bottom, left:right], grey[top:bottom, left:right]
        height, width = alpha.shape
        placed = None
        for _ in range(PLACEMENT_TRIES):
            y, x = int(rng.integers(0, image_size - height + 1)), int(rng.integers(0, image_size - width + 1))
            box = [x, y, width, height]
            if all(_iou(box, other) <= MAX_IOU for other in result.bboxes):
                placed = box
                break
        if placed is None:
            continue
        tint = rng.uniform(0, 255, size=3)
        while abs(tint.mean() - base_grey) < MIN_CONTRAST:
            tint = rng.uniform(0, 255, size=3)
        shade = tint * (0.35 + 0.65 * grey[..., None])
        region = canvas[y : y + height, x : x + width]
        region[...] = region * (1 - alpha[..., None]) + shade * alpha[..., None]
        mask = np.zeros((image_size, image_size), dtype=bool)
        mask[y : y + height, x : x + width] = alpha > 0
        result.bboxes.append(placed)
        result.category_ids.append(int(pool.labels[picks[slot]]) + 1)
        result.source_indices.append(int(pool.indices[picks[slot]]))
        result.masks.append(mask)
    result.image = np.clip(np.rint(canvas), 0, 255).astype(np.uint8)
    return result


def _write_split(folder: Path, split: str, pool: ObjectPool, count: int, image_size: int, seed: int, advance,
                 image_format: str = "png", layout: str = "splits") -> None:
    """One split: its images and its instances file (``folder/instances.json``, or for the COCO
    2017 layout ``annotations/instances_<split>2017.json`` beside ``folder``)."""
    image_folder = folder / "images" if layout == "splits" else folder
    image_folder.mkdir(parents=True)
    images, annotations = [], []
    for index in range(count):
        composed = compose_image(pool, image_rng(seed, split, index), image_size)
        image_id = index + 1
        file_name = f"images/{index:06d}.{image_format}" if layout == "splits" else f"{image_id:012d}.{image_format}"
        options = {"quality": JPEG_QUALITY} if image_format == "jpg" else {}
        Image.fromarray(composed.image).save(folder / file_name, format=FORMATS[image_format], **options)
        images.append({"id": image_id, "file_name": file_name, "height": image_size, "width": image_size})
        for bbox, category_id, source_index in zip(composed.bboxes, composed.category_ids, composed.source_indices):
            annotations.append({
                "id": len(annotations) + 1, "image_id": image_id, "category_id": category_id, "bbox": bbox,
                "area": bbox[2] * bbox[3], "iscrowd": 0, "source_index": source_index,
            })  # fmt: skip
        advance()
    instances = {
        "info": {
            "description": f"Fashion-MNIST objects composed on textured noise ({split})",
            "split": split, "seed": seed, "image_size": image_size, "object_source": f"fashion-mnist {pool.source}",
        },
        "images": images,
        "annotations": annotations,
        "categories": [{"id": i + 1, "name": name, "supercategory": "clothing"} for i, name in enumerate(FASHION_MNIST_CLASSES)],
    }  # fmt: skip
    if layout == "splits":
        (folder / "instances.json").write_text(json.dumps(instances))
    else:
        (folder.parent / "annotations").mkdir(exist_ok=True)
        (folder.parent / "annotations" / f"instances_{folder.name}.json").write_text(json.dumps(instances))


def compose(
    out: Path,
    fmnist_root: Path,
    sizes: dict[str, int],
    image_size: int = 128,
    seed: int = 0,
    overwrite: bool = False,
    progress: bool = False,
    image_format: str | None = None,
    layout: str = "splits",
) -> Path:
    """Writes the set to ``out`` (``out/{train,val,test}/``, or the COCO 2017 layout) and returns ``out``.

    Args:
        out: the set's folder; built in a temporary folder beside it and renamed at the end.
        fmnist_root: the folder with the Fashion-MNIST IDX files (``train-images-idx3-ubyte.gz``, ...).
        sizes: images per split, e.g. ``{"train": 4000, "val": 500, "test": 500}``.
        image_size: side of the square images.
        seed: seed of the val/test object halves and of every image.
        overwrite: replace an existing ``out`` (else it is an error).
        progress: show a progress bar.
        image_format: ``"png"`` or ``"jpg"`` (default: PNG for ``"splits"``, JPEG for ``"coco2017"``).
        layout: ``"splits"`` (``out/<split>/instances.json`` + ``images/``) or ``"coco2017"``
            (``out/annotations/instances_<split>2017.json`` + ``out/<split>2017/``; train and val only).
    """
    out = Path(out)
    unknown = set(sizes) - set(SPLITS)
    if unknown or any(n < 0 for n in sizes.values()):
        raise ValueError(f"sizes must map {SPLITS} to counts >= 0, got {sizes}")
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    image_format = image_format or ("jpg" if layout == "coco2017" else "png")
    if image_format not in FORMATS:
        raise ValueError(f"image_format must be one of {sorted(FORMATS)}, got {image_format!r}")
    if layout == "coco2017" and sizes.get("test", 0):
        raise ValueError("the COCO 2017 layout has train and val only (COCO's test images have no public annotations): set test to 0")
    if out.exists() and not overwrite:
        raise FileExistsError(f"{out} exists: pass overwrite=True (--overwrite) to replace it")
    pools = object_pools(fmnist_root, seed)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        from rich.progress import Progress

        with Progress(disable=not progress) as bar:
            task = bar.add_task(f"composing {out.name}", total=sum(sizes.values()))
            for split in SPLITS if layout == "splits" else ("train", "val"):
                folder = tmp / (split if layout == "splits" else f"{split}2017")
                _write_split(folder, split, pools[split], sizes.get(split, 0), image_size, seed, lambda: bar.advance(task), image_format, layout)
        if out.exists():
            old = out.parent / f".{out.name}.old-{os.getpid()}"
            out.rename(old)
            shutil.rmtree(old)
        tmp.rename(out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=default_data_root() / "fmnist-det", help="default: $MMKD_DATA/fmnist-det")
    parser.add_argument("--fmnist", type=Path, default=default_data_root() / "fashion-mnist", help="default: $MMKD_DATA/fashion-mnist")
    for split in SPLITS:
        parser.add_argument(f"--{split}", type=int, default=DEFAULT_SIZES[split], help=f"{split} images (default {DEFAULT_SIZES[split]})")
    parser.add_argument("--quick", action="store_true", help=f"a small set for tests: {QUICK_SIZES}")
    parser.add_argument("--image-size", type=int, default=128)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    parser.add_argument("--layout", default="splits", choices=LAYOUTS, help="splits (default) or coco2017 (annotations/ + train2017/ + val2017/)")
    parser.add_argument("--format", default=None, choices=sorted(FORMATS), help="image files: png (default for splits) or jpg (default for coco2017)")
    args = parser.parse_args()
    sizes = dict(QUICK_SIZES) if args.quick else {split: getattr(args, split) for split in SPLITS}
    if args.layout == "coco2017":
        sizes["test"] = 0  # COCO 2017 has no annotated test split
    start = time.perf_counter()
    out = compose(args.out, args.fmnist, sizes, image_size=args.image_size, seed=args.seed, overwrite=args.overwrite, progress=True,
                  image_format=args.format, layout=args.layout)  # fmt: skip
    print(f"wrote {out} ({sizes}) in {time.perf_counter() - start:.1f} s")


if __name__ == "__main__":
    main()
