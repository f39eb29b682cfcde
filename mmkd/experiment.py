"""Run a config end to end from Python (fit, then test), as ``mmkd fit`` / ``mmkd test`` would."""

from __future__ import annotations

import time
from typing import Sequence

from mmkd.cli import lightning_cli


def _summarise(cli, test_metrics: dict) -> dict[str, float]:
    metrics = {key: float(value) for key, value in test_metrics.items()}
    if getattr(cli.model, "teacher_val_result", None) is not None:
        metrics["val/teacher_acc"] = cli.model.teacher_val_result
    metrics["params"] = sum(p.numel() for p in cli.model.model.parameters())
    return metrics


def fit_and_test(config: str, overrides: Sequence[str] = (), test: bool = True) -> dict[str, float]:
    """Fit ``config`` (with CLI-style ``--key=value`` overrides), test the final weights, and
    return the test metrics plus the last ``val/acc``, the teacher's ``val/teacher_acc`` when there is a
    teacher, the student's parameter count and the wall time of the fit. With ``test=False``
    (pre-training, G2SD's generic stage) it returns the last logged ``val/*`` values instead."""
    cli = lightning_cli(["-c", config, *overrides], run=False)
    start = time.perf_counter()
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    fit_seconds = time.perf_counter() - start
    if not test:
        logged = {key: float(value) for key, value in cli.trainer.callback_metrics.items() if key.startswith("val/")}
        return {**logged, "fit_seconds": fit_seconds}
    val_acc = float(cli.trainer.callback_metrics["val/acc"])  # test() resets callback_metrics
    [test_metrics] = cli.trainer.test(cli.model, datamodule=cli.datamodule, verbose=False)
    return {**_summarise(cli, test_metrics), "val/acc": val_acc, "fit_seconds": fit_seconds}


def evaluate_checkpoint(config: str, ckpt_path: str, overrides: Sequence[str] = ()) -> dict[str, float]:
    """Test the weights in ``ckpt_path`` with the model and data of ``config``."""
    cli = lightning_cli(["-c", config, *overrides], run=False)
    [test_metrics] = cli.trainer.test(cli.model, datamodule=cli.datamodule, ckpt_path=ckpt_path, verbose=False)
    return _summarise(cli, test_metrics)
