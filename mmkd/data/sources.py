"""Where the images of a split are: an index of samples (how to read sample ``i``'s bytes, its
label, its name) over an image folder, a file list, webdataset tar shards or a Hugging Face
dataset saved on disk.

Every index is held in numpy arrays (names in one byte buffer with offsets, labels in an int
array), never in Python lists of strings: DataLoader workers forked from the main process read
these pages without writing to them, so an index of a million files is not copied into every
worker as its objects' reference counts change (the copy-on-read growth of list-based datasets).
"""

from __future__ import annotations

import array
import csv
import glob
import io
import json
import os
import tarfile
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")  # torchvision's IMG_EXTENSIONS
SHARD_IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp", "ppm", "bmp", "tif", "tiff")
UNLABELED = -1


class DataSourceError(ValueError):
    """A data location that cannot be read as the layout it claims (named path and line)."""


class StringArena:
    """Many strings in one ``uint8`` buffer plus offsets (int32 below 2 GiB): two numpy arrays instead of a
    list of ``str`` objects (about 1 byte per character instead of 50 + 1 per string, and no
    per-object reference counts for forked workers to touch)."""

    def __init__(self, strings: Iterable[str]) -> None:
        buffer, ends = bytearray(), array.array("q")  # array, not list: no million int objects left behind
        for string in strings:
            buffer += string.encode("utf-8")
            ends.append(len(buffer))
        self.data = np.frombuffer(buffer, dtype=np.uint8).copy()  # exact size; the growing buffer is freed
        self.offsets = np.zeros(len(ends) + 1, dtype=np.int32 if len(buffer) < 2**31 else np.int64)
        self.offsets[1:] = np.frombuffer(ends, dtype=np.int64)

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def __getitem__(self, i: int) -> str:
        return self.data[self.offsets[i] : self.offsets[i + 1]].tobytes().decode("utf-8")

    def take(self, indices: np.ndarray) -> "StringArena":
        return StringArena(self[int(i)] for i in indices)

    @property
    def nbytes(self) -> int:
        return self.data.nbytes + self.offsets.nbytes


def _label_array(labels: Sequence[int]) -> np.ndarray:
    return np.asarray(labels, dtype=np.int32).reshape(-1)  # int32: 4 MB less per million samples


class ImageSource:
    """The samples of one split: ``len``, ``labels`` (int32 array, -1 for unlabelled),
    ``read(i)`` (a binary file object of the encoded image), ``name(i)`` (its path or key, for
    messages and predictions), ``subset(indices, labels)``, and a ``fingerprint()`` of what the
    index holds."""

    labels: np.ndarray
    kind = "source"

    def __len__(self) -> int:
        return len(self.labels)

    def read(self, i: int) -> io.IOBase:
        raise NotImplementedError

    def name(self, i: int) -> str:
        raise NotImplementedError

    def key(self, i: int) -> str:
        """The sample's name within its split (relative path, shard key or row), as a list of
        labelled samples names it."""
        raise NotImplementedError

    def subset(self, indices: np.ndarray, labels: np.ndarray | None = None) -> "ImageSource":
        raise NotImplementedError

    def fingerprint(self) -> dict[str, Any]:
        """What the index holds (kind, size, sha256 of its names and labels), for the teacher cache."""
        import hashlib

        digest = hashlib.sha256(self.labels.tobytes())
        for part in self._identity():
            digest.update(part)
        return {"kind": self.kind, "samples": len(self), "index_sha256": digest.hexdigest()}

    def _identity(self) -> list[bytes]:
        raise NotImplementedError


class FileSource(ImageSource):
    """Images as files: ``root / names[i]``."""

    kind = "files"

    def __init__(self, root: str | Path, names: StringArena, labels: np.ndarray) -> None:
        self.root, self.names, self.labels = Path(root), names, _label_array(labels)

    def _identity(self) -> list[bytes]:
        return [str(self.root).encode(), self.names.data.tobytes(), self.names.offsets.tobytes()]

    def path(self, i: int) -> Path:
        return self.root / self.names[i]

    def name(self, i: int) -> str:
        return str(self.path(i))

    def key(self, i: int) -> str:
        return self.names[i]

    def read(self, i: int) -> io.IOBase:
        return open(self.path(i), "rb")

    def subset(self, indices: np.ndarray, labels: np.ndarray | None = None) -> "FileSource":
        indices = np.asarray(indices)
        return FileSource(self.root, self.names.take(indices), self.labels[indices] if labels is None else labels)


class TarSource(ImageSource):
    """Samples inside uncompressed tar shards (the webdataset layout: ``KEY.jpg`` + ``KEY.cls``),
    read by seeking to each member's data: random access, so the sampler's order and the
    (seed, epoch, index) augmentation apply as for files. Each worker opens the shards it needs
    once (file handles are per process)."""

    kind = "tar"

    def __init__(self, shards: Sequence[str], keys: StringArena, shard_ids: np.ndarray, offsets: np.ndarray, sizes: np.ndarray, labels: np.ndarray) -> None:
        self.shards = StringArena(shards)
        self.keys, self.shard_ids, self.offsets, self.sizes = keys, shard_ids, offsets, sizes
        self.labels = _label_array(labels)
        self._handles: dict[int, Any] = {}
        self._pid = os.getpid()

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_handles": {}}

    def _identity(self) -> list[bytes]:
        arrays = (self.shards.data, self.shards.offsets, self.keys.data, self.keys.offsets, self.shard_ids, self.offsets, self.sizes)
        return [array.tobytes() for array in arrays]

    def name(self, i: int) -> str:
        return f"{self.shards[int(self.shard_ids[i])]}:{self.keys[i]}"

    def key(self, i: int) -> str:
        return self.keys[i]

    def read(self, i: int) -> io.IOBase:
        if os.getpid() != self._pid:  # forked: the parent's handles share its file positions
            self._handles, self._pid = {}, os.getpid()
        shard = int(self.shard_ids[i])
        handle = self._handles.get(shard)
        if handle is None:
            handle = self._handles[shard] = open(self.shards[shard], "rb")
        handle.seek(int(self.offsets[i]))
        data = handle.read(int(self.sizes[i]))
        if len(data) != int(self.sizes[i]):
            raise OSError(f"shard {self.shards[shard]} ends inside sample {self.keys[i]} (truncated)")
        return io.BytesIO(data)

    def subset(self, indices: np.ndarray, labels: np.ndarray | None = None) -> "TarSource":
        indices = np.asarray(indices)
        shards = [self.shards[i] for i in range(len(self.shards))]
        labels = self.labels[indices] if labels is None else labels
        return TarSource(shards, self.keys.take(indices), self.shard_ids[indices], self.offsets[indices], self.sizes[indices], labels)


class HFSource(ImageSource):
    """A Hugging Face ``datasets.Dataset`` (memory-mapped Arrow): the image column read as encoded
    bytes (``Image(decode=False)``) and decoded here like any file."""

    kind = "hf"

    def __init__(self, dataset: Any, image_column: str, labels: np.ndarray, rows: np.ndarray | None = None, description: str = "") -> None:
        from datasets import Image as HFImage

        self.dataset = dataset.cast_column(image_column, HFImage(decode=False))
        self.image_column, self.labels, self.description = image_column, _label_array(labels), description
        self.rows = np.arange(len(self.labels), dtype=np.int64) if rows is None else np.asarray(rows, dtype=np.int64)

    def _identity(self) -> list[bytes]:
        return [self.description.encode(), str(self.dataset._fingerprint).encode(), self.rows.tobytes()]

    def name(self, i: int) -> str:
        return f"{self.description}[{int(self.rows[i])}]"

    def key(self, i: int) -> str:
        return str(int(self.rows[i]))

    def read(self, i: int) -> io.IOBase:
        value = self.dataset[int(self.rows[i])][self.image_column]
        if value.get("bytes"):
            return io.BytesIO(value["bytes"])
        if value.get("path"):
            return open(value["path"], "rb")
        raise OSError(f"row {int(self.rows[i])} of {self.description} has no image bytes or path")

    def subset(self, indices: np.ndarray, labels: np.ndarray | None = None) -> "HFSource":
        indices = np.asarray(indices)
        source = HFSource.__new__(HFSource)
        source.dataset, source.image_column, source.description = self.dataset, self.image_column, self.description
        source.rows = self.rows[indices]
        source.labels = self.labels[indices] if labels is None else _label_array(labels)
        return source


# -- opening a location ---------------------------------------------------------------------------
def is_image_file(name: str) -> bool:
    return name.lower().endswith(IMAGE_EXTENSIONS)


def scan_folder(root: Path, recursive: bool = True) -> list[str]:
    """Image file names under ``root``, relative to it, sorted (for unlabelled folders)."""
    names = []
    for folder, dirs, files in os.walk(root, followlinks=True):
        dirs.sort()
        relative = os.path.relpath(folder, root)
        names += [name if relative == "." else f"{relative}/{name}" for name in sorted(files) if is_image_file(name)]
        if not recursive:
            break
    return names


def class_folders(root: Path) -> list[str]:
    """The class names of an ImageFolder tree: its sub-folders, sorted (torchvision's ``find_classes``)."""
    return sorted(entry.name for entry in os.scandir(root) if entry.is_dir() and not entry.name.startswith("."))


def image_folder(root: Path, classes: Sequence[str] | None = None) -> tuple[FileSource, list[str]]:
    """An ImageFolder split, ``root/<class>/**/*.jpg``; ``classes`` (default: the sub-folders) fixes
    the label order, so val and test use the training split's. An empty class folder, or a folder
    whose class is not in ``classes``, is an error."""
    found = class_folders(root)
    if not found:
        raise DataSourceError(f"{root} has no class sub-folders: an ImageFolder split is {root}/<class name>/<image files>")
    classes = list(found if classes is None else classes)
    unknown = sorted(set(found) - set(classes))
    if unknown:
        raise DataSourceError(f"{root} has class folders {unknown[:5]} that are not among the training classes ({len(classes)}: {classes[:5]}...)")
    label_of = {name: label for label, name in enumerate(classes)}
    names, labels = [], []
    for name in found:
        files = scan_folder(root / name)
        if not files:
            raise DataSourceError(f"class folder {root / name} holds no image files ({', '.join(IMAGE_EXTENSIONS)})")
        names += [f"{name}/{file}" for file in files]
        labels += [label_of[name]] * len(files)
    return FileSource(root, StringArena(names), np.asarray(labels)), classes


def _label_of(value: Any, where: str, classes: Sequence[str] | None, label_of: dict[str, int] | None) -> int:
    """A list row's label: a class name of ``classes``, or an index into them."""
    if value is None or value == "":
        return UNLABELED
    if isinstance(value, str) and label_of is not None and value in label_of:
        return label_of[value]
    try:
        label = int(value)
    except (TypeError, ValueError):
        raise DataSourceError(f"{where}: label {value!r} is not one of the classes {list(classes or [])[:10]}") from None
    if classes is not None and not 0 <= label < len(classes):
        raise DataSourceError(f"{where}: label {label} is outside the {len(classes)} classes (0..{len(classes) - 1})")
    if label < 0:
        raise DataSourceError(f"{where}: label {label} is negative")
    return label


def _list_rows(path: Path) -> Iterable[tuple[str, Any, int]]:
    """(path, label, line number) of each row of a CSV or JSONL file list, streamed."""
    try:
        with open(path, newline="") as f:
            if path.suffix.lower() == ".csv":
                reader = csv.DictReader(f)
                if not reader.fieldnames or "path" not in reader.fieldnames:
                    raise DataSourceError(f"{path}: a file list's CSV header needs a 'path' column (and 'label'), got {reader.fieldnames}")
                for row in reader:
                    yield row["path"], row.get("label"), reader.line_num
                return
            for number, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as err:
                    raise DataSourceError(f"{path}:{number}: not a JSON object ({err})") from None
                if not isinstance(row, dict) or "path" not in row:
                    raise DataSourceError(f"{path}:{number}: a JSONL row needs a 'path' key, got {line.strip()[:80]}")
                yield row["path"], row.get("label"), number
    except UnicodeDecodeError as err:
        raise DataSourceError(f"{path} is not a text file list ({err})") from None


def file_list(path: Path, classes: Sequence[str] | None = None, check_files: bool = True) -> tuple[FileSource, list[str] | None]:
    """A CSV (header ``path,label``) or JSONL (``{"path": ..., "label": ...}``) list; paths relative
    to the list's folder. Labels are class names or indices; without ``classes``, names become the
    sorted set of names found, and integer labels are used as they are. A missing file or a bad
    label is an error naming the list's line; ``check_files`` stats every file at setup.

    The rows are streamed straight into the compact index: each distinct label value gets a code
    (and the line it first appears on, for errors) and is resolved once at the end, so a million-row
    list never exists as a million Python tuples (whose freed heap would stay in every worker)."""
    root = path.parent
    codes: dict[Any, int] = {}  # distinct label value -> code
    first_line: list[int] = []  # code -> line where the value first appears
    row_codes = array.array("i")

    def names() -> Iterable[str]:
        for name, label, line in _list_rows(path):
            if check_files and not (root / name).is_file():
                raise DataSourceError(f"{path}:{line}: {root / name} does not exist")
            try:
                code = codes.setdefault(label, len(codes))
            except TypeError:
                raise DataSourceError(f"{path}:{line}: label {label!r} is neither a class name nor an index") from None
            if code == len(first_line):
                first_line.append(line)
            row_codes.append(code)
            yield name

    arena = StringArena(names())
    if not len(arena):
        raise DataSourceError(f"{path} lists no samples")
    values = list(codes)
    if classes is None and any(isinstance(value, str) and not value.lstrip("-").isdigit() for value in values):
        classes = sorted({value for value in values if value not in (None, "")})
    label_of = {name: i for i, name in enumerate(classes)} if classes is not None else None
    resolved = np.array([_label_of(value, f"{path}:{line}", classes, label_of) for value, line in zip(values, first_line)], dtype=np.int32)
    labels = resolved[np.frombuffer(row_codes, dtype=np.int32)]
    return FileSource(root, arena, labels), (list(classes) if classes is not None else None)


def expand_shards(pattern: str | Path) -> list[str]:
    """Shard paths from a folder (its ``*.tar``), a glob, or a brace pattern ``shards-{000..009}.tar``."""
    pattern = str(pattern)
    if os.path.isdir(pattern):
        return sorted(glob.glob(os.path.join(pattern, "*.tar")))
    from braceexpand import braceexpand

    paths: list[str] = []
    for expanded in braceexpand(pattern):
        paths += sorted(glob.glob(expanded)) if glob.has_magic(expanded) else [expanded]
    return paths


def tar_shards(shards: Sequence[str], classes: Sequence[str] | None = None) -> TarSource:
    """Index webdataset shards: per sample (``KEY.<image ext>`` with ``KEY.cls``, the key being
    the member's path up to the first dot of its file name) where its image bytes are. Reads the
    tar headers and the small ``.cls`` members once; a shard that is not a readable tar, or a
    sample without an image, is an error naming the shard and key."""
    if not shards:
        raise DataSourceError("no shards given (a folder of *.tar, a glob or a brace pattern)")
    keys, shard_ids, offsets, sizes, labels = [], [], [], [], []
    for shard_id, shard in enumerate(shards):
        if not os.path.isfile(shard):
            raise DataSourceError(f"shard {shard} does not exist")
        samples: dict[str, dict[str, Any]] = {}
        try:
            with tarfile.open(shard, "r:") as tar:
                for member in tar:
                    if not member.isfile():
                        continue
                    folder, _, base = member.name.rpartition("/")
                    stem, dot, extension = base.partition(".")
                    if not dot:
                        continue
                    key = f"{folder}/{stem}" if folder else stem
                    sample = samples.setdefault(key, {})
                    extension = extension.lower()
                    if extension in SHARD_IMAGE_EXTENSIONS:
                        sample["image"] = (member.offset_data, member.size)
                    elif extension == "cls":
                        sample["cls"] = tar.extractfile(member).read().decode().strip()
        except (tarfile.TarError, OSError, EOFError, UnicodeDecodeError) as err:
            raise DataSourceError(f"cannot read shard {shard} ({type(err).__name__}: {err}): it is not an uncompressed tar or is cut short") from None
        for key, sample in samples.items():
            if "image" not in sample:
                raise DataSourceError(f"shard {shard}: sample {key!r} has no image member ({', '.join(SHARD_IMAGE_EXTENSIONS)})")
            keys.append(key)
            shard_ids.append(shard_id)
            offsets.append(sample["image"][0])
            sizes.append(sample["image"][1])
            labels.append(_label_of(sample.get("cls"), f"{shard}:{key}.cls", classes, None))
    return TarSource(list(shards), StringArena(keys), np.asarray(shard_ids, np.int32), np.asarray(offsets, np.int64), np.asarray(sizes, np.int64), np.asarray(labels))


HF_MARKERS = ("dataset_info.json", "dataset_dict.json", "state.json")
HF_SPLIT_NAMES = {"train": ("train",), "val": ("validation", "val", "valid"), "test": ("test",)}


def is_hf_dataset(path: Path) -> bool:
    return path.is_dir() and (any((path / marker).is_file() for marker in HF_MARKERS) or any(path.glob("*.parquet")) or any(path.glob("*/*.parquet")))


def hf_splits(path: Path) -> dict[str, Any]:
    """The splits of a dataset saved with ``save_to_disk`` (a ``Dataset`` is one ``train`` split)
    or of a folder of parquet files (``train-*.parquet``, ``data/train-*.parquet``, ...)."""
    import datasets

    if any((path / marker).is_file() for marker in HF_MARKERS):
        loaded = datasets.load_from_disk(str(path))
        return dict(loaded) if isinstance(loaded, datasets.DatasetDict) else {"train": loaded}
    files = sorted(glob.glob(str(path / "*.parquet")) + glob.glob(str(path / "*" / "*.parquet")))
    by_split: dict[str, list[str]] = {}
    for file in files:
        name = Path(file).name.split("-")[0].split(".")[0]
        by_split.setdefault(name, []).append(file)
    loaded = datasets.load_dataset("parquet", data_files=by_split)
    return dict(loaded)


def hf_source(dataset: Any, description: str, classes: Sequence[str] | None, image_column: str | None, label_column: str | None) -> tuple[HFSource, list[str] | None]:
    """An :class:`HFSource` over ``dataset``: the image column is the one of feature type
    ``Image`` (or ``image_column``), labels the ``ClassLabel`` column (or ``label_column``)."""
    from datasets import ClassLabel, Image as HFImage

    features = dataset.features
    if image_column is None:
        image_columns = [name for name, feature in features.items() if isinstance(feature, HFImage)]
        if len(image_columns) != 1:
            raise DataSourceError(f"{description}: set image_column; the columns of type Image are {image_columns} (all: {list(features)})")
        image_column = image_columns[0]
    if image_column not in features:
        raise DataSourceError(f"{description} has no column {image_column!r} (columns: {list(features)})")
    if label_column is None:
        label_columns = [name for name, feature in features.items() if isinstance(feature, ClassLabel)]
        label_column = label_columns[0] if label_columns else ("label" if "label" in features else None)
    if label_column is None:
        labels = np.full(len(dataset), UNLABELED)
    else:
        if label_column not in features:
            raise DataSourceError(f"{description} has no column {label_column!r} (columns: {list(features)})")
        feature = features[label_column]
        if classes is None and isinstance(feature, ClassLabel):
            classes = list(feature.names)
        labels = np.asarray(dataset.data.column(label_column).to_numpy(zero_copy_only=False), dtype=np.int64)
        top = len(classes) if classes is not None else np.iinfo(np.int64).max
        bad = np.nonzero((labels < UNLABELED) | (labels >= top))[0]  # -1: datasets' "no label"
        if len(bad):
            row = int(bad[0])
            raise DataSourceError(f"{description}: row {row} has label {int(labels[row])}, outside the {top} classes")
    return HFSource(dataset, image_column, labels, description=description), (list(classes) if classes is not None else None)
