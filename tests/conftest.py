"""Shared fixtures. Tests read the real data in ../shared/data (Fashion-MNIST, MNIST digits);
where that folder is absent (a user's clone), the data-dependent tests are skipped."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"
DATA_ROOT = Path(os.environ.get("MMKD_DATA") or SHARED_DATA).resolve()  # tests chdir into tmp dirs

torch.set_num_threads(min(2, os.cpu_count() or 1))
# Without a GPU the Triton kernels run in Triton's interpreter; it must be chosen before the
# kernels are defined (at import of mmkd.losses).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(scope="session")
def data_root() -> Path:
    if not (DATA_ROOT / "fashion-mnist").is_dir():
        pytest.skip(f"real data not found at {DATA_ROOT} (set MMKD_DATA)")
    return DATA_ROOT


@pytest.fixture(autouse=True)
def _data_env(monkeypatch: pytest.MonkeyPatch) -> None:
    if (DATA_ROOT / "fashion-mnist").is_dir():
        monkeypatch.setenv("MMKD_DATA", str(DATA_ROOT))


@pytest.fixture(autouse=True)
def _in_tmp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Runs write runs/ and logs relative to the working directory: keep them in tmp."""
    monkeypatch.chdir(tmp_path)
