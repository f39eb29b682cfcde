"""Audio-visual data from files (mmkd.data.AudioVisualFilesDataModule): video clips muxed at test
time from the MNIST digits and the spoken-digit recordings of ../shared/data, and PNG + WAV pairs.
Expected tensors are computed here from the source arrays with numpy, soundfile and torchaudio."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
import torchaudio
from PIL import Image

from mmkd.data import AudioVisualFilesDataModule, AVDecodeError
from mmkd.data.av_files import write_clip
from mmkd.data.idx import read_idx
from mmkd.data.sources import DataSourceError

DIGITS = tuple(range(10))
COUNTS = {"train": 3, "val": 1, "test": 1}
FPS, FRAMES_PER_CLIP = 4, 4  # 1-s clips of four different images of the digit
MEL = {"sample_rate": 8000, "n_fft": 512, "hop_length": 256, "n_mels": 32}


def sources(data_root: Path) -> dict[int, list[tuple[np.ndarray, np.ndarray]]]:
    """Per digit, (4 MNIST images [4, 28, 28] uint8, an FSDD recording float32 at 8 kHz) per sample."""
    images = read_idx(data_root / "mnist-10k" / "images-idx3-ubyte.gz")
    labels = read_idx(data_root / "mnist-10k" / "labels-idx1-ubyte.gz")
    recordings = sorted((data_root / "fsdd" / "recordings").glob("*.wav"))
    per_digit = {}
    for digit in DIGITS:
        pictures = images[labels == digit]
        speech = [p for p in recordings if p.name.startswith(f"{digit}_")]
        total = sum(COUNTS.values())
        per_digit[digit] = [(pictures[4 * i : 4 * i + FRAMES_PER_CLIP], sf.read(speech[i], dtype="float32")[0]) for i in range(total)]
    return per_digit


def write_tree(root: Path, data_root: Path, kind: str = "clips") -> dict[str, dict]:
    """``<split>/<digit>/<n>.mkv`` (lossless FFV1 + FLAC clips) or ``<n>.png`` + ``<n>.wav``
    pairs; returns {relative visual path: (frames, samples)}."""
    written = {}
    for digit, samples in sources(data_root).items():
        position = 0
        for split, count in COUNTS.items():
            folder = root / split / str(digit)
            folder.mkdir(parents=True, exist_ok=True)
            for n in range(count):
                frames, recording = samples[position]
                position += 1
                if kind == "clips":
                    write_clip(folder / f"{n}.mkv", list(frames), FPS, recording, 8000, "ffv1", "flac")
                    written[f"{split}/{digit}/{n}.mkv"] = (frames, recording)
                else:
                    Image.fromarray(frames[0]).save(folder / f"{n}.png")
                    sf.write(folder / f"{n}.wav", recording, 8000, subtype="PCM_16")
                    written[f"{split}/{digit}/{n}.png"] = (frames[:1], recording)
    return written


@pytest.fixture(scope="module")
def clips(tmp_path_factory: pytest.TempPathFactory, data_root: Path) -> tuple[Path, dict]:
    root = tmp_path_factory.mktemp("clips")
    return root, write_tree(root, data_root, "clips")


@pytest.fixture(scope="module")
def pairs(tmp_path_factory: pytest.TempPathFactory, data_root: Path) -> tuple[Path, dict]:
    root = tmp_path_factory.mktemp("pairs")
    return root, write_tree(root, data_root, "pairs")


def expected_log_mel(recording: np.ndarray, start: int = 0, length: int = 8000) -> torch.Tensor:
    """The log-mel features as defined: the window cut and zero-padded, torchaudio's mel power
    spectrogram, dB with an 80 dB floor below the clip's peak."""
    window = torch.zeros(length)
    piece = torch.from_numpy(recording[start : start + length])
    window[: len(piece)] = piece
    power = torchaudio.transforms.MelSpectrogram(**MEL)(window)
    return torchaudio.transforms.AmplitudeToDB("power", top_db=80)(power)[None]


def datamodule(root: Path, **kwargs) -> AudioVisualFilesDataModule:
    settings = {"image_mean": 0.5, "image_std": 0.25, "audio_mean": -10.0, "audio_std": 20.0, "batch_size": 8, **kwargs}
    dm = AudioVisualFilesDataModule(root=str(root), **settings)
    dm.setup("fit")
    return dm


def sample_of(dm: AudioVisualFilesDataModule, split: str, name: str) -> dict:
    dataset = dm.splits[split]
    index = next(i for i in range(len(dataset)) if dataset.visual[i] == name)
    return dataset[index]


def test_pairs_are_the_png_pixels_and_the_wav_log_mel(pairs: tuple[Path, dict]) -> None:
    root, written = pairs
    dm = datamodule(root)
    assert dm.class_names == [str(d) for d in DIGITS] and len(dm.splits["train"]) == 30 and dm.input_shape == {"image": (1, 28, 28), "audio": (1, 32, 32)}
    for name in ("train/0/0.png", "test/3/0.png"):
        frames, recording = written[name]
        sample = sample_of(dm, name.split("/")[0], name)
        assert torch.equal(sample["image"], (torch.from_numpy(frames[0]).float()[None] / 255 - 0.5) / 0.25)
        torch.testing.assert_close(sample["audio"], (expected_log_mel(recording) + 10.0) / 20.0, atol=1e-4, rtol=0)
        assert sample["label"] == int(name.split("/")[1])


def test_unset_statistics_are_the_training_pairs(pairs: tuple[Path, dict]) -> None:
    root, written = pairs
    dm = AudioVisualFilesDataModule(root=str(root), stats_samples=1000)
    dm.setup("fit")
    train = [value for name, value in written.items() if name.startswith("train/")]
    pixels = np.stack([frames[0] for frames, _ in train]).astype(np.float64) / 255
    audio = torch.stack([expected_log_mel(recording) for _, recording in train]).double()
    assert dm.image_mean[0] == pytest.approx(pixels.mean(), abs=1e-6) and dm.image_std[0] == pytest.approx(pixels.std(ddof=1), abs=1e-6)
    assert dm.audio_mean == pytest.approx(float(audio.mean()), abs=1e-3) and dm.audio_std == pytest.approx(float(audio.std()), abs=1e-3)


def test_clips_give_their_frames_and_the_same_window_of_their_sound(clips: tuple[Path, dict]) -> None:
    root, written = clips
    frames, recording = written["val/2/0.mkv"]
    # four frames of the whole 1-s clip: the segment centres 0.125, 0.375, ... show frames 0..3
    dm = datamodule(root, frames=4, visual_key="video")
    sample = sample_of(dm, "val", "val/2/0.mkv")
    assert sample["video"].shape == (1, 4, 28, 28) and dm.input_shape["video"] == (1, 4, 28, 28)
    assert torch.equal(sample["video"], (torch.from_numpy(frames).float()[None] / 255 - 0.5) / 0.25)
    torch.testing.assert_close(sample["audio"], (expected_log_mel(recording) + 10.0) / 20.0, atol=1e-4, rtol=0)
    # a centred half-second window, [0.25 s, 0.75 s): frames at 0.375 and 0.625 (frames 1, 2), samples 2000..6000
    dm = datamodule(root, frames=2, duration=0.5, clip_start="centre")
    sample = sample_of(dm, "val", "val/2/0.mkv")
    assert torch.equal(sample["image"], (torch.from_numpy(frames[1:3]).float()[None] / 255 - 0.5) / 0.25)
    torch.testing.assert_close(sample["audio"], (expected_log_mel(recording, 2000, 4000) + 10.0) / 20.0, atol=1e-4, rtol=0)


def test_h264_aac_clips_decode_close_to_their_sources(tmp_path: Path, data_root: Path) -> None:
    frames, recording = sources(data_root)[1][0]
    folder = tmp_path / "train" / "1"
    folder.mkdir(parents=True)
    rgb = [np.repeat(f[..., None], 3, axis=2) for f in frames]
    write_clip(folder / "a.mp4", rgb, FPS, recording, 8000)  # libx264 yuv420p + AAC
    dm = datamodule(tmp_path, frames=4, channels=3, image_mean=0.0, image_std=1.0, audio_mean=0.0, audio_std=1.0)
    sample = dm.splits["train"][0]
    assert sample["image"].shape == (3, 4, 28, 28) and sample["audio"].shape == (1, 32, 32)
    expected = torch.from_numpy(frames).float()[None].expand(3, -1, -1, -1) / 255
    assert (sample["image"] - expected).abs().mean() < 0.03  # lossy, yuv420p chroma subsampling
    assert (sample["audio"] - expected_log_mel(recording)).abs().mean() < 3.0  # dB, lossy AAC at 8 kHz


def test_random_windows_and_noise_repeat_across_worker_counts_and_differ_across_epochs(clips: tuple[Path, dict]) -> None:
    root, _ = clips
    options = {"frames": 2, "duration": 0.5, "clip_start": "random", "frame_sampling": "random", "noise_snr_db": 0.0}
    batches = {}
    for workers in (0, 2):
        dm = datamodule(root, num_workers=workers, **options)
        loader = dm.train_dataloader()
        batches[workers] = [next(iter(loader))]
        loader.sampler.set_epoch(1)
        batches[workers].append(next(iter(loader)))
    for first, second in zip(batches[0], batches[2]):
        assert torch.equal(first["index"], second["index"]) and torch.equal(first["image"], second["image"]) and torch.equal(first["audio"], second["audio"])
    dataset = dm.splits["train"]
    assert not torch.equal(dataset[(3, 0)]["audio"], dataset[(3, 1)]["audio"])
    evaluation = dm.splits["val"]
    assert torch.equal(evaluation[1]["audio"], evaluation[1]["audio"])  # evaluation: one fixed draw per sample
    fixed = datamodule(root, noise_snr_db=0.0, noise_per_epoch=False).splits["train"]  # AV-MNIST's noise: one draw per sample
    assert torch.equal(fixed[(3, 0)]["audio"], fixed[(3, 1)]["audio"]) and not torch.equal(fixed[(3, 0)]["audio"], fixed[(4, 0)]["audio"])


def test_lists_and_file_name_patterns(clips: tuple[Path, dict], tmp_path: Path) -> None:
    root, written = clips
    # train.csv (a clip per row) and val.jsonl (a video with a separate recording)
    names = sorted(written)
    (root / "train.csv").write_text("video,label\n" + "".join(f"{n},{n.split('/')[1]}\n" for n in names if n.startswith("train/")))
    sf.write(root / "val_0.wav", written["val/0/0.mkv"][1], 8000)
    (root / "val.jsonl").write_text(json.dumps({"video": "val/0/0.mkv", "audio": "val_0.wav", "label": "0"}) + "\n")
    try:
        dm = datamodule(root)
        assert len(dm.splits["train"]) == 30 and len(dm.splits["val"]) == 1 and dm.splits["val"].audio[0] == "val_0.wav"
    finally:
        (root / "train.csv").unlink()
        (root / "val.jsonl").unlink()
    # RAVDESS names: Actor_AA/01-01-EE-II-SS-RR-AA.mp4, the emotion EE and the actor AA in the name
    for actor in (1, 2, 3):
        folder = tmp_path / f"Actor_{actor:02d}"
        folder.mkdir()
        for emotion in (1, 5):
            frames, recording = written[f"train/{emotion % 4}/0.mkv"]
            write_clip(folder / f"01-01-{emotion:02d}-01-01-01-{actor:02d}.mkv", list(frames), FPS, recording, 8000, "ffv1", "flac")
        (folder / f"02-01-01-01-01-01-{actor:02d}.mkv").write_bytes(b"a video-only file the pattern leaves out")
    dm = datamodule(tmp_path, files="Actor_*/01-*.mkv", label_pattern=r"/01-01-(\d\d)-", class_map={"01": "neutral", "05": "angry", "08": "surprised"},
                    split_patterns={"train": "Actor_0[12]/", "test": "Actor_03/"})  # fmt: skip
    assert dm.class_names == ["neutral", "angry"] and sorted(dm.splits) == ["test", "train"]
    assert len(dm.splits["train"]) == 4 and dm.splits["test"].labels.tolist() == [0, 1]
    with pytest.raises(DataSourceError, match="class '05' is not in class_map"):
        datamodule(tmp_path, files="Actor_*/01-*.mkv", label_pattern=r"/01-01-(\d\d)-", class_map={"01": "neutral"}, split_patterns={"train": "Actor_0[12]/"})


def bad_clip(path: Path, kind: str, data_root: Path) -> None:
    frames, recording = sources(data_root)[0][0]
    if kind == "corrupt":
        path.write_bytes(b"\x1aE\xdf\xa3 these bytes are no Matroska file" * 10)
    elif kind == "no_audio":
        write_clip(path, list(frames), FPS, None, 8000, "ffv1")
    elif kind == "no_video":
        write_clip(path, [], FPS, recording, 8000, audio_codec="flac")
    elif kind == "no_frames":  # a video stream, but no frame in it
        from fractions import Fraction

        import av

        with av.open(str(path), "w") as container:
            stream = container.add_stream("ffv1", rate=FPS)
            stream.width = stream.height = 28
            stream.pix_fmt = "gray"
            audio = container.add_stream("flac", rate=8000)
            audio.layout = "mono"
            frame = av.AudioFrame.from_ndarray((recording[None, :4096] * 32767).astype(np.int16), format="s16", layout="mono")
            frame.sample_rate, frame.pts, frame.time_base = 8000, 0, Fraction(1, 8000)
            for packet in audio.encode(frame):
                container.mux(packet)
            container.mux(audio.encode(None))


@pytest.mark.parametrize(("kind", "message"), [
    ("corrupt", "cannot decode the sound track of .*bad.mkv"),
    ("no_audio", "bad.mkv has no audio stream"),
    ("no_video", "bad.mkv has no video stream"),
    ("no_frames", "bad.mkv holds no video frames"),
])  # fmt: skip
def test_bad_clips_are_named_errors_or_skipped_and_counted(tmp_path: Path, data_root: Path, kind: str, message: str) -> None:
    good = write_tree(tmp_path / "d", data_root, "clips")
    assert good
    bad_clip(tmp_path / "d" / "train" / "0" / "bad.mkv", kind, data_root)
    dm = datamodule(tmp_path / "d", frames=2)
    dataset = dm.splits["train"]
    bad = next(i for i in range(len(dataset)) if dataset.visual[i].endswith("bad.mkv"))
    with pytest.raises(AVDecodeError, match=message + r".*\(sample \d+\).*on_bad_file=skip"):
        dataset[bad]
    dm = datamodule(tmp_path / "d", frames=2, on_bad_file="skip", batch_size=32)
    batch = dm.on_before_batch_transfer(next(iter(dm.train_dataloader())), 0)
    assert len(batch["label"]) == 30 and len(dm.bad_files) == 1 and "bad.mkv" in dm.bad_files[0]


def test_a_sample_rate_other_than_the_configured_one_is_an_error_without_resampling(pairs: tuple[Path, dict]) -> None:
    root, _ = pairs
    dm = datamodule(root, sample_rate=16000, resample=False)
    with pytest.raises(AVDecodeError, match="is sampled at 8000 Hz, the data expects 16000 Hz.*resample=true"):
        dm.splits["train"][0]
    resampled = datamodule(root, sample_rate=16000).splits["train"][0]["audio"]
    assert resampled.shape == (1, 32, 16000 // 256 + 1)


def test_layout_errors_name_the_file_and_the_fix(tmp_path: Path, pairs: tuple[Path, dict]) -> None:
    root, _ = pairs
    with pytest.raises(DataSourceError, match="has no train/ folder, train.csv or train.jsonl"):
        datamodule(tmp_path)
    lone = tmp_path / "train" / "0"
    lone.mkdir(parents=True)
    Image.new("L", (28, 28)).save(lone / "x.png")
    with pytest.raises(DataSourceError, match=r"x.png has no audio file \(.wav, .flac, .ogg\) of the same name"):
        datamodule(tmp_path)
    with pytest.raises(DataSourceError, match="frames=4 needs video files, but train has pictures"):
        datamodule(root, frames=4)


def test_mst_distill_trains_on_pairs_and_its_checkpoint_predicts_files(pairs: tuple[Path, dict], clips: tuple[Path, dict], tmp_path: Path) -> None:
    # the shipped file-based MST config with only the data path given, as a user runs it
    from mmkd.cli import lightning_cli, main

    from conftest import CONFIGS

    root, written = pairs
    cli = lightning_cli(["-c", str(CONFIGS / "mst/av_pairs.yaml"), f"--data.init_args.root={root}", "--data.init_args.num_workers=1",
                         "--data.init_args.batch_size=8", "--model.init_args.stage_epochs=[1,1,1]", "--trainer.limit_train_batches=2",
                         "--trainer.limit_val_batches=1", "--trainer.enable_progress_bar=false"], run=False)  # fmt: skip
    cli.trainer.fit(cli.model, cli.datamodule)
    assert cli.model.completed_stage == 3 and cli.trainer.global_step == 6
    trained = cli.datamodule
    assert trained.audio_std > 0 and trained.image_mean[0] > 0  # the pairs' own statistics
    assert 0.0 <= cli.trainer.test(cli.model, trained, verbose=False)[0]["test/acc"] <= 1.0
    # predictions on a folder of clips elsewhere (no training data there): the class names and the
    # statistics come from the checkpoint; the audio student hears each clip's sound track
    predict = tmp_path / "new"
    predict.mkdir()
    for name in ("test/1/0.mkv", "test/3/0.mkv"):
        (predict / name.replace("/", "_")).write_bytes((clips[0] / name).read_bytes())
    main(["predict", "-c", str(CONFIGS / "mst/av_pairs.yaml"), f"--data.init_args.root={tmp_path / 'none'}", f"--data.init_args.predict={predict}",
          "--ckpt_path=runs/mst/av_pairs/last.ckpt", "--output=rows.csv", "--topk=2", "--trainer.enable_progress_bar=false"])  # fmt: skip
    rows = list(csv.DictReader(open("rows.csv")))
    assert [Path(row["path"]).name for row in rows] == ["test_1_0.mkv", "test_3_0.mkv"]
    student = cli.model.model.eval()
    for row, name in zip(rows, ("test/1/0.mkv", "test/3/0.mkv")):
        audio = (expected_log_mel(clips[1][name][1]) - trained.audio_mean) / trained.audio_std
        with torch.no_grad():
            probs = student(audio[None]).softmax(-1)[0]
        top = probs.topk(2)
        assert [row["class_1"], row["class_2"]] == [trained.class_names[i] for i in top.indices.tolist()]
        assert float(row["prob_1"]) == pytest.approx(float(top.values[0]), abs=1e-4)


@pytest.mark.slow
def test_a_run_on_clips_killed_mid_epoch_resumes_to_the_same_weights(clips: tuple[Path, dict], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # 2 worker processes, random windows, frames and noise: killed after step 5, resumed from step 4
    from test_distributed import killed_and_resumed_equals_straight

    root, _ = clips
    monkeypatch.chdir(tmp_path)
    data = ["--data=mmkd.data.AudioVisualFilesDataModule", f"--data.init_args.root={root}", "--data.init_args.num_workers=2",
            "--data.init_args.batch_size=4", "--data.init_args.duration=0.5", "--data.init_args.clip_start=random",
            "--data.init_args.noise_snr_db=0.0"]  # fmt: skip
    killed_and_resumed_equals_straight("mst/audio_alone.yaml", *data)


@pytest.mark.slow
def test_the_ravdess_recipe_runs_on_a_tree_of_its_layout(tmp_path: Path, data_root: Path) -> None:
    # RAVDESS as unzipped: Actor_AA/MM-VV-EE-II-SS-RR-AA.mp4 (H.264 + AAC); actors 01, 17 and 21 (one
    # per split of the recipe) with the 8 emotions each, plus a video-only file and a song it leaves out
    from mmkd.cli import lightning_cli

    from conftest import CONFIGS

    per_digit = sources(data_root)
    for actor in (1, 17, 21):
        folder = tmp_path / "RAVDESS" / f"Actor_{actor:02d}"
        folder.mkdir(parents=True)
        for emotion in range(1, 9):
            frames, recording = per_digit[emotion][0]
            canvas = [np.pad(np.asarray(Image.fromarray(f).resize((90, 90))), ((0, 0), (35, 35))) for f in frames]
            video = [np.repeat(canvas[i * len(canvas) // 40][..., None], 3, axis=2) for i in range(40)]  # 4 s at 10 fps, 160x90
            sound = np.resize(recording, 32000)  # 4 s at 8 kHz
            for name in (f"01-01-{emotion:02d}-01-01-01-{actor:02d}", f"02-01-{emotion:02d}-01-01-01-{actor:02d}", f"01-02-{emotion:02d}-01-01-01-{actor:02d}"):
                write_clip(folder / f"{name}.mp4", video, 10, None if name.startswith("02") else sound, 8000)
    cli = lightning_cli(["-c", str(CONFIGS / "mst/ravdess.yaml"), f"--data.init_args.root={tmp_path / 'RAVDESS'}", "--data.init_args.num_workers=0",
                         "--data.init_args.batch_size=4", "--data.init_args.stats_samples=8", "--model.init_args.stage_epochs=[1,1,1]",
                         "--trainer.limit_train_batches=1", "--trainer.limit_val_batches=1", "--trainer.enable_progress_bar=false"], run=False)  # fmt: skip
    dm = cli.datamodule
    dm.setup("fit")
    assert dm.class_names == ["neutral", "calm", "happy", "sad", "angry", "fearful", "disgust", "surprised"]
    assert {split: len(dataset) for split, dataset in dm.splits.items()} == {"train": 8, "val": 8, "test": 8}
    assert all(name.split("/")[1].startswith("01-01-") for name in dm.splits["train"].visual)
    sample = dm.splits["val"][0]
    assert sample["video"].shape == (3, 15, 224, 224) and sample["audio"].shape == (1, 15, 156) and sample["label"] == 0
    cli.trainer.fit(cli.model, dm)
    assert cli.model.completed_stage == 3 and cli.trainer.global_step == 3


def test_crema_d_layout_pairs_each_flash_video_with_its_wav(tmp_path: Path, data_root: Path) -> None:
    # CREMA-D as distributed: VideoFlash/AAAA_SSS_EEE_LL.flv (no usable sound) and AudioWAV/AAAA_SSS_EEE_LL.wav
    per_digit = sources(data_root)
    (tmp_path / "VideoFlash").mkdir()
    (tmp_path / "AudioWAV").mkdir()
    for actor in (1001, 1002, 1091):
        for number, emotion in enumerate(("ANG", "HAP")):
            frames, recording = per_digit[number][0]
            stem = f"{actor}_DFA_{emotion}_XX"
            write_clip(tmp_path / "VideoFlash" / f"{stem}.flv", [np.repeat(f[..., None], 3, axis=2) for f in frames], FPS, None, 8000)
            sf.write(tmp_path / "AudioWAV" / f"{stem}.wav", recording, 8000)
    dm = datamodule(tmp_path, files="VideoFlash/*.flv", audio_files="AudioWAV/{stem}.wav", label_pattern=r"/\d{4}_[A-Z]{3}_([A-Z]{3})_",
                    class_map={"ANG": "anger", "HAP": "happy"}, split_patterns={"train": r"/100\d_", "test": r"/109\d_"}, frames=2, channels=3)  # fmt: skip
    assert dm.class_names == ["anger", "happy"] and len(dm.splits["train"]) == 4 and len(dm.splits["test"]) == 2
    sample = sample_of(dm, "test", "VideoFlash/1091_DFA_HAP_XX.flv")
    assert sample["image"].shape == (3, 2, 28, 28) and sample["label"] == 1
    torch.testing.assert_close(sample["audio"], (expected_log_mel(per_digit[1][0][1]) + 10.0) / 20.0, atol=1e-4, rtol=0)
    (tmp_path / "AudioWAV" / "1002_DFA_ANG_XX.wav").unlink()
    with pytest.raises(DataSourceError, match=r"1002_DFA_ANG_XX.flv: its audio file .*1002_DFA_ANG_XX.wav \(audio_files='AudioWAV/\{stem\}.wav'\) does not exist"):
        datamodule(tmp_path, files="VideoFlash/*.flv", audio_files="AudioWAV/{stem}.wav", label_pattern=r"_([A-Z]{3})_", split_patterns={"train": "."})
