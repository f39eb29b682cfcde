"""mmkd against torchdistill on the same KD job, measured interleaved in one run.

    python tools/bench_vs_torchdistill.py            # writes bench/vs_torchdistill.json, prints a table
    python tools/bench_vs_torchdistill.py --rounds 2 --steps 8   # quicker

The job, identical on both sides: a torchvision ResNet-18 teacher (weights saved to a file and
loaded by both; throughput does not depend on what they learnt) and torchdistill's CIFAR ResNet-20
student (``torchdistill.models.classification.resnet.resnet20``, the same module in both), Hinton
KD with T = 4 and alpha = 0.9 (torchdistill's ``KDLoss``; mmkd's ``KD`` with kd_weight 0.9 and
ce_weight 0.1), SGD lr 0.1, momentum 0.9, weight decay 5e-4, batch 128, on Fashion-MNIST
images written to a folder as PNGs and read back lazily by one DataLoader worker (torchvision
``ImageFolder`` with Resize(32), ToTensor, Normalize for torchdistill; ``ImageFilesDataModule``
at 32 px, bilinear, no crop, for mmkd), ``--threads`` torch threads (1 by default).

torchdistill comes from PyPI (``torchdistill==1.1.4``: 1.1.5 asks for torch >= 2.12, the pinned
stack is 2.11), installed by this script into its own virtual environment
(``runs/bench_envs/torchdistill``) whose ``.pth`` file points at this interpreter's packages, so
both sides run the same torch build. Its side is driven the way its example
``examples/torchvision/image_classification.py`` trains: ``get_distillation_box`` with the
sample KD config's ``train`` section, then ``forward_process`` and ``post_forward_process`` per
batch with ``loss.item()``. One difference is set on purpose: torchdistill never calls the
teacher's ``eval()`` (its pre-epoch process only sets the student to train mode), so its teacher
would normalise with batch statistics; the driver puts the teacher in eval mode, as mmkd does.

Variants, interleaved (torchdistill; mmkd with the teacher's BatchNorms left unfolded,
``Teacher(fold_batchnorm=False)``; mmkd as shipped, the frozen teacher's BatchNorms folded into
its convolutions on the first batch; mmkd channels_last; mmkd channels_last with bf16 autocast;
mmkd with the student compiled, ``compile_model``, with and without channels_last; then again) for ``--rounds`` timed rounds after one untimed round, each in a fresh process:
samples/s over ``--steps`` steps after ``--warmup`` steps (data loading included, start-up not),
its ratio to the torchdistill run of the same round (the median of those ratios is reported), and
the process's peak resident memory and wall time after its imports (start-up and compiling
included). The fold changes the teacher's arithmetic by float rounding
(1e-6 relative); only the bf16 variant changes it beyond that (torchdistill mixes precision only
through Hugging Face Accelerate).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tools"))

DATA = Path(os.environ.get("MMKD_DATA", ROOT.parent / "shared" / "data"))
TORCHDISTILL = "torchdistill==1.1.4"
MEAN, STD = [0.286] * 3, [0.353] * 3
TEMPERATURE, ALPHA, LR, MOMENTUM, WEIGHT_DECAY = 4.0, 0.9, 0.1, 0.9, 5e-4
VARIANTS = {
    "torchdistill": [],
    "mmkd, teacher unfolded": ["--model.init_args.teacher.init_args.fold_batchnorm=false"],
    "mmkd": [],
    "mmkd channels_last": ["--model.init_args.channels_last=true"],
    "mmkd channels_last bf16": ["--model.init_args.channels_last=true", "--trainer.precision=bf16-mixed"],
    "mmkd compile_model": ["--model.init_args.compile_model=true"],
    "mmkd channels_last compile": ["--model.init_args.channels_last=true", "--model.init_args.compile_model=true"],
}


def ensure_environment(env: Path) -> Path:
    """The torchdistill environment's interpreter, made on first use."""
    python = env / "bin" / "python"
    if not python.exists():
        print(f"creating {env} with {TORCHDISTILL} ...", flush=True)
        subprocess.run([sys.executable, "-m", "venv", str(env)], check=True)
        purelib = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                                 check=True, capture_output=True, text=True).stdout.strip()  # fmt: skip
        # this interpreter's packages (torch, torchvision, mmkd's dependencies) and the repository
        Path(purelib, "mmkd_environment.pth").write_text(f"{sysconfig.get_paths()['purelib']}\n{ROOT}\n")
    if subprocess.run([str(python), "-c", "import torchdistill"], capture_output=True).returncode:
        subprocess.run([str(python), "-m", "pip", "install", "-q", TORCHDISTILL], check=True)
    return python


def prepare(workdir: Path, images: int) -> tuple[Path, Path]:
    """The PNG folder and the teacher's weights file."""
    import image_files
    import torch
    import torchvision

    root = workdir / f"fmnist_png_{images}"
    if not (root / "train").is_dir():
        image_files.write_layout(root, DATA / "fashion-mnist", "folder", [images, 256, 0], fmt="png")
    weights = workdir / "resnet18.pth"
    if not weights.is_file():
        torch.manual_seed(0)
        torch.save(torchvision.models.resnet18(num_classes=10).state_dict(), weights)
    return root, weights


def images_needed(args: argparse.Namespace) -> int:
    return 128 * (args.warmup + args.steps + 1)


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run_torchdistill(args: argparse.Namespace, root: Path, weights: Path) -> dict:
    import torch
    import torchvision
    from torch.utils.data import RandomSampler
    from torchdistill.core.distillation import get_distillation_box
    from torchdistill.models.classification.resnet import resnet20
    from torchvision import transforms

    torch.manual_seed(0)
    teacher = torchvision.models.resnet18(num_classes=10)
    teacher.load_state_dict(torch.load(weights, map_location="cpu", weights_only=True))
    student = resnet20(num_classes=10)
    transform = transforms.Compose([transforms.Resize(32), transforms.ToTensor(), transforms.Normalize(MEAN, STD)])
    datasets = {"train": torchvision.datasets.ImageFolder(str(root / "train"), transform),
                "val": torchvision.datasets.ImageFolder(str(root / "val"), transform)}  # fmt: skip
    loader = {"sampler": {"class_or_func": RandomSampler, "kwargs": None},
              "kwargs": {"batch_size": 128, "num_workers": 1, "pin_memory": False, "drop_last": False}}  # fmt: skip
    train_config = {  # the sample KD config's train section (configs/sample/cifar10/kd/*.yaml), CPU
        "log_freq": 1000, "num_epochs": 1,
        "train_data_loader": {"dataset_id": "train", **loader}, "val_data_loader": {"dataset_id": "val", **loader},
        "teacher": {"forward_proc": "forward_batch_only", "sequential": [], "requires_grad": False, "frozen_modules": []},
        "student": {"forward_proc": "forward_batch_only", "adaptations": None, "sequential": [], "requires_grad": True, "frozen_modules": []},
        "optimizer": {"key": "SGD", "kwargs": {"lr": LR, "momentum": MOMENTUM, "weight_decay": WEIGHT_DECAY}},
        "scheduler": {"key": "MultiStepLR", "kwargs": {"milestones": [91, 136], "gamma": 0.1}},
        "criterion": {"key": "WeightedSumLoss", "kwargs": {"sub_terms": {"kd": {"weight": 1.0, "criterion": {"key": "KDLoss", "kwargs": {
            "student_module_path": ".", "student_module_io": "output", "teacher_module_path": ".", "teacher_module_io": "output",
            "temperature": TEMPERATURE, "alpha": ALPHA, "reduction": "batchmean"}}}}}},
    }  # fmt: skip
    box = get_distillation_box(teacher, student, datasets, train_config, torch.device("cpu"), None, False, 1)
    box.pre_epoch_process(epoch=0)
    box.teacher_model.eval()  # see the module docstring
    started, steps = None, 0
    for index, (images, targets, supp) in enumerate(box.train_data_loader):
        if index == args.warmup:
            started = time.perf_counter()
        loss = box.forward_process(images, targets, supp)
        box.post_forward_process(loss=loss)
        loss.item()
        if index >= args.warmup:
            steps += 1
            if steps == args.steps:
                break
    elapsed = time.perf_counter() - started
    return {"samples_per_second": steps * 128 / elapsed, "steps": steps}


def mmkd_config(workdir: Path, root: Path, weights: Path) -> Path:
    import yaml

    config = {
        "seed_everything": 0,
        "trainer": {"max_epochs": 1, "limit_val_batches": 0, "logger": False, "enable_checkpointing": False,
                    "enable_progress_bar": False, "enable_model_summary": False},
        "model": {"class_path": "mmkd.distillers.KD", "init_args": {
            "student": {"class_path": "mmkd.models.imported_model", "init_args": {
                "builder": "torchdistill.models.classification.resnet.resnet20", "model_args": {"num_classes": 10}}},
            "teacher": {"class_path": "mmkd.core.Teacher", "init_args": {
                "model": {"class_path": "mmkd.models.torchvision_model", "init_args": {"name": "resnet18", "num_classes": 10}},
                "checkpoint": str(weights)}},
            "temperature": TEMPERATURE, "kd_weight": ALPHA, "ce_weight": round(1 - ALPHA, 6), "num_classes": 10,
            "optimizer": {"class_path": "torch.optim.SGD", "init_args": {"lr": LR, "momentum": MOMENTUM, "weight_decay": WEIGHT_DECAY}},
            "lr_scheduler": {"class_path": "torch.optim.lr_scheduler.MultiStepLR", "init_args": {"milestones": [91, 136], "gamma": 0.1}}}},
        "data": {"class_path": "mmkd.data.ImageFilesDataModule", "init_args": {
            "root": str(root), "batch_size": 128, "num_workers": 1, "image_size": 32, "channels": 3, "interpolation": "bilinear",
            "crop_pct": 1.0, "mean": MEAN, "std": STD, "augment": False}},
    }  # fmt: skip
    path = workdir / "mmkd_kd.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def run_mmkd(args: argparse.Namespace, root: Path, weights: Path, overrides: list[str]) -> dict:
    from bench_train import StepTimer
    from mmkd.cli import lightning_cli

    config = mmkd_config(Path(args.workdir), root, weights)
    cli = lightning_cli(["-c", str(config), f"--trainer.max_steps={args.warmup + args.steps}", *overrides], run=False)
    timer = StepTimer(args.warmup)
    cli.trainer.callbacks.append(timer)
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    return {"samples_per_second": timer.steps * 128 / timer.elapsed, "steps": timer.steps}


def worker(args: argparse.Namespace) -> None:
    import torch

    started = time.perf_counter()
    torch.set_num_threads(args.threads)
    root, weights = prepare(Path(args.workdir), images_needed(args))
    if args.worker == "torchdistill":
        result = run_torchdistill(args, root, weights)
    else:
        result = run_mmkd(args, root, weights, VARIANTS[args.worker])
    # the whole process after its imports: start-up and, with compile_model, compiling
    result.update(peak_rss_mib=peak_rss_mib(), threads=torch.get_num_threads(), run_seconds=time.perf_counter() - started)
    print("RESULT " + json.dumps(result), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=12, help="timed steps per run")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--env", default="runs/bench_envs/torchdistill")
    parser.add_argument("--workdir", default="runs/bench_vs_torchdistill")
    parser.add_argument("--out", default="bench/vs_torchdistill.json")
    parser.add_argument("--worker", choices=list(VARIANTS), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(args)

    import torch
    from benchlib import machine_info

    started, load_before = time.time(), os.getloadavg()
    workdir = Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    python = ensure_environment(Path(args.env))
    prepare(workdir, images_needed(args))
    common = ["--steps", str(args.steps), "--warmup", str(args.warmup), "--threads", str(args.threads), "--workdir", str(workdir)]
    runs: dict[str, list[dict]] = {name: [] for name in VARIANTS}
    for round_index in range(args.rounds + 1):  # round 0 untimed
        for name in VARIANTS:
            done = subprocess.run([str(python), __file__, "--worker", name, *common], capture_output=True, text=True)
            lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
            if done.returncode or not lines:
                sys.exit(f"{name} failed (exit {done.returncode}):\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
            result = json.loads(lines[-1][len("RESULT ") :])
            print(f"round {round_index} {name}: {result['samples_per_second']:.1f} samples/s, peak RSS {result['peak_rss_mib']:.0f} MiB, "
                  f"run {result['run_seconds']:.0f} s", flush=True)
            if round_index:
                runs[name].append(result)
    baseline = [r["samples_per_second"] for r in runs["torchdistill"]]
    summary = {}
    for name, results in runs.items():
        rates = [r["samples_per_second"] for r in results]
        # each run against the torchdistill run of its own round: the machine's drift cancels
        ratios = [rate / base for rate, base in zip(rates, baseline)]
        summary[name] = {"samples_per_second_median": statistics.median(rates), "samples_per_second_all": rates,
                         "vs_torchdistill_per_round": ratios, "vs_torchdistill": statistics.median(ratios),
                         "peak_rss_mib_median": statistics.median(r["peak_rss_mib"] for r in results),
                         "run_seconds_median": statistics.median(r["run_seconds"] for r in results), "threads": results[0]["threads"]}  # fmt: skip
    print(f"\n{'variant':<26}{'samples/s':>10}{'vs torchdistill':>17}  {'per round':<20}{'peak RSS MiB':>12}")
    for name, row in summary.items():
        rounds = " ".join(f"{r:.2f}" for r in row["vs_torchdistill_per_round"])
        print(f"{name:<26}{row['samples_per_second_median']:>10.1f}{row['vs_torchdistill']:>16.2f}x  {rounds:<20}{row['peak_rss_mib_median']:>12.0f}")
    torch.set_num_threads(args.threads)
    record = {"benchmark": "mmkd vs torchdistill, KD ResNet-18 -> ResNet-20 at 32 px, batch 128", "command": "python " + " ".join(sys.argv),
              "torchdistill": TORCHDISTILL, "summary": summary, "machine": machine_info(load_before), "wall_seconds": time.time() - started}  # fmt: skip
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(record, indent=2))


if __name__ == "__main__":
    main()
