"""Fused distillation losses: the same maths as :mod:`mmkd.losses`, computed without keeping the
intermediate tensors that eager autograd saves.

The hand-written paths compute a loss's value *and* its gradient in one forward pass (the
gradients of these losses have closed forms), keep only the gradient, and scale it by the incoming
gradient in backward. All implementations share one signature, picked by ``impl``:

- ``"triton"``: one Triton kernel over the rows (CUDA; on CPU only under ``TRITON_INTERPRET=1``,
  which the tests use).
- ``"compiled"``: ``torch.compile`` of the reference function (inductor fuses forward and
  backward into a few loops; C++ on CPU). Compiles once per shape, then reuses.
- ``"chunked"``: plain torch over blocks of rows, so temporaries are the size of one block; needs
  no compiler (any device).
- ``"eager"``: the reference functions of :mod:`mmkd.losses` under ordinary autograd.
- ``"auto"`` (default): ``triton`` for CUDA tensors; on CPU ``compiled`` from
  ``AUTO_COMPILE_MIN_ELEMENTS`` elements up and ``eager`` below, where a loss costs next to
  nothing and compiling would only add start-up time. ``tools/bench_losses.py`` measured these
  choices (bench/losses_cpu.json, bench/losses_cuda.json).

The hand-written paths support one backward pass per forward (no ``retain_graph`` double use, no
double backward): use ``impl="eager"`` for those.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Literal

import torch

try:
    import triton  # noqa: F401

    HAS_TRITON = True
except ImportError:  # triton ships with torch's Linux wheels; elsewhere the chunked path serves
    HAS_TRITON = False

LossImpl = Literal["auto", "triton", "compiled", "chunked", "eager"]
IMPLS = ("auto", "triton", "compiled", "chunked", "eager")
AUTO_COMPILE_MIN_ELEMENTS = 1 << 20


def resolve_impl(impl: str, tensor: torch.Tensor) -> str:
    """The implementation ``impl`` means for ``tensor``; a clear error for one that cannot run."""
    if impl not in IMPLS:
        raise ValueError(f"unknown loss impl {impl!r}; choose one of {', '.join(IMPLS)}")
    interpreted = os.environ.get("TRITON_INTERPRET") == "1"
    if impl == "auto":
        if tensor.is_cuda:
            return "triton" if HAS_TRITON else "compiled"
        return "compiled" if tensor.numel() >= AUTO_COMPILE_MIN_ELEMENTS else "eager"
    if impl == "triton":
        if not HAS_TRITON:
            raise RuntimeError("impl='triton' needs the triton package (pip install triton); use impl='chunked'")
        if not tensor.is_cuda and not interpreted:
            raise RuntimeError(
                f"impl='triton' needs CUDA tensors (got {tensor.device}); set TRITON_INTERPRET=1 to run the "
                "kernels on CPU (slow, for tests) or use impl='chunked'"
            )
    return impl


_COMPILED: dict[Callable, Callable] = {}


def compiled(function: Callable) -> Callable:
    """``torch.compile(function)``, made once per function (each keeps its own compiled shapes)."""
    if function not in _COMPILED:
        _COMPILED[function] = torch.compile(function)
    return _COMPILED[function]


def rows_per_chunk(row_size: int, budget: int = 1 << 20) -> int:
    """Rows per block of the chunked path: about ``budget`` elements per block."""
    return max(1, budget // max(1, row_size))


def scale_saved_gradients(ctx: torch.autograd.function.FunctionCtx, grad_output: torch.Tensor) -> list[torch.Tensor | None]:
    """Backward of a loss whose gradients were computed in forward (kept in ``ctx.grads``): scale
    them by ``grad_output`` in place (no second N×C buffer), once. Always a multiply, never a test
    of ``grad_output == 1``: reading a CUDA value back would stall the host and the asynchronous
    launches behind it."""
    grads = getattr(ctx, "grads", None)
    if grads is None:
        raise RuntimeError("a fused mmkd loss was back-propagated twice; use impl='eager' with retain_graph")
    # dropping ctx's reference lets autograd adopt the buffer as .grad instead of copying it
    ctx.grads = None
    return [grad.mul_(grad_output.to(grad.dtype)) if grad is not None else None for grad in grads]


from mmkd.losses.fused.feature import fused_feature_loss  # noqa: E402
from mmkd.losses.fused.kd import fused_kd_loss  # noqa: E402

__all__ = ["AUTO_COMPILE_MIN_ELEMENTS", "HAS_TRITON", "IMPLS", "LossImpl", "fused_feature_loss", "fused_kd_loss", "resolve_impl"]
