"""Benchmark DHO on Fashion-MNIST with 1 % and 10 % of the labels: the CLIP teacher's zero-shot
accuracy, the student trained on the labels alone, single-head KD, and DHO with the fixed
(alpha, beta) = (0.5, 0.5) and with (alpha, beta) searched on the validation split.

    python tools/bench_dho.py                          # configs' schedules, seeds 0 1, 1 % and 10 %
    python tools/bench_dho.py --seeds 0 --fractions 0.01 --epochs 1 --clip-epochs 1   # a quick look

The teacher (configs/dho/clip_fmnist.yaml, contrastive training with captions) is trained once,
with seed 0. For each labelled fraction and seed the students share the split, the data order and
the schedule of configs/dho/fmnist.yaml:
  ce_only      the CE head on the labelled images alone (kd_weight=0)
  single_head  CE + KD (labelled and unlabelled) on one head
  dho_fixed    DHO, heads mixed with alpha = beta = 0.5 (the ImageNet script)
  dho_search   the same run, (alpha, beta) picked on the validation split (the k-shot scripts)
  dho_plain_kd_head   (with --plain-kd-head) DHO with a linear KD head on the raw features
Each run keeps its result in <workdir>/.../result.json, so an interrupted benchmark resumes.
"""

from __future__ import annotations

import argparse
import os
import time

from benchlib import add_run_arguments, report, seeded_run, shared_overrides

CONFIGS = "configs/dho"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_run_arguments(parser, out="bench/dho_fmnist_{percent}pct.json", workdir="runs/bench_dho")
    parser.add_argument("--fractions", nargs="+", type=float, default=[0.01, 0.1])
    parser.add_argument("--clip-epochs", type=int, default=None, help="teacher CLIP training (default: the config's)")
    parser.add_argument("--epochs", type=int, default=None, help="the students (default: the config's)")
    parser.add_argument("--plain-kd-head", action="store_true", help="also DHO with a plain linear KD head (kd_normalize=false)")
    args = parser.parse_args()
    work, shared = args.workdir, shared_overrides(args)

    def run(name: str, config: str, run_dir: str, seed: int, epochs: int | None, extra: list[str]) -> dict:
        return seeded_run(name, f"{CONFIGS}/{config}", run_dir, seed, epochs, [*shared, *extra])

    started, load_before = time.time(), os.getloadavg()
    clip_weights = f"{work}/clip_fmnist.safetensors"
    teacher = run("teacher (CLIP, zero-shot)", "clip_fmnist.yaml", f"{work}/clip", 0, args.clip_epochs,
                  ["--data.init_args.seed=0", f"--model.init_args.export_path={clip_weights}"])  # fmt: skip
    students = {
        "ce_only": ["--model.init_args.kd_weight=0"],
        "single_head": ["--model.init_args.single_head=true"],
        "dho_search": ["--model.init_args.mix=search"],
    }
    if args.plain_kd_head:  # the few-shot scripts' KD head, on the raw features
        students["dho_plain_kd_head"] = ["--model.init_args.mix=search", "--model.init_args.student.init_args.kd_normalize=false"]
    for fraction in args.fractions:
        percent = f"{100 * fraction:g}"
        results: dict[str, list[dict]] = {"teacher": [teacher]}
        for seed in args.seeds:
            for name, extra in students.items():
                overrides = [f"--data.init_args.data.init_args.seed={seed}", f"--data.init_args.labeled_fraction={fraction}",
                             f"--model.init_args.teacher.init_args.model.init_args.pretrained={clip_weights}", *extra]  # fmt: skip
                result = run(f"{percent} % labels: {name}", "fmnist.yaml", f"{work}/{percent}pct/seed{seed}/{name}", seed, args.epochs, overrides)
                if name == "dho_search":  # the same weights with the configured (alpha, beta)
                    results.setdefault("dho_fixed", []).append({**result, "test/acc": result["test/acc_fixed_mix"]})
                results.setdefault(name, []).append(result)
        report(f"DHO on Fashion-MNIST, {percent} % labels (test split, final weights)", results, args.seeds, started,
               load_before, args.out.format(percent=percent), "ce_only", labeled_fraction=fraction)  # fmt: skip


if __name__ == "__main__":
    main()
