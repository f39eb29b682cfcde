"""Training throughput of a KD step on Fashion-MNIST: the teacher run online vs read back from the
teacher-output cache, and the effect of bf16 autocast, channels_last and torch.compile.

    python tools/bench_train.py                  # writes bench/train_kd_cpu.json, prints a table
    python tools/bench_train.py --batches 40 --rounds 2   # quicker

Every variant is ``configs/kd/fmnist_kd.yaml`` (without augmentation, which a cache requires)
fitted for ``--batches`` steps; samples/s are counted after ``--warmup`` steps. Variants run
interleaved (A B C ... A B C ...) for ``--rounds`` rounds after one untimed round (compilation),
and the median is reported with its ratio to the online fp32 baseline. The teacher is the shipped
recipe's checkpoint (``make demo`` trains it).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import LearningRateMonitor
from torch.utils.flop_counter import FlopCounterMode

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchlib import machine_info  # noqa: E402
from mmkd.cli import lightning_cli, main as mmkd_main  # noqa: E402

CONFIG = str(ROOT / "configs/kd/fmnist_kd.yaml")
VARIANTS = {
    "online": [],
    "cached": ["--model.init_args.teacher_cache={cache}"],
    "online bf16": ["--trainer.precision=bf16-mixed"],
    "cached bf16": ["--model.init_args.teacher_cache={cache}", "--trainer.precision=bf16-mixed"],
    "online channels_last": ["--model.init_args.channels_last=true"],
    "online compile": ["--model.init_args.compile_model=true"],
}


class StepTimer(L.Callback):
    """Wall time from the start of step ``warmup`` to the end of the last step."""

    def __init__(self, warmup: int) -> None:
        self.warmup, self.started, self.steps = warmup, None, 0

    def on_train_batch_start(self, trainer, module, batch, batch_idx) -> None:
        if batch_idx == self.warmup:
            self.started = time.perf_counter()

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        if batch_idx >= self.warmup:
            self.steps += 1
            self.elapsed = time.perf_counter() - self.started


def fit_variant(overrides: list[str], batches: int, warmup: int, workdir: str) -> float:
    """Samples per second of one short fit."""
    cli = lightning_cli([
        "-c", CONFIG, "--data.init_args.augment=false", "--trainer.max_epochs=1",
        f"--trainer.limit_train_batches={batches}", "--trainer.limit_val_batches=0", "--trainer.logger=false",
        "--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false",
        f"--trainer.callbacks.init_args.dirpath={workdir}/ckpt", f"--trainer.default_root_dir={workdir}", *overrides,
    ], run=False)  # fmt: skip
    timer = StepTimer(warmup)
    # no logger here, so no learning-rate monitor either (it refuses to run without one)
    cli.trainer.callbacks = [c for c in cli.trainer.callbacks if not isinstance(c, LearningRateMonitor)] + [timer]
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    return timer.steps * cli.datamodule.batch_size / timer.elapsed


def flops(model: torch.nn.Module, batch: torch.Tensor) -> int:
    with FlopCounterMode(display=False) as counter:
        model(batch)
    return counter.get_total_flops()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batches", type=int, default=80, help="training steps per fit")
    parser.add_argument("--warmup", type=int, default=10, help="untimed steps at the start of each fit")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--workdir", default="runs/bench_train")
    parser.add_argument("--out", default="bench/train_kd_cpu.json")
    args = parser.parse_args()
    teacher = Path("runs/teachers/fmnist_resnet10t/last.ckpt")
    if not teacher.is_file():
        parser.error(f"{teacher} not found: train the teacher first (make demo, or mmkd fit -c configs/teachers/fmnist_resnet10t.yaml)")
    started, load_before = time.time(), os.getloadavg()

    cache = f"{args.workdir}/cache"
    build_start = time.perf_counter()
    mmkd_main(["cache", "-c", CONFIG, "--out", cache, "--overwrite", "--data.init_args.augment=false"])
    cache_seconds = time.perf_counter() - build_start

    probe = lightning_cli(["-c", CONFIG], run=False).model
    example = torch.zeros(128, 1, 28, 28)
    teacher_flops, student_flops = flops(probe.teacher.model, example), flops(probe.student, example)

    runs = {name: [o.format(cache=cache) for o in VARIANTS[name]] for name in args.variants}
    samples_per_second: dict[str, list[float]] = {name: [] for name in runs}
    for round_index in range(args.rounds + 1):  # round 0: untimed (torch.compile, caches, allocator)
        for name, overrides in runs.items():
            value = fit_variant(overrides, args.batches, args.warmup, args.workdir)
            print(f"round {round_index} {name}: {value:.0f} samples/s", flush=True)
            if round_index:
                samples_per_second[name].append(value)

    baseline = statistics.median(samples_per_second["online"]) if "online" in samples_per_second else None
    summary = {
        name: {"samples_per_second_median": statistics.median(values), "samples_per_second_all": values,
               "vs_online": statistics.median(values) / baseline if baseline else None}
        for name, values in samples_per_second.items()
    }  # fmt: skip
    record = {
        "benchmark": "KD training step on Fashion-MNIST (batch 128, no augmentation): samples/s",
        "command": "python " + " ".join(sys.argv),
        "teacher_flops_per_batch": teacher_flops, "student_flops_per_batch": student_flops,
        "teacher_to_student_flops": teacher_flops / student_flops,
        "cache_build_seconds": cache_seconds, "summary": summary,
        "machine": machine_info(load_before),
        "wall_seconds": time.time() - started,
    }  # fmt: skip
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(record, indent=2))
    print(f"\nteacher/student FLOPs: {teacher_flops / student_flops:.0f}x; cache built in {cache_seconds:.0f} s")
    print("\n| variant | samples/s (median) | vs online fp32 | epoch time vs online |")
    print("|---|---:|---:|---:|")
    for name, row in summary.items():
        ratio = row["vs_online"]
        print(f"| {name} | {row['samples_per_second_median']:.0f} | {ratio:.2f}x | {1 / ratio:.2f}x |")
    print(f"\nthreads {torch.get_num_threads()}, load average {load_before[0]:.2f} -> {os.getloadavg()[0]:.2f}; wrote {args.out}")


if __name__ == "__main__":
    main()
