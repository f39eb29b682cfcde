"""The README's quick start (`make demo`): on real Fashion-MNIST, train a teacher, train the
small student alone, distil the student from the teacher with KD, and print the three test
accuracies. Every step is the shipped config run through the same code as `mmkd fit`:

    mmkd fit -c configs/teachers/fmnist_resnet10t.yaml
    mmkd fit -c configs/kd/fmnist_student_alone.yaml
    mmkd fit -c configs/kd/fmnist_kd.yaml

Outputs go to runs/ under the current directory. A teacher already at
runs/teachers/fmnist_resnet10t/last.ckpt is reused (--retrain-teacher to train it again).
Loss curves: runs/logs/*/version_*/metrics.csv. --out FILE also writes the table as JSON (the
README's numbers: --retrain-teacher --out bench/quickstart.json).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from mmkd.experiment import evaluate_checkpoint, fit_and_test  # noqa: E402

sys.path.insert(0, str(ROOT / "tools"))
from benchlib import finished_checkpoint, machine_info  # noqa: E402

TEACHER_CONFIG = str(ROOT / "configs/teachers/fmnist_resnet10t.yaml")
ALONE_CONFIG = str(ROOT / "configs/kd/fmnist_student_alone.yaml")
KD_CONFIG = str(ROOT / "configs/kd/fmnist_kd.yaml")
TEACHER_CKPT = "runs/teachers/fmnist_resnet10t/last.ckpt"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--retrain-teacher", action="store_true")
    parser.add_argument("--teacher-epochs", type=int, default=None, help="default: the teacher config's")
    parser.add_argument("--student-epochs", type=int, default=None, help="default: the student configs'")
    parser.add_argument("--limit-train-batches", type=float, default=None, help="for a smoke run")
    parser.add_argument("--out", default=None, help="also write the results as JSON here")
    args = parser.parse_args()

    common = ["--trainer.enable_model_summary=false"]
    if args.limit_train_batches:
        common.append(f"--trainer.limit_train_batches={args.limit_train_batches:g}")
    started, load_before = time.perf_counter(), os.getloadavg()
    rows = []
    teacher_epochs = args.teacher_epochs or yaml.safe_load(Path(TEACHER_CONFIG).read_text())["trainer"]["max_epochs"]
    if Path(TEACHER_CKPT).is_file() and not finished_checkpoint(str(Path(TEACHER_CKPT).parent), teacher_epochs):
        print(f"== {TEACHER_CKPT} is from an unfinished run (fewer than {teacher_epochs} epochs): training the teacher again", flush=True)
    if args.retrain_teacher or not finished_checkpoint(str(Path(TEACHER_CKPT).parent), teacher_epochs):
        print("== 1/3 training the teacher (configs/teachers/fmnist_resnet10t.yaml)", flush=True)
        epochs = [f"--trainer.max_epochs={args.teacher_epochs}"] if args.teacher_epochs else []
        teacher = fit_and_test(TEACHER_CONFIG, common + epochs)
    else:
        print(f"== 1/3 reusing the teacher at {TEACHER_CKPT} (--retrain-teacher to train it again)", flush=True)
        teacher = evaluate_checkpoint(TEACHER_CONFIG, TEACHER_CKPT, common)
    rows.append(("teacher (ResNet-10-T, 1/2 width)", teacher))

    epochs = [f"--trainer.max_epochs={args.student_epochs}"] if args.student_epochs else []
    print("== 2/3 training the student alone (configs/kd/fmnist_student_alone.yaml)", flush=True)
    rows.append(("student alone (ResNet-10-T, 1/8 width)", fit_and_test(ALONE_CONFIG, common + epochs)))
    print("== 3/3 distilling the student with KD (configs/kd/fmnist_kd.yaml)", flush=True)
    rows.append(("student + KD (T=4)", fit_and_test(KD_CONFIG, common + epochs)))

    print("\nFashion-MNIST test accuracy (10,000 official test images)\n")
    print(f"| {'model':<40} | {'params':>9} | {'test acc':>8} |")
    print(f"|{'-' * 42}|{'-' * 11}|{'-' * 10}|")
    for name, metrics in rows:
        print(f"| {name:<40} | {metrics['params']:>9,} | {100 * metrics['test/acc']:>7.2f}% |")
    gain = 100 * (rows[2][1]["test/acc"] - rows[1][1]["test/acc"])
    seconds = time.perf_counter() - started
    print(f"\nKD vs student alone: {gain:+.2f} points; total time {seconds:.0f} s")
    if args.out:
        results = {name: {key: metrics[key] for key in ("params", "test/acc")} for name, metrics in rows}
        record = {"benchmark": "make demo: Fashion-MNIST test accuracy", "command": "python " + " ".join(sys.argv),
                  "results": results, "kd_gain_points": gain, "wall_seconds": seconds, "machine": machine_info(load_before)}  # fmt: skip
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(record, indent=2) + "\n")
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
