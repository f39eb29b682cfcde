"""A callback that writes, at the end of `mmkd fit`, what a test of a recipe checks: the step
count, the logged metrics and the values at some attribute paths of the trainer (loaded by
`mmkd fit` through PYTHONPATH, as tests/kill_callback.py)."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.callbacks import Callback


def plain(value: Any) -> Any:
    """A JSON-able copy: tensors become numbers or lists, tuples lists, dataclasses dicts, modules
    their class name and parameter count."""
    if isinstance(value, torch.nn.Module):
        return {"class": type(value).__name__, "parameters": sum(p.numel() for p in value.parameters())}
    if isinstance(value, torch.Tensor):
        return value.item() if value.numel() == 1 else value.tolist()
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return plain(dataclasses.asdict(value))
    if isinstance(value, dict):
        return {str(k): plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    if isinstance(value, Path):
        return str(value)
    return repr(value)


def lookup(root: Any, path: str) -> Any:
    """``trainer`` attribute path, e.g. ``lightning_module.teacher.model.visual.image_size``;
    ``[key]`` indexes (``datamodule.views[image]``), ``len()`` around a path takes its length."""
    if path.startswith("len(") and path.endswith(")"):
        return len(lookup(root, path[4:-1]))
    value = root
    for part in path.replace("[", ".[").split("."):
        if part.startswith("["):
            key = part[1:-1]
            value = value[int(key)] if key.lstrip("-").isdigit() else value[key]
        elif part:
            value = getattr(value, part)
    return value


class RecipeProbe(Callback):
    def __init__(self, out: str, facts: list[str] | None = None) -> None:
        self.out, self.facts = out, list(facts or [])

    def on_fit_end(self, trainer, pl_module) -> None:
        report = {
            "global_step": trainer.global_step,
            "metrics": {key: float(value) for key, value in trainer.callback_metrics.items()},
            "facts": {path: plain(lookup(trainer, path)) for path in self.facts},
        }
        Path(self.out).write_text(json.dumps(report, indent=1))
