"""AV-MNIST from the real MNIST digits and FSDD recordings: pairing, splits, seeding, failure modes."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

from mmkd.data import AudioDecodeError, AVMNISTDataModule, log_mel, pca_degrade, read_wav


def _digit(recording: str) -> int:
    return int(recording.split("_")[0])


def _speaker(recording: str) -> str:
    return recording.split("_")[1]


@pytest.fixture(scope="module")
def dm(data_root: Path) -> AVMNISTDataModule:
    """The default configuration, built once for the module (its setup takes seconds)."""
    module = AVMNISTDataModule(root=str(data_root))
    module.prepare_data()
    module.setup("fit")
    return module


def _short(data_root: Path, **kwargs) -> AVMNISTDataModule:
    """A cheaper variant (an eighth of a second of audio) for the tests that build several."""
    module = AVMNISTDataModule(root=str(data_root), duration=0.125, **kwargs)
    module.setup("fit")
    return module


def test_every_image_is_paired_with_a_recording_of_its_digit(dm: AVMNISTDataModule) -> None:
    for split, dataset in dm.splits.items():
        assert [_digit(r) for r in dm.recording_ids[split]] == dataset.labels.tolist()
    batch = next(iter(dm.train_dataloader()))
    recordings = dm.recording_ids["train"][batch["index"].numpy()]
    assert [_digit(r) for r in recordings] == batch["label"].tolist()


def test_splits_share_no_image_and_no_recording(dm: AVMNISTDataModule) -> None:
    images = [set(dm.image_ids[s].tolist()) for s in ("train", "val", "test")]
    assert [len(s) for s in images] == [6000, 2000, 2000] and len(set.union(*images)) == 10000
    pools = [set(dm.recording_ids[s]) for s in ("train", "val", "test")]
    assert [len(p) for p in pools] == [1800, 600, 600] and len(set.union(*pools)) == 3000  # 60/20/20 of each digit
    for split in ("train", "val", "test"):
        names, counts = np.unique(dm.recording_ids[split], return_counts=True)
        for digit in range(10):
            of_digit = counts[[_digit(n) == digit for n in names]]
            assert of_digit.max() - of_digit.min() <= 1  # each recording used equally often


def test_train_batch_shapes_and_standardisation(dm: AVMNISTDataModule) -> None:
    assert dm.input_shape == {"image": (1, 28, 28), "audio": (1, 32, 32)}  # 1 s at 8 kHz, hop 256
    batch = next(iter(dm.train_dataloader()))
    assert set(batch) == {"image", "audio", "label", "index"}
    assert batch["image"].shape == (128, 1, 28, 28) and batch["audio"].shape == (128, 1, 32, 32)
    assert batch["image"].dtype == batch["audio"].dtype == torch.float32 and batch["label"].dtype == torch.long
    for modality in dm.modalities:
        train = dm.splits["train"].inputs[modality]
        assert abs(float(train.mean())) < 1e-4 and abs(float(train.std()) - 1) < 1e-4
    assert next(iter(dm.val_dataloader()))["audio"].shape == (256, 1, 32, 32)


def test_train_loader_resumes_mid_epoch(dm: AVMNISTDataModule) -> None:
    loader = dm.train_dataloader()
    loader.sampler.set_epoch(2)
    straight = [batch["index"] for batch in loader]
    iterator = iter(loader)
    next(iterator), next(iterator)
    state = dm.state_dict()
    assert state == {"train_position": {"epoch": 2, "batches_yielded": 2}}
    dm.load_state_dict(state)
    resumed = dm.train_dataloader()
    resumed.sampler.set_epoch(2)
    assert all(torch.equal(a, b["index"]) for a, b in zip(straight[2:], resumed, strict=True))


def test_same_seed_same_data_other_seed_other_split(data_root: Path, dm: AVMNISTDataModule) -> None:
    first, again = _short(data_root, seed=1), _short(data_root, seed=1)
    for split in ("train", "val", "test"):
        for modality in ("image", "audio"):
            assert torch.equal(first.splits[split].inputs[modality], again.splits[split].inputs[modality])
        assert (first.recording_ids[split] == again.recording_ids[split]).all()
    assert set(first.image_ids["test"].tolist()) != set(dm.image_ids["test"].tolist())
    assert set(first.recording_ids["test"]) != set(dm.recording_ids["test"])


def test_held_out_speaker_forms_the_test_pool(data_root: Path) -> None:
    module = _short(data_root, held_out_speakers=["george"])
    assert {_speaker(r) for r in module.recording_ids["test"]} == {"george"}
    assert all(_speaker(r) != "george" for s in ("train", "val") for r in module.recording_ids[s])
    assert len(set(module.recording_ids["test"])) == 500
    assert [len(set(module.recording_ids[s])) for s in ("train", "val")] == [1880, 620]  # 250 per digit at 3:1
    with pytest.raises(ValueError, match=r"\['nobody'\].*'george'.*'jackson'"):
        _short(data_root, held_out_speakers=["nobody"])


def test_pca_degrade_on_hand_cases() -> None:
    generator = torch.Generator().manual_seed(0)
    # variances 100, 9, 1, 0.09 along the axes: 90.8 %, 99.0 %, 99.9 %, 100 % cumulated
    train = torch.randn(4000, 4, generator=generator) * torch.tensor([10.0, 3.0, 1.0, 0.3])
    images = torch.randn(20, 4, generator=generator) * 5
    assert torch.allclose(pca_degrade(train, images, 1.0), images, atol=1e-5)
    mean = train.mean(0)
    for energy, kept in ((0.5, 1), (0.95, 2), (0.995, 3), (1.0, 4)):
        degraded = pca_degrade(train, images, energy)
        assert torch.linalg.matrix_rank(degraded - mean) == kept
    assert torch.allclose(pca_degrade(train, images, 0.5)[:, 1:], mean[1:].expand(20, 3), atol=0.2)  # only axis 0 kept


def test_log_mel_clamps_each_spectrogram_on_its_own() -> None:
    # amplitudes from 1e-5 to 1: with a clamp shared by the batch (or chunk) the quiet ones would
    # lie more than 80 dB below its peak and be cut
    scale = torch.logspace(-5, 0, 300)[:, None]
    waveforms = torch.randn(300, 800, generator=torch.Generator().manual_seed(0)) * scale
    whole = log_mel(waveforms, 8000)
    assert whole.shape == (300, 1, 32, 4)  # 800 samples, hop 256
    assert torch.allclose(whole[:10], log_mel(waveforms[:10], 8000), atol=1e-3)


def test_unreadable_and_empty_audio_files_are_named(tmp_path: Path, data_root: Path) -> None:
    noise = tmp_path / "noise.wav"
    noise.write_bytes(np.random.default_rng(0).bytes(4000))
    truncated = tmp_path / "truncated.wav"
    truncated.write_bytes((data_root / "fsdd/recordings/0_george_0.wav").read_bytes()[:30])
    empty = tmp_path / "empty.wav"
    sf.write(empty, np.zeros(0, dtype=np.int16), 8000, subtype="PCM_16")
    for path in (noise, truncated, empty):
        with pytest.raises(AudioDecodeError, match=rf"{path.name}.*Delete or replace"):
            read_wav(path)
    samples, rate = read_wav(data_root / "fsdd/recordings/0_george_0.wav")
    assert rate == 8000 and samples.dtype == np.float32 and 0 < np.abs(samples).max() <= 1


def test_one_corrupt_recording_stops_setup(tmp_path: Path, data_root: Path) -> None:
    (tmp_path / "fsdd/recordings").mkdir(parents=True)
    (tmp_path / "mnist-10k").symlink_to(data_root / "mnist-10k")
    for path in (data_root / "fsdd/recordings").glob("*.wav"):
        (tmp_path / "fsdd/recordings" / path.name).symlink_to(path)
    corrupt = tmp_path / "fsdd/recordings/3_theo_7.wav"
    corrupt.unlink()
    corrupt.write_bytes(b"RIFF not really a wave file")
    with pytest.raises(AudioDecodeError, match="3_theo_7.wav"):
        AVMNISTDataModule(root=str(tmp_path)).setup("fit")


def test_missing_folders_say_what_is_missing_and_how_to_point_at_a_copy(tmp_path: Path, data_root: Path) -> None:
    (tmp_path / "mnist-10k").symlink_to(data_root / "mnist-10k")
    with pytest.raises(FileNotFoundError, match=r"fsdd/recordings/\*\.wav not found.*free-spoken-digit.*MMKD_DATA"):
        AVMNISTDataModule(root=str(tmp_path)).prepare_data()
