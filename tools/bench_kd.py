"""Benchmark the classic distillers on Fashion-MNIST: teacher, student alone, and the student
with KD, DKD and FitNets (optionally AT, RKD), several seeds each.

    python tools/bench_kd.py                       # writes bench/kd_fmnist.json and prints a table
    python tools/bench_kd.py --methods kd at rkd --seeds 0 --epochs 2   # a quicker look

The teacher is trained once per seed from configs/teachers/fmnist_resnet10t.yaml (seed s teaches
the students of seed s); every student recipe in configs/kd/ runs with the same schedule and
data order for a given seed, so the differences come from the distillation terms alone.
"""

from __future__ import annotations

import argparse
import os
import time

from benchlib import report, run_once

RECIPES = {
    "student_alone": "configs/kd/fmnist_student_alone.yaml",
    "kd": "configs/kd/fmnist_kd.yaml",
    "dkd": "configs/kd/fmnist_dkd.yaml",
    "fitnets": "configs/kd/fmnist_fitnets.yaml",
    "at": "configs/kd/fmnist_at.yaml",
    "rkd": "configs/kd/fmnist_rkd.yaml",
}


TEACHER_RECIPE = "configs/teachers/fmnist_resnet10t.yaml"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--methods", nargs="+", default=["kd", "dkd", "fitnets"], choices=[m for m in RECIPES if m != "student_alone"])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1])
    parser.add_argument("--epochs", type=int, default=None, help="student epochs (default: the configs')")
    parser.add_argument("--teacher-epochs", type=int, default=None)
    parser.add_argument("--out", default="bench/kd_fmnist.json")
    parser.add_argument("--workdir", default="runs/bench_kd")
    parser.add_argument("--reuse", action="store_true",
                        help="test the final checkpoint of a run that has one instead of training it again "
                             "(a run's result.json, written when it finishes, is always reused)")  # fmt: skip
    args = parser.parse_args()

    results: dict[str, list[dict]] = {}
    started, load_before = time.time(), os.getloadavg()
    for seed in args.seeds:
        seed_dir = f"{args.workdir}/seed{seed}"
        teacher_ckpt = f"{seed_dir}/teacher/last.ckpt"
        common = [f"--seed_everything={seed}", f"--data.init_args.seed={seed}", "--trainer.enable_progress_bar=false",
                  f"--trainer.logger.init_args.save_dir={seed_dir}/logs"]  # fmt: skip
        runs = [("teacher", TEACHER_RECIPE, args.teacher_epochs), *((m, RECIPES[m], args.epochs) for m in ["student_alone", *args.methods])]
        for name, config, epochs in runs:
            overrides = [*common, f"--trainer.callbacks.init_args.dirpath={seed_dir}/{name}"]
            if name not in ("teacher", "student_alone"):
                overrides.append(f"--model.init_args.teacher.init_args.checkpoint={teacher_ckpt}")
            if epochs:
                overrides.append(f"--trainer.max_epochs={epochs}")
            print(f"[seed {seed}] {name}", flush=True)
            results.setdefault(name, []).append({"seed": seed, **run_once(config, f"{seed_dir}/{name}", overrides, args.reuse, epochs)})

    report("classic KD on Fashion-MNIST (test split, final weights)", results, args.seeds, started, load_before, args.out, "student_alone")

if __name__ == "__main__":
    main()
