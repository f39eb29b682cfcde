"""Fused feature distillation: optional parameter-free LayerNorm of the teacher feature, then
MSE / smooth-L1 / cosine against the student's prediction, and the prediction's gradient.

Rows are feature vectors: the last dim of ``[..., D]`` tokens, or the channels of ``[B, C, H, W]``
maps (read in place through strides, NCHW or channels-last, no transpose copy). With ``t`` the
(normalised) target row, ``x`` the prediction row, ``M`` elements and ``R`` rows:

    mse        loss = sum (x - t)^2 / M                       grad = 2 (x - t) / M
    smooth_l1  loss = sum huber_beta(x - t) / M               grad = clamp((x - t) / beta, -1, 1) / M
    cosine     loss = sum_rows (1 - cos(x, t)) / R            grad = -(t / (|x||t|) - cos x / |x|^2) / R

The target gets no gradient (it is the teacher's), exactly as :func:`mmkd.losses.feature_loss`.
"""

from __future__ import annotations

import torch

from mmkd.losses.fused import HAS_TRITON, compiled, fused_loss_op, resolve_impl, rows_per_chunk

KINDS = {"mse": 0, "smooth_l1": 1, "cosine": 2}
LAYERNORM_EPS = 1e-6  # as normalize_target
COSINE_EPS = 1e-8  # as F.cosine_similarity

if HAS_TRITON:
    import triton
    import triton.language as tl

    @triton.jit
    def _feature_kernel(
        pred_ptr, target_ptr, grad_ptr, partial_ptr,
        n_rows, n_feat, inner,
        pred_outer, pred_inner, pred_feat, target_outer, target_inner, target_feat, grad_outer, grad_inner, grad_feat,
        grad_scale, beta, layernorm_eps, cosine_eps,
        KIND: tl.constexpr, NORMALIZE: tl.constexpr, NEED_GRAD: tl.constexpr,
        BLOCK_R: tl.constexpr, BLOCK_F: tl.constexpr,
    ):  # fmt: skip
        rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
        row_ok = rows < n_rows
        outer = (rows // inner).to(tl.int64)[:, None]
        within = (rows % inner).to(tl.int64)[:, None]
        feats = tl.arange(0, BLOCK_F)[None, :]
        mask = row_ok[:, None] & (feats < n_feat)
        x = tl.load(pred_ptr + outer * pred_outer + within * pred_inner + feats * pred_feat, mask=mask, other=0.0).to(tl.float32)
        t = tl.load(target_ptr + outer * target_outer + within * target_inner + feats * target_feat, mask=mask, other=0.0).to(tl.float32)
        if NORMALIZE:
            mean = tl.sum(t, 1) / n_feat
            centred = tl.where(mask, t - mean[:, None], 0.0)
            var = tl.sum(centred * centred, 1) / n_feat
            t = centred * tl.rsqrt(var + layernorm_eps)[:, None]
        diff = x - t
        if KIND == 0:
            loss = tl.sum(tl.sum(diff * diff, 1), 0)
            grad = 2.0 * diff
        elif KIND == 1:
            abs_diff = tl.abs(diff)
            small = abs_diff < beta
            loss = tl.sum(tl.sum(tl.where(mask, tl.where(small, 0.5 * diff * diff / beta, abs_diff - 0.5 * beta), 0.0), 1), 0)
            grad = tl.where(small, diff / beta, tl.where(diff > 0, 1.0, -1.0))
        else:
            x_norm = tl.maximum(tl.sqrt(tl.sum(x * x, 1)), cosine_eps)
            t_norm = tl.maximum(tl.sqrt(tl.sum(t * t, 1)), cosine_eps)
            cos = tl.sum(x * t, 1) / (x_norm * t_norm)
            loss = tl.sum(tl.where(row_ok, 1.0 - cos, 0.0), 0)
            grad = (cos / (x_norm * x_norm))[:, None] * x - t / (x_norm * t_norm)[:, None]
        tl.store(partial_ptr + tl.program_id(0), loss)
        if NEED_GRAD:
            grad_ptrs = grad_ptr + outer * grad_outer + within * grad_inner + feats * grad_feat
            tl.store(grad_ptrs, (grad * grad_scale).to(grad_ptr.dtype.element_ty), mask=mask)


def _as_rows(x: torch.Tensor) -> tuple[torch.Tensor, int, tuple[int, int, int]]:
    """A view of ``x`` as rows of features: (view, inner, (outer, inner, feature) strides).

    Row ``r`` sits at ``outer = r // inner``, ``within = r % inner``. For ``[B, C, H, W]`` maps the
    features are the channels and ``inner = H * W``; for anything else the last dim, ``inner = 1``.
    """
    if x.ndim == 4:
        batch, channels, height, width = x.shape
        if x.stride(2) != width * x.stride(3):  # H and W cannot be merged into one stride
            x = x.contiguous()
        return x, height * width, (x.stride(0), x.stride(3), x.stride(1))
    rows = x.reshape(-1, x.shape[-1])
    return rows, 1, (rows.stride(0), 0, rows.stride(1))


def _feature_triton(pred, target, kind, normalize, beta, grad):
    pred, inner, pred_strides = _as_rows(pred)
    target, _, target_strides = _as_rows(target)
    n_feat = pred.shape[1]
    n_rows = pred.numel() // n_feat
    if grad is not None:
        grad, _, grad_strides = _as_rows(grad)
    else:
        grad_strides = (0, 0, 0)
    block_f = triton.next_power_of_2(n_feat)
    if block_f > 16384:
        raise ValueError(f"the Triton feature loss keeps a whole feature row in registers; {n_feat} features is too many, use impl='chunked'")
    # about 16 KiB of each input per program: enough bytes in flight to stream at DRAM speed
    block_r = max(1, min(64, (16384 // pred.element_size()) // block_f))
    grid = triton.cdiv(n_rows, block_r)
    partial = torch.empty(grid, device=pred.device, dtype=torch.float32)
    loss_scale = 1.0 / (n_rows if kind == "cosine" else pred.numel())
    _feature_kernel[(grid,)](
        pred, target, grad if grad is not None else partial, partial,
        n_rows, n_feat, inner, *pred_strides, *target_strides, *grad_strides,
        loss_scale, float(beta), LAYERNORM_EPS, COSINE_EPS,
        KIND=KINDS[kind], NORMALIZE=normalize, NEED_GRAD=grad is not None, BLOCK_R=block_r, BLOCK_F=block_f,
        num_warps=8 if block_r * block_f >= 4096 else 4,
    )  # fmt: skip
    return partial.sum() * loss_scale


def _feature_rows_chunk(x, t, kind, normalize, beta, loss_scale, dim):
    """Loss sum and scaled gradient of one block (float32 temporaries the size of the block)."""
    # copies: the in-place maths below must not touch the caller's tensors
    x, t = x.to(torch.float32, copy=True), t.to(torch.float32, copy=True)
    if normalize:
        mean = t.mean(dim, keepdim=True)
        var = t.var(dim, keepdim=True, unbiased=False)
        t = t.sub_(mean).div_(var.add_(LAYERNORM_EPS).sqrt_())
    if kind == "cosine":
        x_norm = torch.linalg.vector_norm(x, dim=dim, keepdim=True).clamp_min_(COSINE_EPS)
        t_norm = torch.linalg.vector_norm(t, dim=dim, keepdim=True).clamp_min_(COSINE_EPS)
        cos = (x * t).sum(dim, keepdim=True).div_(x_norm * t_norm)
        grad = x.mul_(cos / x_norm.square()).sub_(t.div_(x_norm * t_norm)).mul_(loss_scale)
        return (1.0 - cos).sum(), grad
    diff = x.sub_(t)
    if kind == "mse":
        return diff.square().sum(), diff.mul_(2.0 * loss_scale)
    abs_diff = diff.abs()
    small = abs_diff < beta
    loss = torch.where(small, 0.5 * diff.square() / beta, abs_diff - 0.5 * beta).sum()
    return loss, diff.div_(beta).clamp_(-1.0, 1.0).mul_(loss_scale)


def _feature_chunked(pred, target, kind, normalize, beta, grad):
    dim = 1 if pred.ndim == 4 else -1
    if pred.ndim != 4:  # rows of tokens: block over the flattened leading dims
        pred, target = pred.reshape(-1, pred.shape[-1]), target.reshape(-1, target.shape[-1])
        grad = grad.view(-1, grad.shape[-1]) if grad is not None else None
    n_rows = pred.numel() // pred.shape[dim]
    loss_scale = 1.0 / (n_rows if kind == "cosine" else pred.numel())
    step = rows_per_chunk(pred[0].numel())  # whole samples of a dense map, rows of tokens
    total = torch.zeros((), device=pred.device, dtype=torch.float32)
    for start in range(0, pred.shape[0], step):
        block = slice(start, start + step)
        loss, block_grad = _feature_rows_chunk(pred[block], target[block], kind, normalize, beta, loss_scale, dim)
        total += loss
        if grad is not None:
            grad[block] = block_grad
    return total * loss_scale


def _gradient_buffer(pred: torch.Tensor, need_grad: bool) -> torch.Tensor:
    """The op's gradient output, unfilled, in a layout that :func:`_as_rows` and the chunked path
    can view without copying (an empty tensor when ``pred`` needs none)."""
    if not need_grad:
        return pred.new_empty(0)
    if pred.ndim == 4 and pred.is_contiguous(memory_format=torch.channels_last):
        return torch.empty_like(pred, memory_format=torch.channels_last)
    return pred.new_empty(pred.shape)


def _fake_feature(pred, target, kind, normalize, beta, impl, need_grad):
    return pred.new_empty((), dtype=torch.float32), _gradient_buffer(pred, need_grad)


@fused_loss_op("mmkd::fused_feature", _fake_feature)
def _fused_feature(pred: torch.Tensor, target: torch.Tensor, kind: str, normalize: bool, beta: float, impl: str, need_grad: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """The loss, and the gradient of ``pred`` if asked for."""
    grad = _gradient_buffer(pred, need_grad)
    run = _feature_triton if impl == "triton" else _feature_chunked
    return run(pred, target, kind, normalize, beta, grad if need_grad else None), grad


def fused_feature_loss(
    pred: torch.Tensor,
    target: torch.Tensor,
    kind: str = "mse",
    normalize: bool = False,
    beta: float = 1.0,
    impl: str = "auto",
) -> torch.Tensor:
    """:func:`mmkd.losses.feature_loss` (same arguments and value) computed by a fused path."""
    if pred.shape != target.shape:
        raise ValueError(f"feature shapes differ: student {list(pred.shape)} vs teacher {list(target.shape)}")
    if kind not in KINDS:
        raise ValueError(f"unknown feature loss kind {kind!r}; choose 'mse', 'smooth_l1' or 'cosine'")
    impl = resolve_impl(impl, pred)
    if impl in ("eager", "compiled"):
        from mmkd.losses.feature import feature_loss

        return (compiled(feature_loss) if impl == "compiled" else feature_loss)(pred, target, kind, normalize, beta)
    return _fused_feature(pred, target.detach(), kind, bool(normalize), float(beta), impl, pred.requires_grad and torch.is_grad_enabled())
