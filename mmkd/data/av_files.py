"""Audio-visual samples from files, read lazily by DataLoader workers: video clips with their
sound track (decoded with PyAV), or a picture or video file paired with an audio file. Batches
have the AV-MNIST layout (``{"image", "audio", "label", "index"}``), so MST-Distill and the
cross-modal distillers run on them unchanged."""

from __future__ import annotations

import csv
import functools
import json
import math
import re
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Literal, Sequence

import numpy as np
import torch
import torchaudio
from PIL import Image
from torch.utils.data import DataLoader, Dataset, Subset

from mmkd.data.audio_visual import AudioDecodeError, log_mel, read_wav
from mmkd.data.common import SplitsDataModule, sample_randint
from mmkd.data.files import BAD_FILES, ImageDecodeError, collate_samples, report_bad_files
from mmkd.data.sources import IMAGE_EXTENSIONS, DataSourceError, StringArena, class_folders

AUDIO_EXTENSIONS = (".wav", ".flac", ".ogg")
VIDEO_EXTENSIONS = (".mp4", ".mkv", ".avi", ".mov", ".webm", ".flv", ".m4v", ".mpg", ".mpeg")
SPLITS = ("train", "val", "test")


class AVDecodeError(AudioDecodeError):
    """A clip that cannot be used as it is: a corrupt container, a missing audio or video stream,
    no frames, an unsupported codec, or a sample rate other than the configured one."""


@dataclass(frozen=True)
class AudioSpec:
    """How a recording becomes a model's ``audio`` input: mono, resampled to ``sample_rate``
    (or, without ``resample``, required to have it), the clip window's ``duration`` seconds cut
    or zero-padded, then a log-mel spectrogram in dB (80 dB floor, ``[1, n_mels, frames]``),
    ``n_mfcc`` MFCCs (torchaudio's ``MFCC`` on the same mel bank, ``[1, n_mfcc, frames]``; MST's
    RAVDESS input is 15) or the waveform itself (``[1, samples]``), standardised with
    ``mean``/``std``. With
    ``noise_snr_db``, white noise at that SNR relative to the window's RMS is mixed into the
    padded window first (AV-MNIST's degradation)."""

    sample_rate: int = 8000
    duration: float = 1.0
    features: Literal["log_mel", "mfcc", "waveform"] = "log_mel"
    n_mels: int = 32
    n_fft: int = 512
    hop_length: int = 256
    mean: float = 0.0
    std: float = 1.0
    noise_snr_db: float | None = None
    resample: bool = True
    n_mfcc: int = 15

    @property
    def length(self) -> int:
        return round(self.duration * self.sample_rate)

    @property
    def shape(self) -> tuple[int, ...]:
        if self.features == "waveform":
            return (1, self.length)
        return (1, self.n_mfcc if self.features == "mfcc" else self.n_mels, self.length // self.hop_length + 1)


def _decode_error(path: Path, err: Exception, what: str) -> AVDecodeError:
    return AVDecodeError(f"cannot decode {what} of {path}: {type(err).__name__}: {err}. Delete or replace the file.")


def read_audio(path: str | Path) -> tuple[np.ndarray, int]:
    """The mono float32 samples and sample rate of an audio file (soundfile) or of the first audio
    stream of a video container (PyAV, downmixed by FFmpeg)."""
    path = Path(path)
    if path.suffix.lower() in AUDIO_EXTENSIONS:
        return read_wav(path)
    import av

    try:
        with av.open(str(path)) as container:
            if not container.streams.audio:
                raise AVDecodeError(f"{path} has no audio stream: give clips with a sound track, or pair the file with an audio file")
            stream = container.streams.audio[0]
            resampler = av.AudioResampler(format="flt", layout="mono", rate=stream.rate)
            chunks = [out.to_ndarray().reshape(-1) for frame in container.decode(stream) for out in resampler.resample(frame)]
            chunks += [out.to_ndarray().reshape(-1) for out in resampler.resample(None)]
            rate = stream.rate
    except AVDecodeError:
        raise
    except (av.FFmpegError, OSError, ValueError) as err:
        raise _decode_error(path, err, "the sound track") from err
    if not chunks or not sum(len(c) for c in chunks):
        raise AVDecodeError(f"the sound track of {path} holds no samples. Delete or replace the file.")
    return np.clip(np.concatenate(chunks), -1.0, 1.0), rate


def audio_window(samples: np.ndarray, rate: int, start: float, spec: AudioSpec, source: Path, noise: torch.Generator | None = None) -> torch.Tensor:
    """The window of ``spec.duration`` seconds from ``start`` of a recording, as ``spec`` describes."""
    if rate != spec.sample_rate and not spec.resample:
        raise AVDecodeError(
            f"{source} is sampled at {rate} Hz, the data expects {spec.sample_rate} Hz: convert it, or set "
            "--data.init_args.resample=true to resample on the fly"
        )
    first = round(start * rate)
    waveform = torch.from_numpy(samples[first : first + math.ceil(spec.duration * rate)])
    if rate != spec.sample_rate:
        waveform = torchaudio.functional.resample(waveform, rate, spec.sample_rate)
    waveform = waveform[: spec.length]
    # the noise scales with the sound in the window (none in a window past the recording's end)
    rms = waveform.square().mean().sqrt() if len(waveform) else torch.tensor(0.0)
    waveform = torch.nn.functional.pad(waveform, (0, spec.length - len(waveform)))
    if spec.noise_snr_db is not None:
        waveform = waveform + torch.randn(spec.length, generator=noise) * rms / 10 ** (spec.noise_snr_db / 20)
    if spec.features == "waveform":
        features = waveform[None]
    elif spec.features == "mfcc":
        features = _mfcc_transform(spec.sample_rate, spec.n_mfcc, spec.n_mels, spec.n_fft, spec.hop_length)(waveform[None])
    else:
        features = log_mel(waveform[None], spec.sample_rate, spec.n_mels, spec.n_fft, spec.hop_length)[0]
    return (features - spec.mean) / spec.std


@functools.lru_cache(maxsize=4)
def _mfcc_transform(sample_rate: int, n_mfcc: int, n_mels: int, n_fft: int, hop_length: int) -> torch.nn.Module:
    return torchaudio.transforms.MFCC(sample_rate, n_mfcc, melkwargs={"n_fft": n_fft, "hop_length": hop_length, "n_mels": n_mels})


def audio_input(path: str | Path, spec: AudioSpec, noise: torch.Generator | None = None) -> torch.Tensor:
    """One audio file (or a clip's sound track) from its start, as ``spec`` describes."""
    samples, rate = read_audio(path)
    return audio_window(samples, rate, 0.0, spec, Path(path), noise)


def read_frames(path: str | Path, times: Sequence[float]) -> list[Image.Image]:
    """The frames of a video file's first video stream on screen at ``times`` (seconds,
    ascending): for each time the last frame that starts at or before it (the first frame for
    times before it), as PIL images."""
    import av

    path = Path(path)
    pictures: list[Image.Image] = []
    try:
        with av.open(str(path)) as container:
            if not container.streams.video:
                raise AVDecodeError(f"{path} has no video stream: give video clips, or pair an audio file with a picture")
            stream = container.streams.video[0]
            if torch.utils.data.get_worker_info() is not None:
                stream.codec_context.thread_count = 1  # the workers are the parallelism: FFmpeg's threads would oversubscribe
            if times[0] > 1.0 and stream.time_base is not None:  # long clips: start at the key frame before the window
                container.seek(int(times[0] / stream.time_base), stream=stream, backward=True)
            previous = None
            for frame in container.decode(stream):
                time = frame.time
                if time is None:
                    continue
                while len(pictures) < len(times) and time > times[len(pictures)]:
                    pictures.append((previous or frame).to_image())
                if len(pictures) == len(times):
                    break
                previous = frame
    except AVDecodeError:
        raise
    except (av.FFmpegError, OSError, ValueError) as err:
        raise _decode_error(path, err, "the video stream") from err
    if previous is None and not pictures:
        raise AVDecodeError(f"{path} holds no video frames. Delete or replace the file.")
    while len(pictures) < len(times):
        pictures.append(previous.to_image())
    return pictures


def clip_length(path: Path) -> float:
    """A video file's duration in seconds (its video stream's, else the container's)."""
    import av

    try:
        with av.open(str(path)) as container:
            if not container.streams.video:
                raise AVDecodeError(f"{path} has no video stream: give video clips, or pair an audio file with a picture")
            stream = container.streams.video[0]
            if stream.duration is not None and stream.time_base is not None:
                return float(stream.duration * stream.time_base)
            return (container.duration or 0) / 1e6
    except AVDecodeError:
        raise
    except (av.FFmpegError, OSError, ValueError) as err:
        raise _decode_error(path, err, "the container") from err


def write_clip(
    path: str | Path,
    frames: Sequence[np.ndarray],
    fps: float,
    samples: np.ndarray | None,
    sample_rate: int,
    video_codec: str = "libx264",
    audio_codec: str = "aac",
) -> Path:
    """Mux ``frames`` (uint8 ``[H, W]`` greyscale or ``[H, W, 3]`` RGB) at ``fps`` and, unless
    None, the mono float ``samples`` at ``sample_rate`` into one video file with PyAV (the
    container from the suffix: ``.mp4``, ``.mkv``, ...). ``video_codec="ffv1"`` keeps the pixels
    exact (``.mkv``); ``libx264`` writes yuv420p as most cameras and sites do. No frames: a
    file with a sound track only."""
    import av
    from fractions import Fraction

    path = Path(path)
    with av.open(str(path), "w") as container:
        video = None
        if len(frames):
            grey = frames[0].ndim == 2
            video = container.add_stream(video_codec, rate=Fraction(fps).limit_denominator(1000))
            video.height, video.width = frames[0].shape[:2]
            video.pix_fmt = ("gray" if grey else "bgr0") if video_codec == "ffv1" else "yuv420p"
        audio = None
        if samples is not None:
            audio = container.add_stream(audio_codec, rate=sample_rate)
            audio.layout = "mono"
        for number, pixels in enumerate(frames):
            frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(pixels), format="gray" if grey else "rgb24")
            frame.pts, frame.time_base = number, Fraction(1) / video.codec_context.rate
            container.mux(video.encode(frame))
        if video is not None:
            container.mux(video.encode(None))
        if audio is not None:
            codec_format = audio.codec_context.codec.audio_formats[0].name
            resampler = av.AudioResampler(format=codec_format, layout="mono", rate=sample_rate)
            frame_size = audio.codec_context.frame_size or 1024
            pcm = np.asarray(samples, dtype=np.float32)
            for first in range(0, len(pcm), frame_size):
                chunk = av.AudioFrame.from_ndarray(pcm[None, first : first + frame_size], format="flt", layout="mono")
                chunk.sample_rate, chunk.pts, chunk.time_base = sample_rate, first, Fraction(1, sample_rate)
                for out in resampler.resample(chunk):
                    container.mux(audio.encode(out))
            for out in resampler.resample(None):
                container.mux(audio.encode(out))
            container.mux(audio.encode(None))
    return path


def picture_tensor(image: Image.Image, size: tuple[int, int], channels: int, centre_crop: bool) -> torch.Tensor:
    """A picture as ``[C, H, W]`` floats in [0, 1]: greyscale or RGB, centre-cropped to the target
    aspect ratio when ``centre_crop``, resized (bilinear) to ``size``."""
    image = image.convert("L" if channels == 1 else "RGB")
    if centre_crop:
        width, height = image.size
        scale = min(width / size[1], height / size[0])
        crop_w, crop_h = round(size[1] * scale), round(size[0] * scale)
        left, top = (width - crop_w) // 2, (height - crop_h) // 2
        image = image.crop((left, top, left + crop_w, top + crop_h))
    if image.size != (size[1], size[0]):
        image = image.resize((size[1], size[0]), Image.BILINEAR)
    pixels = torch.from_numpy(np.asarray(image, dtype=np.float32).copy()).div_(255.0)
    return pixels[None] if channels == 1 else pixels.permute(2, 0, 1)


def frame_times(start: float, span: float, count: int, sampling: str, generator: torch.Generator | None) -> list[float]:
    """``count`` times in ``[start, start + span)``: the centres of ``count`` equal segments
    (``"uniform"``), or one random time in each (``"random"``, TSN's segment sampling)."""
    offsets = torch.rand(count, generator=generator).tolist() if sampling == "random" else [0.5] * count
    return [start + (i + offset) * span / count for i, offset in enumerate(offsets)]


class AVFilesDataset(Dataset):
    """Samples ``{visual_key, "audio", "label", "index"}`` of clips or pairs, decoded on access.

    A sample is a visual file (picture or video) and an audio source (an audio file, or ``""``
    for the visual file's own sound track). Keys are indices or ``(index, epoch)`` pairs; the
    random draws (clip window, frame times, noise) come from a generator seeded by (seed, epoch,
    index) in training and (seed, index) in evaluation, so a resumed run and any worker count
    see the same inputs. With ``raw``, no standardisation (for the statistics)."""

    def __init__(self, root: Path, visual: StringArena, audio: StringArena, labels: np.ndarray, module: "AudioVisualFilesDataModule", train: bool, raw: bool = False) -> None:
        self.root, self.visual, self.audio, self.labels = root, visual, audio, labels
        self.module, self.train, self.raw = module, train, raw

    def __len__(self) -> int:
        return len(self.labels)

    def name(self, index: int) -> str:
        """A sample's name in predictions: its visual file (a pair's picture or video)."""
        return str(self.root / self.visual[index])

    def raw_copy(self) -> "AVFilesDataset":
        return AVFilesDataset(self.root, self.visual, self.audio, self.labels, self.module, self.train, raw=True)

    def __getitem__(self, key: int | tuple[int, int]) -> dict[str, Any]:
        index, epoch = key if isinstance(key, tuple) else (key, 0)
        visual_path = self.root / self.visual[index]
        audio_path = self.root / self.audio[index] if self.audio[index] else visual_path
        try:
            visual, audio = self._decode(index, epoch, visual_path, audio_path)
        except AudioDecodeError as err:
            return self._bad(f"{err} (sample {index})", type(err))
        except (OSError, SyntaxError, ValueError) as err:  # PIL's errors for a bad picture
            return self._bad(f"cannot decode image {visual_path} (sample {index}): {type(err).__name__}: {err}", ImageDecodeError)
        return {self.module.visual_key: visual, "audio": audio, "label": int(self.labels[index]), "index": index}

    def _decode(self, index: int, epoch: int, visual_path: Path, audio_path: Path) -> tuple[torch.Tensor, torch.Tensor]:
        m = self.module
        # window and frames from one stream, the noise from another (fixed per sample when not per epoch)
        epoch = epoch if self.train else -1
        generator = self._generator(index, epoch, 7)
        noise = self._generator(index, epoch if m.noise_per_epoch else -1, 8)
        samples, rate = read_audio(audio_path)
        is_video = visual_path.suffix.lower() in VIDEO_EXTENSIONS
        # the clip's length: its video's when the sound comes with it, else the recording's
        length = clip_length(visual_path) if is_video and audio_path == visual_path else len(samples) / rate
        free = max(0.0, length - m.audio_spec.duration)
        mode = m.clip_start if self.train or m.clip_start != "random" else "centre"
        start = {"start": 0.0, "centre": free / 2, "random": float(torch.rand(1, generator=generator)) * free}[mode]
        spec = m.audio_spec if not self.raw else replace(m.audio_spec, mean=0.0, std=1.0)
        if is_video:
            span = min(m.audio_spec.duration, length - start) if length > start else m.audio_spec.duration
            sampling = m.frame_sampling if self.train else "uniform"
            pictures = read_frames(visual_path, frame_times(start, span, m.frames, sampling, generator))
        else:
            with Image.open(visual_path) as image:
                image.load()
                pictures = [image]
        frames = torch.stack([picture_tensor(p, m.image_size, m.channels, m.centre_crop) for p in pictures], dim=1)  # [C, T, H, W]
        visual = frames[:, 0] if m.frames == 1 else frames
        if not self.raw:
            shape = (-1,) + (1,) * (visual.ndim - 1)
            visual = (visual - torch.tensor(m.image_mean).view(shape)) / torch.tensor(m.image_std).view(shape)
        return visual, audio_window(samples, rate, start, spec, audio_path, noise)

    def _generator(self, index: int, epoch: int, stream: int) -> torch.Generator:
        seed = sample_randint(self.module.seed, torch.tensor([epoch]), torch.tensor([index]), stream, 2**31 - 1)
        return torch.Generator().manual_seed(int(seed[0]))

    def _bad(self, message: str, error: type[Exception]) -> dict[str, str]:
        if self.module.on_bad_file == "skip":
            return {BAD_FILES: message}
        raise error(f"{message}. Replace or remove the sample, or set --data.init_args.on_bad_file=skip to leave such samples out")


class AudioVisualFilesDataModule(SplitsDataModule):
    """Audio-visual samples from files, read lazily by DataLoader workers: a video clip with its
    sound track, or a picture or video file paired with an audio file.

    Layouts of ``root`` (the first that applies):

    - ``files``: a glob under ``root`` (``"Actor_*/01-01-*.mp4"``), each file a sample; the class
      is the first group of ``label_pattern`` searched in the path relative to ``root``, renamed
      by ``class_map``; the split is the first of ``split_patterns`` (``{split: regex}``) found
      in that path (files matching none are left out); ``audio_files`` (``"AudioWAV/{stem}.wav"``)
      names each sample's audio file, else its own sound track is used. (RAVDESS, CREMA-D.)
    - per split a list ``<split>.csv`` or ``<split>.jsonl``: a ``label`` column and the visual
      file under ``video``, ``image`` or ``path``, the audio file under ``audio`` (optional:
      without it the visual file's sound track); paths relative to ``root``.
    - per split a class-folder tree ``<split>/<class>/``: a video file alone is a clip; a
      picture or video file beside an audio file (wav, flac, ogg) of the same stem is a pair;
      a lone picture or audio file is an error naming it.

    A sample takes the window of ``duration`` seconds at the clip's start (``clip_start``
    ``"start"``), centre, or a seeded random place in training (``"random"``; centre in
    evaluation); from a video, ``frames`` frames of that window (the centres of equal segments,
    or with ``frame_sampling="random"`` a random time in each, in training), and the same window
    of its sound. Batches: ``{visual_key: [B, C, H, W] (frames 1) or [B, C, T, H, W], "audio":
    [B, 1, n_mels, frames] or [B, 1, samples], "label", "index"}``, the layout of
    :class:`~mmkd.data.audio_visual.AVMNISTDataModule`, so its configs take this module in its
    place. The index is two string arenas and a label array (flat in the number of samples);
    nothing is preloaded.

    Normalisation: ``image_mean``/``image_std`` (one value or one per channel) and
    ``audio_mean``/``audio_std`` left unset are the statistics of up to ``stats_samples``
    training samples (seeded, read by the loader's workers at setup; with the training noise:
    what the models see), as AV-MNIST standardises with its training split's.

    Args:
        root: the data set's folder.
        image_size: side (or ``[height, width]``) the pictures and frames are resized to;
            ``channels`` 1 or 3; ``centre_crop`` crops to that aspect ratio first.
        frames: frames per video sample (1: a picture ``[C, H, W]``).
        sample_rate, duration, features, n_mels, n_mfcc, n_fft, hop_length, resample: the audio input
            (:class:`AudioSpec`); ``resample=False`` makes another sample rate an error.
        noise_snr_db: white noise mixed into each window (AV-MNIST: 0 dB); None for none.
        noise_per_epoch: a new noise draw each training epoch; False keeps one draw per
            sample, as AV-MNIST, which mixes the noise in once when it builds its pairs.
        predict: what ``mmkd predict`` reads: a video or picture file, a folder (searched
            recursively: clips, and pictures or videos paired with audio files by stem), or a
            .csv/.jsonl list as above (labels optional); relative to ``root`` or absolute. The
            class names and statistics are those of the checkpoint predicted with (saved with
            the data module's state), else of the training split.
        on_bad_file: ``"raise"`` or ``"skip"`` (left out of its batch, counted in ``data/bad_files``).
    """

    def __init__(
        self,
        root: str,
        files: str | None = None,
        label_pattern: str | None = None,
        class_map: dict[str, str] | None = None,
        split_patterns: dict[str, str] | None = None,
        audio_files: str | None = None,
        visual_key: str = "image",
        image_size: int | list[int] = 28,
        channels: int = 1,
        centre_crop: bool = False,
        frames: int = 1,
        frame_sampling: Literal["uniform", "random"] = "uniform",
        clip_start: Literal["start", "centre", "random"] = "start",
        image_mean: float | list[float] | None = None,
        image_std: float | list[float] | None = None,
        sample_rate: int = 8000,
        duration: float = 1.0,
        features: Literal["log_mel", "mfcc", "waveform"] = "log_mel",
        n_mels: int = 32,
        n_mfcc: int = 15,
        n_fft: int = 512,
        hop_length: int = 256,
        resample: bool = True,
        audio_mean: float | None = None,
        audio_std: float | None = None,
        noise_snr_db: float | None = None,
        noise_per_epoch: bool = True,
        stats_samples: int = 512,
        predict: str | None = None,
        batch_size: int = 128,
        eval_batch_size: int | None = None,
        num_workers: int = 0,
        seed: int = 0,
        on_bad_file: Literal["raise", "skip"] = "raise",
    ) -> None:
        super().__init__(batch_size=batch_size, eval_batch_size=eval_batch_size, seed=seed, num_workers=num_workers)
        for name, value, allowed in (("on_bad_file", on_bad_file, ("raise", "skip")), ("frame_sampling", frame_sampling, ("uniform", "random")),
                                     ("clip_start", clip_start, ("start", "centre", "random")), ("features", features, ("log_mel", "mfcc", "waveform"))):
            if value not in allowed:
                raise ValueError(f"{name} must be one of {allowed}, got {value!r}")
        if files is not None and (label_pattern is None or not split_patterns):
            raise ValueError("files needs label_pattern (a regex whose first group is the class) and split_patterns ({split: regex})")
        if frames < 1 or channels not in (1, 3):
            raise ValueError(f"frames must be >= 1 and channels 1 or 3, got frames={frames}, channels={channels}")
        self.root = Path(root).expanduser()
        self.files, self.label_pattern, self.class_map = files, label_pattern, class_map
        self.split_patterns, self.audio_files = split_patterns, audio_files
        self.visual_key, self.frames, self.frame_sampling, self.clip_start = visual_key, frames, frame_sampling, clip_start
        self.image_size = (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)
        self.channels, self.centre_crop, self.image_mean, self.image_std = channels, centre_crop, image_mean, image_std
        self.audio_spec = AudioSpec(sample_rate, duration, features, n_mels, n_fft, hop_length, noise_snr_db=noise_snr_db, resample=resample, n_mfcc=n_mfcc)
        self.audio_mean, self.audio_std, self.stats_samples, self.on_bad_file = audio_mean, audio_std, stats_samples, on_bad_file
        self.predict, self.noise_per_epoch = predict, noise_per_epoch
        self.class_names: list[str] = []
        self.bad_files: list[str] = []

    collate_fn = staticmethod(collate_samples)

    @property
    def input_shape(self) -> dict[str, tuple[int, ...]]:
        visual = (self.channels, *self.image_size) if self.frames == 1 else (self.channels, self.frames, *self.image_size)
        return {self.visual_key: visual, "audio": self.audio_spec.shape}

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    # -- finding the samples ---------------------------------------------------------------------
    def _from_pattern(self) -> dict[str, list[tuple[str, str, str]]]:
        label_re = re.compile(self.label_pattern)
        split_res = {split: re.compile(pattern) for split, pattern in self.split_patterns.items()}
        found: dict[str, list[tuple[str, str, str]]] = {split: [] for split in split_res}
        for path in sorted(self.root.glob(self.files)):
            name = path.relative_to(self.root).as_posix()
            split = next((s for s, pattern in split_res.items() if pattern.search(name)), None)
            if split is None:
                continue
            match = label_re.search(name)
            if match is None:
                raise DataSourceError(f"{path}: label_pattern {self.label_pattern!r} finds no class in {name!r}")
            label = match.group(1)
            if self.class_map is not None:
                if label not in self.class_map:
                    raise DataSourceError(f"{path}: class {label!r} is not in class_map {sorted(self.class_map)}")
                label = self.class_map[label]
            audio = ""
            if self.audio_files is not None:
                audio = self.audio_files.format(stem=path.stem, name=path.name, parent=path.parent.relative_to(self.root).as_posix())
                if not (self.root / audio).is_file():
                    raise DataSourceError(f"{path}: its audio file {self.root / audio} (audio_files={self.audio_files!r}) does not exist")
            found[split].append((name, audio, label))
        for split, samples in found.items():
            if not samples:
                raise DataSourceError(f"no file of {self.root}/{self.files} matches split_patterns[{split!r}] = {self.split_patterns[split]!r}")
        return found

    def _from_list(self, listing: Path, labelled: bool = True) -> list[tuple[str, str, str]]:
        if listing.suffix == ".jsonl":
            with open(listing) as f:
                rows = [(json.loads(line), number) for number, line in enumerate(f, 1) if line.strip()]
        else:
            with open(listing, newline="") as f:
                reader = csv.DictReader(f)
                rows = [(row, reader.line_num) for row in reader]
        samples = []
        for row, line in rows:
            visual = next((row[key] for key in ("video", "image", "path") if row.get(key)), None)
            if visual is None or (labelled and "label" not in row):
                raise DataSourceError(f"{listing}:{line}: a row needs a label and a video, image or path (plus an optional audio), got {sorted(row)}")
            audio = row.get("audio") or ""
            for name in (visual, audio):
                if name and not (self.root / name).is_file():
                    raise DataSourceError(f"{listing}:{line}: {self.root / name} does not exist")
            samples.append((visual, audio, str(row.get("label", ""))))
        if not samples:
            raise DataSourceError(f"{listing} lists no samples")
        return samples

    def _scan(self, folder: Path, label: str) -> list[tuple[str, str, str]]:
        """The clips and pairs under ``folder`` (recursively), all of class ``label``."""
        by_stem: dict[Path, dict[str, Path]] = {}
        for path in sorted(p for p in folder.rglob("*") if p.is_file()):
            suffix = path.suffix.lower()
            kind = "audio" if suffix in AUDIO_EXTENSIONS else "visual" if suffix in IMAGE_EXTENSIONS + VIDEO_EXTENSIONS else None
            if kind is not None:
                by_stem.setdefault(path.with_suffix(""), {})[kind] = path
        if not by_stem:
            raise DataSourceError(f"{folder} holds no clips or picture + audio pairs")
        samples = []
        for files in by_stem.values():
            visual, audio = files.get("visual"), files.get("audio")
            if visual is None or (audio is None and visual.suffix.lower() not in VIDEO_EXTENSIONS):
                (only,) = files.values()
                missing = "audio file (.wav, .flac, .ogg)" if audio is None else "picture or video file"
                raise DataSourceError(f"{only} has no {missing} of the same name beside it: a sample is a clip or a pair")
            samples.append((self._relative(visual), self._relative(audio) if audio else "", label))
        return samples

    def _relative(self, path: Path) -> str:
        return path.relative_to(self.root).as_posix() if path.is_relative_to(self.root) else str(path.resolve())

    def _from_folders(self, folder: Path) -> list[tuple[str, str, str]]:
        return [sample for label in class_folders(folder) for sample in self._scan(folder / label, label)]

    def _from_predict(self) -> list[tuple[str, str, str]]:
        location = Path(self.predict).expanduser()
        location = location if location.is_absolute() else self.root / location
        if location.is_dir():
            return self._scan(location, "")
        if location.suffix.lower() in (".csv", ".jsonl") and location.is_file():
            return self._from_list(location, labelled=False)
        if location.suffix.lower() in IMAGE_EXTENSIONS + VIDEO_EXTENSIONS and location.is_file():
            return [(self._relative(location), "", "")]
        raise DataSourceError(f"predict={self.predict!r}: {location} is not a video or picture file, a folder or a .csv/.jsonl list")

    def _samples(self) -> dict[str, list[tuple[str, str, str]]]:
        """Per split, (visual path, audio path or "", class name) of each sample."""
        if self.files is not None:
            return self._from_pattern()
        found = {}
        for split in SPLITS:
            listing = next((self.root / f"{split}{suffix}" for suffix in (".csv", ".jsonl") if (self.root / f"{split}{suffix}").is_file()), None)
            if listing is not None:
                found[split] = self._from_list(listing)
            elif (self.root / split).is_dir():
                found[split] = self._from_folders(self.root / split)
        return found

    def setup(self, stage: str | None = None) -> None:
        if stage == "predict" and self.predict is not None and "predict" not in self.splits:
            samples = self._from_predict()
            labels = np.full(len(samples), -1, dtype=np.int32)
            visual, audio = StringArena(v for v, _, _ in samples), StringArena(a for _, a, _ in samples)
            self.splits["predict"] = AVFilesDataset(self.root, visual, audio, labels, self, train=False)
            if not self._has_training_split():  # the checkpoint brings the class names and statistics
                return
        if "train" in self.splits:
            return
        found = self._samples()
        if "train" not in found:
            raise DataSourceError(
                f"{self.root} has no train/ folder, train.csv or train.jsonl of clips or pairs (or set files, label_pattern and split_patterns)"
            )
        names = [label for _, _, label in found["train"]]
        mapped = list(dict.fromkeys(self.class_map.values())) if self.class_map else []
        self.class_names = [name for name in mapped if name in set(names)] or sorted(set(names))
        label_of = {name: i for i, name in enumerate(self.class_names)}
        for split, samples in found.items():
            if self.frames > 1 and any(Path(v).suffix.lower() in IMAGE_EXTENSIONS for v, _, _ in samples):
                raise DataSourceError(f"frames={self.frames} needs video files, but {split} has pictures: set frames: 1 or give videos")
            unknown = sorted({label for _, _, label in samples} - label_of.keys())
            if unknown:
                raise DataSourceError(f"{self.root} ({split}): classes {unknown[:5]} are not among the training classes {self.class_names[:10]}")
            labels = np.array([label_of[label] for _, _, label in samples], dtype=np.int32)
            visual, audio = StringArena(v for v, _, _ in samples), StringArena(a for _, a, _ in samples)
            self.splits[split] = AVFilesDataset(self.root, visual, audio, labels, self, train=split == "train")
        self._standardisation()

    def _has_training_split(self) -> bool:
        return self.files is not None or any((self.root / name).exists() for name in ("train", "train.csv", "train.jsonl"))

    def _standardisation(self) -> None:
        """The statistics left unset, from up to ``stats_samples`` training samples (seeded)."""
        per_channel = lambda value: tuple(float(v) for v in (value if isinstance(value, (list, tuple)) else [value] * self.channels))  # noqa: E731
        if None in (self.image_mean, self.image_std, self.audio_mean, self.audio_std):
            train = self.splits["train"]
            chosen = np.random.default_rng(self.seed).choice(len(train), min(self.stats_samples, len(train)), replace=False)
            loader = DataLoader(Subset(train.raw_copy(), chosen.tolist()), batch_size=64, num_workers=self.num_workers, collate_fn=collate_samples)
            visual_sum = visual_sq = visual_count = audio_sum = audio_sq = audio_count = 0.0
            for batch in loader:
                pixels = batch[self.visual_key].double().transpose(0, 1).reshape(self.channels, -1)
                audio = batch["audio"].double()
                visual_sum, visual_sq, visual_count = visual_sum + pixels.sum(1), visual_sq + pixels.square().sum(1), visual_count + pixels.shape[1]
                audio_sum, audio_sq, audio_count = audio_sum + audio.sum(), audio_sq + audio.square().sum(), audio_count + audio.numel()
            visual_mean, audio_mean = visual_sum / visual_count, float(audio_sum / audio_count)
            visual_std = ((visual_sq / visual_count - visual_mean.square()) * visual_count / (visual_count - 1)).clamp_min(0).sqrt()
            audio_std = math.sqrt(max(0.0, (audio_sq / audio_count - audio_mean**2) * audio_count / (audio_count - 1)))
            self.image_mean = visual_mean.tolist() if self.image_mean is None else self.image_mean
            self.image_std = visual_std.tolist() if self.image_std is None else self.image_std
            self.audio_mean = audio_mean if self.audio_mean is None else self.audio_mean
            self.audio_std = audio_std if self.audio_std is None else self.audio_std
        self.image_mean, self.image_std = per_channel(self.image_mean), per_channel(self.image_std)
        if not all(math.isfinite(v) and v > 0 for v in (*self.image_std, self.audio_std)):
            raise DataSourceError(f"the training samples under {self.root} have no variation (image std {self.image_std}, audio std {self.audio_std})")
        self.audio_spec = replace(self.audio_spec, mean=float(self.audio_mean), std=float(self.audio_std))

    @property
    def preprocessing(self) -> dict[str, dict]:
        """Each input's preprocessing (after ``setup``), in the zoo manifest's terms."""
        spec = self.audio_spec
        return {
            self.visual_key: {"size": list(self.image_size), "channels": self.channels, "frames": self.frames, "mean": list(self.image_mean), "std": list(self.image_std)},
            "audio": {"sample_rate": spec.sample_rate, "duration": spec.duration, "features": spec.features, "n_mels": spec.n_mels, "n_mfcc": spec.n_mfcc, "n_fft": spec.n_fft,
                      "hop_length": spec.hop_length, "mean": spec.mean, "std": spec.std, "training_noise_snr_db": spec.noise_snr_db},
        }  # fmt: skip

    # the class names and statistics travel in checkpoints, so predictions need no training data
    def state_dict(self) -> dict:
        stats = {"class_names": self.class_names, "image_mean": self.image_mean, "image_std": self.image_std,
                 "audio_mean": self.audio_mean, "audio_std": self.audio_std}  # fmt: skip
        return {**super().state_dict(), "audio_visual": stats}

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        stats = state.get("audio_visual")
        if stats is not None:
            for key, value in stats.items():
                setattr(self, key, value)
            self.audio_spec = replace(self.audio_spec, mean=float(self.audio_mean), std=float(self.audio_std))

    def predict_dataloader(self) -> DataLoader:
        if None in (self.image_mean, self.image_std, self.audio_mean, self.audio_std):
            raise DataSourceError(
                f"{self.root} has no training split to take the normalisation from: predict with --ckpt_path of a run trained "
                "on this data module (its checkpoint holds the statistics), or set image_mean, image_std, audio_mean and audio_std"
            )
        return super().predict_dataloader()

    def on_before_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        return report_bad_files(self, batch, "a sample")
