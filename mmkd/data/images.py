"""Image classification data modules: Fashion-MNIST and MNIST (full, or the 10k digits)."""

from __future__ import annotations

from pathlib import Path

import torch
from mmkd.data.common import ImageTensorDataset, InMemoryDataModule, default_data_root
from mmkd.data.idx import read_idx

FASHION_MNIST_CLASSES = (
    "T-shirt/top", "trouser", "pullover", "dress", "coat",
    "sandal", "shirt", "sneaker", "bag", "ankle boot",
)  # fmt: skip
DIGIT_CLASSES = tuple(str(d) for d in range(10))


def find_data_file(root: Path, folders: tuple[str, ...], name: str) -> Path | None:
    """``root/folder/name.gz`` or ``root/folder/name`` in the first of ``folders`` that has it."""
    for folder in folders:
        for suffix in (".gz", ""):
            path = root / folder / f"{name}{suffix}"
            if path.is_file():
                return path
    return None


def digits_10k_files(root: Path) -> tuple[Path | None, Path | None]:
    """The images and labels IDX files of the 10,000 MNIST digits in ``root/mnist-10k/`` (None where missing)."""
    return find_data_file(root, ("mnist-10k",), "images-idx3-ubyte"), find_data_file(root, ("mnist-10k",), "labels-idx1-ubyte")


class IDXImageDataModule(InMemoryDataModule):
    """Base for 28x28 greyscale IDX datasets held in memory.

    Splits: ``val_size`` images held out from the training files (seeded), the official test
    files as test split. Batches are dicts ``{"image", "label", "index"}``.

    Args:
        root: folder with the data; default ``$MMKD_DATA`` or ``~/.cache/mmkd/data``.
        batch_size: training batch size.
        eval_batch_size: batch size for val/test/predict (default: 2x ``batch_size``).
        val_size: images of the training files held out for validation.
        seed: seed of the train/val split and of the training order and augmentation.
        augment: random shift by up to 2 px (and horizontal flip where the classes allow it).
        auto_augment: with ``augment``, a timm RandAugment / AutoAugment string applied after the
            shift (``"rand-m9-mstd0.5-inc1"``: G2SD's specific stage); translations scale with
            the 28-px image as timm's do with 224 px (45 % of the side at full magnitude).
        re_prob: with ``augment``, timm random erasing (pixel mode) on the normalised image with
            this probability (G2SD's specific stage: 0.25).
        num_workers: DataLoader workers (the data is in memory; 0 is usually fastest on CPU).
        download: let ``prepare_data`` download missing files with torchvision.
    """

    splits: dict[str, ImageTensorDataset]
    num_classes = 10
    input_shape = (1, 28, 28)
    mean, std = 0.5, 0.5
    class_names: tuple[str, ...] = ()
    hflip = False
    _folders: tuple[str, ...] = ()
    _file_names = {
        "train_images": "train-images-idx3-ubyte",
        "train_labels": "train-labels-idx1-ubyte",
        "test_images": "t10k-images-idx3-ubyte",
        "test_labels": "t10k-labels-idx1-ubyte",
    }

    def __init__(
        self,
        root: str | None = None,
        batch_size: int = 128,
        eval_batch_size: int | None = None,
        val_size: int = 5000,
        seed: int = 0,
        augment: bool = True,
        num_workers: int = 0,
        download: bool = True,
        auto_augment: str | None = None,
        re_prob: float = 0.0,
    ) -> None:
        super().__init__(batch_size=batch_size, eval_batch_size=eval_batch_size, seed=seed, num_workers=num_workers)
        self.root = Path(root).expanduser() if root else default_data_root()
        self.val_size, self.augment, self.download = val_size, augment, download
        self.auto_augment, self.re_prob = auto_augment, re_prob

    # -- locating and fetching files ------------------------------------------------------------
    def _paths(self) -> dict[str, Path] | None:
        paths = {key: find_data_file(self.root, self._folders, name) for key, name in self._file_names.items()}
        return paths if all(paths.values()) else None

    def _torchvision_download(self) -> None:
        raise NotImplementedError

    def _missing_message(self, reason: str) -> str:
        wanted = ", ".join(f"{name}.gz" for name in self._file_names.values())
        return (
            f"{type(self).__name__}: data not found under {self.root} ({reason}). Point the data "
            f"module at a folder that holds {wanted} in one of the sub-folders {list(self._folders)}: "
            "set MMKD_DATA=/path/to/data or pass --data.init_args.root=/path/to/data."
        )

    def prepare_data(self) -> None:
        if self._paths():
            return
        if not self.download:
            raise FileNotFoundError(self._missing_message("download=False"))
        try:
            self._torchvision_download()
        except Exception as err:  # network errors come in many types; all mean the same here
            reason = " ".join(str(err).split())
            raise FileNotFoundError(self._missing_message(f"download failed: {reason}")) from err
        if not self._paths():
            raise FileNotFoundError(self._missing_message("download finished but files are missing"))

    # -- splits --------------------------------------------------------------------------------
    def _load(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        paths = self._paths()
        if paths is None:
            raise FileNotFoundError(self._missing_message("files missing; prepare_data was not run?"))
        arrays = {key: torch.from_numpy(read_idx(path).copy()) for key, path in paths.items()}
        return arrays["train_images"], arrays["train_labels"], arrays["test_images"], arrays["test_labels"]

    def setup(self, stage: str | None = None) -> None:
        if self.splits:
            return
        train_images, train_labels, test_images, test_labels = self._load()
        if not 0 < self.val_size < len(train_images):
            raise ValueError(f"val_size={self.val_size} must be in (0, {len(train_images)})")
        order = torch.randperm(len(train_images), generator=torch.Generator().manual_seed(self.seed))
        val_idx, train_idx = order[: self.val_size], order[self.val_size :]
        common = dict(mean=self.mean, std=self.std)
        self.splits = {
            "train": ImageTensorDataset(
                train_images[train_idx], train_labels[train_idx], augment=self.augment,
                hflip=self.hflip, seed=self.seed, auto_augment=self.auto_augment, re_prob=self.re_prob, **common,
            ),
            "val": ImageTensorDataset(train_images[val_idx], train_labels[val_idx], **common),
            "test": ImageTensorDataset(test_images, test_labels, **common),
        }  # fmt: skip

    def teacher_cache_dataset(self, views: int | None = None) -> tuple[ImageTensorDataset, dict]:
        """The training split for a teacher cache (see :mod:`mmkd.core.cache`) and its fingerprint
        (content, normalisation, transform). Refused with random augmentation, and for cached
        views: those are recorded by the file data modules."""
        from mmkd.core.cache import TeacherCacheError, refuse_random_augmentation, tensor_sha256

        if views is not None:
            raise TeacherCacheError(
                f"{type(self).__name__} holds its images in memory and cannot record augmented views for a teacher cache: "
                "write the images to a folder (tools/image_files.py) and read them with mmkd.data.ImageFilesDataModule, "
                "or build a cache of the unaugmented images (no --views, --data.init_args.augment=false)"
            )
        refuse_random_augmentation(self)
        train = self.splits["train"]
        fingerprint = {
            "data": type(self).__name__, "train_samples": len(train),
            "train_sha256": tensor_sha256(train.images, train.labels),
            "normalize": [train.mean, train.std], "augment": False,
        }  # fmt: skip
        return train, fingerprint


class FashionMNISTDataModule(IDXImageDataModule):
    """Fashion-MNIST: 60k train (minus ``val_size`` for validation) + the official 10k test.

    Looks for the IDX files in ``root/fashion-mnist/`` or torchvision's ``root/FashionMNIST/raw/``.
    """

    mean, std = 0.2860, 0.3530
    class_names = FASHION_MNIST_CLASSES
    hflip = True  # clothes are left-right symmetric classes
    _folders = ("fashion-mnist", "FashionMNIST/raw", ".")

    def _torchvision_download(self) -> None:
        from torchvision.datasets import FashionMNIST

        FashionMNIST(str(self.root), train=True, download=True)
        FashionMNIST(str(self.root), train=False, download=True)


class MNISTDataModule(IDXImageDataModule):
    """MNIST digits. Uses the full MNIST (torchvision layout ``root/MNIST/raw``) when present;
    otherwise the 10,000-digit set in ``root/mnist-10k/`` (``images-idx3-ubyte.gz``,
    ``labels-idx1-ubyte.gz``), which has no official test split: there ``test_size`` digits are
    held out with the seed, then ``val_size`` of the rest. ``variant`` forces one of the two.
    """

    mean, std = 0.1307, 0.3081
    class_names = DIGIT_CLASSES
    _folders = ("MNIST/raw",)

    def __init__(self, *args, variant: str = "auto", test_size: int = 2000, **kwargs) -> None:
        if variant not in ("auto", "full", "10k"):
            raise ValueError(f"variant must be 'auto', 'full' or '10k', got {variant!r}")
        kwargs.setdefault("augment", False)  # a shifted digit is still the same digit, but a flip is not
        kwargs.setdefault("val_size", 1000)
        super().__init__(*args, **kwargs)
        self.variant, self.test_size = variant, test_size

    def _digits_10k(self) -> tuple[Path, Path] | None:
        images, labels = digits_10k_files(self.root)
        return (images, labels) if images and labels else None

    def _use_10k(self) -> bool:
        if self.variant != "auto":
            return self.variant == "10k"
        return super()._paths() is None and self._digits_10k() is not None

    def _paths(self) -> dict[str, Path] | None:
        if self._use_10k():
            found = self._digits_10k()
            return dict(zip(("images", "labels"), found)) if found else None
        return super()._paths()

    def _load(self):
        if not self._use_10k():
            return super()._load()
        found = self._digits_10k()
        if found is None:
            raise FileNotFoundError(self._missing_message("mnist-10k/images-idx3-ubyte.gz missing"))
        images, labels = (torch.from_numpy(read_idx(p).copy()) for p in found)
        order = torch.randperm(len(images), generator=torch.Generator().manual_seed(10_000 + self.seed))
        test_idx, train_idx = order[: self.test_size], order[self.test_size :]
        return images[train_idx], labels[train_idx], images[test_idx], labels[test_idx]

    def _torchvision_download(self) -> None:
        from torchvision.datasets import MNIST

        MNIST(str(self.root), train=True, download=True)
        MNIST(str(self.root), train=False, download=True)
