"""Audio-visual data: AV-MNIST-style pairs of an MNIST digit and a spoken digit of the same class
(for cross-modal distillers such as MST-Distill), and the pieces to build other modality pairs."""

from __future__ import annotations

import functools
import re
from pathlib import Path

import numpy as np
import soundfile as sf
import torch
import torchaudio
from torch.utils.data import Dataset

from mmkd.data.common import InMemoryDataModule, default_data_root
from mmkd.data.idx import read_idx
from mmkd.data.images import DIGIT_CLASSES, digits_10k_files

FSDD_URL = "https://github.com/Jakobovski/free-spoken-digit-dataset"
_RECORDING_NAME = re.compile(r"(\d)_([A-Za-z0-9-]+)_(\d+)")
_CHUNK = 256  # pairs per log-mel / noise chunk: bounds the transient memory of setup


def _split_sizes(count: int, fractions: tuple[float, ...]) -> list[int]:
    """``count`` items shared in the ratio of ``fractions`` (the last part takes the rounding)."""
    sizes = [round(count * f / sum(fractions)) for f in fractions[:-1]]
    return [*sizes, count - sum(sizes)]


def _standardise(values: torch.Tensor, train: torch.Tensor) -> tuple[torch.Tensor, float, float]:
    """``values``, in place, minus the mean and over the std of ``train`` (one scalar each), and
    those two scalars."""
    mean, std = train.mean(), train.std()
    return values.sub_(mean).div_(std), float(mean), float(std)


class AudioDecodeError(ValueError):
    """An audio file that cannot be decoded or holds no samples."""


def read_wav(path: str | Path) -> tuple[np.ndarray, int]:
    """One audio file as float32 mono samples in [-1, 1] (channels averaged) and its sample rate.

    Raises :class:`AudioDecodeError` naming the file when it is corrupt, not audio, or empty:
    a broken file must stop the run rather than enter the data as silence.
    """
    path = Path(path)
    try:
        samples, sample_rate = sf.read(str(path), dtype="float32", always_2d=True)
    except (RuntimeError, OSError) as err:  # soundfile raises RuntimeErrors (LibsndfileError) for bad files
        raise AudioDecodeError(f"cannot decode audio file {path}: {err}. Delete or replace the file.") from err
    if len(samples) == 0:
        raise AudioDecodeError(f"audio file {path} holds no samples (empty or truncated). Delete or replace the file.")
    return np.clip(samples.mean(axis=1), -1.0, 1.0), sample_rate  # float files may exceed full scale


@functools.lru_cache(maxsize=4)
def _log_mel_transform(sample_rate: int, n_mels: int, n_fft: int, hop_length: int) -> torch.nn.Module:
    """Built once per configuration: the mel filter bank costs more than a chunk's transform."""
    return torch.nn.Sequential(
        torchaudio.transforms.MelSpectrogram(sample_rate=sample_rate, n_fft=n_fft, hop_length=hop_length, n_mels=n_mels),
        torchaudio.transforms.AmplitudeToDB(stype="power", top_db=80),
    )


def log_mel(
    waveforms: torch.Tensor, sample_rate: int, n_mels: int = 32, n_fft: int = 512, hop_length: int = 256
) -> torch.Tensor:
    """Log-mel spectrograms [N, 1, n_mels, frames] (dB, each clamped to 80 dB below its own peak)
    of waveforms [N, T], computed in chunks so that the intermediate STFT stays small."""
    transform = _log_mel_transform(sample_rate, n_mels, n_fft, hop_length)
    # [B, 1, T] -> [B, 1, n_mels, frames]: AmplitudeToDB applies top_db per leading entry, so with
    # the channel axis each spectrogram is clamped on its own, whatever the chunk holds.
    return torch.cat([transform(chunk.unsqueeze(1)) for chunk in waveforms.split(_CHUNK)])


def pca_degrade(train_images: torch.Tensor, images: torch.Tensor, energy: float) -> torch.Tensor:
    """``images`` [M, D] projected onto the leading principal components of ``train_images``
    [N, D] that together explain ``energy`` of the training variance (at least one component).

    AV-MNIST removes 75 % of the images' energy this way (``energy=0.25``) so that neither
    modality alone is easy. The PCA is fitted on the training images only; ``energy=1`` keeps
    every component and returns the images unchanged (up to float error).
    """
    if not 0 < energy <= 1:
        raise ValueError(f"energy must be in (0, 1], got {energy}")
    train = train_images.double()
    mean = train.mean(dim=0)
    centred = train - mean
    variances, components = torch.linalg.eigh(centred.T @ centred)  # ascending
    variances, components = variances.flip(0).clamp(min=0), components.flip(1)
    if energy >= 1:
        keep = len(variances)
    else:
        explained = variances.cumsum(0) / variances.sum()
        keep = min(int((explained < energy).sum()) + 1, len(variances))
    basis = components[:, :keep]
    projection, mean = (basis @ basis.T).to(images.dtype), mean.to(images.dtype)
    return (images - mean) @ projection + mean


class PairedDataset(Dataset):
    """Samples of several modalities held in memory, one row per sample in every tensor.

    Items are ``{modality: [...], "label": int, "index": int}``; ``__getitems__`` builds a whole
    batch ``{modality: [B, ...], "label": [B], "index": [B]}`` by indexing (use
    ``collate_fn=passthrough_collate``). Keys are indices or ``(index, epoch)`` pairs from
    :class:`~mmkd.data.common.EpochShuffleSampler` (no augmentation, so the epoch is unused).
    """

    def __init__(self, inputs: dict[str, torch.Tensor], labels: torch.Tensor) -> None:
        lengths = {name: len(tensor) for name, tensor in inputs.items()}
        if any(length != len(labels) for length in lengths.values()):
            raise ValueError(f"{len(labels)} labels but inputs of lengths {lengths}")
        self.inputs, self.labels = inputs, labels.long()

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, key: int | tuple[int, int]) -> dict:
        batch = self.__getitems__([key])
        return {name: (int(value[0]) if name == "index" else value[0]) for name, value in batch.items()}

    def __getitems__(self, keys: list) -> dict:
        indices = torch.tensor([key[0] if isinstance(key, tuple) else key for key in keys], dtype=torch.long)
        batch = {name: tensor[indices] for name, tensor in self.inputs.items()}
        return {**batch, "label": self.labels[indices], "index": indices}


class AVMNISTDataModule(InMemoryDataModule):
    """AV-MNIST from real data: each of the 10,000 MNIST digits in ``root/mnist-10k/`` paired
    with a recording of the same digit from the Free Spoken Digit Dataset
    (``root/fsdd/recordings/{digit}_{speaker}_{take}.wav``).

    As in AV-MNIST, the images lose most of their energy to PCA and the audio gets white noise,
    so that each modality alone is weak. As in MST-Distill's code, the digits are split at random
    into train/val/test once (``split``). The recordings are split into per-split pools (by
    digit, or by speaker with ``held_out_speakers``), and every split pairs its images only with
    its own pool's recordings, each used equally often (±1). Everything is computed at setup;
    batches are ``{"image": [B, 1, 28, 28], "audio": [B, 1, n_mels, frames], "label", "index"}``,
    both inputs standardised with the training split's mean and std. ``recording_ids[split]``
    names the recording paired with each sample, ``image_ids[split]`` its digit's position in
    the MNIST file.

    Args:
        root: folder holding ``mnist-10k/`` and ``fsdd/recordings/``; default ``$MMKD_DATA`` or
            ``~/.cache/mmkd/data``.
        batch_size: training batch size.
        eval_batch_size: batch size for val/test/predict (default: 2x ``batch_size``).
        seed: seed of the splits, the pairing, the noise and the training order.
        split: train/val/test fractions of the images, and of each digit's recordings.
        held_out_speakers: speakers whose recordings form the test pool (the others are split
            train/val in the ratio ``split[0]:split[1]``); default: recordings split by ``split``.
        image_energy: fraction of the training images' variance kept by the PCA (AV-MNIST: 0.25).
        noise_snr_db: signal-to-noise ratio of the white noise added to each recording, relative
            to that recording's RMS; None adds no noise. At the default 0 dB, after 15 epochs
            (Adam 1e-3, batch 128), the audio network of configs/mst/ alone reaches 77 % test
            accuracy, the image network 65 % and the fusion net 92 %; each modality alone is
            not enough.
        duration: seconds of audio per sample (recordings are cropped or padded with zeros).
        n_mels / n_fft / hop_length: the log-mel spectrograms' bands, window and hop (samples); the
            defaults give 32x32 spectrograms of 1 s at FSDD's 8 kHz.
        num_workers: DataLoader workers (the data is in memory; 0 is usually fastest on CPU).
    """

    num_classes = 10
    class_names = DIGIT_CLASSES
    modalities = ("image", "audio")
    def __init__(
        self,
        root: str | None = None,
        batch_size: int = 128,
        eval_batch_size: int | None = None,
        seed: int = 0,
        split: tuple[float, float, float] = (0.6, 0.2, 0.2),
        held_out_speakers: list[str] | None = None,
        image_energy: float = 0.25,
        noise_snr_db: float | None = 0.0,
        duration: float = 1.0,
        n_mels: int = 32,
        n_fft: int = 512,
        hop_length: int = 256,
        num_workers: int = 0,
    ) -> None:
        super().__init__(batch_size=batch_size, eval_batch_size=eval_batch_size, seed=seed, num_workers=num_workers)
        if len(split) != 3 or min(split) <= 0 or abs(sum(split) - 1) > 1e-6:
            raise ValueError(f"split must be three positive fractions summing to 1, got {split}")
        self.root = Path(root).expanduser() if root else default_data_root()
        self.split = tuple(split)
        self.held_out_speakers = list(held_out_speakers) if held_out_speakers else None
        self.image_energy, self.noise_snr_db = image_energy, noise_snr_db
        self.duration, self.n_mels, self.n_fft, self.hop_length = duration, n_mels, n_fft, hop_length
        self.image_ids: dict[str, torch.Tensor] = {}
        self.recording_ids: dict[str, np.ndarray] = {}
        self._sample_rate: int | None = None
        self.audio_normalization: list[float] = []  # after setup: the training split's log-mel mean and std

    @property
    def input_shape(self) -> dict[str, tuple[int, ...]]:
        """Shapes of one sample's inputs; before setup the sample rate is read from one WAV header."""
        sample_rate = self._sample_rate or sf.info(str(self._files()[2][0])).samplerate
        frames = round(self.duration * sample_rate) // self.hop_length + 1
        return {"image": (1, 28, 28), "audio": (1, self.n_mels, frames)}

    @property
    def preprocessing(self) -> dict[str, dict]:
        """How a recording becomes the ``audio`` input, published with zoo students (after
        ``setup``: the standardisation is the training split's). The white noise is part of the
        training data: a model trained here expects it (``mmkd predict`` mixes it in)."""
        if not self.audio_normalization:
            raise RuntimeError("AVMNISTDataModule.preprocessing is known after setup()")
        mean, std = self.audio_normalization
        audio = {"kind": "audio", "sample_rate": self._sample_rate, "duration": self.duration, "features": "log_mel", "n_mels": self.n_mels,
                 "n_fft": self.n_fft, "hop_length": self.hop_length, "top_db": 80, "mean": mean, "std": std,
                 "training_noise_snr_db": self.noise_snr_db}  # fmt: skip
        return {"audio": audio}

    # -- files -----------------------------------------------------------------------------------
    def _files(self) -> tuple[Path, Path, list[Path]]:
        images, labels = digits_10k_files(self.root)
        recordings = sorted((self.root / "fsdd" / "recordings").glob("*.wav"))
        missing = [name for name, found in (
            ("mnist-10k/images-idx3-ubyte.gz", images), ("mnist-10k/labels-idx1-ubyte.gz", labels),
            ("fsdd/recordings/*.wav", recordings),
        ) if not found]  # fmt: skip
        if missing:
            raise FileNotFoundError(
                f"{type(self).__name__}: {', '.join(missing)} not found under {self.root}. Point the data "
                "module at a folder holding mnist-10k/ (the MNIST digits as IDX files) and fsdd/recordings/ "
                f"(the Free Spoken Digit Dataset's recordings, {FSDD_URL}): set MMKD_DATA=/path/to/data "
                "or pass --data.init_args.root=/path/to/data."
            )
        return images, labels, recordings

    def prepare_data(self) -> None:
        self._files()

    # -- splits ----------------------------------------------------------------------------------
    def _recording_pools(self, digits: np.ndarray, speakers: np.ndarray, generator: torch.Generator) -> list[np.ndarray]:
        """Positions of the train, val and test recordings: per digit, seeded, at the ``split``
        fractions; or with ``held_out_speakers``, those speakers' recordings as test and the
        others' split train/val in the ratio ``split[0]:split[1]``."""
        held_out = np.zeros(len(digits), dtype=bool)
        fractions = self.split
        if self.held_out_speakers:
            found = sorted(set(speakers.tolist()))
            unknown = sorted(set(self.held_out_speakers) - set(found))
            if unknown:
                raise ValueError(f"held_out_speakers {unknown} not among the speakers found: {found}")
            held_out = np.isin(speakers, self.held_out_speakers)
            fractions = self.split[:2]
        pools: list[list[int]] = [[], [], []]
        for digit in range(self.num_classes):
            members = np.flatnonzero((digits == digit) & ~held_out)
            members = members[torch.randperm(len(members), generator=generator).numpy()]
            parts = np.split(members, np.cumsum(_split_sizes(len(members), fractions))[:-1])
            if self.held_out_speakers:
                parts.append(np.flatnonzero((digits == digit) & held_out))
            for pool, part in zip(pools, parts):
                pool.extend(part.tolist())
        return [np.array(pool, dtype=np.int64) for pool in pools]

    def _pair(self, labels: torch.Tensor, pool: np.ndarray, digits: np.ndarray, generator: torch.Generator) -> torch.Tensor:
        """For images of ``labels``, positions of recordings of the same digit from ``pool``:
        each digit's recordings in a seeded order, cycled, so each is used equally often (±1)."""
        recordings = torch.empty_like(labels)
        for digit in range(self.num_classes):
            candidates = torch.from_numpy(pool[digits[pool] == digit])
            if len(candidates) == 0:
                raise ValueError(f"a split's recording pool has no recording of digit {digit}: check split and held_out_speakers")
            images = torch.nonzero(labels == digit).flatten()
            cycle = candidates[torch.randperm(len(candidates), generator=generator)]
            recordings[images] = cycle[torch.arange(len(images)) % len(cycle)]
        return recordings

    def setup(self, stage: str | None = None) -> None:
        if self.splits:
            return
        image_path, label_path, recording_paths = self._files()
        names = np.array([path.stem for path in recording_paths])
        parsed = [_RECORDING_NAME.fullmatch(name) for name in names]
        if not all(parsed):
            odd = [str(path) for path, match in zip(recording_paths, parsed) if not match]
            raise ValueError(f"recordings not named {{digit}}_{{speaker}}_{{take}}.wav: {odd[:5]}")
        digits = np.array([int(match[1]) for match in parsed])
        speakers = np.array([match[2] for match in parsed])
        images = torch.from_numpy(read_idx(image_path).copy()).float().div_(255.0).flatten(1)
        labels = torch.from_numpy(read_idx(label_path).copy()).long()

        splits = ("train", "val", "test")
        generator = torch.Generator().manual_seed(self.seed)
        order = torch.randperm(len(images), generator=generator)
        image_idx = dict(zip(splits, order.split(_split_sizes(len(images), self.split))))
        pools = dict(zip(splits, self._recording_pools(digits, speakers, generator)))
        recording_idx = {split: self._pair(labels[image_idx[split]], pools[split], digits, generator) for split in splits}
        audio = self._spectrograms(recording_paths, torch.cat([recording_idx[split] for split in splits]), generator)
        audio, *self.audio_normalization = _standardise(audio, audio[: len(image_idx["train"])])
        audio = audio.split([len(image_idx[split]) for split in splits])
        degraded = pca_degrade(images[image_idx["train"]], images, self.image_energy)
        degraded = _standardise(degraded, degraded[image_idx["train"]])[0].view(-1, 1, 28, 28)
        for split, spectrograms in zip(splits, audio):
            inputs = {"image": degraded[image_idx[split]], "audio": spectrograms}
            self.splits[split] = PairedDataset(inputs, labels[image_idx[split]])
            self.image_ids[split] = image_idx[split]
            self.recording_ids[split] = names[recording_idx[split].numpy()]

    def _spectrograms(self, paths: list[Path], recording_idx: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """Log-mel spectrograms of the recordings at ``recording_idx`` (one per pair), each
        recording read once; every pair gets its own seeded noise draw."""
        decoded = [read_wav(path) for path in paths]
        rates = {rate for _, rate in decoded}
        if len(rates) != 1:
            examples = {rate: str(next(p for p, (_, r) in zip(paths, decoded) if r == rate)) for rate in rates}
            raise ValueError(f"recordings at several sample rates {sorted(rates)} (e.g. {examples}); resample them to one rate")
        self._sample_rate = rates.pop()
        length = round(self.duration * self._sample_rate)
        waveforms = torch.zeros(len(paths), length)
        for row, (samples, _) in zip(waveforms, decoded):
            row[: len(samples)] = torch.from_numpy(samples[:length])
        rms = torch.tensor([float(np.sqrt(np.mean(np.square(s[:length])))) for s, _ in decoded])
        audio = torch.empty(len(recording_idx), *self.input_shape["audio"])
        for start in range(0, len(recording_idx), _CHUNK):
            chunk = recording_idx[start : start + _CHUNK]
            batch = waveforms[chunk]
            if self.noise_snr_db is not None:
                noise_std = rms[chunk] / 10 ** (self.noise_snr_db / 20)
                batch += torch.randn(batch.shape, generator=generator) * noise_std[:, None]
            audio[start : start + len(chunk)] = log_mel(batch, self._sample_rate, self.n_mels, self.n_fft, self.hop_length)
        return audio
