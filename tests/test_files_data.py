"""Image data on disk, as a user has it: the four layouts written at test time from real
Fashion-MNIST images (tools/image_files.py), read lazily by DataLoader workers."""

from __future__ import annotations

import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from mmkd.data.files import ImageDecodeError, ImageFilesDataModule
from mmkd.data.sources import DataSourceError
from mmkd.data.views import ViewSpec, random_resized_crop_box

from conftest import REPO

sys.path.insert(0, str(REPO / "tools"))
import image_files  # noqa: E402

EXACT = {"image": {"size": 28, "mean": 0.0, "std": 1.0, "crop_pct": 1.0, "channels": 1}}  # pixels / 255, as stored


@pytest.fixture(scope="module")
def fmnist(data_root: Path) -> tuple[np.ndarray, np.ndarray]:
    return image_files.fashion_mnist(data_root / "fashion-mnist", 90)


def module(root: Path, **kwargs) -> ImageFilesDataModule:
    dm = ImageFilesDataModule(root=str(root), **{"batch_size": 8, "num_workers": 0, "views": EXACT, **kwargs})
    dm.setup("fit")
    return dm


def all_samples(dm: ImageFilesDataModule, split: str) -> tuple[torch.Tensor, torch.Tensor]:
    dataset = dm.splits[split]
    samples = [dataset[i] for i in range(len(dataset))]
    return torch.stack([s["image"] for s in samples]), torch.tensor([s["label"] for s in samples])


@pytest.mark.parametrize("layout", ["folder", "csv", "jsonl", "shards", "hf", "parquet"])
def test_every_layout_reads_the_stored_pixels_and_labels(tmp_path: Path, data_root: Path, fmnist, layout: str) -> None:
    # PNG is lossless: an evaluation view of the stored size gives back the stored pixels
    root = image_files.write_layout(tmp_path / layout, data_root / "fashion-mnist", layout, [50, 20, 20], fmt="png")
    dm = module(root, augment=False)
    assert dm.num_classes == 10 and {split: len(ds) for split, ds in dm.splits.items()} == {"train": 50, "val": 20, "test": 20}
    images, labels = fmnist
    names = list(image_files.CLASS_FOLDERS)
    for split, offset in (("train", 0), ("test", 70)):
        pixels, got = all_samples(dm, split)
        stored = torch.from_numpy(images[offset : offset + len(got)]).float() / 255
        # shards store label indices (.cls) and name no classes; the other layouts name them
        named = dm.class_names != tuple(str(i) for i in range(10))
        expected = torch.tensor([dm.class_names.index(names[label]) if named else label for label in labels[offset : offset + len(got)]])
        order = [int(dm.splits[split].sample_key(i).split("_")[-1].split(".")[0]) if layout != "hf" and layout != "parquet" else i for i in range(len(got))]
        assert torch.equal(got, expected[order])
        assert torch.allclose(pixels[:, 0], stored[order], atol=1e-6)


def test_workers_and_resume_see_the_same_views(tmp_path: Path, data_root: Path) -> None:
    root = image_files.write_layout(tmp_path / "d", data_root / "fashion-mnist", "folder", [48, 8, 8], size=(60, 44))
    views = {"image": {"size": 24}}

    def epoch_batches(workers: int, epoch: int) -> list[torch.Tensor]:
        dm = module(root, num_workers=workers, views=views)
        loader = dm.train_dataloader()
        loader.sampler.set_epoch(epoch)
        return [batch["image"] for batch in loader]

    zero, two = epoch_batches(0, 1), epoch_batches(2, 1)
    assert all(torch.equal(a, b) for a, b in zip(zero, two)) and len(zero) == 6
    assert not torch.equal(epoch_batches(0, 2)[0], zero[0])  # another epoch, other crops
    # a loader resumed after 2 batches continues with the uninterrupted run's third batch
    dm = module(root, views=views)
    loader = dm.train_dataloader()
    loader.load_state_dict({"epoch": 1, "batches_yielded": 2})
    loader.sampler.set_epoch(1)
    assert torch.equal(next(iter(loader))["image"], zero[2])


def test_one_crop_gives_each_model_its_own_view(tmp_path: Path, data_root: Path) -> None:
    root = image_files.write_layout(tmp_path / "d", data_root / "fashion-mnist", "folder", [40, 10, 10], size=(120, 90))
    student = {"size": 32, "interpolation": "bilinear"}
    teacher = {"size": 64, "interpolation": "bicubic", "mean": 0.5, "std": 0.5}
    dm = module(root, views={"image": student, "teacher_image": teacher})
    assert dm.input_shape == {"image": (3, 32, 32), "teacher_image": (3, 64, 64)}
    sample = dm.splits["train"][(3, 0)]
    mean, std = torch.tensor(ViewSpec().mean).view(3, 1, 1), torch.tensor(ViewSpec().std).view(3, 1, 1)
    student_pixels = sample["image"] * std + mean
    teacher_pixels = sample["teacher_image"] * 0.5 + 0.5
    shrunk = torch.nn.functional.interpolate(teacher_pixels[None], size=32, mode="bilinear", antialias=True)[0]
    assert (shrunk - student_pixels).abs().mean() < 0.03  # the same crop, resampled
    other = dm.splits["train"][(3, 1)]["image"] * std + mean  # another epoch: another crop
    assert (other - student_pixels).abs().mean() > 3 * (shrunk - student_pixels).abs().mean()


def test_random_resized_crop_box_follows_torchvision() -> None:
    # torchvision's get_params: area in scale * W * H, log-uniform ratio, top/left uniform
    draws = [0.5, 0.5, 0.25, 0.75] * 10
    left, top, right, bottom = random_resized_crop_box(500, 375, draws)
    area = 500 * 375 * (0.08 + 0.92 * 0.5)
    assert (right - left, bottom - top) == (round(area**0.5), round(area**0.5))  # ratio exp(0) = 1
    assert top == int(0.25 * (375 - (bottom - top) + 1)) and left == int(0.75 * (500 - (right - left) + 1))
    # no try fits (every area draw 1.0 with an extreme ratio): the centre crop clamped to the ratio
    assert random_resized_crop_box(100, 10, [1.0, 1.0, 0.0, 0.0] * 10) == (43, 0, 56, 10)  # w = round(10 * 4/3), left (100 - 13) // 2


def test_jpeg_draft_decoding_changes_little(tmp_path: Path, data_root: Path) -> None:
    root = image_files.write_layout(tmp_path / "d", data_root / "fashion-mnist", "folder", [40, 10, 10], size=(500, 375))
    fast, full = module(root, views={"image": {"size": 64}}), module(root, views={"image": {"size": 64}}, draft=False)
    a, b = all_samples(fast, "val")[0], all_samples(full, "val")[0]
    assert (a - b).abs().mean() < 0.05 and not torch.equal(a, b)


def test_bad_files_are_named_or_skipped_and_counted(tmp_path: Path, data_root: Path) -> None:
    root = image_files.write_layout(tmp_path / "d", data_root / "fashion-mnist", "folder", [40, 10, 10])
    victim = sorted((root / "train").rglob("*.jpg"))[3]
    victim.write_bytes(victim.read_bytes()[:100])  # cut short
    dm = module(root)
    index = next(i for i in range(40) if dm.splits["train"].source.path(i) == victim)
    with pytest.raises(ImageDecodeError, match=str(victim)):
        dm.splits["train"][index]
    dm = module(root, on_bad_file="skip", batch_size=40)
    loader = dm.train_dataloader()
    batch = dm.on_before_batch_transfer(next(iter(loader)), 0)
    assert len(batch["label"]) == 39 and "bad_files" not in batch
    assert len(dm.bad_files) == 1 and str(victim) in dm.bad_files[0]


def test_setup_errors_name_the_path_and_line(tmp_path: Path, data_root: Path) -> None:
    root = image_files.write_layout(tmp_path / "d", data_root / "fashion-mnist", "csv", [40, 10, 10])
    (root / "val.csv").write_text("path,label\nimages/val/val_0000000.jpg,coat\nimages/val/nope.jpg,coat\n")
    with pytest.raises(DataSourceError, match=r"val.csv:3: .*nope.jpg does not exist"):
        module(root)
    (root / "val.csv").write_text("path,label\nimages/val/val_0000000.jpg,zebra\n")
    with pytest.raises(DataSourceError, match=r"val.csv:2: label 'zebra' is not one of the classes"):
        module(root)
    (root / "val.csv").write_text("path,label\nimages/val/val_0000000.jpg,12\n")
    with pytest.raises(DataSourceError, match=r"val.csv:2: label 12 is outside the \d+ classes"):
        module(root)
    folder = image_files.write_layout(tmp_path / "f", data_root / "fashion-mnist", "folder", [30, 4, 4])
    for image in (folder / "val" / image_files.CLASS_FOLDERS[0]).glob("*"):
        image.unlink()
    (folder / "val" / image_files.CLASS_FOLDERS[0]).mkdir(exist_ok=True)
    with pytest.raises(DataSourceError, match=f"class folder .*{image_files.CLASS_FOLDERS[0]} holds no image files"):
        module(folder)
    shards = image_files.write_layout(tmp_path / "s", data_root / "fashion-mnist", "shards", [40, 10, 10])
    shard = next((shards / "val").glob("*.tar"))
    shard.write_bytes(b"not a tar" * 100)
    with pytest.raises(DataSourceError, match=f"cannot read shard {shard}"):
        module(shards)


def test_predict_reads_a_folder_without_classes_and_one_image(tmp_path: Path, data_root: Path, fmnist) -> None:
    root = image_files.write_layout(tmp_path / "d", data_root / "fashion-mnist", "folder", [40, 10, 10])
    loose = tmp_path / "mine"
    (loose / "sub").mkdir(parents=True)
    for i in range(3):
        Image.fromarray(fmnist[0][i]).save(loose / ("sub" if i else ".") / f"{i}.png")
    dm = module(root, predict=str(loose))
    names = [dm.splits["predict"].source.name(i) for i in range(3)]
    assert names == [str(loose / "0.png"), str(loose / "sub/1.png"), str(loose / "sub/2.png")]
    batch = next(iter(dm.predict_dataloader()))
    assert batch["image"].shape == (3, 1, 28, 28) and batch["label"].tolist() == [-1, -1, -1]
    single = module(root, predict=str(loose / "0.png"))
    assert len(single.splits["predict"]) == 1


def test_semi_supervised_over_files(tmp_path: Path, data_root: Path) -> None:
    from mmkd.data import SemiSupervisedDataModule

    root = image_files.write_layout(tmp_path / "d", data_root / "fashion-mnist", "folder", [60, 10, 10])
    data = ImageFilesDataModule(root=str(root), batch_size=8, num_workers=0, views=EXACT)
    semi = SemiSupervisedDataModule(data, shots_per_class=1)
    semi.setup("fit")
    labeled, unlabeled = semi.parts["labeled"], semi.parts["unlabeled"]
    assert len(labeled) == 10 and sorted(labeled.labels.tolist()) == list(range(10))
    assert len(unlabeled) == 50 and set(unlabeled.labels.tolist()) == {-1}
    batch, _, _ = next(iter(semi.train_dataloader()))  # CombinedLoader: (batch, index, loader index)
    assert batch["labeled"]["image"].shape[1:] == (1, 28, 28)
    # the labelled samples named by a list file (file names, as DHO's split files), and unlabelled images elsewhere
    chosen = [data.splits["train"].sample_key(i) for i in (0, 5, 9)]
    listing = tmp_path / "labeled.txt"
    listing.write_text("\n".join(key.rsplit("/", 1)[-1] for key in chosen) + "\n")
    extra = tmp_path / "unlabeled"
    extra.mkdir()
    for i, path in enumerate(sorted((root / "test").rglob("*.jpg"))[:7]):
        (extra / f"u{i}.jpg").write_bytes(path.read_bytes())
    semi = SemiSupervisedDataModule(ImageFilesDataModule(root=str(root), batch_size=8, num_workers=0, views=EXACT), labeled_list=str(listing), unlabeled=str(extra))
    semi.setup("fit")
    assert [semi.parts["labeled"].sample_key(i) for i in range(3)] == chosen
    assert len(semi.parts["unlabeled"]) == 7 and set(semi.parts["unlabeled"].labels.tolist()) == {-1}
    listing.write_text("no_such_file.jpg\n")
    with pytest.raises(ValueError, match="labeled.txt:1: 'no_such_file.jpg' is not a sample"):
        SemiSupervisedDataModule(ImageFilesDataModule(root=str(root), views=EXACT), labeled_list=str(listing)).setup("fit")


def test_index_is_numpy_arrays_not_python_objects(tmp_path: Path, data_root: Path) -> None:
    root = image_files.write_layout(tmp_path / "d", data_root / "fashion-mnist", "csv", [40, 10, 10])
    source = module(root).splits["train"].source
    arrays = [value for value in vars(source.names).values()] + [source.labels]
    assert all(isinstance(array, np.ndarray) for array in arrays)
    assert source.names.nbytes < 40 * 40  # about one byte per character of the relative paths


@pytest.mark.slow
def test_a_run_on_an_image_folder_killed_mid_epoch_resumes_to_the_same_weights(tmp_path: Path, data_root: Path) -> None:
    # `mmkd fit` as a user runs it on their own folder: the data module picked on the command
    # line, 2 worker processes, random crops and flips; killed after step 5, resumed from step 4
    from test_distributed import killed_and_resumed_equals_straight

    root = image_files.write_layout(tmp_path / "photos", data_root / "fashion-mnist", "folder", [384, 64, 64], size=(40, 36))
    data = ["--data=mmkd.data.ImageFilesDataModule", f"--data.init_args.root={root}", "--data.init_args.num_workers=2",
            "--data.init_args.batch_size=32", "--data.init_args.image_size=28", "--data.init_args.channels=1",
            "--data.init_args.scale=[0.5, 1.0]"]  # fmt: skip
    killed_and_resumed_equals_straight("teachers/fmnist_resnet10t.yaml", *data)


def test_dho_runs_unchanged_on_an_image_folder(tmp_path: Path, data_root: Path) -> None:
    # the shipped DHO config with only its data swapped for a folder of JPEGs: the CLIP teacher
    # gets its own view (32 px RGB, CLIP normalisation) of each crop, the student its 28 px grey one
    from mmkd.cli import lightning_cli
    from test_distributed import random_clip_teacher

    from conftest import CONFIGS, SHORT

    random_clip_teacher()
    root = image_files.write_layout(tmp_path / "photos", data_root / "fashion-mnist", "folder", [200, 40, 40], size=(56, 56))
    inner = "--data.init_args.data.init_args"
    cli = lightning_cli(["-c", str(CONFIGS / "dho/fmnist.yaml"), *SHORT, "--data.init_args.data=mmkd.data.ImageFilesDataModule",
                         f"{inner}.root={root}", f"{inner}.num_workers=1", f"{inner}.batch_size=16", f"{inner}.image_size=28",
                         f"{inner}.channels=1", "--data.init_args.labeled_fraction=0.1"], run=False)  # fmt: skip
    seen = []
    cli.model.teacher.model.register_forward_pre_hook(lambda module, args: seen.append(tuple(args[0].shape[1:])))
    cli.trainer.fit(cli.model, cli.datamodule)
    assert set(seen) == {(3, 32, 32)}  # in training (labelled + unlabelled) and validation alike
    views = cli.datamodule.views
    assert views["image"].shape == (1, 28, 28) and views["teacher_image"].shape == (3, 32, 32)
    assert views["teacher_image"].mean == pytest.approx((0.48145466, 0.4578275, 0.40821073))
    assert cli.trainer.global_step == 3 and len(cli.datamodule.parts["labeled"]) == 20
    adapter = next(m for m in cli.model.teacher.modules() if type(m).__name__ == "ImageAdapter")
    assert adapter.input_mean.flatten().tolist() == pytest.approx(list(views["teacher_image"].mean))  # the adapter changes nothing


def test_randaugment_and_random_erasing_are_timms_and_reproducible(tmp_path: Path, data_root: Path) -> None:
    root = image_files.write_layout(tmp_path / "d", data_root / "fashion-mnist", "folder", [40, 10, 10], size=(64, 64))
    views = {"image": {"size": 48}}
    plain = module(root, views=views).splits["train"]
    augmented = module(root, views=views, auto_augment="rand-m9-mstd0.5-inc1", re_prob=1.0).splits["train"]
    again = module(root, views=views, auto_augment="rand-m9-mstd0.5-inc1", re_prob=1.0, num_workers=2).splits["train"]
    for index in range(6):
        a = augmented[(index, 3)]["image"]
        assert torch.equal(a, again[(index, 3)]["image"])  # a function of (seed, epoch, index)
        assert not torch.equal(a, plain[(index, 3)]["image"])
    torch.manual_seed(123)
    before = torch.rand(1)
    torch.manual_seed(123)
    augmented[(0, 0)]
    assert torch.equal(torch.rand(1), before)  # the global RNG streams are left as they were
    with pytest.raises(ValueError, match="not a timm RandAugment"):
        module(root, views=views, auto_augment="bogus")


def test_teacher_cache_and_inspect_on_files_use_the_models_views(tmp_path: Path, data_root: Path, teacher_in_place: Path, capsys) -> None:
    from mmkd.cli import main
    from mmkd.core import TeacherCache

    from conftest import CONFIGS, SHORT

    root = image_files.write_layout(tmp_path / "d", data_root / "fashion-mnist", "folder", [64, 16, 16], size=(40, 40))
    data = ["--data=mmkd.data.ImageFilesDataModule", f"--data.init_args.root={root}", "--data.init_args.num_workers=1",
            "--data.init_args.image_size=28", "--data.init_args.channels=1", "--data.init_args.augment=false"]  # fmt: skip
    config = str(CONFIGS / "kd/fmnist_fitnets.yaml")
    main(["cache", "-c", config, "--out", "cache", *data])
    assert len(TeacherCache("cache")) == 64
    main(["fit", "-c", config, *data, *SHORT, "--model.init_args.teacher_cache=cache"])  # its fingerprint is the run's
    capsys.readouterr()
    main(["inspect", "-c", config, *data, "--depth", "1"])
    assert "[1, 64, 4, 4]" in capsys.readouterr().out  # the teacher's layer2 on 28 px inputs (224 px would give 28 x 28)
    with pytest.raises(SystemExit):
        main(["cache", "-c", config, "--out", "cache2", *data[:-1]])  # random crops: refused, as for the in-memory sets


def test_a_teacher_whose_classes_are_in_another_order_is_said(tmp_path: Path, data_root: Path, teacher_in_place: Path) -> None:
    # The teacher learnt Fashion-MNIST's label order (0 T-shirt/top, 1 trouser, ...); a file list that
    # names its classes is numbered in sorted order (T-shirt-top, ankle_boot, bag, ...). Distilling
    # that teacher as it is would teach the student the wrong classes for the whole run.
    from mmkd.cli import lightning_cli

    from conftest import CONFIGS, SHORT

    root = image_files.write_layout(tmp_path / "d", data_root / "fashion-mnist", "csv", [64, 128, 16], fmt="png")
    data = ["--data=mmkd.data.ImageFilesDataModule", f"--data.init_args.root={root}", "--data.init_args.num_workers=0",
            "--data.init_args.image_size=28", "--data.init_args.channels=1", "--data.init_args.mean=0.286",
            "--data.init_args.std=0.353", "--data.init_args.crop_pct=1.0", "--data.init_args.batch_size=64"]  # fmt: skip
    fit = ["fit", "-c", str(CONFIGS / "kd/fmnist_kd.yaml"), *data, *SHORT, "--trainer.limit_train_batches=1"]
    with pytest.warns(UserWarning, match=r"val/teacher_acc is .* no better than chance \(10.0% for 10 classes\).*"
                      r"the data's classes in label order: T-shirt-top, ankle_boot, bag, .*data.init_args.classes"):  # fmt: skip
        permuted = lightning_cli(fit)
    order = "[" + ", ".join(image_files.CLASS_FOLDERS) + "]"  # the teacher's own order
    with warnings.catch_warnings(record=True) as said:
        warnings.simplefilter("always")
        run = lightning_cli([*fit, f"--data.init_args.classes={order}"])
    assert not [w for w in said if "teacher_acc" in str(w.message)]
    accuracy = {"permuted": permuted.model.teacher_val_result, "teacher's order": run.model.teacher_val_result}
    assert accuracy["permuted"] < 0.19 <= accuracy["teacher's order"], accuracy
    assert run.datamodule.class_names == image_files.CLASS_FOLDERS


@pytest.mark.slow
def test_ddp_trains_on_an_image_folder_with_workers(tmp_path: Path, data_root: Path) -> None:
    # two gloo processes, each with its DataLoader worker; the sampler gives each its half of the folder
    from test_distributed import DDP, mmkd_fit, weights

    root = image_files.write_layout(tmp_path / "photos", data_root / "fashion-mnist", "folder", [128, 32, 32], size=(40, 36))
    mmkd_fit("teachers/fmnist_resnet10t.yaml", *DDP, "--data=mmkd.data.ImageFilesDataModule", f"--data.init_args.root={root}",
             "--data.init_args.num_workers=1", "--data.init_args.batch_size=16", "--data.init_args.image_size=28",
             "--data.init_args.channels=1", "--trainer.callbacks.init_args.dirpath=ddp")  # fmt: skip
    checkpoint = torch.load("ddp/last.ckpt", map_location="cpu", weights_only=True)
    assert checkpoint["global_step"] == 3 and all(torch.isfinite(value).all() for value in weights("ddp/last.ckpt").values())


def test_a_bad_folder_stops_mmkd_fit_with_one_line(tmp_path: Path, data_root: Path, capsys) -> None:
    from mmkd.cli import main

    from conftest import CONFIGS

    root = image_files.write_layout(tmp_path / "d", data_root / "fashion-mnist", "folder", [40, 10, 10])
    (root / "train" / "zebra").mkdir()
    with pytest.raises(SystemExit) as stopped:
        main(["fit", "-c", str(CONFIGS / "teachers/fmnist_resnet10t.yaml"), "--data=mmkd.data.ImageFilesDataModule", f"--data.init_args.root={root}"])
    assert stopped.value.code == 2
    assert f"mmkd: error: class folder {root / 'train' / 'zebra'} holds no image files" in capsys.readouterr().err
