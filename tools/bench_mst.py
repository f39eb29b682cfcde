"""Benchmark MST-Distill on AV-MNIST against plain KD, for an image student and an audio student.

    python tools/bench_mst.py                        # configs' schedules, seeds 0 1, both students
    python tools/bench_mst.py --seeds 0 --students image --epochs 2 --stage-epochs 1 1 1   # a quick look

Per seed (which also draws the 60/20/20 split, the pairing and the audio noise), all with the
Adam, batch and data of configs/mst/*.yaml:
  image_alone / audio_alone   each modality's network trained on the labels: the student alone,
                              and the cross-modal teacher of the other student
  fusion_teacher              the multimodal teacher, labels alone
  kd_from_mm / kd_from_cm     plain KD (T = 4) into the student from the fusion / cross-modal teacher
  mst                         MST-Distill, all three stages (its teachers are co-trained in stage 1;
                              their test accuracy is reported as mst_teacher_mm / mst_teacher_cm)
  mst_single_masks            (with --single-masks) MST-Distill with one mask per specialised teacher
The baselines train for as many epochs as the MST student does (stages 1 + 3). Each run keeps its
result in <workdir>/.../result.json, so an interrupted benchmark resumes.
"""

from __future__ import annotations

import argparse
import os
import time

from benchlib import Run, add_run_arguments, execute_all, report, seeded_run, shared_overrides

CONFIGS = "configs/mst"
OTHER = {"image": "audio", "audio": "image"}


def plan(args: argparse.Namespace, stage_epochs: list[int], epochs: int) -> dict[str, Run]:
    """Every run of the benchmark, keyed ``seed{N}/{name}`` (also its folder in the work dir)."""
    runs: dict[str, Run] = {}
    mst_stages = "--model.init_args.stage_epochs=[{},{},{}]".format(*stage_epochs)
    variants = {"mst": (), **({"mst_single_masks": ("--model.init_args.cumulative_masks=false",)} if args.single_masks else {})}
    for seed in args.seeds:
        for name in ("image_alone", "audio_alone", "fusion_teacher"):
            runs[f"seed{seed}/{name}"] = Run(name, name, seed, epochs)
        for student in args.students:
            for label, teacher, teacher_config in (("kd_from_mm", "fusion_teacher", "fusion"), ("kd_from_cm", f"{OTHER[student]}_alone", OTHER[student])):
                checkpoint = f"--model.init_args.teacher.init_args.checkpoint={args.workdir}/seed{seed}/{teacher}/last.ckpt"
                runs[f"seed{seed}/{student}_{label}"] = Run(f"{student}_{label}", f"kd_{student}_from_{teacher_config}", seed, epochs, (checkpoint,), (f"seed{seed}/{teacher}",))
            for label, extra in variants.items():
                config = "avmnist" if student == "image" else "avmnist_audio"
                runs[f"seed{seed}/{student}_{label}"] = Run(f"{student}_{label}", config, seed, None, (mst_stages, *extra))
    return runs


def execute(key: str, run: Run, args: argparse.Namespace) -> dict:
    overrides = [*shared_overrides(args), f"--data.init_args.seed={run.seed}", *run.extra]
    return seeded_run(run.name, f"{CONFIGS}/{run.config}.yaml", f"{args.workdir}/{key}", run.seed, run.epochs, overrides)




def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_run_arguments(parser, out="bench/mst_avmnist_{student}.json", workdir="runs/bench_mst")
    parser.add_argument("--students", nargs="+", choices=["image", "audio"], default=["image", "audio"])
    parser.add_argument("--stage-epochs", nargs=3, type=int, default=None, help="MST's three stages (default: the config's)")
    parser.add_argument("--epochs", type=int, default=None, help="the baselines (default: stage 1 + stage 3 epochs)")
    parser.add_argument("--single-masks", action="store_true", help="also MST with one mask per specialised teacher")
    args = parser.parse_args()
    stage_epochs = args.stage_epochs or _config_stage_epochs()
    epochs = args.epochs or stage_epochs[0] + stage_epochs[2]

    started, load_before = time.time(), os.getloadavg()
    done = execute_all(plan(args, stage_epochs, epochs), execute, args)
    for student in args.students:
        rows: dict[str, list[dict]] = {}
        for seed in args.seeds:
            run = {key.split("/")[1]: result for key, result in done.items() if key.startswith(f"seed{seed}/")}
            rows.setdefault("teacher", []).append(run["fusion_teacher"])
            rows.setdefault("crossmodal_teacher", []).append(run[f"{OTHER[student]}_alone"])
            rows.setdefault("student_alone", []).append(run[f"{student}_alone"])
            for label in ("kd_from_mm", "kd_from_cm", "mst", "mst_single_masks"):
                if f"{student}_{label}" in run:
                    rows.setdefault(label, []).append(run[f"{student}_{label}"])
            mst = run[f"{student}_mst"]
            for base, same_network in (("mm", run["fusion_teacher"]), ("cm", run[f"{OTHER[student]}_alone"])):
                co_trained = {**mst, "test/acc": mst[f"test/acc_{base}"], "params": same_network["params"]}
                rows.setdefault(f"mst_teacher_{base}", []).append(co_trained)
        report(f"MST-Distill on AV-MNIST, {student} student (test split; the MST student with the lowest val CE of stage 3)",
               rows, args.seeds, started, load_before, args.out.format(student=student), "student_alone",
               stage_epochs=stage_epochs, baseline_epochs=epochs, jobs=args.jobs)  # fmt: skip


def _config_stage_epochs() -> list[int]:
    import yaml

    with open(f"{CONFIGS}/avmnist.yaml") as f:
        return yaml.safe_load(f)["model"]["init_args"]["stage_epochs"]


if __name__ == "__main__":
    main()
