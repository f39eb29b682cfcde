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
    return the test metrics, the last logged ``val/*`` values (``val/acc``, ...; the teacher's
    ``val/teacher_acc`` when there is a teacher), the student's parameter count and the wall time
    of the fit. With ``test=False`` (pre-training, G2SD's generic stage) there is no test."""
    cli = lightning_cli(["-c", config, *overrides], run=False)
    start = time.perf_counter()
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    fit_seconds = time.perf_counter() - start
    # read before test(), which resets callback_metrics
    validation = {key: float(value) for key, value in cli.trainer.callback_metrics.items() if key.startswith("val/")}
    if not test:
        return {**validation, "fit_seconds": fit_seconds}
    [test_metrics] = cli.trainer.test(cli.model, datamodule=cli.datamodule, verbose=False)
    return {**validation, **_summarise(cli, test_metrics), "fit_seconds": fit_seconds}


def evaluate_checkpoint(config: str, ckpt_path: str, overrides: Sequence[str] = ()) -> dict[str, float]:
    """Test the weights in ``ckpt_path`` with the model and data of ``config``."""
    cli = lightning_cli(["-c", config, *overrides], run=False)
    [test_metrics] = cli.trainer.test(cli.model, datamodule=cli.datamodule, ckpt_path=ckpt_path, verbose=False)
    return _summarise(cli, test_metrics)
