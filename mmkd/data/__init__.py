"""Lightning data modules. Batches are dicts: ``{"image", "label", "index", ...}``."""

from mmkd.data.audio_visual import AudioDecodeError, AVMNISTDataModule, PairedDataset, log_mel, pca_degrade, read_wav
from mmkd.data.common import EpochShuffleSampler, ImageTensorDataset, InMemoryDataModule, ResumableDataLoader, default_data_root
from mmkd.data.images import FashionMNISTDataModule, IDXImageDataModule, MNISTDataModule
from mmkd.data.semi import SemiSupervisedDataModule, balanced_labeled_split

__all__ = [
    "AVMNISTDataModule",
    "AudioDecodeError",
    "EpochShuffleSampler",
    "FashionMNISTDataModule",
    "IDXImageDataModule",
    "ImageTensorDataset",
    "InMemoryDataModule",
    "MNISTDataModule",
    "PairedDataset",
    "ResumableDataLoader",
    "SemiSupervisedDataModule",
    "balanced_labeled_split",
    "default_data_root",
    "log_mel",
    "pca_degrade",
    "read_wav",
]
