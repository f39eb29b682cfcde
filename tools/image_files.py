"""Write real images from ../shared/data as the on-disk layouts mmkd reads (an ImageFolder tree,
CSV/JSONL file lists, webdataset shards, a Hugging Face dataset), to try the file data modules
as a user would and to test and benchmark them.

    python tools/image_files.py --out runs/data/fmnist-files --layout folder --per-split 2000 500 500
    python tools/image_files.py --out runs/data/fmnist-photos --layout folder --size 500 375   # photo-sized JPEGs
    python tools/image_files.py --out runs/data/imagenet-standin --layout imagenet --per-split 4 2 0 --size 64 64

``--layout imagenet`` writes a stand-in of the ImageNet-1k folders the full-size recipes read
(``train/<wnid>/<wnid>_<n>.JPEG``, ``val/<wnid>/ILSVRC2012_val_<n>.JPEG``; ``--per-split`` counts
images per class there): the first ``--classes`` ImageNet WordNet ids, in sorted order as
ImageNet's, so that their labels 0, 1, 2 ... are those of the 1000-class recipes; class ``k``
holds Fashion-MNIST images of label ``k``.

The images are Fashion-MNIST's (``--source`` its IDX folder), written as JPEG (or PNG) at
``--size`` (upscaled with bicubic interpolation), the class names as folder names.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import sys
from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from mmkd.data.idx import read_idx  # noqa: E402
from mmkd.data.images import FASHION_MNIST_CLASSES  # noqa: E402

CLASS_FOLDERS = tuple(name.replace("/", "-").replace(" ", "_") for name in FASHION_MNIST_CLASSES)
SPLITS = ("train", "val", "test")
# The first ImageNet-1k classes in WordNet-id order (label order of an ImageFolder of ImageNet):
# tench, goldfish, great white shark, tiger shark, hammerhead, electric ray, stingray, cock, hen, ostrich
IMAGENET_WNIDS = ("n01440764", "n01443537", "n01484850", "n01491361", "n01494475",
                  "n01496331", "n01498041", "n01514668", "n01514859", "n01518878")  # fmt: skip


def fashion_mnist(source: Path, count: int, offset: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """``count`` Fashion-MNIST training images (uint8 [N, 28, 28]) and labels, from ``offset``."""
    images = read_idx(source / "train-images-idx3-ubyte.gz")[offset : offset + count]
    labels = read_idx(source / "train-labels-idx1-ubyte.gz")[offset : offset + count]
    if len(images) < count:
        raise ValueError(f"asked for {count} images from {offset}, the training files hold {offset + len(images)}")
    return images, labels.astype(np.int64)


def encode(image: np.ndarray, size: Sequence[int] | None, fmt: str, quality: int = 90) -> bytes:
    """One grey image as RGB JPEG or PNG bytes, resized to ``size`` (width, height) if given."""
    picture = Image.fromarray(image).convert("RGB")
    if size is not None and tuple(size) != picture.size:
        picture = picture.resize(tuple(size), Image.BICUBIC)
    buffer = io.BytesIO()
    picture.save(buffer, format="JPEG" if fmt == "jpg" else "PNG", **({"quality": quality} if fmt == "jpg" else {}))
    return buffer.getvalue()


def write_split(out: Path, layout: str, split: str, images: np.ndarray, labels: np.ndarray, size: Sequence[int] | None = None, fmt: str = "jpg", shard_size: int = 500) -> Path:
    """Write one split in ``layout`` (``folder``, ``csv``, ``jsonl``, ``shards``); returns its location."""
    out.mkdir(parents=True, exist_ok=True)
    if layout in ("folder", "csv", "jsonl"):
        rows = []
        for i, (image, label) in enumerate(zip(images, labels)):
            relative = f"{split}/{CLASS_FOLDERS[label]}/{split}_{i:07d}.{fmt}" if layout == "folder" else f"images/{split}/{split}_{i:07d}.{fmt}"
            path = out / relative
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(encode(image, size, fmt))
            rows.append((relative, CLASS_FOLDERS[label]))
        if layout == "folder":
            return out / split
        listing = out / f"{split}.{layout}"
        with open(listing, "w", newline="") as f:
            if layout == "csv":
                writer = csv.writer(f)
                writer.writerow(["path", "label"])
                writer.writerows(rows)
            else:
                f.writelines(json.dumps({"path": path, "label": label}) + "\n" for path, label in rows)
        return listing
    if layout == "shards":
        import webdataset as wds

        folder = out / split
        folder.mkdir(parents=True, exist_ok=True)
        with wds.ShardWriter(str(folder / f"{split}-%06d.tar"), maxcount=shard_size, verbose=0) as sink:
            for i, (image, label) in enumerate(zip(images, labels)):
                sink.write({"__key__": f"{split}_{i:07d}", fmt: encode(image, size, fmt), "cls": str(int(label)).encode()})
        return folder
    raise ValueError(f"unknown layout {layout!r}")


def write_hf_dataset(out: Path, splits: dict[str, tuple[np.ndarray, np.ndarray]], size: Sequence[int] | None = None, fmt: str = "png", parquet: bool = False) -> Path:
    """A Hugging Face ``DatasetDict`` (``image``: Image, ``label``: ClassLabel) saved with
    ``save_to_disk``, or as ``<split>-00000-of-00001.parquet`` files with ``parquet``."""
    import datasets

    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=list(CLASS_FOLDERS))})
    name = {"val": "validation"}
    built = datasets.DatasetDict({
        name.get(split, split): datasets.Dataset.from_dict(
            {"image": [{"bytes": encode(image, size, fmt), "path": None} for image in images], "label": labels.tolist()}, features=features
        )
        for split, (images, labels) in splits.items()
    })  # fmt: skip
    if parquet:
        out.mkdir(parents=True, exist_ok=True)
        for split, dataset in built.items():
            dataset.to_parquet(str(out / f"{split}-00000-of-00001.parquet"))
    else:
        built.save_to_disk(str(out))
    return out


def write_layout(out: Path, source: Path, layout: str, per_split: Sequence[int], size: Sequence[int] | None = None, fmt: str = "jpg") -> Path:
    """Train/val/test splits of ``per_split`` images each, from consecutive Fashion-MNIST images."""
    offset, parts = 0, {}
    for split, count in zip(SPLITS, per_split):
        parts[split] = fashion_mnist(source, count, offset)
        offset += count
    if layout in ("hf", "parquet"):
        return write_hf_dataset(out, parts, size, fmt, parquet=layout == "parquet")
    for split, (images, labels) in parts.items():
        write_split(out, layout, split, images, labels, size, fmt)
    return out


def write_imagenet_standin(out: Path, source: Path, classes: int = 3, per_class: Sequence[int] = (4, 2, 0), size: Sequence[int] | None = (64, 64)) -> Path:
    """A stand-in of the ImageNet-1k ImageFolder tree: ``train/``, ``val/`` (and ``test/`` if asked)
    with one folder per WordNet id (the first ``classes`` of ImageNet's, sorted), ``per_class``
    JPEGs per class and split named as ImageNet's files, from Fashion-MNIST images of label
    ``k`` for class ``k`` (consecutive images of the training file, so the splits share none)."""
    if not 1 <= classes <= min(len(IMAGENET_WNIDS), len(CLASS_FOLDERS)):
        raise ValueError(f"classes must be in 1..{len(IMAGENET_WNIDS)}, got {classes}")
    images, labels = fashion_mnist(source, 60_000)
    taken = {k: iter(np.nonzero(labels == k)[0]) for k in range(classes)}
    number = 0
    for split, count in zip(SPLITS, per_class):
        if count == 0:
            continue
        for k, wnid in enumerate(IMAGENET_WNIDS[:classes]):
            folder = out / split / wnid
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(count):
                number += 1
                name = f"{wnid}_{i + 1}.JPEG" if split == "train" else f"ILSVRC2012_{split}_{number:08d}.JPEG"
                (folder / name).write_bytes(encode(images[next(taken[k])], size, "jpg"))
    return out


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--source", type=Path, default=REPO.parent / "shared" / "data" / "fashion-mnist")
    parser.add_argument("--layout", default="folder", choices=["folder", "csv", "jsonl", "shards", "hf", "parquet", "imagenet"])
    parser.add_argument("--classes", type=int, default=3, help="--layout imagenet: how many ImageNet classes (WordNet ids)")
    parser.add_argument("--per-split", type=int, nargs=3, default=[2000, 500, 500], metavar=("TRAIN", "VAL", "TEST"))
    parser.add_argument("--size", type=int, nargs=2, default=None, metavar=("WIDTH", "HEIGHT"), help="resize (default: 28x28 as stored)")
    parser.add_argument("--format", default="jpg", choices=["jpg", "png"])
    args = parser.parse_args(argv)
    if args.layout == "imagenet":
        print(write_imagenet_standin(args.out, args.source, args.classes, args.per_split, args.size))
        return
    print(write_layout(args.out, args.source, args.layout, args.per_split, args.size, args.format))


if __name__ == "__main__":
    main()
