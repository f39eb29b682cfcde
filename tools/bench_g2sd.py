"""Benchmark G2SD on Fashion-MNIST: the MAE teacher, the small ViT alone, the specific stage
alone, and G2SD (generic + specific), on several seeds.

    python tools/bench_g2sd.py                                   # configs' schedules, seeds 0 1
    python tools/bench_g2sd.py --precision bf16-mixed            # on a GPU
    python tools/bench_g2sd.py --seeds 0 --mae-epochs 2 --generic-epochs 2 --epochs 2   # a quick look

The teacher (MAE pre-training, then fine-tuning) is trained once, with seed 0. For each seed the
three students share the data order, the augmentation (RandAugment, erasing, mixup/cutmix), the
optimiser, the lr schedule and the number of epochs of the specific stage
(configs/g2sd/specific.yaml):
  vit_alone      configs/g2sd/vit_alone.yaml: labels only
  specific_only  G2SD's specific stage from a random init (no layer decay: nothing to preserve)
  g2sd           the generic stage (configs/g2sd/generic.yaml), then the specific stage from it
With --ablate-augmentation, the ViT alone and G2SD also run without RandAugment and erasing
(vit_alone_no_randaug, g2sd_no_randaug): what the specific stage's augmentation does to each.
Each run keeps its result in <workdir>/.../result.json, so an interrupted benchmark resumes.
"""

from __future__ import annotations

import argparse
import os
import time

from benchlib import add_run_arguments, report, seeded_run, shared_overrides

CONFIGS = "configs/g2sd"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_run_arguments(parser, out="bench/g2sd_fmnist.json", workdir="runs/bench_g2sd")
    parser.add_argument("--mae-epochs", type=int, default=None, help="teacher MAE pre-training (default: the config's)")
    parser.add_argument("--teacher-epochs", type=int, default=None, help="teacher fine-tuning")
    parser.add_argument("--generic-epochs", type=int, default=None, help="G2SD generic stage")
    parser.add_argument("--epochs", type=int, default=None, help="the three students' supervised / specific stage")
    parser.add_argument("--ablate-augmentation", action="store_true",
                        help="also the ViT alone and G2SD without RandAugment and random erasing (mixup/cutmix kept)")  # fmt: skip
    args = parser.parse_args()
    work, shared = args.workdir, shared_overrides(args)

    def run(name: str, config: str, run_dir: str, seed: int, epochs: int | None, extra: list[str], test: bool = True) -> dict:
        overrides = [*shared, f"--data.init_args.seed={seed}", *extra]
        return seeded_run(name, f"{CONFIGS}/{config}", run_dir, seed, epochs, overrides, test)

    started, load_before = time.time(), os.getloadavg()
    mae = run("mae_pretrain", "mae_pretrain.yaml", f"{work}/mae", 0, args.mae_epochs, [], test=False)
    teacher = run("teacher", "teacher_finetune.yaml", f"{work}/teacher", 0, args.teacher_epochs,
                  [f"--model.init_args.model.init_args.checkpoint={work}/mae/last.ckpt"])  # fmt: skip
    teacher_arg = f"--model.init_args.teacher.init_args.checkpoint={work}/teacher/last.ckpt"
    results: dict[str, list[dict]] = {"teacher": [teacher]}
    generic: list[dict] = []
    for seed in args.seeds:
        seed_dir = f"{work}/seed{seed}"
        student_init = "--model.init_args.student.init_args.encoder_checkpoint"
        results.setdefault("vit_alone", []).append(run("vit_alone", "vit_alone.yaml", f"{seed_dir}/vit_alone", seed, args.epochs, []))
        results.setdefault("specific_only", []).append(
            run("specific_only", "specific.yaml", f"{seed_dir}/specific_only", seed, args.epochs,
                [teacher_arg, f"{student_init}=null", "--model.init_args.layer_decay=null", "--model.init_args.no_weight_decay_1d=true"])
        )  # fmt: skip
        generic.append(run("generic", "generic.yaml", f"{seed_dir}/generic", seed, args.generic_epochs,
                           [f"--model.init_args.teacher.init_args.checkpoint={work}/mae/last.ckpt",
                            f"--model.init_args.export_dir={seed_dir}/generic/export"], test=False))  # fmt: skip
        results.setdefault("g2sd", []).append(
            run("g2sd", "specific.yaml", f"{seed_dir}/g2sd", seed, args.epochs, [teacher_arg, f"{student_init}={seed_dir}/generic/last.ckpt"])
        )
        if args.ablate_augmentation:
            no_augment = ["--data.init_args.auto_augment=null", "--data.init_args.re_prob=0"]
            results.setdefault("vit_alone_no_randaug", []).append(
                run("vit_alone_no_randaug", "vit_alone.yaml", f"{seed_dir}/vit_alone_no_randaug", seed, args.epochs, no_augment))
            results.setdefault("g2sd_no_randaug", []).append(
                run("g2sd_no_randaug", "specific.yaml", f"{seed_dir}/g2sd_no_randaug", seed, args.epochs,
                    [teacher_arg, f"{student_init}={seed_dir}/generic/last.ckpt", *no_augment]))  # fmt: skip

    report("G2SD on Fashion-MNIST (test split, final weights)", results, args.seeds, started, load_before, args.out, "vit_alone",
           pretraining={"mae": mae, "generic": generic})

if __name__ == "__main__":
    main()
