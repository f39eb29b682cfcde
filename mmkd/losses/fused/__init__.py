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

The hand-written paths are ``torch.library`` custom ops (``mmkd::fused_kd``,
``mmkd::fused_feature``) with fake kernels and registered backwards, so ``torch.compile`` keeps a
step that uses them in one graph and ``mode="reduce-overhead"`` can record their launches as CUDA
graphs. They support one backward pass per forward (no ``retain_graph`` double use, no double
backward): use ``impl="eager"`` for those.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any, Literal

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


def fused_loss_op(name: str, fake: Callable) -> Callable[[Callable], Callable[..., torch.Tensor]]:
    """Decorator: registers ``loss_and_gradients``, which returns ``(loss, *gradients)`` with one
    gradient per leading tensor argument (an empty tensor for one that needs none), as the custom
    op ``name`` with the fake kernel ``fake`` and a backward that scales the gradients. Returns a
    function of the same arguments that gives the loss: through the op while ``torch.compile``
    traces, through a plain ``autograd.Function`` in eager, where the dispatcher's round trip to a
    Python op would add host time to every call (60 µs on a 2-core CPU)."""

    def register(loss_and_gradients: Callable) -> Callable[..., torch.Tensor]:
        op = torch.library.custom_op(name, loss_and_gradients, mutates_args=())
        op.register_fake(fake)
        op.register_autograd(_op_backward, setup_context=_save_gradients)

        def loss(*args: Any) -> torch.Tensor:
            if torch.compiler.is_compiling():
                return op(*args)[0]
            return _EagerFusedLoss.apply(loss_and_gradients, *args)

        return loss

    return register


def _save_gradients(ctx, inputs: tuple, output: tuple[torch.Tensor, ...]) -> None:
    # the gradients, computed in forward, are all backward needs; nothing differentiates them,
    # so autograd is told not to fill zero gradients of their size for them
    ctx.num_inputs = len(inputs)
    ctx.mark_non_differentiable(*output[1:])
    ctx.set_materialize_grads(False)
    ctx.save_for_backward(*output[1:])


def _op_backward(ctx, grad_loss: torch.Tensor, *_: Any) -> tuple[torch.Tensor | None, ...]:
    grads = scale_saved_gradients(ctx, grad_loss)
    return *grads, *[None] * (ctx.num_inputs - len(grads))


class _EagerFusedLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, loss_and_gradients: Callable, *args: Any) -> torch.Tensor:
        loss, *grads = loss_and_gradients(*args)
        ctx.num_inputs = len(args)
        ctx.save_for_backward(*grads)
        return loss

    @staticmethod
    def backward(ctx, grad_loss: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        return None, *_op_backward(ctx, grad_loss)


def scale_saved_gradients(ctx, grad_output: torch.Tensor) -> list[torch.Tensor | None]:
    """Backward of a fused loss op: the saved gradients times ``grad_output`` (``None`` for the
    empty ones, of inputs that need none).

    Eager autograd scales them in place, so no second buffer of the gradient's size is made, and
    a second backward through the same graph (``retain_graph``) finds them modified. Under
    ``torch.compile`` the product is out of place (a compiled backward may not mutate what forward
    saved) and the compiler plans the buffers. Always a multiply, never a test of
    ``grad_output == 1``: reading a CUDA value back would stall the host and the asynchronous
    launches behind it."""
    try:
        grads = ctx.saved_tensors
    except RuntimeError as err:
        if "modified by an inplace operation" not in str(err):
            raise
        raise RuntimeError("a fused mmkd loss was back-propagated twice; use impl='eager' with retain_graph") from err
    # a plain tensor is eager autograd; torch.compile and export trace with tensor subclasses
    return [None if grad.numel() == 0 else grad.mul_(grad_output.to(grad.dtype)) if type(grad) is torch.Tensor
            else grad * grad_output.to(grad.dtype) for grad in grads]  # fmt: skip


from mmkd.losses.fused.feature import fused_feature_loss  # noqa: E402
from mmkd.losses.fused.kd import fused_kd_loss  # noqa: E402

__all__ = ["AUTO_COMPILE_MIN_ELEMENTS", "HAS_TRITON", "IMPLS", "LossImpl", "fused_feature_loss", "fused_kd_loss", "resolve_impl"]
