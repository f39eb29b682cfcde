"""What every benchmark records beside its figures: the software, the threads and the load."""

from __future__ import annotations

import os
import platform

import torch


def machine_info(load_before: tuple[float, float, float]) -> dict:
    """Platform, versions, thread count, CPUs, and the load average before and after the run."""
    return {
        "platform": platform.platform(), "python": platform.python_version(), "torch": torch.__version__,
        "threads": torch.get_num_threads(), "cpus": os.cpu_count(),
        "loadavg_before": load_before, "loadavg_after": os.getloadavg(),
    }  # fmt: skip
