"""Module paths and output shapes of a model, for choosing what to distil."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn


@dataclass
class ModuleInfo:
    path: str
    kind: str
    output_shape: str
    parameters: int


def _describe(output: Any) -> str:
    if isinstance(output, torch.Tensor):
        return str(list(output.shape))
    if isinstance(output, (tuple, list)):
        return "(" + ", ".join(_describe(o) for o in output) + ")"
    if isinstance(output, dict):
        return "{" + ", ".join(f"{k}: {_describe(v)}" for k, v in output.items()) + "}"
    return type(output).__name__


@torch.no_grad()
def inspect_modules(model: nn.Module, example_input: torch.Tensor) -> list[ModuleInfo]:
    """Run ``model`` once in eval mode and record every submodule's output shape.

    Modules that did not run show ``not called``; modules called several times show the last call.
    """
    outputs: dict[str, str] = {}
    handles = []
    for path, module in model.named_modules():
        def hook(mod: nn.Module, inputs: Any, output: Any, path: str = path) -> None:
            outputs[path] = _describe(output)

        handles.append(module.register_forward_hook(hook))
    was_training = model.training
    model.eval()
    try:
        model(example_input)
    finally:
        model.train(was_training)
        for handle in handles:
            handle.remove()
    return [
        ModuleInfo(path or "(model)", type(module).__name__, outputs.get(path, "not called"),
                   sum(p.numel() for p in module.parameters()))
        for path, module in model.named_modules()
    ]  # fmt: skip


def print_inspection(title: str, infos: list[ModuleInfo], max_depth: int | None = None) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"{title}: module paths", title_justify="left")
    for column in ("path", "module", "output shape", "params"):
        table.add_column(column, justify="right" if column == "params" else "left")
    for info in infos:
        if max_depth is not None and info.path.count(".") >= max_depth:
            continue
        table.add_row(info.path, info.kind, info.output_shape, f"{info.parameters:,}")
    Console(width=max(100, Console().width)).print(table)
