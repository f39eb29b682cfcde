"""Lightning data modules. Batches are dicts: ``{"image", "label", "index", ...}``."""

from mmkd.data.common import EpochShuffleSampler, ImageTensorDataset, ResumableDataLoader, default_data_root
from mmkd.data.images import FashionMNISTDataModule, IDXImageDataModule, MNISTDataModule
from mmkd.data.semi import SemiSupervisedDataModule, balanced_labeled_split

__all__ = [
    "EpochShuffleSampler",
    "FashionMNISTDataModule",
    "IDXImageDataModule",
    "ImageTensorDataset",
    "MNISTDataModule",
    "ResumableDataLoader",
    "SemiSupervisedDataModule",
    "balanced_labeled_split",
    "default_data_root",
]
