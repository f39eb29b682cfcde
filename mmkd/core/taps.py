"""Feature taps: capture submodule outputs (or inputs) by dotted module path with forward hooks."""

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


def parse_tap(spec: str) -> tuple[str, bool, int]:
    """A tap's ``path[:input][@call]``: the module path, whether its (first) input is recorded
    instead of its output, and which of its calls in one forward pass (``@0`` the first, the
    default ``@-1`` the last) for a module that runs several times (a shared block, a loop)."""
    path, call = spec, -1
    if "@" in path:
        path, _, index = path.rpartition("@")
        try:
            call = int(index)
        except ValueError:
            raise ValueError(f"tap {spec!r}: after '@' comes the call's index (0 the first, -1 the last), got {index!r}") from None
    on_input = path.endswith(":input")
    if ":" in path and not on_input:
        raise ValueError(f"tap {spec!r}: the only suffix is ':input' (the module's first input instead of its output)")
    return path.removesuffix(":input"), on_input, call


class FeatureTap:
    """Records, on every forward pass of ``model``, the outputs of the submodules at ``paths`` —
    or, for a path written ``path:input``, the module's first input (a head's input is the pooled
    feature the head sees) — and for a module that runs several times per forward, the call chosen
    by ``@index`` (default the last: ``blocks.3@0`` is its first call).

    Gradients flow through recorded student features; teacher features are recorded under the
    teacher's ``no_grad``. :meth:`pop` returns and clears what the last forward recorded, so no
    activations outlive the step. Hooks stay on the module objects, so they survive ``.to()``,
    DDP wrapping and FSDP2's ``fully_shard``.
    """

    def __init__(self, model: nn.Module, paths: Iterable[str]) -> None:
        self.paths = list(dict.fromkeys(paths))
        self.calls: dict[str, list[Any]] = {}
        self._handles = []
        for spec in self.paths:
            path, on_input, _ = parse_tap(spec)
            self._handles.append(get_module(model, path).register_forward_hook(self._recorder(spec, on_input)))

    def _recorder(self, spec: str, on_input: bool):
        def hook(module: nn.Module, inputs: Any, output: Any) -> None:
            self.calls.setdefault(spec, []).append(inputs[0] if on_input else output)

        return hook

    def pop(self) -> dict[str, Any]:
        calls, self.calls = self.calls, {}
        missing = [p for p in self.paths if p not in calls]
        if missing:
            raise RuntimeError(
                f"the modules at {missing} did not run in the last forward pass, so nothing was "
                "recorded there; choose paths on the forward path of the model"
            )
        outputs = {}
        for spec, values in calls.items():
            call = parse_tap(spec)[2]
            if not -len(values) <= call < len(values):
                raise RuntimeError(f"tap {spec!r}: the module ran {len(values)} time(s) in the last forward pass; choose @0..@{len(values) - 1}")
            outputs[spec] = values[call]
        return outputs

    def clear(self) -> None:
        """Drop what was recorded (after a forward pass whose features are not needed)."""
        self.calls = {}

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []
