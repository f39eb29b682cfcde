"""Run a config end to end from Python (fit, then test), as ``mmkd fit`` would."""

from __future__ import annotations

import time
from typing import Sequence

from mmkd.cli import lightning_cli


def fit_and_test(config: str, overrides: Sequence[str] = ()) -> dict[str, float]:
    """Fit ``config`` (with CLI-style ``--key=value`` overrides), test the final weights, and
    return the test metrics plus ``val/acc``, the teacher's ``val/teacher_acc`` when there is a
    teacher, the student's parameter count and the wall time of the fit."""
    cli = lightning_cli(["-c", config, *overrides], run=False)
    start = time.perf_counter()
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    fit_seconds = time.perf_counter() - start
    [test_metrics] = cli.trainer.test(cli.model, datamodule=cli.datamodule, verbose=False)
    metrics = {key: float(value) for key, value in test_metrics.items()}
    metrics["val/acc"] = float(cli.trainer.callback_metrics["val/acc"])
    if getattr(cli.model, "teacher_val_result", None) is not None:
        metrics["val/teacher_acc"] = cli.model.teacher_val_result
    metrics["params"] = sum(p.numel() for p in cli.model.model.parameters())
    metrics["fit_seconds"] = fit_seconds
    return metrics
