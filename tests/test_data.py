"""Data modules on the real Fashion-MNIST and MNIST digits, and their failure modes."""

from __future__ import annotations

import gzip
import shutil
from pathlib import Path

import pytest
import torch

from mmkd.data import EpochShuffleSampler, FashionMNISTDataModule, MNISTDataModule
from mmkd.data.idx import read_idx


def test_fashion_mnist_splits_are_real_and_seeded(data_root: Path) -> None:
    dm = FashionMNISTDataModule(root=str(data_root), val_size=5000, seed=3)
    dm.prepare_data()
    dm.setup("fit")
    assert [len(dm.splits[s]) for s in ("train", "val", "test")] == [55000, 5000, 10000]
    assert torch.bincount(dm.splits["test"].labels).tolist() == [1000] * 10  # the official test split
    again = FashionMNISTDataModule(root=str(data_root), val_size=5000, seed=3)
    again.setup("fit")
    assert torch.equal(dm.splits["val"].images, again.splits["val"].images)
    other = FashionMNISTDataModule(root=str(data_root), val_size=5000, seed=4)
    other.setup("fit")
    assert not torch.equal(dm.splits["val"].images, other.splits["val"].images)
    batch = next(iter(dm.val_dataloader()))
    assert batch["image"].shape == (256, 1, 28, 28) and batch["label"].dtype == torch.long
    assert abs(float(batch["image"].mean())) < 0.2 and 0.8 < float(batch["image"].std()) < 1.2


def test_augmentation_depends_only_on_seed_epoch_index(data_root: Path) -> None:
    dm = FashionMNISTDataModule(root=str(data_root), seed=0)
    dm.setup("fit")
    train = dm.splits["train"]
    assert torch.equal(train[(7, 2)]["image"], train[(7, 2)]["image"])
    assert any(not torch.equal(train[(i, 0)]["image"], train[(i, 1)]["image"]) for i in range(8))
    assert not torch.equal(dm.splits["val"][7]["image"], dm.splits["val"][7]["image"] * 0)


def test_sampler_order_is_a_function_of_epoch() -> None:
    sampler = EpochShuffleSampler(100, seed=1)
    sampler.set_epoch(3)
    first = list(sampler)
    sampler.set_epoch(4)
    assert list(sampler) != first
    sampler.set_epoch(3)
    assert list(sampler) == first
    assert sorted(i for i, _ in first) == list(range(100)) and {e for _, e in first} == {3}


def test_sampler_splits_the_epoch_across_ranks_and_is_not_wrapped_by_lightning() -> None:
    single = EpochShuffleSampler(101, seed=2)
    single.set_epoch(5)
    ranks = [EpochShuffleSampler(101, seed=2, num_replicas=2, rank=r) for r in (0, 1)]
    for sampler in ranks:
        sampler.set_epoch(5)
    parts = [list(sampler) for sampler in ranks]
    assert [len(p) for p in parts] == [51, 51] == [len(s) for s in ranks]  # padded to a multiple of 2
    interleaved = [key for pair in zip(*parts) for key in pair]
    assert interleaved[:101] == list(single)  # the single-process order, dealt out in turn
    assert isinstance(single, torch.utils.data.DistributedSampler)  # Lightning keeps it as it is


def test_train_loader_resumes_mid_epoch_and_only_in_that_epoch() -> None:
    from mmkd.data.common import ResumableDataLoader

    class SampleIndex(torch.utils.data.Dataset):
        def __getitem__(self, key: tuple[int, int]) -> int:
            return key[0]

    def loader(rank: int = 0, replicas: int = 1) -> ResumableDataLoader:
        sampler = EpochShuffleSampler(20, seed=3, num_replicas=replicas, rank=rank)
        return ResumableDataLoader(SampleIndex(), batch_size=3, sampler=sampler, collate_fn=list)

    straight = loader()
    straight.sampler.set_epoch(4)
    batches = list(straight)
    partial = loader()
    partial.sampler.set_epoch(4)
    iterator = iter(partial)
    seen = [next(iterator), next(iterator)]
    assert partial.state_dict() == {"epoch": 4, "batches_yielded": 2}

    resumed = loader()
    resumed.load_state_dict(partial.state_dict())
    resumed.sampler.set_epoch(4)
    assert seen + list(resumed) == batches and resumed.batches_yielded == len(batches)
    resumed.sampler.set_epoch(5)  # the next epoch is whole
    assert len(list(resumed)) == len(batches)
    closed = loader()
    closed.load_state_dict({"epoch": 4, "batches_yielded": 7})
    closed.sampler.set_epoch(5)  # a checkpoint that closed epoch 4: epoch 5 starts from its beginning
    assert len(list(closed)) == len(batches)
    ranks = [loader(rank, 2) for rank in (0, 1)]
    for rank_loader in ranks:
        rank_loader.load_state_dict({"epoch": 4, "batches_yielded": 1})
        rank_loader.sampler.set_epoch(4)
    whole = [loader(rank, 2) for rank in (0, 1)]
    for rank_loader in whole:
        rank_loader.sampler.set_epoch(4)
    assert [list(r) for r in ranks] == [list(w)[1:] for w in whole]  # each rank skips its own first batch


def test_mnist_10k_digits(data_root: Path) -> None:
    dm = MNISTDataModule(root=str(data_root))
    dm.prepare_data()
    dm.setup("fit")
    assert [len(dm.splits[s]) for s in ("train", "val", "test")] == [7000, 1000, 2000]
    assert set(torch.unique(dm.splits["test"].labels).tolist()) == set(range(10))


def test_missing_data_says_how_to_point_at_a_copy(tmp_path: Path) -> None:
    dm = FashionMNISTDataModule(root=str(tmp_path / "empty"), download=False)
    with pytest.raises(FileNotFoundError, match=r"MMKD_DATA=.*--data.init_args.root"):
        dm.prepare_data()


def test_failed_download_says_how_to_point_at_a_copy(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from torchvision.datasets import FashionMNIST

    # A closed port on loopback: the download fails at once, as it does on an offline machine.
    monkeypatch.setattr(FashionMNIST, "mirrors", ["http://127.0.0.1:9/"])
    dm = FashionMNISTDataModule(root=str(tmp_path / "dl"))
    with pytest.raises(FileNotFoundError, match=r"download failed.*MMKD_DATA"):
        dm.prepare_data()


def test_truncated_idx_file_is_named(tmp_path: Path, data_root: Path) -> None:
    folder = tmp_path / "fashion-mnist"
    folder.mkdir()
    for path in (data_root / "fashion-mnist").glob("*.gz"):
        shutil.copy(path, folder / path.name)
    target = folder / "t10k-labels-idx1-ubyte.gz"
    raw = gzip.decompress(target.read_bytes())
    target.write_bytes(gzip.compress(raw[:-10]))
    dm = FashionMNISTDataModule(root=str(tmp_path))
    with pytest.raises(ValueError, match="t10k-labels-idx1-ubyte.gz.*truncated"):
        dm.setup("fit")
    assert read_idx(folder / "t10k-images-idx3-ubyte.gz").shape == (10000, 28, 28)
