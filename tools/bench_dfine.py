"""D-FINE's ablation on composed Fashion-MNIST detection scenes: the direct box regression
baseline, +FDR, and +FDR+GO-LSD (the paper's 53.0 -> 53.8 -> 54.5 AP on COCO), same schedule.

    python tools/bench_dfine.py                       # the README's table: CPU-scale config, seeds 0 1
    python tools/bench_dfine.py --config configs/dfine/fmnist_det.yaml --jobs 6   # the full recipe, six runs at once (a GPU)
    python tools/bench_dfine.py --seeds 0 --epochs 1  # a quick look
    python tools/bench_dfine.py --seeds 0 --variants fdr_golsd fdr_golsd_no_cdn --out bench/dfine_cdn.json   # with and without CDN (31 min)

The data set is composed first when --data does not hold it (tools/compose_detection.py, its
default sizes and seed 0); the seed of a run is its training seed. Each run keeps its result in
<workdir>/.../result.json, so an interrupted benchmark resumes; the work folder (default
runs/bench_dfine/<config name>) and the JSON (bench/dfine_<config name>.json) are the config's own.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

from benchlib import Run, add_run_arguments, execute_all, machine_info, seeded_run, shared_overrides

VARIANTS = {
    "baseline": ("--model.init_args.model.init_args.box_head=direct", "--model.init_args.go_lsd=false"),
    "fdr": ("--model.init_args.go_lsd=false",),
    "fdr_golsd": (),
    # the full method without contrastive denoising (the detector's num_denoising 0): what CDN adds
    "fdr_golsd_no_cdn": ("--model.init_args.model.init_args.num_denoising=0",),
}
DEFAULT_VARIANTS = ["baseline", "fdr", "fdr_golsd"]
METRICS = ["test/map", "test/map_50", "test/map_75", "test/map_small", "test/map_medium", "test/map_large"]


def execute(key: str, run: Run, args: argparse.Namespace) -> dict:
    overrides = [*shared_overrides(args), f"--data.init_args.root={args.data}", *run.extra]
    return seeded_run(run.name, run.config, f"{args.workdir}/{key}", run.seed, run.epochs, overrides)


def val_map_curve(run_dir: str) -> list[float]:
    """The run's validation mAP after each epoch, from its CSV log (the newest, if it ran again)."""
    import csv

    log = max(Path(run_dir).glob("logs/*/version_*/metrics.csv"), key=lambda path: path.stat().st_mtime)
    with log.open() as f:
        return [float(row["val/map"]) for row in csv.DictReader(f) if row.get("val/map")]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_run_arguments(parser, out=None, workdir=None)  # default: named after the config (results of one config are never reused for another)
    parser.add_argument("--data", default="runs/data/fmnist-det", help="the composed set (built here when missing)")
    parser.add_argument("--config", default="configs/dfine/fmnist_det_small.yaml", help="the +FDR+GO-LSD recipe; the other rows override it")
    parser.add_argument("--epochs", type=int, default=None, help="default: the config's")
    parser.add_argument("--variants", nargs="+", choices=sorted(VARIANTS), default=DEFAULT_VARIANTS, help="rows, run in this order per seed")
    args = parser.parse_args()
    stem = Path(args.config).stem
    args.out, args.workdir = args.out or f"bench/dfine_{stem}.json", args.workdir or f"runs/bench_dfine/{stem}"
    if not (Path(args.data) / "train" / "instances.json").is_file():
        import compose_detection

        from mmkd.data.common import default_data_root

        fmnist = default_data_root() / "fashion-mnist"
        compose_detection.compose(Path(args.data), fmnist, compose_detection.DEFAULT_SIZES, progress=True)

    started, load_before = time.time(), os.getloadavg()
    runs = {f"seed{seed}/{name}": Run(name, args.config, seed, args.epochs, extra) for seed in args.seeds for name, extra in
            ((name, VARIANTS[name]) for name in args.variants)}
    done = execute_all(runs, execute, args)
    summary = {}
    for name in args.variants:
        per_seed = [done[f"seed{seed}/{name}"] for seed in args.seeds]
        summary[name] = {metric: statistics.mean(r[metric] for r in per_seed) for metric in METRICS}
        summary[name] |= {"test/map_per_seed": [r["test/map"] for r in per_seed], "fit_seconds_mean": statistics.mean(r["fit_seconds"] for r in per_seed),
                          "val/map_by_epoch_per_seed": [val_map_curve(f"{args.workdir}/seed{seed}/{name}") for seed in args.seeds]}
    record = {
        "benchmark": "D-FINE ablation on composed Fashion-MNIST scenes (test split, COCO mAP, final weights)",
        "command": "python " + " ".join(sys.argv), "config": args.config, "seeds": args.seeds, "summary": summary, "runs": done,
        "machine": machine_info(load_before), "wall_seconds": time.time() - started,
    }  # fmt: skip
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(record, indent=2))
    print(f"\n| variant | AP (mean of {len(args.seeds)} seeds) | per seed | AP50 | AP75 | AP small | AP medium | AP large |")
    print("|---|---:|---|---:|---:|---:|---:|---:|")
    for name, row in summary.items():
        per_seed = ", ".join(f"{100 * v:.1f}" for v in row["test/map_per_seed"])
        cells = " | ".join(f"{100 * row[m]:.1f}" if row[m] >= 0 else "n/a" for m in METRICS[1:])  # -1: no such objects
        print(f"| {name} | {100 * row['test/map']:.1f} | {per_seed} | {cells} |")
    print("\nvalidation mAP by epoch (mean of the seeds):")
    for name, row in summary.items():
        print(f"  {name:10s} " + " ".join(f"{100 * statistics.mean(epoch):5.1f}" for epoch in zip(*row["val/map_by_epoch_per_seed"])))
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
