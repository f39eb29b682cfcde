"""The teacher cache of recorded augmented views (``mmkd cache --views V``) against the teacher run
online, on images written to disk from Fashion-MNIST, with RandomResizedCrop + flip.

    python tools/bench_view_cache.py                     # both parts -> bench/view_cache.json, bench/view_cache.png
    python tools/bench_view_cache.py --part speed --teachers resnet152 --rounds 2

**speed**: a ResNet-10t student (timm) at 128 px from teachers of growing cost (timm ResNet-18,
-50, -152, random weights saved to a file and loaded as a checkpoint: throughput does not depend
on what the weights learnt), batch 32, on ``--samples`` 160-px JPEGs. For each teacher the cache
is built once (``--views`` views, timed), then a training epoch with the teacher online and one
from the cache are timed interleaved (online, cached, online, cached, ...; samples/s from the
``--warmup``-th step on, so worker start-up is not counted). Reports the cached epoch's time as
a fraction of the online epoch's and after how many epochs the build has paid for itself.

**accuracy**: the shipped KD recipe (``configs/kd/fmnist_kd.yaml``, its teacher trained by
``configs/teachers/fmnist_resnet10t.yaml``) on a folder of 28-px PNGs with RandomResizedCrop
(scale 0.35-1) + flip, trained for ``--epochs`` epochs with the teacher online, from a cache of
all 10 logits in float32, and from caches of the top-3 and the top-1 logit in float16, ``--views`` =
``--epochs`` (each epoch its own views); ``--seeds`` are the students' initialisation seeds
(the data and its views are the same in every run).

**--mixup**: the data module also mixes each training sample with a recorded partner (mixup 0.8 /
CutMix 1.0, label smoothing 0.1, ``mmkd.data.mixing.SampleMixup``). In the speed part every
teacher then gets four interleaved variants (online and cached, each unmixed and mixed), so the
cost of decoding the partner is measured in the same run; in the accuracy part every run and
cache mixes (its caches are kept apart from the unmixed ones).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tools"))

import image_files  # noqa: E402
from bench_train import StepTimer, flops  # noqa: E402
from benchlib import machine_info, seeded_run  # noqa: E402
from mmkd.cli import lightning_cli, main as mmkd_main  # noqa: E402

DATA = Path(os.environ.get("MMKD_DATA", ROOT.parent / "shared" / "data"))
IMAGENET_KD = str(ROOT / "configs/imagenet/kd_resnet34_resnet18.yaml")
FMNIST_KD = str(ROOT / "configs/kd/fmnist_kd.yaml")
FMNIST_TEACHER = ROOT / "runs/teachers/fmnist_resnet10t/last.ckpt"
STUDENT = "resnet10t"
SIZE = 128
MIXUP = "--data.init_args.mixup={mixup_alpha: 0.8, cutmix_alpha: 1.0, label_smoothing: 0.1}"


def speed_overrides(root: Path, teacher: str, weights: Path, workdir: Path) -> list[str]:
    view = json.dumps({"image": {"size": SIZE, "interpolation": "bilinear", "crop_pct": 0.875}})
    return [
        f"--model.init_args.student.init_args.name={STUDENT}", "--model.init_args.student.init_args.num_classes=10",
        f"--model.init_args.teacher.init_args.model.init_args.name={teacher}", "--model.init_args.teacher.init_args.model.init_args.num_classes=10",
        f"--model.init_args.teacher.init_args.checkpoint={weights}", "--model.init_args.num_classes=10",
        f"--data.init_args.root={root}", "--data.init_args.batch_size=32", "--data.init_args.num_workers=1", f"--data.init_args.views={view}",
        "--trainer.max_epochs=1", "--trainer.limit_val_batches=0", "--trainer.logger=false", "--trainer.enable_progress_bar=false",
        "--trainer.enable_model_summary=false", f"--trainer.callbacks.init_args.dirpath={workdir}/ckpt",
    ]  # fmt: skip


def timed_epoch(overrides: list[str], warmup: int) -> float:
    """Samples/s of one training epoch, from step ``warmup`` on."""
    from lightning.pytorch.callbacks import LearningRateMonitor

    cli = lightning_cli(["-c", IMAGENET_KD, *overrides], run=False)
    timer = StepTimer(warmup)
    cli.trainer.callbacks = [c for c in cli.trainer.callbacks if not isinstance(c, LearningRateMonitor)] + [timer]
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    return timer.steps * cli.datamodule.batch_size / timer.elapsed


def speed(args: argparse.Namespace, workdir: Path) -> dict:
    import timm

    root = workdir / "photos"
    if not (root / "train").is_dir():
        image_files.write_layout(root, DATA / "fashion-mnist", "folder", [args.samples, 32, 0], size=(160, 160))
    setups, builds, ratios = {}, {}, {}
    mixings = ("", " mixed") if args.mixup else ("",)  # suffixes of the variants' names
    for teacher in args.teachers:
        weights = workdir / f"{teacher}.pth"
        torch.manual_seed(0)
        model = timm.create_model(teacher, num_classes=10)
        torch.save(model.state_dict(), weights)
        student = timm.create_model(STUDENT, num_classes=10)
        example = torch.zeros(1, 3, SIZE, SIZE)
        ratios[teacher] = flops(model.eval(), example) / flops(student.eval(), example)
        setups[teacher] = {}
        for mixing in mixings:
            overrides = [*speed_overrides(root, teacher, weights, workdir), *([MIXUP] if mixing else [])]
            cache = workdir / f"cache_{teacher}{mixing.replace(' ', '_')}"
            start = time.perf_counter()
            mmkd_main(["cache", "-c", IMAGENET_KD, "--out", str(cache), "--views", str(args.views), "--overwrite", "--batch-size", "64", *overrides])
            builds[teacher + mixing] = time.perf_counter() - start
            setups[teacher] |= {"online" + mixing: overrides, "cached" + mixing: [*overrides, f"--model.init_args.teacher_cache={cache}"]}
            print(f"{teacher}{mixing}: teacher/student FLOPs {ratios[teacher]:.1f}x, cache of {args.views} views built in {builds[teacher + mixing]:.0f} s", flush=True)
    rates: dict[str, dict[str, list[float]]] = {teacher: {name: [] for name in variants} for teacher, variants in setups.items()}
    for round_index in range(args.rounds + 1):  # round 0 untimed
        for teacher, variants in setups.items():
            for name, overrides in variants.items():
                value = timed_epoch(overrides, args.warmup)
                print(f"round {round_index} {teacher} {name}: {value:.1f} samples/s", flush=True)
                if round_index:
                    rates[teacher][name].append(value)
    summary = {}
    for teacher, by_name in rates.items():
        for mixing in mixings:
            online, cached = statistics.median(by_name["online" + mixing]), statistics.median(by_name["cached" + mixing])
            online_epoch, cached_epoch = args.samples / online, args.samples / cached
            build = builds[teacher + mixing]
            summary[teacher + mixing] = {
                "teacher_to_student_flops": ratios[teacher], "online_samples_per_second": by_name["online" + mixing],
                "cached_samples_per_second": by_name["cached" + mixing], "cached_epoch_vs_online": online / cached,
                "cache_build_seconds": build, "online_epoch_seconds": online_epoch, "cached_epoch_seconds": cached_epoch,
                "build_paid_after_epochs": build / (online_epoch - cached_epoch) if online_epoch > cached_epoch else None,
            }  # fmt: skip
        if args.mixup:  # per round, so the machine's drift between rounds cancels
            for name in ("online", "cached"):
                summary[f"{teacher} mixed"][f"{name}_mixed_vs_unmixed_per_round"] = [
                    mixed / plain for mixed, plain in zip(by_name[f"{name} mixed"], by_name[name])]  # fmt: skip
    return summary


def accuracy(args: argparse.Namespace, workdir: Path) -> dict:
    if not FMNIST_TEACHER.is_file():
        mmkd_main(["fit", "-c", str(ROOT / "configs/teachers/fmnist_resnet10t.yaml"), "--trainer.enable_progress_bar=false"])
    root = workdir / "fmnist"
    if not (root / "train").is_dir():
        image_files.write_layout(root, DATA / "fashion-mnist", "folder", [args.train_size, 2000, 2000], fmt="png")
    data = [
        "--data=mmkd.data.ImageFilesDataModule", f"--data.init_args.root={root}", "--data.init_args.num_workers=1",
        "--data.init_args.image_size=28", "--data.init_args.channels=1", "--data.init_args.batch_size=128", "--data.init_args.scale=[0.35, 1.0]",
        # the teacher's label order and normalisation (the folders sort alphabetically; Fashion-MNIST's statistics)
        f"--data.init_args.classes={json.dumps(list(image_files.CLASS_FOLDERS))}", "--data.init_args.mean=0.286", "--data.init_args.std=0.353",
        "--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false", *([MIXUP] if args.mixup else []),
    ]  # fmt: skip
    tag = "_mixed" if args.mixup else ""
    caches = {"full fp32": [], "top-3 fp16": ["--topk", "3", "--dtype", "float16"], "top-1 fp16": ["--topk", "1", "--dtype", "float16"]}
    variants = {"online": []}
    for name, options in caches.items():
        cache = workdir / f"fmnist_cache_{name.split()[0]}{tag}"
        if not (cache / "meta.json").is_file():
            mmkd_main(["cache", "-c", FMNIST_KD, "--out", str(cache), "--views", str(args.epochs), "--overwrite", *options, *data])
        variants[name] = [f"--model.init_args.teacher_cache={cache}"]
    results: dict[str, list[dict]] = {name: [] for name in variants}
    for seed in args.seeds:
        for name, extra in variants.items():
            run_dir = str(workdir / f"fmnist_{name.split()[0]}{tag}_seed{seed}")
            results[name].append(seeded_run(name, FMNIST_KD, run_dir, seed, args.epochs, [*data, *extra]))
    size = {name: sum(f.stat().st_size for f in (workdir / f"fmnist_cache_{name.split()[0]}{tag}").iterdir()) for name in caches}
    return {
        name: {"test_acc_per_seed": [r["test/acc"] for r in runs], "test_acc_mean": statistics.mean(r["test/acc"] for r in runs),
               "fit_seconds_mean": statistics.mean(r["fit_seconds"] for r in runs), "cache_bytes": size.get(name)}
        for name, runs in results.items()
    }  # fmt: skip


def plot(summary: dict, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    teachers = sorted((t for t in summary if not t.endswith(" mixed")), key=lambda t: summary[t]["teacher_to_student_flops"])
    x = [summary[t]["teacher_to_student_flops"] for t in teachers]
    fig, ax = plt.subplots(figsize=(5.5, 3.6))
    for name, marker in (("online", "o"), ("cached", "s")):
        ax.plot(x, [statistics.median(summary[t][f"{name}_samples_per_second"]) for t in teachers], marker=marker, label=f"teacher {name}")
    for t, xv in zip(teachers, x):
        ax.annotate(t, (xv, statistics.median(summary[t]["cached_samples_per_second"])), textcoords="offset points", xytext=(4, 4), fontsize=8)
    ax.set_xscale("log")
    ax.set_xlabel("teacher / student forward FLOPs")
    ax.set_ylabel("training samples / s")
    ax.set_title(f"{STUDENT} student at {SIZE} px, RandomResizedCrop + flip", fontsize=9)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--part", choices=["speed", "accuracy", "both"], default="both")
    parser.add_argument("--teachers", nargs="+", default=["resnet18", "resnet50", "resnet152"])
    parser.add_argument("--samples", type=int, default=384, help="training images of the speed part")
    parser.add_argument("--views", type=int, default=2, help="views per sample of the speed part's caches")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--train-size", type=int, default=10000, help="training images of the accuracy part")
    parser.add_argument("--epochs", type=int, default=4, help="epochs (and views) of the accuracy part")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1])
    parser.add_argument("--mixup", action="store_true", help="the data module also mixes (mixup / CutMix with recorded partners)")
    parser.add_argument("--workdir", default="runs/bench_view_cache")
    parser.add_argument("--out", default="bench/view_cache.json")
    args = parser.parse_args()
    workdir = Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    started, load_before = time.time(), os.getloadavg()
    record: dict = {"benchmark": "teacher cache of recorded views vs the teacher online", "command": "python " + " ".join(sys.argv)}
    if args.part in ("speed", "both"):
        record["speed"] = speed(args, workdir)
    if args.part in ("accuracy", "both"):
        record["accuracy"] = accuracy(args, workdir)
    record.update(machine=machine_info(load_before), wall_seconds=time.time() - started)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(record, indent=2))
    if "speed" in record:
        plot(record["speed"], out.with_suffix(".png"))
        print(f"\n| teacher | teacher/student FLOPs | online samples/s | cached samples/s | cached epoch / online epoch | build ({args.views} views) | paid after |")
        print("|---|---:|---:|---:|---:|---:|---:|")
        for teacher, row in record["speed"].items():
            paid = f"{row['build_paid_after_epochs']:.1f} epochs" if row["build_paid_after_epochs"] else "never"
            print(f"| {teacher} | {row['teacher_to_student_flops']:.1f}x | {statistics.median(row['online_samples_per_second']):.1f} | "
                  f"{statistics.median(row['cached_samples_per_second']):.1f} | {row['cached_epoch_vs_online']:.2f}x | {row['cache_build_seconds']:.0f} s | {paid} |")  # fmt: skip
        for teacher, row in record["speed"].items():
            for name in ("online", "cached"):
                if f"{name}_mixed_vs_unmixed_per_round" in row:
                    print(f"{teacher}, {name}: mixed / unmixed samples/s per round", ", ".join(f"{r:.2f}" for r in row[f"{name}_mixed_vs_unmixed_per_round"]))
    if "accuracy" in record:
        print("\n| teacher outputs | test acc per seed | mean | cache size |")
        print("|---|---|---:|---:|")
        for name, row in record["accuracy"].items():
            size = f"{row['cache_bytes'] / 2**20:.1f} MiB" if row["cache_bytes"] else "-"
            print(f"| {name} | {', '.join(f'{a:.4f}' for a in row['test_acc_per_seed'])} | {row['test_acc_mean']:.4f} | {size} |")
    print(f"\nthreads {torch.get_num_threads()}, load average {load_before[0]:.2f} -> {os.getloadavg()[0]:.2f}; wrote {out}")


if __name__ == "__main__":
    main()
