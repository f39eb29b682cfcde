"""Data loading from image files: mmkd's ImageFilesDataModule against torchvision's ImageFolder
(issue 19, "Evidence").

    python tools/bench_data.py            # ~8 min on 2 cores -> bench/data_throughput.json, bench/data_memory.json
    python tools/bench_data.py --quick    # ~2 min, smaller -> runs/bench_data/data_*_quick.json
    python tools/bench_data.py --part memory

(a) **Throughput** of decode + RandomResizedCrop(224) + horizontal flip + to-tensor + ImageNet
normalisation on photo-sized JPEGs (Fashion-MNIST's real images upscaled to 500x375 with
``tools/image_files.py``, written here), per DataLoader setting (``num_workers`` 0, 1, 2; 0 is one
process doing everything), batch 64, the same DataLoader settings for every loader (shuffled,
persistent workers, pin_memory only with CUDA):

* ``torchvision``: ``datasets.ImageFolder`` with ``transforms.Compose([RandomResizedCrop(224),
  RandomHorizontalFlip(), ToTensor(), Normalize(ImageNet)])``;
* ``torchvision v2``: the same with ``transforms.v2`` as its documentation recommends
  (``ToImage``, crop and flip on the uint8 tensor, ``ToDtype(float32, scale=True)``, ``Normalize``);
* ``mmkd``: ``ImageFilesDataModule(views={"image": {"size": 224}}).train_dataloader()``;
* ``mmkd draft=False``: without the reduced-size JPEG decoding.

A round is one epoch of every loader, in turn (A B C D, A B C D, ...); in each epoch the first two
waves of batches (2 x max(1, workers): worker start-up, first reads) are left out of the timing.
Reported: the median over rounds and each round's ratio to torchvision. Draft decoding only
applies when the crop is at least twice the output on both sides, so the share of the crops it
applies to is reported too (none of the 500x375 ones: there ``mmkd`` and ``mmkd draft=False`` run
the same code, and their difference is the noise of the measurement), and a second, smaller
measurement on 1024x768 JPEGs (workers 0) shows it where it does apply.

(b) **Memory** of the main process plus its 2 workers while iterating a training loader (after
10 and after ``--batches`` batches), over a CSV file list of 20k real small JPEGs vs a 1M-row list
cycling over those same files (``check_files=False``): the sum of PSS (``/proc/PID/smaps_rollup``,
shared pages counted once) and of RSS. Each runs in its own fresh process. Also measured: the
index's own bytes (``names.nbytes + labels.nbytes``), and with tracemalloc the Python list of
``(path, label)`` tuples that torchvision's ``ImageFolder``/``DatasetFolder`` holds for the same
paths, and the sampler's per-epoch index lists (EpochShuffleSampler, in the main process). PSS
counts file-backed pages (the shared libraries) shared with any other process, including other
users' Python processes on the same venv, so its absolute value moves with the machine's other
work; the anonymous part (``Pss_Anon``) is this process tree's own and is reported too. Each
index size is measured ``--memory-repeats`` times in fresh processes, interleaved; medians.

The torch threads of the main process are set with ``--threads`` (default 1: DataLoader workers
run with 1 thread, and so the workers=0 row is one core's work too). Thread count and load average
are recorded (per round too): on a shared machine compare the ratios of one round, not absolute
numbers across runs.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tools"))

from benchlib import machine_info  # noqa: E402

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
SOURCE = ROOT.parent / "shared" / "data" / "fashion-mnist"


# -- data, written at bench time from the real Fashion-MNIST images ----------------------------
def ensure_images(out: Path, layout: str, count: int, size: tuple[int, int] | None) -> tuple[Path, float]:
    """``count`` training images in ``layout`` under ``out`` (reused when a stamp says they are
    the same); returns the folder and the seconds spent writing (0 when reused)."""
    import image_files

    stamp = out / "stamp.json"
    wanted = {"layout": layout, "count": count, "size": list(size) if size else None}
    if stamp.is_file() and json.loads(stamp.read_text()) == wanted:
        return out, 0.0
    if out.exists():
        import shutil

        shutil.rmtree(out)
    started = time.perf_counter()
    image_files.write_layout(out, SOURCE, layout, [count, 0, 0], size=size)
    stamp.write_text(json.dumps(wanted))
    return out, time.perf_counter() - started


# -- (a) throughput ----------------------------------------------------------------------------
def loader_settings(workers: int, seed: int = 0) -> dict:
    """What mmkd's SplitsDataModule._loader passes, for the torchvision loaders too."""
    return dict(num_workers=workers, persistent_workers=workers > 0, pin_memory=torch.cuda.is_available(),
                generator=torch.Generator().manual_seed(seed))  # fmt: skip


def torchvision_loader(folder: Path, batch_size: int, workers: int, v2: bool = False) -> torch.utils.data.DataLoader:
    from torchvision import datasets, transforms

    if v2:
        from torchvision.transforms import v2 as T

        transform = T.Compose([
            T.ToImage(), T.RandomResizedCrop(224, antialias=True), T.RandomHorizontalFlip(),
            T.ToDtype(torch.float32, scale=True), T.Normalize(IMAGENET_MEAN, IMAGENET_STD),
        ])  # fmt: skip
    else:
        transform = transforms.Compose([
            transforms.RandomResizedCrop(224), transforms.RandomHorizontalFlip(), transforms.ToTensor(),
            transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD),
        ])  # fmt: skip
    dataset = datasets.ImageFolder(str(folder), transform)
    return torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=True, **loader_settings(workers))


def mmkd_loader(root: Path, batch_size: int, workers: int, draft: bool = True) -> torch.utils.data.DataLoader:
    from mmkd.data.files import ImageFilesDataModule

    dm = ImageFilesDataModule(root=str(root), views={"image": {"size": 224}}, batch_size=batch_size, num_workers=workers, draft=draft, seed=0)
    dm.setup("fit")
    return dm.train_dataloader()


def timed_epoch(loader: torch.utils.data.DataLoader, epoch: int, warmup: int) -> tuple[float, int]:
    """Images/s of one epoch from the end of batch ``warmup`` to the last batch."""
    if hasattr(loader.sampler, "set_epoch"):
        loader.sampler.set_epoch(epoch)  # what Lightning does: another crop per sample every epoch
    started, images, batches = None, 0, 0
    for batch in loader:
        batches += 1
        if batches == warmup:
            started = time.perf_counter()
        elif batches > warmup:
            images += len(batch["image"] if isinstance(batch, dict) else batch[0])
    if started is None or images == 0:
        raise ValueError(f"an epoch of {batches} batches is too short for {warmup} warm-up batches: write more images")
    return images / (time.perf_counter() - started), images


def draft_share(width: int, height: int, count: int, epochs: range, size: int = 224) -> float:
    """The share of training crops that mmkd decodes at reduced size (the crop at least twice the view)."""
    from mmkd.data.views import Augment, random_resized_crop_box, sample_uniforms

    augment, hits, total = Augment(), 0, 0
    for epoch in epochs:
        for index in range(count):
            box = random_resized_crop_box(width, height, sample_uniforms(0, epoch, index, 0, 40), augment.scale, augment.ratio)
            hits += min(box[2] - box[0], box[3] - box[1]) / size >= 2
            total += 1
    return hits / total


def compare(loaders: dict, rounds: int, warmup: int, label: str) -> dict:
    """Interleaved rounds over ``loaders`` (name -> loader); per loader the images/s of every round."""
    rates: dict[str, list[float]] = {name: [] for name in loaders}
    loads = []
    for round_index in range(rounds):
        for name, loader in loaders.items():
            rate, images = timed_epoch(loader, round_index + 1, warmup)
            rates[name].append(rate)
            print(f"  {label} round {round_index} {name}: {rate:.0f} images/s ({images} timed)", flush=True)
        loads.append(os.getloadavg()[0])
    baseline = rates["torchvision"]
    summary = {}
    for name, values in rates.items():
        ratios = [v / b for v, b in zip(values, baseline)]
        summary[name] = {"images_per_second_median": statistics.median(values), "images_per_second_all": values,
                         "vs_torchvision_median": statistics.median(ratios), "vs_torchvision_per_round": ratios}  # fmt: skip
    return {"summary": summary, "loadavg_per_round": loads}


def shutdown(loaders: dict) -> None:
    for loader in loaders.values():  # persistent workers: end them before the next setting runs
        iterator = getattr(loader, "_iterator", None)
        if iterator is not None and hasattr(iterator, "_shutdown_workers"):
            iterator._shutdown_workers()
        loader._iterator = None


def throughput(args) -> dict:
    work = Path(args.workdir)
    photos, photo_seconds = ensure_images(work / f"photos_{args.photos}", "folder", args.photos, (500, 375))
    print(f"photos: {args.photos} JPEGs of 500x375 in {photos} ({'written in %.0f s' % photo_seconds if photo_seconds else 'reused'})", flush=True)
    warmups = {}
    results = {}
    for workers in args.workers:
        warmup = 2 * max(1, workers)
        warmups[workers] = warmup
        loaders = {
            "torchvision": torchvision_loader(photos / "train", args.batch_size, workers),
            "torchvision v2": torchvision_loader(photos / "train", args.batch_size, workers, v2=True),
            "mmkd": mmkd_loader(photos, args.batch_size, workers),
            "mmkd draft=False": mmkd_loader(photos, args.batch_size, workers, draft=False),
        }
        results[str(workers)] = compare(loaders, args.rounds, warmup, f"workers={workers}")
        shutdown(loaders)
    share = draft_share(500, 375, args.photos, range(1, args.rounds + 1))
    large = None
    if args.large:
        width, height = args.large_size
        folder, large_seconds = ensure_images(work / f"large_{args.large}_{width}x{height}", "folder", args.large, (width, height))
        print(f"large photos: {args.large} JPEGs of {width}x{height} ({'written in %.0f s' % large_seconds if large_seconds else 'reused'})", flush=True)
        loaders = {
            "torchvision": torchvision_loader(folder / "train", args.batch_size, 0),
            "mmkd": mmkd_loader(folder, args.batch_size, 0),
            "mmkd draft=False": mmkd_loader(folder, args.batch_size, 0, draft=False),
        }
        large = {"size": [width, height], "images": args.large, "workers": 0, **compare(loaders, args.rounds, 2, f"{width}x{height}"),
                 "draft_share": draft_share(width, height, args.large, range(1, args.rounds + 1))}  # fmt: skip
    return {
        "benchmark": "decode + RandomResizedCrop(224) + flip + to-tensor + normalise, images/s, mmkd ImageFilesDataModule vs torchvision ImageFolder",
        "images": {"count": args.photos, "size": [500, 375], "format": "JPEG quality 90 (tools/image_files.py, Fashion-MNIST upscaled bicubic)",
                   "folder": str(photos), "write_seconds": photo_seconds},
        "batch_size": args.batch_size, "rounds": args.rounds, "warmup_batches": warmups,
        "loader_settings": {"shuffle": True, "persistent_workers": "workers > 0", "pin_memory": torch.cuda.is_available()},
        "main_process_threads": torch.get_num_threads(),
        "by_workers": results, "draft_share_500x375": share, "large_photos": large,
    }  # fmt: skip


def print_throughput(record: dict) -> None:
    print("\n| workers | loader | images/s (median) | per process | vs torchvision (median) | per round |")
    print("|---:|---|---:|---:|---:|---|")
    for workers, result in record["by_workers"].items():
        for name, row in result["summary"].items():
            per = row["images_per_second_median"] / max(1, int(workers))
            rounds = ", ".join(f"{r:.2f}" for r in row["vs_torchvision_per_round"])
            print(f"| {workers} | {name} | {row['images_per_second_median']:.0f} | {per:.0f} | {row['vs_torchvision_median']:.2f}x | {rounds} |")
    print(f"\ndraft decoding applies to {100 * record['draft_share_500x375']:.1f} % of the 500x375 training crops (crop >= 448 px on both sides)")
    large = record.get("large_photos")
    if large:
        width, height = large["size"]
        print(f"\n{width}x{height} JPEGs, workers 0 (draft applies to {100 * large['draft_share']:.1f} % of the crops):\n")
        print("| loader | images/s (median) | vs torchvision (median) | per round |")
        print("|---|---:|---:|---|")
        for name, row in large["summary"].items():
            rounds = ", ".join(f"{r:.2f}" for r in row["vs_torchvision_per_round"])
            print(f"| {name} | {row['images_per_second_median']:.0f} | {row['vs_torchvision_median']:.2f}x | {rounds} |")


# -- (b) memory --------------------------------------------------------------------------------
def smaps_rollup(pid: int) -> dict[str, int]:
    """The kB fields of /proc/PID/smaps_rollup (Rss, Pss, Pss_Anon, Pss_File, Pss_Shmem, ...)."""
    fields = {}
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines()[1:]:
        name, _, value = line.partition(":")
        parts = value.split()
        if len(parts) == 2 and parts[1] == "kB":
            fields[name] = int(parts[0])
    return fields


def children(pid: int) -> list[int]:
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                status = Path(f"/proc/{entry}/status").read_text()
            except OSError:
                continue
            ppid = next((int(line.split()[1]) for line in status.splitlines() if line.startswith("PPid:")), None)
            if ppid == pid:
                found.append(int(entry))
    return sorted(found)


def memory_of(pids: list[int]) -> dict:
    per = {pid: smaps_rollup(pid) for pid in pids}
    mib = lambda field: sum(p.get(field, 0) for p in per.values()) / 1024  # noqa: E731
    return {"processes": len(pids), "pss_mib": mib("Pss"), "rss_mib": mib("Rss"), "pss_anon_mib": mib("Pss_Anon"),
            "pss_file_mib": mib("Pss_File"), "pss_shmem_mib": mib("Pss_Shmem"),
            "per_process_pss_mib": [p.get("Pss", 0) / 1024 for p in per.values()],
            "per_process_rss_mib": [p.get("Rss", 0) / 1024 for p in per.values()]}  # fmt: skip


def memory_child(listing: str, check_files: bool, batches: int, batch_size: int, workers: int, threads: int) -> dict:
    """In a fresh process: set up a loader over ``listing``, iterate it, measure; then, with
    tracemalloc, the list-of-tuples index torchvision would hold for the same paths."""
    torch.set_num_threads(threads)
    from mmkd.data.files import ImageFilesDataModule

    started = time.perf_counter()
    dm = ImageFilesDataModule(train=listing, views={"image": {"size": 64}}, batch_size=batch_size, num_workers=workers, check_files=check_files, seed=0)
    dm.setup("fit")
    setup_seconds = time.perf_counter() - started
    if len(dm.splits["train"]) < batches * batch_size:
        raise ValueError(f"{listing}: {len(dm.splits['train'])} samples are fewer than {batches} batches of {batch_size}")
    gc.collect()
    source = dm.splits["train"].source
    record = {"rows": len(source), "setup_seconds": setup_seconds, "index_bytes": source.names.nbytes + source.labels.nbytes,
              "index_names_bytes": source.names.nbytes, "index_labels_bytes": source.labels.nbytes,
              "after_setup": memory_of([os.getpid()])}  # fmt: skip
    loader = dm.train_dataloader()
    loader.sampler.set_epoch(0)
    iterator = iter(loader)
    for done in range(1, batches + 1):
        next(iterator)
        if done in (10, batches):
            workers_now = children(os.getpid())
            record[f"after_{done}_batches"] = {**memory_of([os.getpid(), *workers_now]), "workers": len(workers_now)}
    iterator.close()
    shutdown({"train": loader})
    del iterator, loader
    gc.collect()

    import tracemalloc

    root = str(source.root)
    names, labels = source.names, source.labels.tolist()
    tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0]
    samples = [(os.path.join(root, names[i]), labels[i]) for i in range(len(names))]  # DatasetFolder.samples
    record["torchvision_list_bytes"] = tracemalloc.get_traced_memory()[0] - before
    del samples
    gc.collect()
    from mmkd.data.common import EpochShuffleSampler

    before = tracemalloc.get_traced_memory()[0]
    order = iter(EpochShuffleSampler(len(source), seed=0))
    next(order)  # the epoch's order and keys are built on the first draw
    # Python objects (lists of ints) through tracemalloc; torch tensors, which tracemalloc does
    # not see, by their storages among the generator's locals
    storages = {}
    for value in order.gi_frame.f_locals.values():
        for item in value if isinstance(value, (list, tuple)) else [value]:
            if isinstance(item, torch.Tensor):
                storage = item.untyped_storage()
                storages[storage.data_ptr()] = storage.nbytes()
    record["sampler_epoch_python_bytes"] = tracemalloc.get_traced_memory()[0] - before
    record["sampler_epoch_tensor_bytes"] = sum(storages.values())
    record["sampler_epoch_list_bytes"] = record["sampler_epoch_python_bytes"] + record["sampler_epoch_tensor_bytes"]
    tracemalloc.stop()
    return record


def write_big_list(small: Path, rows: int, count: int) -> tuple[Path, float]:
    """``small/train_<rows>.csv``: ``rows`` rows cycling over the ``count`` files of ``small/train.csv``."""
    import csv

    target = small / f"train_{rows}.csv"
    if target.is_file():
        return target, 0.0
    started = time.perf_counter()
    with open(small / "train.csv", newline="") as f:
        listed = [(row["path"], row["label"]) for row in csv.DictReader(f)]
    if len(listed) != count:
        raise ValueError(f"{small / 'train.csv'} lists {len(listed)} files, expected {count}")
    with open(target.with_suffix(".tmp"), "w") as f:
        f.write("path,label\n")
        for start in range(0, rows, count):
            f.writelines(f"{path},{label}\n" for path, label in listed[: min(count, rows - start)])
    target.with_suffix(".tmp").rename(target)
    return target, time.perf_counter() - started


METRICS = ("pss_mib", "rss_mib", "pss_anon_mib")


def memory(args) -> dict:
    work = Path(args.workdir)
    small, seconds = ensure_images(work / f"small_{args.small_files}", "csv", args.small_files, (64, 64))
    print(f"small files: {args.small_files} JPEGs of 64x64 in {small} ({'written in %.0f s' % seconds if seconds else 'reused'})", flush=True)
    big, big_seconds = write_big_list(small, args.big_rows, args.small_files)
    print(f"big list: {big} ({args.big_rows} rows{', written in %.0f s' % big_seconds if big_seconds else ', reused'})", flush=True)
    configs = {f"{args.small_files} files": (small / "train.csv", True), f"{args.big_rows} rows": (big, False)}
    runs: dict[str, dict] = {label: {"listing": str(listing), "check_files": check, "repeats": []} for label, (listing, check) in configs.items()}
    at = f"after_{args.batches}_batches"
    for repeat in range(args.memory_repeats):  # interleaved: small, big, small, big
        for label, (listing, check) in configs.items():
            command = [sys.executable, __file__, "--memory-child", str(listing), "--check-files", str(int(check)), "--batches", str(args.batches),
                       "--batch-size", str(args.batch_size), "--threads", str(args.threads)]  # fmt: skip
            done = subprocess.run(command, capture_output=True, text=True)
            if done.returncode:
                raise RuntimeError(f"the memory measurement of {listing} failed:\n{done.stderr[-3000:]}")
            measured = json.loads(done.stdout.strip().splitlines()[-1])
            runs[label]["repeats"].append(measured)
            print(f"  repeat {repeat} {label}: PSS {measured[at]['pss_mib']:.0f} MiB, RSS {measured[at]['rss_mib']:.0f} MiB, "
                  f"PSS anonymous {measured[at]['pss_anon_mib']:.0f} MiB", flush=True)  # fmt: skip
    for run in runs.values():
        first = run["repeats"][0]
        run.update({key: first[key] for key in ("rows", "index_bytes", "index_names_bytes", "index_labels_bytes", "torchvision_list_bytes",
                                                "sampler_epoch_list_bytes", "sampler_epoch_python_bytes", "sampler_epoch_tensor_bytes")})  # fmt: skip
        run["median"] = {metric: statistics.median(r[at][metric] for r in run["repeats"]) for metric in METRICS}
        run["median_per_process_pss_mib"] = [statistics.median(values) for values in zip(*(r[at]["per_process_pss_mib"] for r in run["repeats"]))]
        run["median_main_pss_after_setup_mib"] = statistics.median(r["after_setup"]["pss_mib"] for r in run["repeats"])
    small_run, big_run = runs.values()
    return {
        "benchmark": f"memory of a training loader (main process + 2 workers) over a file list of {args.small_files} files vs {args.big_rows} rows",
        "images": {"count": args.small_files, "size": [64, 64], "format": "JPEG", "folder": str(small)},
        "batch_size": args.batch_size, "batches": args.batches, "workers": 2, "view": {"size": 64}, "repeats": args.memory_repeats,
        "runs": runs, "ratio_big_to_small": {metric: big_run["median"][metric] / small_run["median"][metric] for metric in METRICS},
        "added_mib": {metric: big_run["median"][metric] - small_run["median"][metric] for metric in METRICS},
    }  # fmt: skip


def print_memory(record: dict) -> None:
    print(f"\nmedians of {record['repeats']} fresh processes each, after {record['batches']} batches of {record['batch_size']}, 2 workers:\n")
    print("| index | index bytes | PSS main + 2 workers (MiB) | PSS per process | PSS anonymous | RSS sum | torchvision list of (path, label) | sampler's epoch order |")
    print("|---|---:|---:|---|---:|---:|---:|---:|")
    for label, run in record["runs"].items():
        median = run["median"]
        per = " / ".join(f"{value:.0f}" for value in run["median_per_process_pss_mib"])
        print(f"| {label} | {run['index_bytes'] / 2**20:.1f} MiB | {median['pss_mib']:.0f} | {per} | {median['pss_anon_mib']:.0f} | {median['rss_mib']:.0f} | "
              f"{run['torchvision_list_bytes'] / 2**20:.1f} MiB | {run['sampler_epoch_list_bytes'] / 2**20:.1f} MiB |")  # fmt: skip
    ratio, added = record["ratio_big_to_small"], record["added_mib"]
    small, big = list(record["runs"])
    print(f"\n{big} / {small}: PSS {ratio['pss_mib']:.3f}x (+{added['pss_mib']:.0f} MiB), PSS anonymous {ratio['pss_anon_mib']:.3f}x "
          f"(+{added['pss_anon_mib']:.0f} MiB), RSS {ratio['rss_mib']:.3f}x (+{added['rss_mib']:.0f} MiB)")  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--part", choices=["all", "throughput", "memory"], default="all")
    parser.add_argument("--quick", action="store_true", help="fewer images and rounds, a 200k-row list; writes runs/bench_data/*_quick.json")
    parser.add_argument("--photos", type=int, default=None, help="500x375 JPEGs (default 1536; --quick 768)")
    parser.add_argument("--rounds", type=int, default=None, help="interleaved rounds (default 5; --quick 2)")
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--large", type=int, default=None, help="1024x768 JPEGs for the draft measurement (default 384; --quick 192; 0: skip)")
    parser.add_argument("--large-size", type=int, nargs=2, default=[1024, 768])
    parser.add_argument("--small-files", type=int, default=20_000)
    parser.add_argument("--big-rows", type=int, default=None, help="rows of the big list (default 1,000,000; --quick 200,000)")
    parser.add_argument("--batches", type=int, default=50, help="batches iterated before the memory is read")
    parser.add_argument("--memory-repeats", type=int, default=None, help="fresh processes per index size, interleaved (default 2; --quick 1)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads of the main process")
    parser.add_argument("--workdir", default="runs/bench_data")
    parser.add_argument("--out-throughput", default=None)
    parser.add_argument("--out-memory", default=None)
    parser.add_argument("--memory-child", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--check-files", type=int, default=1, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.memory_child:
        print(json.dumps(memory_child(args.memory_child, bool(args.check_files), args.batches, args.batch_size, 2, args.threads)))
        return
    quick = args.quick
    args.photos = args.photos or (768 if quick else 1536)
    args.rounds = args.rounds or (2 if quick else 5)
    args.large = args.large if args.large is not None else (192 if quick else 384)
    args.big_rows = args.big_rows or (200_000 if quick else 1_000_000)
    args.memory_repeats = args.memory_repeats or (1 if quick else 2)
    suffix = "_quick" if quick else ""
    folder = Path("runs/bench_data") if quick else Path("bench")
    args.out_throughput = args.out_throughput or str(folder / f"data_throughput{suffix}.json")
    args.out_memory = args.out_memory or str(folder / f"data_memory{suffix}.json")
    torch.set_num_threads(args.threads)
    if not (SOURCE / "train-images-idx3-ubyte.gz").is_file():
        parser.error(f"{SOURCE} not found: the benchmark writes its images from the real Fashion-MNIST files there")

    records = {}
    for part, run, out in (("throughput", throughput, args.out_throughput), ("memory", memory, args.out_memory)):
        if args.part not in ("all", part):
            continue
        started, load_before = time.time(), os.getloadavg()
        record = {**run(args), "command": "python " + " ".join(sys.argv), "machine": machine_info(load_before), "wall_seconds": time.time() - started}
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(json.dumps(record, indent=2))
        records[part] = (record, out)
    if "throughput" in records:
        print_throughput(records["throughput"][0])
    if "memory" in records:
        print_memory(records["memory"][0])
    for record, out in records.values():
        machine = record["machine"]
        print(f"\n{record['benchmark']}: threads {machine['threads']} (main process), {machine['cpus']} CPUs, "
              f"load average {machine['loadavg_before'][0]:.2f} -> {machine['loadavg_after'][0]:.2f}, {record['wall_seconds']:.0f} s; wrote {out}")


if __name__ == "__main__":
    main()
