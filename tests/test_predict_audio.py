"""`mmkd predict` for the zoo's audio student on real recordings (issue 23, item 6): the manifest
publishes the preprocessing the student was trained with, and predict applies it."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
import torchaudio

from mmkd import zoo
from mmkd.cli import main
from mmkd.data import AVMNISTDataModule
from mmkd.predict import AudioFeatures, audio_source

ZOO = "avmnist-audiocnn-mst"


@pytest.fixture(scope="module")
def held_out(tmp_path_factory: pytest.TempPathFactory, data_root: Path) -> dict:
    """The recordings of the seed-0 AV-MNIST test split (none of them heard in training), copied
    to a folder the way a user would have them."""
    dm = AVMNISTDataModule(root=str(data_root), seed=0)
    dm.setup()
    folder = tmp_path_factory.mktemp("recordings")
    names = sorted(set(dm.recording_ids["test"]))
    for name in names:
        (folder / f"{name}.wav").write_bytes((data_root / "fsdd/recordings" / f"{name}.wav").read_bytes())
    assert not set(names) & set(dm.recording_ids["train"])
    return {"folder": folder, "names": names, "datamodule": dm}


def test_manifest_publishes_the_training_preprocessing(held_out: dict) -> None:
    published = zoo.info(ZOO)["preprocessing"]
    dm = held_out["datamodule"]
    computed = dm.preprocessing["audio"]
    # the mean is a float32 sum whose last bits follow the order of summation (1.46505177 vs 1.46505141)
    assert published.keys() == computed.keys()
    for key, value in computed.items():
        assert published[key] == (pytest.approx(value, rel=1e-5) if isinstance(value, float) else value), key
    # the standardisation is the training split's log-mel mean and std, computed here from the definition
    train = dm.splits["train"].inputs["audio"] * published["std"] + published["mean"]
    assert abs(float(train.mean()) - published["mean"]) < 1e-3 and abs(float(train.std()) - published["std"]) < 1e-3
    assert published["training_noise_snr_db"] == 0.0 and published["sample_rate"] == 8000
    assert zoo.info(ZOO)["input_normalization"] == {"mean": published["mean"], "std": published["std"]}
    assert zoo.info("fmnist-det-dfine")["preprocessing"]["mean"] == [0.485, 0.456, 0.406]  # what its data module applies


def test_features_follow_the_published_recipe_at_any_sample_rate(tmp_path: Path, held_out: dict) -> None:
    prep = zoo.info(ZOO)["preprocessing"]
    original = held_out["folder"] / f"{held_out['names'][0]}.wav"
    samples, rate = sf.read(original, dtype="float32")
    assert rate == 8000
    upsampled = torchaudio.functional.resample(torch.from_numpy(samples), 8000, 16000)
    sf.write(tmp_path / "16k.wav", upsampled.numpy(), 16000, subtype="FLOAT")
    features = AudioFeatures(audio_source([str(tmp_path / "16k.wav")]), prep, training_noise=False)[0]["audio"]
    # the recipe, from the manifest, with torchaudio's own transforms
    waveform = torchaudio.functional.resample(upsampled, 16000, 8000)[:8000]
    waveform = torch.nn.functional.pad(waveform, (0, 8000 - len(waveform)))
    mel = torchaudio.transforms.MelSpectrogram(sample_rate=8000, n_fft=prep["n_fft"], hop_length=prep["hop_length"], n_mels=prep["n_mels"])
    expected = (torchaudio.transforms.AmplitudeToDB(stype="power", top_db=prep["top_db"])(mel(waveform[None])) - prep["mean"]) / prep["std"]
    assert features.shape == (1, 32, 32) == tuple(zoo.info(ZOO)["input_shape"])
    torch.testing.assert_close(features, expected, rtol=1e-4, atol=1e-4)


def accuracy(rows: list[dict]) -> float:
    return float(np.mean([row["class_1"] == Path(row["path"]).name[0] for row in rows]))


def test_predict_on_held_out_recordings(held_out: dict, capsys: pytest.CaptureFixture) -> None:
    """On clean recordings the student, trained on speech in 0 dB white noise, is near chance;
    with the training noise mixed in (predict's default, said in its first line) it scores its
    published test accuracy (89.2 % on the noisy test pairs) within a few points."""
    main(["predict", "--zoo", ZOO, str(held_out["folder"]), "--output", "noisy.csv", "--num-workers", "0"])
    assert "white noise at 0 dB SNR as in training" in capsys.readouterr().out
    main(["predict", "--zoo", ZOO, str(held_out["folder"]), "--output", "clean.csv", "--num-workers", "0", "--no-training-noise"])
    noisy, clean = (list(csv.DictReader(open(name))) for name in ("noisy.csv", "clean.csv"))
    assert len(noisy) == len(clean) == len(held_out["names"]) == 600
    assert accuracy(noisy) > 0.85 and accuracy(clean) < 0.4, (accuracy(noisy), accuracy(clean))
    print(f"held-out recordings: {accuracy(noisy):.4f} with the training noise, {accuracy(clean):.4f} clean")
    assert {row["class_1"] for row in noisy} == set("0123456789")  # named classes, not indices of something else


def test_video_files_are_predicted_from_their_sound_track(tmp_path: Path, held_out: dict, data_root: Path) -> None:
    # clips muxed from 20 held-out recordings (lossless FLAC in Matroska, a digit image as the
    # picture): the same rows, class by class and probability by probability, as their WAVs
    from mmkd.data.av_files import write_clip
    from mmkd.data.idx import read_idx

    picture = read_idx(data_root / "mnist-10k" / "images-idx3-ubyte.gz")[0]
    (tmp_path / "wav").mkdir()
    (tmp_path / "clips").mkdir()
    for name in held_out["names"][:20]:
        source = held_out["folder"] / f"{name}.wav"
        (tmp_path / "wav" / source.name).write_bytes(source.read_bytes())
        write_clip(tmp_path / "clips" / f"{name}.mkv", [picture] * 2, 2, sf.read(source, dtype="float32")[0], 8000, "ffv1", "flac")
    for folder in ("wav", "clips"):
        main(["predict", "--zoo", ZOO, str(tmp_path / folder), "--output", f"{folder}.csv", "--num-workers", "0"])
    wav, clips = (list(csv.DictReader(open(f"{folder}.csv"))) for folder in ("wav", "clips"))
    assert [Path(row["path"]).stem for row in clips] == [Path(row["path"]).stem for row in wav] == held_out["names"][:20]
    for a, b in zip(wav, clips):
        assert a["class_1"] == b["class_1"] and float(a["prob_1"]) == pytest.approx(float(b["prob_1"]), abs=1e-5)


def test_audio_errors_end_in_one_line(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    (tmp_path / "bad.wav").write_bytes(b"RIFF not audio")
    (tmp_path / "notes.txt").write_text("no audio")
    for argv, message in (
        ([str(tmp_path / "bad.wav")], "cannot decode audio file"),
        ([str(tmp_path / "notes.txt")], "is not an audio or video file"),
        ([str(tmp_path / "missing.wav")], "missing.wav does not exist"),
    ):
        with pytest.raises(SystemExit):
            main(["predict", "--zoo", ZOO, *argv, "--num-workers", "0"])
        err = capsys.readouterr().err.strip().splitlines()
        assert err[-1].startswith("mmkd: error: ") and message in err[-1], err
