"""The benchmarks' shared runner: a kept result is reused only for the command that made it."""

from __future__ import annotations

import sys

import pytest

import mmkd.experiment
from conftest import REPO  # noqa: E402

sys.path.insert(0, str(REPO / "tools"))
import benchlib  # noqa: E402


def test_a_kept_result_is_reused_only_for_the_same_command(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    fits = []

    def fake_fit(config: str, overrides: list[str], test: bool) -> dict:  # stands for a real fit and test
        fits.append(overrides)
        return {"test/acc": 0.5 + len(fits) / 10}

    monkeypatch.setattr(mmkd.experiment, "fit_and_test", fake_fit)
    first = benchlib.run_once("kd.yaml", str(tmp_path), ["--trainer.max_epochs=2"], reuse=False, epochs=2)
    assert benchlib.run_once("kd.yaml", str(tmp_path), ["--trainer.max_epochs=2"], reuse=False, epochs=2) == first  # resumed
    assert len(fits) == 1
    other = benchlib.run_once("kd.yaml", str(tmp_path), ["--trainer.max_epochs=8"], reuse=False, epochs=8)  # other epochs
    assert len(fits) == 2 and other != first
