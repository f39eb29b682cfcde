"""Time and peak memory of the distillation losses, forward + backward, at realistic shapes: the
eager reference vs ``torch.compile`` of it vs the fused paths (chunked torch; Triton on a GPU,
called eagerly and recorded as CUDA graphs by ``torch.compile(mode="reduce-overhead")``;
Liger-Kernel's KL divergence where it is installed).

    python tools/bench_losses.py                  # CPU: writes bench/losses_cpu.json
    python tools/bench_losses.py --device cuda    # GPU: writes bench/losses_cuda.json
    python tools/bench_losses.py --quick          # small shapes, a smoke run

All implementations of a case are timed interleaved (A B C A B C ...) in one process and the
median is reported with its ratio to eager, so machine noise hits them alike. Peak extra memory is
what one forward + backward adds on top of its inputs (the gradient it leaves in ``.grad``
included): CUDA's allocator peak on a GPU; on CPU the process's resident-set high-water mark
(reset through /proc/self/clear_refs, with glibc's mmap threshold fixed so freed blocks go back to
the OS). On a GPU the step time (host launches included) and the GPU kernel time (torch.profiler)
are both reported; the effective bandwidth of each path (inputs read once + gradient written once,
per kernel second) is compared with a device-to-device copy measured in the same run.
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchlib import machine_info  # noqa: E402
from mmkd.losses import feature_loss, kd_loss  # noqa: E402
from mmkd.losses.fused import HAS_TRITON, fused_feature_loss, fused_kd_loss  # noqa: E402

# (name, kind, shape): kd = Hinton KD at T=4 on logits; feature = parameter-free LayerNorm of the
# target + smooth-L1 (beta 2, G2SD) on tokens, + MSE (FitNets-style) on dense maps.
CASES = [
    ("kd logits 256x10", "kd", (256, 10)),
    ("kd logits 256x1000", "kd", (256, 1000)),
    ("kd logits 256x32000", "kd", (256, 32000)),
    ("feature tokens 64x197x384", "tokens", (64, 197, 384)),
    ("feature tokens 256x197x768", "tokens", (256, 197, 768)),
    ("feature dense 32x256x56x56", "dense", (32, 256, 56, 56)),
]
QUICK_CASES = [("kd logits 64x100", "kd", (64, 100)), ("feature tokens 8x17x64", "tokens", (8, 17, 64)),
               ("feature dense 4x16x8x8", "dense", (4, 16, 8, 8))]  # fmt: skip


def loss_functions(kind: str, device: str) -> dict[str, Callable]:
    if kind == "kd":
        reference = lambda s, t: kd_loss(s, t, 4.0)  # noqa: E731
        fused = lambda impl: lambda s, t: fused_kd_loss(s, t, 4.0, impl=impl)  # noqa: E731
    else:
        args = ("smooth_l1", True, 2.0) if kind == "tokens" else ("mse", True, 1.0)
        reference = lambda p, t: feature_loss(p, t, *args)  # noqa: E731
        fused = lambda impl: lambda p, t: fused_feature_loss(p, t, *args, impl=impl)  # noqa: E731
    functions = {"eager": reference, "compiled": fused("compiled"), "chunked": fused("chunked")}
    if device == "cuda" and HAS_TRITON:
        functions["triton"] = fused("triton")
        # the same ops recorded as CUDA graphs: one replay per forward and per backward, no launches
        functions["triton-graphs"] = torch.compile(fused("triton"), mode="reduce-overhead", fullgraph=True)
    if device == "cuda" and kind == "kd":
        try:
            from liger_kernel.transformers import LigerKLDIVLoss

            liger_kl = LigerKLDIVLoss(reduction="batchmean", log_target=True)
            functions["liger"] = lambda s, t: liger_kl(
                torch.log_softmax(s.float() / 4.0, -1), torch.log_softmax(t.float() / 4.0, -1)
            ) * 16.0  # fmt: skip
        except ImportError:
            pass
    return functions


class PeakMemory:
    """Peak bytes a call adds on top of what is allocated when it starts."""

    def __init__(self, device: str) -> None:
        self.device = device
        if device == "cpu":
            # a fixed threshold: every block over 128 KiB is mmapped and returned to the OS when freed
            ctypes.CDLL("libc.so.6").mallopt(-3, 128 * 1024)  # M_MMAP_THRESHOLD

    @staticmethod
    def _status(field: str) -> int:
        with open("/proc/self/status") as status:
            return next(int(line.split()[1]) * 1024 for line in status if line.startswith(field))

    def measure(self, call: Callable[[], None]) -> int:
        gc.collect()
        if self.device == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
            call()
            torch.cuda.synchronize()
            return torch.cuda.max_memory_allocated() - base
        with open("/proc/self/clear_refs", "w") as refs:
            refs.write("5")  # reset the high-water mark VmHWM to the current RSS
        base = self._status("VmRSS:")
        call()
        return self._status("VmHWM:") - base


def timed(call: Callable[[], None], device: str) -> float:
    if device == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        call()
        end.record()
        torch.cuda.synchronize()
        return start.elapsed_time(end) / 1000
    begin = time.perf_counter()
    call()
    return time.perf_counter() - begin


def kernel_time(run: Callable[[], None], student: torch.Tensor, rounds: int) -> float:
    """Seconds of GPU kernels per forward + backward (torch.profiler), without the host's launch
    overhead that dominates small shapes in a Python loop (and hides behind the model's own kernels
    in a real training step)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(rounds):
            student.grad = None
            run()
        torch.cuda.synchronize()
    return sum(event.self_device_time_total for event in prof.key_averages()) / 1e6 / rounds


def copy_bandwidth(device: str) -> float | None:
    """Bytes per second of a device-to-device copy of 1 GiB (read + write counted)."""
    if device != "cuda":
        return None
    source = torch.empty(1 << 28, device=device, dtype=torch.float32)
    target = torch.empty_like(source)
    for _ in range(3):
        target.copy_(source)
    seconds = statistics.median(timed(lambda: target.copy_(source), device) for _ in range(10))
    return 2 * source.numel() * 4 / seconds


def bench_case(name: str, kind: str, shape: tuple, dtype: torch.dtype, device: str, impls: list[str], rounds: int) -> dict:
    torch.manual_seed(0)
    student = torch.randn(shape, device=device, dtype=dtype, requires_grad=True)
    teacher = torch.randn(shape, device=device, dtype=dtype)
    functions = {k: v for k, v in loss_functions(kind, device).items() if k in impls}

    runs = {impl: (lambda function=function: function(student, teacher).backward()) for impl, function in functions.items()}
    for run in runs.values():  # warm-up: compilation, autotuning, lazy initialisation, CUDA graph recording
        for _ in range(3):
            student.grad = None
            run()
    seconds: dict[str, list[float]] = {impl: [] for impl in runs}
    for _ in range(rounds):
        for impl, run in runs.items():
            student.grad = None  # freed outside the measurement: every path allocates its own
            seconds[impl].append(timed(run, device))
    memory = PeakMemory(device)
    peak = {}
    for impl, run in runs.items():
        student.grad = None
        peak[impl] = memory.measure(run)
    kernel_seconds = {impl: kernel_time(run, student, rounds) for impl, run in runs.items()} if device == "cuda" else {}
    unit = student.numel() * student.element_size()
    # bytes the Triton path moves by design: the KD kernel reads both inputs twice (log-sum-exp
    # pass, then KL + gradient pass), the feature kernel once; both write the gradient, and
    # backward scales it in place (read + write)
    triton_bytes = (7 if kind == "kd" else 5) * unit
    result = {}
    for impl in runs:
        median = statistics.median(seconds[impl])
        result[impl] = {
            "seconds_median": median, "seconds_all": seconds[impl], "peak_extra_bytes": peak[impl],
            "time_vs_eager": median / statistics.median(seconds["eager"]) if "eager" in seconds else None,
            "memory_vs_eager": peak[impl] / peak["eager"] if "eager" in peak and peak["eager"] else None,
        }  # fmt: skip
        if impl in kernel_seconds:
            result[impl]["kernel_seconds"] = kernel_seconds[impl]
            result[impl]["kernel_time_vs_eager"] = kernel_seconds[impl] / kernel_seconds["eager"] if "eager" in kernel_seconds else None
            result[impl]["minimal_bytes_per_second"] = 3 * unit / kernel_seconds[impl]  # inputs read once, gradient written once
            if impl == "triton":
                result[impl]["bytes_moved_per_second"] = triton_bytes / kernel_seconds[impl]
    return {"name": name, "kind": kind, "shape": list(shape), "dtype": str(dtype).removeprefix("torch."), "impls": result}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--impls", nargs="+", default=["eager", "compiled", "chunked", "triton", "triton-graphs", "liger"])
    parser.add_argument("--dtypes", nargs="+", default=None, help="default: float32 on CPU, float32 and bfloat16 on CUDA")
    parser.add_argument("--rounds", type=int, default=None, help="timed rounds per implementation (default 5 CPU, 20 CUDA)")
    parser.add_argument("--quick", action="store_true", help="three small shapes (a smoke run)")
    parser.add_argument("--out", default=None, help="default: bench/losses_<device>.json")
    args = parser.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device here")
    dtypes = [getattr(torch, d) for d in (args.dtypes or (["float32"] if args.device == "cpu" else ["float32", "bfloat16"]))]
    rounds = args.rounds or (5 if args.device == "cpu" else 20)
    started, load_before = time.time(), os.getloadavg()
    bandwidth = copy_bandwidth(args.device)

    results = []
    for name, kind, shape in QUICK_CASES if args.quick else CASES:
        for dtype in dtypes:
            print(f"{name} {str(dtype).removeprefix('torch.')}", flush=True)
            results.append(bench_case(name, kind, shape, dtype, args.device, args.impls, rounds))

    record = {
        "benchmark": "distillation losses, forward + backward",
        "command": "python " + " ".join(sys.argv),
        "device": torch.cuda.get_device_name() if args.device == "cuda" else platform.processor() or platform.machine(),
        "copy_bytes_per_second": bandwidth,
        "results": results,
        "machine": machine_info(load_before),
        "wall_seconds": time.time() - started,
    }  # fmt: skip
    out = Path(args.out or f"bench/losses_{args.device}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(record, indent=2))

    gpu_header = " GPU kernel time | kernel time vs eager | bandwidth, % of copy (moved / minimal bytes) |" if bandwidth else ""
    print(f"\n| case | dtype | impl | step time (median) | step time vs eager | peak extra memory | memory vs eager |{gpu_header}")
    print("|---|---|---|---:|---:|---:|---:|" + ("---:|---:|---:|" if bandwidth else ""))
    for case in results:
        for impl, row in case["impls"].items():
            memory_ratio = f"{row['memory_vs_eager']:.2f}x" if row["memory_vs_eager"] is not None else "n/a"
            line = (f"| {case['name']} | {case['dtype']} | {impl} | {1e3 * row['seconds_median']:.3f} ms | "
                    f"{row['time_vs_eager']:.2f}x | {row['peak_extra_bytes'] / 2**20:.1f} MiB | {memory_ratio} |")  # fmt: skip
            if bandwidth:
                moved = f"{100 * row['bytes_moved_per_second'] / bandwidth:.0f} % / " if "bytes_moved_per_second" in row else ""
                line += (f" {1e6 * row['kernel_seconds']:.1f} us | {row['kernel_time_vs_eager']:.2f}x |"
                         f" {moved}{100 * row['minimal_bytes_per_second'] / bandwidth:.0f} % |")  # fmt: skip
            print(line)
    print(f"\nthreads {torch.get_num_threads()}, load average {load_before[0]:.2f} -> {os.getloadavg()[0]:.2f}; wrote {out}")


if __name__ == "__main__":
    main()
