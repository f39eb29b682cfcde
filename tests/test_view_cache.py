"""The teacher cache of recorded augmented views (``mmkd cache --views V``) on an image folder
written at test time from real Fashion-MNIST images, with the teacher trained by the shipped
recipe: the views recorded are the training draws, training replays them pixel for pixel, a KD
step from the cache equals the online KD step on the same views, a changed recipe is refused,
and two torchrun ranks build the same cache as one process."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch

from mmkd.cli import lightning_cli, main
from mmkd.core import TeacherCache, TeacherCacheError
from mmkd.data.files import ImageFileDataset
from mmkd.data.mixing import SampleMixup
from mmkd.data.views import random_resized_crop_box, sample_uniforms

from conftest import CONFIGS, REPO, SHORT

sys.path.insert(0, str(REPO / "tools"))
import image_files  # noqa: E402

KD = str(CONFIGS / "kd/fmnist_kd.yaml")
FITNETS = str(CONFIGS / "kd/fmnist_fitnets.yaml")
SIZE = (40, 36)  # width, height: RandomResizedCrop on a non-square image, resized to the models' 28 px


def files_data(root: Path, *extra: str) -> list[str]:
    return ["--data=mmkd.data.ImageFilesDataModule", f"--data.init_args.root={root}", "--data.init_args.num_workers=1",
            "--data.init_args.batch_size=16", "--data.init_args.image_size=28", "--data.init_args.channels=1", *extra]  # fmt: skip


@pytest.fixture
def folder(tmp_path: Path, data_root: Path) -> Path:
    return image_files.write_layout(tmp_path / "d", data_root / "fashion-mnist", "folder", [48, 16, 16], size=SIZE)


def test_recorded_views_are_the_training_draws_and_are_replayed(folder: Path, teacher_in_place: Path) -> None:
    main(["cache", "-c", FITNETS, "--out", "views", "--views", "3", *files_data(folder)])
    cache = TeacherCache("views")
    assert cache.views == 3 and len(cache) == 48 and cache.sources == ["logits", "layer2"]
    recorded = cache.recorded_views()
    assert recorded["crop_box"].shape == (3, 48, 4) and recorded["flip"].shape == (3, 48)
    # each view v of sample i is the RandomResizedCrop + flip (p = 0.5) that training epoch v draws from
    # (seed 0, v, i): torchvision's get_params on the hash's uniforms (checked against torchvision in test_files_data)
    for view, index in [(0, 0), (1, 7), (2, 47), (2, 3)]:
        box = random_resized_crop_box(*SIZE, sample_uniforms(0, view, index, 0, 40))
        assert tuple(recorded["crop_box"][view, index]) == box
        assert bool(recorded["flip"][view, index]) == (sample_uniforms(0, view, index, 1, 1)[0] < 0.5)
    assert len({tuple(recorded["crop_box"][v, 5]) for v in range(3)}) == 3  # three different views of one image

    cli = lightning_cli(["-c", FITNETS, *files_data(folder), "--model.init_args.teacher_cache=views"], run=False)
    trainer = L.Trainer(max_epochs=1, limit_train_batches=0, limit_val_batches=0, logger=False, enable_checkpointing=False)
    trainer.fit(cli.model, datamodule=cli.datamodule)  # sets up the model, which opens the cache and replays its views
    train = cli.datamodule.splits["train"]
    recording, _ = cli.datamodule.teacher_cache_dataset(3)
    teacher = cli.model.teacher.eval()
    for epoch, index in [(4, 7), (2, 47), (3, 0)]:  # epoch e replays view e % 3
        replayed = train[(index, epoch)]
        assert replayed["view"] == epoch % 3
        torch.testing.assert_close(replayed["image"], recording[(index, epoch % 3)]["image"], rtol=0, atol=0)
        with torch.no_grad():
            logits = teacher(replayed["image"][None])
        stored = cache.lookup(torch.tensor([index]), views=torch.tensor([epoch % 3]))
        torch.testing.assert_close(stored["logits"], logits, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(stored["layer2"], cli.model.teacher_tap.pop()["layer2"], rtol=1e-5, atol=1e-5)


class CompareOnline(L.Callback):
    """At every training step: the distillation losses from the cache, then with the teacher run
    online on the same batch (the cache switched off), before the optimiser moves anything."""

    def __init__(self) -> None:
        self.pairs: list[tuple[dict, dict, list[int]]] = []

    def on_train_batch_start(self, trainer, module, batch, batch_idx) -> None:
        cache = module._cache
        cached = {name: value.detach() for name, value in module.distillation_losses(batch).items()}
        module._cache = None
        try:
            online = {name: value.detach() for name, value in module.distillation_losses(batch).items()}
        finally:
            module._cache = cache
        self.pairs.append((cached, online, batch["view"].unique().tolist()))


def test_kd_step_from_the_view_cache_equals_the_online_step(folder: Path, teacher_in_place: Path) -> None:
    # all 10 logits in float32: the cached KD loss is the online one on the replayed views to 1e-6
    main(["cache", "-c", KD, "--out", "views", "--views", "2", *files_data(folder)])
    compare = CompareOnline()
    cli = lightning_cli(["-c", KD, *files_data(folder), *SHORT, "--trainer.max_epochs=3", "--model.init_args.teacher_cache=views"], run=False)
    cli.trainer.callbacks.append(compare)
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    assert [views for _, _, views in compare.pairs] == [[0]] * 3 + [[1]] * 3 + [[0]] * 3  # epoch e: view e % 2
    for cached, online, _ in compare.pairs:
        assert cached.keys() == online.keys() == {"ce", "kd"}
        for name in cached:
            torch.testing.assert_close(cached[name], online[name], rtol=1e-6, atol=1e-6)


def test_a_view_cache_of_another_recipe_or_data_is_refused(folder: Path, teacher_in_place: Path, capsys) -> None:
    from conftest import one_error

    main(["cache", "-c", KD, "--out", "views", "--views", "2", "--topk", "3", "--dtype", "float16", *files_data(folder)])
    printed = capsys.readouterr().out  # the size, said before the rest is built: 3 fp16 values + 3 int16 indices + an fp16 tail + box + flip
    assert "teacher cache: 48 samples x 2 views, 31 bytes per view (logits.values 6 B, logits.indices 6 B, logits.tail 2 B, crop_box 16 B, flip 1 B)" in printed
    cache = TeacherCache("views")
    assert cache.meta["topk"] == 3 and cache.arrays["logits.indices"].dtype == np.int16 and cache.arrays["logits.values"].dtype == np.float16
    fit = ["fit", "-c", KD, *SHORT, "--model.init_args.teacher_cache=views"]
    assert "augment is" in one_error(capsys, [*fit, *files_data(folder, "--data.init_args.hflip=0.0")])
    assert "augment is" in one_error(capsys, [*fit, *files_data(folder, "--data.init_args.seed=1")])
    assert "needs the training split augmented" in one_error(capsys, [*fit, *files_data(folder, "--data.init_args.augment=false")])
    assert "holds its images in memory and cannot record augmented views" in one_error(capsys, ["cache", "-c", KD, "--out", "memory", "--views", "2"])
    with pytest.raises(SystemExit):
        main(["cache", "-c", KD, "--out", "zero", "--views", "0", *files_data(folder)])
    with pytest.raises(TeacherCacheError, match="holds 2 recorded views per sample, but the batch does not say which view"):
        cache.lookup(torch.tensor([0, 1]))


MIX = '--data.init_args.mixup={"mixup_alpha": 0.8, "cutmix_alpha": 1.0, "label_smoothing": 0.1}'


def test_mixed_views_are_recorded_replayed_and_the_kd_step_from_them_equals_the_online_step(folder: Path, teacher_in_place: Path) -> None:
    main(["cache", "-c", KD, "--out", "mixed", "--views", "2", *files_data(folder, MIX)])
    cache = TeacherCache("mixed")
    recorded = cache.recorded_views()
    assert recorded["mix_partner"].shape == (2, 48) and recorded["mix_params"].shape == (2, 48, 4)
    mixing = SampleMixup(mixup_alpha=0.8, cutmix_alpha=1.0, label_smoothing=0.1)
    for view, index in [(0, 0), (1, 7), (1, 47)]:  # each view's partner and draw are those of (seed 0, epoch = view, index)
        partner, params = mixing.draw(0, view, index, 48)
        assert recorded["mix_partner"][view, index] == partner
        np.testing.assert_array_equal(recorded["mix_params"][view, index], params)
    assert 0 < recorded["mix_params"][..., 1].mean() < 1  # both CutMix and mixup views

    cli = lightning_cli(["-c", KD, *files_data(folder, MIX), "--model.init_args.teacher_cache=mixed"], run=False)
    L.Trainer(max_epochs=1, limit_train_batches=0, limit_val_batches=0, logger=False, enable_checkpointing=False).fit(cli.model, datamodule=cli.datamodule)
    train = cli.datamodule.splits["train"]
    plain = ImageFileDataset(train.source, train.views, True, train.augment, train.seed)  # the same draws, nothing mixed
    teacher = cli.model.teacher.eval()
    for epoch, index in [(3, 7), (2, 47)]:  # epoch e replays view e % 2: the sample's crop mixed with its partner's
        replayed, view = train[(index, epoch)], epoch % 2
        partner = int(recorded["mix_partner"][view, index])
        mixed, ratio = mixing.mix({"image": plain[(index, view)]["image"]}, {"image": plain[(partner, view)]["image"]}, recorded["mix_params"][view, index])
        torch.testing.assert_close(replayed["image"], mixed["image"], rtol=0, atol=0)
        torch.testing.assert_close(replayed["mix_target"], mixing.target(plain[index]["label"], plain[partner]["label"], ratio, 10), rtol=0, atol=0)
        with torch.no_grad():
            torch.testing.assert_close(cache.lookup(torch.tensor([index]), views=torch.tensor([view]))["logits"], teacher(replayed["image"][None]), rtol=1e-5, atol=1e-5)

    # all 10 logits in float32: the cached KD step is the online one on the replayed mixed views to 1e-6
    compare = CompareOnline()
    cli = lightning_cli(["-c", KD, *files_data(folder, MIX), *SHORT, "--trainer.max_epochs=2", "--model.init_args.teacher_cache=mixed"], run=False)
    cli.trainer.callbacks.append(compare)
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    assert [views for _, _, views in compare.pairs] == [[0]] * 3 + [[1]] * 3
    for cached, online, _ in compare.pairs:
        for name in ("ce", "kd"):
            torch.testing.assert_close(cached[name], online[name], rtol=1e-6, atol=1e-6)


@pytest.mark.slow
def test_g2sd_specific_trains_from_a_cache_of_mixed_views(folder: Path, capsys) -> None:
    from conftest import one_error

    for stage in ("g2sd/mae_pretrain.yaml", "g2sd/teacher_finetune.yaml"):  # the teacher, by the shipped recipe (a few steps)
        lightning_cli(["fit", "-c", str(CONFIGS / stage), *SHORT])
    specific = ["-c", str(CONFIGS / "g2sd/specific.yaml"), *files_data(folder, MIX, "--data.init_args.auto_augment=rand-m9-mstd0.5-inc1",
                "--data.init_args.re_prob=0.25"), "--model.init_args.student.init_args.encoder_checkpoint=null"]  # fmt: skip
    assert "both model.init_args.mixup and data.init_args.mixup" in one_error(capsys, ["cache", *specific, "--out", "g2sd_views", "--views", "2"])
    specific.append("--model.init_args.mixup=null")
    main(["cache", *specific, "--out", "g2sd_views", "--views", "2"])
    assert "mix in the data module instead" in one_error(capsys, ["fit", *specific[:-1], *SHORT, "--model.init_args.teacher_cache=g2sd_views"])
    compare = CompareOnline()
    cli = lightning_cli([*specific, *SHORT, "--trainer.max_epochs=2", "--model.init_args.teacher_cache=g2sd_views"], run=False)
    cli.trainer.callbacks.append(compare)
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    assert cli.trainer.global_step == 6 and [views for _, _, views in compare.pairs] == [[0]] * 3 + [[1]] * 3
    for cached, online, _ in compare.pairs:  # the distillation head's CE against the argmax of the same teacher logits
        assert cached.keys() == {"ce", "dist"}
        for name in cached:
            torch.testing.assert_close(cached[name], online[name], rtol=1e-6, atol=1e-6)


class CompareDHOTeacher(L.Callback):
    """DHO's teacher logits of a step's labelled + unlabelled batch, from the cache and online."""

    def __init__(self) -> None:
        self.pairs: list[tuple[torch.Tensor, torch.Tensor, list[int]]] = []

    def on_train_batch_start(self, trainer, module, batch, batch_idx) -> None:
        keys = ("image", "teacher_image", "label", "index", "view")
        both = {key: torch.cat([batch["labeled"][key], batch["unlabeled"][key]]) for key in keys}
        cached = module.teacher_outputs(both)["logits"]
        with torch.no_grad():
            online = module.map_teacher_logits(module.teacher_forward(both))
        self.pairs.append((cached, online, both["index"].tolist()))


def test_dho_trains_from_a_cache_of_both_parts_views(tmp_path: Path, data_root: Path) -> None:
    # the shipped DHO config on a folder: 10 % labelled; the CLIP teacher's logits of every labelled and
    # unlabelled view come from the cache (rows 0-3 the labelled part, 4-39 the unlabelled one)
    from test_distributed import random_clip_teacher

    random_clip_teacher()
    root = image_files.write_layout(tmp_path / "photos", data_root / "fashion-mnist", "folder", [40, 16, 16], size=SIZE)
    inner = "--data.init_args.data.init_args"
    config = ["-c", str(CONFIGS / "dho/fmnist.yaml"), "--data.init_args.data=mmkd.data.ImageFilesDataModule", f"{inner}.root={root}",
              f"{inner}.num_workers=1", f"{inner}.batch_size=8", f"{inner}.image_size=28", f"{inner}.channels=1",
              "--data.init_args.labeled_fraction=0.1", "--data.init_args.labeled_batch_size=4"]  # fmt: skip
    main(["cache", *config, "--out", "dho_views", "--views", "2"])
    assert len(TeacherCache("dho_views")) == 40
    compare = CompareDHOTeacher()
    cli = lightning_cli([*config, *SHORT, "--trainer.limit_train_batches=5", "--trainer.max_epochs=2", "--model.init_args.teacher_cache=dho_views"], run=False)
    cli.trainer.callbacks.append(compare)
    cli.trainer.fit(cli.model, cli.datamodule)
    assert len(compare.pairs) == 10 and cli.trainer.global_step == 10
    rows = {row for _, _, indices in compare.pairs for row in indices}
    assert {row for row in rows if row < 4} == {0, 1, 2, 3} and max(rows) < 40 and len(rows - {0, 1, 2, 3}) == 36
    for cached, online, _ in compare.pairs:
        torch.testing.assert_close(cached, online, rtol=1e-4, atol=1e-4)


@pytest.mark.slow
def test_two_torchrun_ranks_build_the_cache_one_process_builds(folder: Path, teacher_in_place: Path) -> None:
    args = ["cache", "-c", FITNETS, "--views", "2", "--shard-size", "20", "--batch-size", "8", *files_data(folder)]
    main([*args, "--out", "single"])
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "mmkd.cli", *args, "--out", "ranks"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=600, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    single, ranks = TeacherCache("single"), TeacherCache("ranks")
    assert single.meta["files"].keys() == ranks.meta["files"].keys() and single.meta["missing_rows"] == ranks.meta["missing_rows"] == 0
    for name, array in single.arrays.items():  # 96 rows in 5 shards: ranks 0 and 1 took shards 0, 2, 4 and 1, 3
        if name in ("crop_box", "flip"):
            np.testing.assert_array_equal(ranks.arrays[name], array)
        else:  # one thread per rank, two in the single process: float sums in another order
            np.testing.assert_allclose(ranks.arrays[name], array, rtol=1e-4, atol=1e-5)
