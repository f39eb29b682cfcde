"""Feature taps: capture submodule outputs by dotted module path with forward hooks."""

from __future__ import annotations

import difflib
from typing import Any, Iterable

from torch import nn


class UnknownModulePathError(KeyError):
    def __init__(self, path: str, model: nn.Module, candidates: list[str]) -> None:
        near = difflib.get_close_matches(path, candidates, n=5, cutoff=0.3) or candidates[:5]
        self.message = (
            f"{type(model).__name__} has no module at path {path!r}. Nearest valid paths: "
            f"{', '.join(near)}. Run `mmkd inspect` to list every path with its output shape."
        )
        super().__init__(self.message)

    def __str__(self) -> str:
        return self.message


def get_module(model: nn.Module, path: str) -> nn.Module:
    """The submodule at a dotted path (``"layer3"``, ``"blocks.7.mlp"``); ``""`` is the model."""
    modules = dict(model.named_modules())
    if path not in modules:
        raise UnknownModulePathError(path, model, [name for name in modules if name])
    return modules[path]


class FeatureTap:
    """Records the outputs of the submodules at ``paths`` on every forward pass of ``model``.

    Gradients flow through recorded student features; teacher features are recorded under the
    teacher's ``no_grad``. :meth:`pop` returns and clears what the last forward recorded, so no
    activations outlive the step. Hooks stay on the module objects, so they survive ``.to()``,
    DDP wrapping and FSDP2's ``fully_shard``.
    """

    def __init__(self, model: nn.Module, paths: Iterable[str]) -> None:
        self.paths = list(dict.fromkeys(paths))
        self.outputs: dict[str, Any] = {}
        self._handles = [
            get_module(model, path).register_forward_hook(self._recorder(path)) for path in self.paths
        ]

    def _recorder(self, path: str):
        def hook(module: nn.Module, inputs: Any, output: Any) -> None:
            self.outputs[path] = output

        return hook

    def pop(self) -> dict[str, Any]:
        outputs, self.outputs = self.outputs, {}
        missing = [p for p in self.paths if p not in outputs]
        if missing:
            raise RuntimeError(
                f"the modules at {missing} did not run in the last forward pass, so nothing was "
                "recorded there; choose paths on the forward path of the model"
            )
        return outputs

    def clear(self) -> None:
        """Drop what was recorded (after a forward pass whose features are not needed)."""
        self.outputs = {}

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []
