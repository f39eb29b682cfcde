"""Lightning data modules. Batches are dicts: ``{"image", "label", "index", ...}``."""

from mmkd.data.audio_visual import AudioDecodeError, AVMNISTDataModule, PairedDataset, log_mel, pca_degrade, read_wav
from mmkd.data.av_files import AudioSpec, AudioVisualFilesDataModule, AVDecodeError
from mmkd.data.common import EpochShuffleSampler, ImageTensorDataset, InMemoryDataModule, ResumableDataLoader, SplitsDataModule, default_data_root
from mmkd.data.files import ImageDecodeError, ImageFileDataset, ImageFilesDataModule
from mmkd.data.images import FashionMNISTDataModule, IDXImageDataModule, MNISTDataModule
from mmkd.data.semi import SemiSupervisedDataModule, balanced_labeled_split
from mmkd.data.sources import DataSourceError
from mmkd.data.views import ViewSpec, view_of_model

__all__ = [
    "AVMNISTDataModule",
    "AudioDecodeError",
    "AudioSpec",
    "AudioVisualFilesDataModule",
    "AVDecodeError",
    "DataSourceError",
    "EpochShuffleSampler",
    "FashionMNISTDataModule",
    "IDXImageDataModule",
    "ImageDecodeError",
    "ImageFileDataset",
    "ImageFilesDataModule",
    "ImageTensorDataset",
    "InMemoryDataModule",
    "MNISTDataModule",
    "PairedDataset",
    "ResumableDataLoader",
    "SemiSupervisedDataModule",
    "SplitsDataModule",
    "ViewSpec",
    "balanced_labeled_split",
    "default_data_root",
    "log_mel",
    "pca_degrade",
    "read_wav",
    "view_of_model",
]
