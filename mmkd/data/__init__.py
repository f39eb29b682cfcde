"""Lightning data modules. Batches are dicts: ``{"image", "label", "index", ...}``."""

from mmkd.data.common import EpochShuffleSampler, ImageTensorDataset, ResumableDataLoader, default_data_root
from mmkd.data.images import FashionMNISTDataModule, IDXImageDataModule, MNISTDataModule

__all__ = [
    "EpochShuffleSampler",
    "FashionMNISTDataModule",
    "IDXImageDataModule",
    "ImageTensorDataset",
    "MNISTDataModule",
    "ResumableDataLoader",
    "default_data_root",
]
