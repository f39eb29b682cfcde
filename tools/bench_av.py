"""Audio-visual data from files: mmkd's AudioVisualFilesDataModule against the in-memory AV-MNIST
(issue 20, "Evidence").

    python tools/bench_av.py --part throughput   # ~4 min on 2 cores -> bench/av_throughput.json
    python tools/bench_av.py --quick             # ~1 min, fewer clips -> runs/bench_av/av_throughput_quick.json
    python tools/bench_av.py --part mst          # ~1 h on 2 cores -> bench/mst_avmnist_audio_clips.json

**MST through clips** (``--part mst``): per seed, the AV-MNIST pairs of ``AVMNISTDataModule(seed)``
(the same split, the same image-recording pairing, the same PCA-degraded digits, clipped to
[0, 1] and stored as 8-bit frames) are muxed into one clip per pair, the degraded digit as its one
frame (1 s at 1 fps, FFV1) and the pair's clean recording as its sound track (FLAC), in
``<split>/<digit>/<n>.mkv``. Then MST-Distill's audio student is trained twice, interleaved
(files, memory, files, memory, ...): ``configs/mst/av_pairs.yaml`` on the clips (0 dB white noise
mixed in by the data module, one draw per sample as AV-MNIST: ``noise_per_epoch=false``; the
normalisation computed from 512 training clips) and ``configs/mst/avmnist_audio.yaml`` in memory,
with the configs' schedule (stages 20, 5, 20). What differs is the noise draw, the 8-bit images
and the estimate of the statistics; the accuracies should agree within the seed-to-seed spread.

Clips are muxed here, with PyAV, from the MNIST digits and the spoken-digit recordings of
``../shared/data`` (each clip: different images of one digit as its frames, a recording of that
digit as its sound track), in two kinds:

* ``avmnist``: the AV-MNIST sample as a clip, 28x28 grey frames at 4 fps for 1 s, FFV1 + FLAC in
  Matroska, read as one frame (``[1, 28, 28]``) and a 32-band log-mel of 1 s at 8 kHz (what
  ``configs/mst/av_pairs.yaml`` trains on, from clips instead of PNG + WAV pairs);
* ``video``: camera-like clips, 3 s of 224x224 RGB at 25 fps in H.264 (yuv420p) + AAC at 16 kHz
  in MP4 (the digits upscaled), read as 8 frames of 112x112 RGB (``[3, 8, 112, 112]``, uniform
  segment sampling over a centred 2-s window) and a 64-band log-mel of the same window.

Each kind's training loader (shuffled, batch 32, random window start and frame sampling) is run
for one epoch per DataLoader setting (``num_workers`` 0, 1, 2; 0 is one process doing
everything), in rounds (0 1 2, 0 1 2, ...); in each epoch the first two waves of batches (2 x
max(1, workers): worker start-up, first reads) are left out of the timing. Reported: clips/s,
the median over rounds, and each round's ratio to workers 0. The main process runs ``--threads``
torch threads (default 1, as the workers); thread count and load average are recorded: on a
shared machine compare the ratios within a round, not absolute numbers across runs.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import soundfile as sf
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchlib import machine_info  # noqa: E402

from mmkd.data import AudioVisualFilesDataModule  # noqa: E402
from mmkd.data.av_files import write_clip  # noqa: E402
from mmkd.data.idx import read_idx  # noqa: E402

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
KINDS = {
    "avmnist": {"frames": 1, "image_size": 28, "channels": 1, "sample_rate": 8000, "duration": 1.0, "n_mels": 32},
    "video": {"frames": 8, "image_size": 112, "channels": 3, "sample_rate": 16000, "duration": 2.0, "n_mels": 64, "n_fft": 1024,
              "hop_length": 512, "clip_start": "random", "frame_sampling": "random"},
}  # fmt: skip


def write_clips(root: Path, kind: str, count: int) -> None:
    """``count`` clips of ``kind`` under ``root/train/<digit>/``."""
    images = read_idx(DATA / "mnist-10k" / "images-idx3-ubyte.gz")
    labels = read_idx(DATA / "mnist-10k" / "labels-idx1-ubyte.gz")
    recordings = sorted((DATA / "fsdd" / "recordings").glob("*.wav"))
    for n in range(count):
        digit = n % 10
        pictures = images[labels == digit][(n // 10) * 4 :][:4]
        samples, rate = sf.read([p for p in recordings if p.name.startswith(f"{digit}_")][n // 10], dtype="float32")
        folder = root / "train" / str(digit)
        folder.mkdir(parents=True, exist_ok=True)
        if kind == "avmnist":
            write_clip(folder / f"{n}.mkv", list(pictures), 4, samples, rate, "ffv1", "flac")
        else:
            big = [np.asarray(Image.fromarray(p).resize((224, 224), Image.BILINEAR).convert("RGB")) for p in pictures]
            frames = [big[i * 4 // 75] for i in range(75)]  # 3 s at 25 fps
            sound = np.resize(np.interp(np.arange(0, len(samples), rate / 16000), np.arange(len(samples)), samples), 48000).astype(np.float32)
            write_clip(folder / f"{n}.mp4", frames, 25, sound, 16000)


def export_avmnist_clips(root: Path, seed: int) -> None:
    """The pairs of AV-MNIST's seed-``seed`` splits as clips (see the module docstring)."""
    from mmkd.data import AVMNISTDataModule
    from mmkd.data.audio_visual import pca_degrade

    dm = AVMNISTDataModule(root=str(DATA), seed=seed, noise_snr_db=None)
    dm.setup()
    images = torch.from_numpy(read_idx(DATA / "mnist-10k" / "images-idx3-ubyte.gz").copy()).float().div_(255.0).flatten(1)
    degraded = pca_degrade(images[dm.image_ids["train"]], images, dm.image_energy).clamp_(0, 1).mul_(255).round_().to(torch.uint8).view(-1, 28, 28)
    for split, dataset in dm.splits.items():
        for n, (image_id, recording, label) in enumerate(zip(dm.image_ids[split].tolist(), dm.recording_ids[split], dataset.labels.tolist())):
            folder = root / split / str(label)
            folder.mkdir(parents=True, exist_ok=True)
            samples, rate = sf.read(DATA / "fsdd" / "recordings" / f"{recording}.wav", dtype="float32")
            write_clip(folder / f"{n}.mkv", [degraded[image_id].numpy()], 1, samples, rate, "ffv1", "flac")
    (root / "done").write_text("complete\n")


def mst_part(args: argparse.Namespace) -> dict:
    from benchlib import seeded_run

    results: dict[str, list[dict]] = {"files": [], "memory": []}
    quiet = ["--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false"]
    for seed in args.seeds:
        root = Path(args.workdir) / f"avmnist_clips_seed{seed}"
        if not (root / "done").is_file():
            print(f"muxing the AV-MNIST seed-{seed} pairs into clips under {root} ...", flush=True)
            export_avmnist_clips(root, seed)
        files = [*quiet, f"--data.init_args.root={root}", "--data.init_args.noise_snr_db=0.0", "--data.init_args.noise_per_epoch=false",
                 f"--data.init_args.seed={seed}", f"--data.init_args.num_workers={args.workers}"]  # fmt: skip
        results["files"].append(seeded_run("mst on clips", "configs/mst/av_pairs.yaml", f"{args.workdir}/seed{seed}/files", seed, None, files))
        memory = [*quiet, f"--data.init_args.seed={seed}"]
        results["memory"].append(seeded_run("mst in memory", "configs/mst/avmnist_audio.yaml", f"{args.workdir}/seed{seed}/memory", seed, None, memory))
    print(f"\n{'pipeline':8s} " + " ".join(f"{'seed ' + str(s):>9s}" for s in args.seeds) + f" {'mean':>8s} {'fit s':>8s}")
    summary = {}
    for name, runs in results.items():
        accuracies = [run["test/acc"] for run in runs]
        seconds = [run.get("fit_seconds", float("nan")) for run in runs]
        summary[name] = {"test_acc_per_seed": accuracies, "test_acc_mean": statistics.mean(accuracies), "fit_seconds_per_seed": seconds}
        print(f"{name:8s} " + " ".join(f"{100 * a:8.2f}%" for a in accuracies) + f" {100 * statistics.mean(accuracies):7.2f}% {statistics.mean(seconds):8.0f}")
    return {"summary": summary, "runs": results}


def epoch_rate(dm: AudioVisualFilesDataModule, workers: int, epoch: int) -> float:
    """Clips per second of one training epoch, after its first two waves of batches."""
    dm.num_workers = workers
    loader = dm.train_dataloader()
    loader.sampler.set_epoch(epoch)
    skip, seen, started = 2 * max(1, workers), 0, None
    for number, batch in enumerate(loader):
        if number == skip - 1:
            started = time.perf_counter()
        elif number >= skip:
            seen += len(batch["label"])
    return seen / (time.perf_counter() - started)


def throughput_part(args: argparse.Namespace) -> dict:
    counts = {"avmnist": 320, "video": 160} if args.quick else {"avmnist": 1280, "video": 320}
    rounds = args.rounds or (2 if args.quick else 3)
    results = {}
    for kind, settings in KINDS.items():
        root = Path(args.workdir) / f"{kind}_{counts[kind]}"
        if not (root / "train").is_dir():
            print(f"writing {counts[kind]} {kind} clips to {root} ...", flush=True)
            write_clips(root, kind, counts[kind])
        dm = AudioVisualFilesDataModule(root=str(root), batch_size=32, stats_samples=64, **settings)
        dm.setup("fit")
        sample = dm.splits["train"][0]
        rates: dict[int, list[float]] = {0: [], 1: [], 2: []}
        for round_ in range(rounds):
            for workers in rates:
                rates[workers].append(epoch_rate(dm, workers, round_))
                print(f"{kind:8s} round {round_} workers {workers}: {rates[workers][-1]:7.1f} clips/s  (load {os.getloadavg()[0]:.2f})", flush=True)
        size = sum(f.stat().st_size for f in root.rglob("*") if f.is_file()) / counts[kind]
        results[kind] = {
            "clips": counts[kind], "bytes_per_clip": round(size), "settings": settings,
            "shapes": {key: list(value.shape) for key, value in sample.items() if torch.is_tensor(value)},
            "clips_per_second": {str(w): statistics.median(r) for w, r in rates.items()},
            "per_round": {str(w): r for w, r in rates.items()},
            "ratio_to_workers_0_per_round": {str(w): [a / b for a, b in zip(r, rates[0])] for w, r in rates.items()},
        }  # fmt: skip
    print(f"\n{'kind':8s} {'input':38s} {'w0 clips/s':>11s} {'w1':>8s} {'w2':>8s} {'w2/w0':>6s}")
    for kind, result in results.items():
        shapes = " + ".join("x".join(map(str, shape)) for key, shape in result["shapes"].items() if key != "label")
        speed = result["clips_per_second"]
        print(f"{kind:8s} {shapes:38s} {speed['0']:11.1f} {speed['1']:8.1f} {speed['2']:8.1f} {speed['2'] / speed['0']:6.2f}")
    return {"results": results}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--part", choices=["throughput", "mst"], default="throughput")
    parser.add_argument("--quick", action="store_true", help="throughput: fewer clips and rounds")
    parser.add_argument("--rounds", type=int, default=None)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1], help="mst: seeds (each its own split, pairing and noise)")
    parser.add_argument("--workers", type=int, default=2, help="mst: DataLoader workers of the clip runs")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--workdir", default="runs/bench_av")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    load_before, started = os.getloadavg(), time.time()
    if args.part == "mst":
        report, default_out = mst_part(args), "bench/mst_avmnist_audio_clips.json"
        title = "MST-Distill audio student on AV-MNIST: clips read from files vs the in-memory pipeline (test accuracy)"
    else:
        report = throughput_part(args)
        default_out = "runs/bench_av/av_throughput_quick.json" if args.quick else "bench/av_throughput.json"
        title = "AudioVisualFilesDataModule training loader, clips/s"
    out = Path(args.out or default_out)
    out.parent.mkdir(parents=True, exist_ok=True)
    report = {"benchmark": title, "command": " ".join(["python", *sys.argv]), **report,
              "machine": machine_info(load_before), "wall_seconds": time.time() - started}  # fmt: skip
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
