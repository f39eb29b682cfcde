"""Shared by the benchmarks: what they record beside their figures (software, threads, load,
accelerator), and resumable fit-and-test runs."""

from __future__ import annotations

import json
import os
import platform
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def machine_info(load_before: tuple[float, float, float]) -> dict:
    """Platform, versions, thread count, CPUs (model and whether it has bf16 instructions), the GPU if
    any, and the load average before and after the run."""
    cpu, cpu_flags = None, []
    if Path("/proc/cpuinfo").is_file():
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name" and cpu is None:
                cpu = value.strip()
            elif key.strip() == "flags" and not cpu_flags:
                cpu_flags = value.split()
    return {
        "platform": platform.platform(), "python": platform.python_version(), "torch": torch.__version__,
        "threads": torch.get_num_threads(), "cpus": os.cpu_count(),
        "cpu": cpu, "cpu_bf16": "avx512_bf16" in cpu_flags or "amx_bf16" in cpu_flags,
        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        "loadavg_before": load_before, "loadavg_after": os.getloadavg(),
    }  # fmt: skip


def finished_checkpoint(run_dir: str, epochs: int | None) -> bool:
    """``run_dir/last.ckpt`` exists and holds the last epoch (not a run killed half-way)."""
    path = Path(run_dir) / "last.ckpt"
    if not path.is_file():
        return False
    return epochs is None or torch.load(path, map_location="cpu", weights_only=True)["epoch"] + 1 >= epochs


def run_once(config: str, run_dir: str, overrides: list[str], reuse: bool, epochs: int | None, test: bool = True) -> dict:
    """Fit and test once; the result is kept in ``run_dir/result.json`` with the command that made
    it, so that an interrupted benchmark starts again where it stopped, and a result of another
    command (other epochs, overrides or config) is never reported for this one."""
    from mmkd.experiment import evaluate_checkpoint, fit_and_test  # late: a benchmark sets its environment first

    result_file = Path(run_dir) / "result.json"
    command = {"config": config, "overrides": overrides, "test": test}
    if result_file.is_file():
        saved = json.loads(result_file.read_text())
        if saved.get("command") == command:
            return saved["result"]
        print(f"  ({result_file} holds the result of another command: running again)", flush=True)
    if reuse and test and finished_checkpoint(run_dir, epochs):
        print(f"  (testing the existing {run_dir}/last.ckpt)", flush=True)
        return evaluate_checkpoint(config, f"{run_dir}/last.ckpt", overrides)
    result = fit_and_test(config, overrides, test)
    result_file.write_text(json.dumps({"command": command, "result": result}, indent=2))
    return result


@dataclass(frozen=True)
class Run:
    """One fit-and-test of a benchmark; ``needs`` are the runs whose checkpoints it reads."""

    name: str
    config: str
    seed: int
    epochs: int | None
    extra: tuple[str, ...] = ()
    needs: tuple[str, ...] = ()


def _worker_init(threads: int) -> None:
    torch.set_num_threads(threads)


def execute_all(runs: dict[str, Run], execute: Callable[[str, Run, object], dict], args) -> dict[str, dict]:
    """``execute(key, run, args)`` for every run, ``args.jobs`` at a time in separate processes
    (each run as soon as the runs it needs are done), or one after the other with ``jobs=1``."""
    if args.jobs == 1:
        return {key: execute(key, run, args) for key, run in sorted(runs.items(), key=lambda item: len(item[1].needs))}
    import multiprocessing
    from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait

    results: dict[str, dict] = {}
    threads = max(1, (os.cpu_count() or 1) // args.jobs)
    with ProcessPoolExecutor(args.jobs, multiprocessing.get_context("spawn"), _worker_init, (threads,)) as pool:
        pending, running = dict(runs), {}
        while pending or running:
            for key in [k for k, run in pending.items() if all(need in results for need in run.needs)]:
                running[pool.submit(execute, key, pending.pop(key), args)] = key
            if not running:
                raise ValueError(f"runs waiting for runs that are not planned: {sorted(pending)}")
            done, _ = wait(running, return_when=FIRST_COMPLETED)
            for future in done:
                results[running.pop(future)] = future.result()
    return results


def add_run_arguments(parser, out: str | None, workdir: str | None) -> None:
    """The options every fit-and-test benchmark takes."""
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1])
    parser.add_argument("--precision", default=None, help="Lightning precision, e.g. bf16-mixed on a GPU")
    parser.add_argument("--override", action="append", default=[], help="extra CLI override for every run, e.g. --override=--trainer.limit_train_batches=5")
    parser.add_argument("--out", default=out)
    parser.add_argument("--workdir", default=workdir)
    parser.add_argument("--jobs", type=int, default=1, help="runs at a time, in separate processes (a many-core GPU machine)")


def shared_overrides(args) -> list[str]:
    """Overrides of every run: quiet, the precision and ``--override``s (:func:`seeded_run` puts the logs in
    the run's folder)."""
    shared = ["--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false"]
    if args.precision:
        shared.append(f"--trainer.precision={args.precision}")
    return shared + args.override


def seeded_run(label: str, config: str, run_dir: str, seed: int, epochs: int | None, overrides: list[str], test: bool = True) -> dict:
    """:func:`run_once` of ``config`` with the seed, the checkpoint folder and the epochs set."""
    # logs in the run's own folder: runs in parallel (--jobs) must not share a CSV logger version
    overrides = [*overrides, f"--seed_everything={seed}", f"--trainer.callbacks.init_args.dirpath={run_dir}",
                 f"--trainer.logger.init_args.save_dir={run_dir}/logs"]  # fmt: skip
    if epochs:
        overrides.append(f"--trainer.max_epochs={epochs}")
    print(f"[seed {seed}] {label}", flush=True)
    return {"seed": seed, **run_once(config, run_dir, overrides, reuse=False, epochs=epochs, test=test)}


def accuracy_summary(results: dict[str, list[dict]]) -> dict[str, dict]:
    """Per model: mean and per-seed test accuracy, the share of the teacher's accuracy, parameters,
    and the mean fit time (None when every run was a reused checkpoint, not fitted here)."""
    teacher = statistics.mean(r["test/acc"] for r in results["teacher"])
    summary = {}
    for name, runs in results.items():
        mean = statistics.mean(r["test/acc"] for r in runs)
        times = [r["fit_seconds"] for r in runs if "fit_seconds" in r]
        summary[name] = {
            "test_acc_mean": mean, "test_acc_per_seed": [r["test/acc"] for r in runs], "share_of_teacher": mean / teacher,
            "params": runs[0]["params"], "fit_seconds_mean": statistics.mean(times) if times else None,
        }  # fmt: skip
    return summary


def report(benchmark: str, results: dict[str, list[dict]], seeds: list[int], started: float, load_before: tuple,
           out: str, baseline: str, **extra: object) -> None:
    """Write the benchmark's JSON (summary, runs, ``extra`` records, command, machine, wall time)
    and print its summary as a Markdown table with the gain over ``baseline``."""
    summary = accuracy_summary(results)
    record = {
        "benchmark": benchmark, "command": "python " + " ".join(sys.argv), "seeds": seeds, "summary": summary,
        "runs": results, **extra, "machine": machine_info(load_before), "wall_seconds": time.time() - started,
    }  # fmt: skip
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    Path(out).write_text(json.dumps(record, indent=2))
    reference = summary[baseline]["test_acc_mean"]
    print(f"\n| model | params | test acc (mean of {len(seeds)} seeds) | per seed | vs {baseline} | share of teacher |")
    print("|---|---:|---:|---|---:|---:|")
    for name, row in summary.items():
        delta = "" if name in ("teacher", baseline) else f"{100 * (row['test_acc_mean'] - reference):+.2f} pt"
        per_seed = ", ".join(f"{100 * a:.2f}" for a in row["test_acc_per_seed"])
        print(f"| {name} | {row['params']:,} | {100 * row['test_acc_mean']:.2f} % | {per_seed} | {delta} | {100 * row['share_of_teacher']:.1f} % |")
    print(f"\nwrote {out}")
