"""The teacher-output cache on real data (the 10k MNIST digits: 3,000 training samples after the test and validation hold-outs) with a
teacher trained by the shipped recipe: built once, read back equal to the online teacher, used by
a fit, and refused whenever it does not belong to the run."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from mmkd.cli import lightning_cli, main
from mmkd.core import TeacherCache, TeacherCacheError, build_teacher_cache
from mmkd.data import MNISTDataModule
from conftest import CONFIGS, SHORT

MNIST = ["--data.class_path=mmkd.data.MNISTDataModule", "--data.init_args.batch_size=128", "--data.init_args.augment=false"]
FITNETS = str(CONFIGS / "kd/fmnist_fitnets.yaml")


def build(config: str = FITNETS, out: str = "cache", *extra: str) -> TeacherCache:
    main(["cache", "-c", config, "--out", out, *MNIST, *extra])
    return TeacherCache(out)


def test_cached_outputs_equal_the_online_teacher(teacher_in_place: Path) -> None:
    cache = build()
    assert cache.sources == ["logits", "layer2"] and len(cache) == 3000
    cli = lightning_cli(["-c", FITNETS, *MNIST], run=False)
    cli.datamodule.prepare_data()
    cli.datamodule.setup("fit")
    dataset, _ = cli.datamodule.teacher_cache_dataset()
    indices = torch.tensor([5, 0, 200, 17, 2999])  # any order
    images = dataset.__getitems__(indices.tolist())["image"]
    online = {"logits": cli.model.teacher(images), **cli.model.teacher_tap.pop()}
    cached = cache.lookup(indices)
    for source in ("logits", "layer2"):
        torch.testing.assert_close(cached[source], online[source], rtol=1e-4, atol=1e-5)


def test_fit_with_cache_matches_fit_with_online_teacher(teacher_in_place: Path) -> None:
    build()
    weights = {}
    for name, extra in {"online": [], "cached": ["--model.init_args.teacher_cache=cache"]}.items():
        cli = lightning_cli(["-c", FITNETS, *MNIST, *SHORT, *extra, f"--trainer.callbacks.init_args.dirpath={name}",
                             f"--trainer.logger.init_args.save_dir={name}/logs"], run=False)  # fmt: skip
        cli.trainer.fit(cli.model, datamodule=cli.datamodule)
        assert (cli.model._cache is not None) == (name == "cached")
        weights[name] = cli.model.student.state_dict()
    for key, value in weights["online"].items():
        torch.testing.assert_close(weights["cached"][key], value, rtol=1e-3, atol=1e-4)


def test_cache_is_refused_when_it_does_not_belong_to_the_run(teacher_in_place: Path, capsys, monkeypatch: pytest.MonkeyPatch) -> None:
    build(str(CONFIGS / "kd/fmnist_kd.yaml"), "kd_cache")  # logits only

    def fit(*extra: str) -> None:
        lightning_cli(["fit", "-c", FITNETS, *SHORT, *extra])

    with pytest.raises(TeacherCacheError, match=r"also needs the teacher's \['layer2'\]: rebuild it"):
        fit(*MNIST, "--model.init_args.teacher_cache=kd_cache")
    with pytest.raises(TeacherCacheError, match="augments the training images at random.*augment=false"):
        fit("--model.init_args.teacher_cache=kd_cache")  # Fashion-MNIST, augmented
    with pytest.raises(TeacherCacheError, match="data is 'MNISTDataModule' in the cache and 'FashionMNISTDataModule' now"):
        fit("--model.init_args.teacher_cache=kd_cache", "--data.init_args.augment=false")
    other = torch.load(teacher_in_place, weights_only=True)
    other["state_dict"]["model.fc.bias"] += 1.0
    torch.save(other, "other_teacher.ckpt")
    with pytest.raises(TeacherCacheError, match="built from other teacher weights"):
        fit(*MNIST, "--model.init_args.teacher_cache=kd_cache", "--model.init_args.teacher.init_args.checkpoint=other_teacher.ckpt")
    with pytest.raises(TeacherCacheError, match="does not match this run's data or transform: train_samples is 3000 in the cache and 7100 now"):
        fit(*MNIST, "--model.init_args.teacher_cache=kd_cache", "--data.init_args.val_size=900")  # another split
    with monkeypatch.context() as patch:  # another input normalisation: the teacher would see other inputs
        patch.setattr(MNISTDataModule, "mean", 0.5)
        with pytest.raises(TeacherCacheError, match=r"data or transform: normalize is \[0.1307, 0.3081\] in the cache and \[0.5, 0.3081\] now"):
            fit(*MNIST, "--model.init_args.teacher_cache=kd_cache")
    with pytest.raises(TeacherCacheError, match=r"no teacher cache at missing \(meta.json missing\): build it with `mmkd cache"):
        fit(*MNIST, "--model.init_args.teacher_cache=missing")
    with pytest.raises(SystemExit):  # the command says why in one line
        main(["cache", "-c", FITNETS, "--out", "augmented"])
    assert "mmkd: error: FashionMNISTDataModule augments the training images at random" in capsys.readouterr().err
    assert not Path("augmented").exists()


def test_corrupt_or_interrupted_cache_is_reported(teacher_in_place: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cache = build(str(CONFIGS / "kd/fmnist_kd.yaml"), "kd_cache")
    data_file = cache.path / cache.meta["files"]["logits"]["file"]
    data_file.write_bytes(data_file.read_bytes()[:1000])  # truncated
    with pytest.raises(TeacherCacheError, match=r"cannot read .*0\.npy .*incomplete or corrupt: rebuild it"):
        TeacherCache("kd_cache")
    cli = lightning_cli(["-c", str(CONFIGS / "kd/fmnist_kd.yaml"), *MNIST], run=False)
    calls, fail_at = [], [3]

    def failing_forward(*args, **kwargs):
        calls.append(1)
        if len(calls) in fail_at:
            raise KeyboardInterrupt  # a user's Ctrl-C half-way
        return torch.zeros(len(args[0]), 10)

    monkeypatch.setattr(cli.model.teacher, "forward", failing_forward)
    with pytest.raises(KeyboardInterrupt):  # shards of 1,024 rows in batches of 512: the first shard is finished
        build_teacher_cache(cli.model, cli.datamodule, "interrupted", progress=False, shard_size=1024)
    partial = Path(".interrupted.partial")
    assert not Path("interrupted").exists() and sorted(f.name for f in partial.iterdir()) == ["build.json", "shard-00000.npz"]
    (partial / "shard-00001.npz.tmp").write_bytes(b"half")  # what a kill while a shard was written leaves
    Path(".interrupted.tmp-99999").mkdir()  # what a killed build of an earlier mmkd leaves
    calls.clear()
    fail_at.clear()
    build_teacher_cache(cli.model, cli.datamodule, "interrupted", progress=False, shard_size=1024)  # resumed
    assert len(calls) == 4  # shards 1 and 2 (1,024 and 952 rows), two batches each; shard 0 was kept
    assert TeacherCache("interrupted").meta["num_samples"] == 3000 and not list(Path(".").glob(".interrupted*"))
    calls.clear()
    fail_at.append(3)
    with pytest.raises(KeyboardInterrupt):
        build_teacher_cache(cli.model, cli.datamodule, "interrupted", progress=False, overwrite=True, shard_size=1024)
    calls.clear()
    fail_at.clear()  # a build of another recipe (top-k) discards the finished shards of this one
    build_teacher_cache(cli.model, cli.datamodule, "interrupted", progress=False, overwrite=True, shard_size=1024, topk=3)
    assert len(calls) == 6 and TeacherCache("interrupted").meta["topk"] == 3 and not list(Path(".").glob(".interrupted*"))


def test_topk_keeps_the_largest_logits_and_the_tail_mass(teacher_in_place: Path) -> None:
    full = build(str(CONFIGS / "kd/fmnist_kd.yaml"), "full")
    top3 = build(str(CONFIGS / "kd/fmnist_kd.yaml"), "top3", "--topk=3")
    indices = torch.arange(0, 3000, 41)
    exact, approx = full.lookup(indices)["logits"], top3.lookup(indices)["logits"]
    values, positions = exact.topk(3, dim=1)
    assert torch.equal(approx.gather(1, positions), values)
    p_exact, p_approx = exact.softmax(1), approx.softmax(1)
    torch.testing.assert_close(p_approx.gather(1, positions), p_exact.gather(1, positions), rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(p_approx.sum(1), torch.ones(len(indices)))
    assert sum(f.stat().st_size for f in top3.path.iterdir()) < sum(f.stat().st_size for f in full.path.iterdir())
