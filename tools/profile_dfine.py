"""Where the time of one D-FINE training step goes: data, model forward, criterion, and the
whole step (forward + losses + backward), for the three rows of the ablation, interleaved
(A B C A B C ...) so that the machine's noise hits all rows alike.

    python tools/profile_dfine.py --device cuda     # -> bench/dfine_step_cuda.json
    python tools/profile_dfine.py                   # CPU -> bench/dfine_step_cpu.json

Batch 32 of composed 128x128 scenes (64 scenes composed into a temporary folder), resnet18, the
config's detector; medians over --reps rounds after 3 warm-up rounds.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from benchlib import machine_info

VARIANTS = {"baseline": ("direct", False), "fdr": ("fdr", False), "fdr_golsd": ("fdr", True)}


def main() -> None:
    import compose_detection

    from mmkd.data.common import default_data_root
    from mmkd.data.detection import CocoDetection
    from mmkd.distillers.dfine import DFine
    from mmkd.models.detr import DFineDetector

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--reps", type=int, default=10)
    parser.add_argument("--out", default=None, help="default: bench/dfine_step_{device}.json")
    args = parser.parse_args()
    device, load_before = args.device, os.getloadavg()

    def sync() -> None:
        if device == "cuda":
            torch.cuda.synchronize()

    def timed(fn) -> float:
        sync()
        start = time.perf_counter()
        fn()
        sync()
        return time.perf_counter() - start

    fmnist = default_data_root() / "fashion-mnist"
    folder = tempfile.mkdtemp()  # the data set reads its images on access: kept until the end
    scenes = compose_detection.compose(Path(folder) / "scenes", fmnist, {"train": 64, "val": 0, "test": 0})
    dataset = CocoDetection(scenes / "train", image_size=128, augment=True)
    keys = [(i, 0) for i in range(32)]
    batch = dataset.__getitems__(keys)
    batch = {"image": batch["image"].to(device), "targets": [{k: v.to(device) if torch.is_tensor(v) else v for k, v in t.items()} for t in batch["targets"]]}
    modules = {}
    for name, (box_head, go_lsd) in VARIANTS.items():
        torch.manual_seed(0)
        modules[name] = DFine(DFineDetector(10, box_head=box_head), 10, go_lsd=go_lsd).to(device)

    times: dict[str, dict[str, list[float]]] = {name: {"forward": [], "criterion": [], "step": []} for name in VARIANTS}
    data_times = []
    for round_ in range(args.reps + 3):
        data_time = timed(lambda: dataset.__getitems__(keys))
        for name, module in modules.items():
            outputs = {}
            forward = timed(lambda: outputs.setdefault("o", module.model(batch["image"])))
            criterion = timed(lambda: module.criterion(outputs["o"], batch["targets"]))
            step = timed(lambda: sum(module.losses(batch).values()).backward())
            if round_ >= 3:
                for part, value in (("forward", forward), ("criterion", criterion), ("step", step)):
                    times[name][part].append(value)
        if round_ >= 3:
            data_times.append(data_time)
    shutil.rmtree(folder)
    summary = {name: {part: statistics.median(values) for part, values in parts.items()} for name, parts in times.items()}
    record = {
        "benchmark": "one D-FINE training step, batch 32 at 128x128, resnet18 (median seconds)",
        "command": "python " + " ".join(sys.argv), "data_seconds": statistics.median(data_times), "summary": summary,
        "runs": times, "machine": machine_info(load_before),
    }  # fmt: skip
    out = Path(args.out or f"bench/dfine_step_{device}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(record, indent=2))
    print(f"\ndata (a batch of 32): {1000 * record['data_seconds']:.0f} ms")
    print("| row | model forward | criterion | step (forward + losses + backward) | criterion share of the step |")
    print("|---|---:|---:|---:|---:|")
    for name, row in summary.items():
        print(f"| {name} | {1000 * row['forward']:.1f} ms | {1000 * row['criterion']:.1f} ms | {1000 * row['step']:.1f} ms | {100 * row['criterion'] / row['step']:.0f} % |")
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
