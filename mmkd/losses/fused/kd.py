"""Fused Hinton KD: ``T^2 * KL(P || Q)`` over temperature softmaxes, batchmean, and its gradient.

With ``P = softmax(a / T)`` and ``Q = softmax(b / T)`` row by row (forward KD: ``a`` = teacher,
``b`` = student; reverse KD swaps them), and ``N`` rows:

    loss            = T^2 / N * sum_rows KL_row,   KL_row = sum_c P_c (log P_c - log Q_c)
    d loss / d b_c  = T / N * (Q_c - P_c)
    d loss / d a_c  = T / N * P_c (log P_c - log Q_c - KL_row)

The kernel makes one pass for the two log-sum-exps (online softmax, so any number of classes)
and one pass for ``KL_row`` and the gradient of ``b``; a third pass writes the gradient of ``a``
only when ``a`` needs one (reverse KD, or mutual learning). Neither side's probabilities are
stored: only the gradient, in the input dtype.
"""

from __future__ import annotations

import torch

from mmkd.losses.fused import HAS_TRITON, compiled, fused_loss_op, resolve_impl, rows_per_chunk

if HAS_TRITON:
    import triton
    import triton.language as tl

    @triton.jit
    def _kd_kernel(
        a_ptr, b_ptr, kl_ptr, grad_a_ptr, grad_b_ptr,
        n_rows, n_cols, stride_a, stride_b, inv_temperature, grad_scale,
        GRAD_A: tl.constexpr, GRAD_B: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
    ):  # fmt: skip
        rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
        row_ok = rows < n_rows
        a_rows = a_ptr + rows.to(tl.int64)[:, None] * stride_a
        b_rows = b_ptr + rows.to(tl.int64)[:, None] * stride_b
        grad_rows = rows.to(tl.int64)[:, None] * n_cols
        offsets = tl.arange(0, BLOCK_C)

        # pass 1: log-sum-exp of a/T and b/T (online, block by block)
        max_a = tl.full([BLOCK_R], float("-inf"), tl.float32)
        max_b = tl.full([BLOCK_R], float("-inf"), tl.float32)
        sum_a = tl.zeros([BLOCK_R], tl.float32)
        sum_b = tl.zeros([BLOCK_R], tl.float32)
        for start in range(0, n_cols, BLOCK_C):
            cols = start + offsets
            mask = row_ok[:, None] & (cols < n_cols)[None, :]
            a = tl.load(a_rows + cols[None, :], mask=mask, other=float("-inf")).to(tl.float32) * inv_temperature
            b = tl.load(b_rows + cols[None, :], mask=mask, other=float("-inf")).to(tl.float32) * inv_temperature
            new_max_a = tl.maximum(max_a, tl.max(a, 1))
            new_max_b = tl.maximum(max_b, tl.max(b, 1))
            sum_a = sum_a * tl.exp(max_a - new_max_a) + tl.sum(tl.exp(a - new_max_a[:, None]), 1)
            sum_b = sum_b * tl.exp(max_b - new_max_b) + tl.sum(tl.exp(b - new_max_b[:, None]), 1)
            max_a, max_b = new_max_a, new_max_b
        lse_a = max_a + tl.log(sum_a)
        lse_b = max_b + tl.log(sum_b)

        # pass 2: KL_row, and the gradient of b
        kl = tl.zeros([BLOCK_R], tl.float32)
        for start in range(0, n_cols, BLOCK_C):
            cols = start + offsets
            mask = row_ok[:, None] & (cols < n_cols)[None, :]
            log_p = tl.load(a_rows + cols[None, :], mask=mask, other=0.0).to(tl.float32) * inv_temperature - lse_a[:, None]
            log_q = tl.load(b_rows + cols[None, :], mask=mask, other=0.0).to(tl.float32) * inv_temperature - lse_b[:, None]
            p = tl.exp(log_p)
            kl += tl.sum(tl.where(mask, p * (log_p - log_q), 0.0), 1)
            if GRAD_B:
                grad_b = grad_scale * (tl.exp(log_q) - p)
                tl.store(grad_b_ptr + grad_rows + cols[None, :], grad_b.to(grad_b_ptr.dtype.element_ty), mask=mask)
        tl.store(kl_ptr + rows, kl, mask=row_ok)

        # pass 3: the gradient of a (needs the finished KL_row)
        if GRAD_A:
            for start in range(0, n_cols, BLOCK_C):
                cols = start + offsets
                mask = row_ok[:, None] & (cols < n_cols)[None, :]
                log_p = tl.load(a_rows + cols[None, :], mask=mask, other=0.0).to(tl.float32) * inv_temperature - lse_a[:, None]
                log_q = tl.load(b_rows + cols[None, :], mask=mask, other=0.0).to(tl.float32) * inv_temperature - lse_b[:, None]
                grad_a = grad_scale * tl.exp(log_p) * (log_p - log_q - kl[:, None])
                tl.store(grad_a_ptr + grad_rows + cols[None, :], grad_a.to(grad_a_ptr.dtype.element_ty), mask=mask)


def _kd_triton(a, b, temperature, grad_a, grad_b):
    n_rows, n_cols = a.shape
    kl = torch.empty(n_rows, device=a.device, dtype=torch.float32)
    block_c = min(triton.next_power_of_2(n_cols), 4096)
    block_r = max(1, min(64, 2048 // block_c))
    _kd_kernel[(triton.cdiv(n_rows, block_r),)](
        a, b, kl, grad_a if grad_a is not None else kl, grad_b if grad_b is not None else kl,
        n_rows, n_cols, a.stride(0), b.stride(0), 1.0 / temperature, temperature / n_rows,
        GRAD_A=grad_a is not None, GRAD_B=grad_b is not None, BLOCK_R=block_r, BLOCK_C=block_c,
        num_warps=8 if block_r * block_c >= 4096 else 4,
    )  # fmt: skip
    return kl


def _kd_chunked(a, b, temperature, grad_a, grad_b):
    n_rows, n_cols = a.shape
    kl = torch.empty(n_rows, device=a.device, dtype=torch.float32)
    grad_scale = temperature / n_rows
    step = rows_per_chunk(n_cols)
    for start in range(0, n_rows, step):
        rows = slice(start, start + step)
        log_p = torch.log_softmax(a[rows].float() / temperature, dim=1)  # not div_: .float() may alias the input
        log_q = torch.log_softmax(b[rows].float() / temperature, dim=1)
        p = log_p.exp()
        log_ratio = log_p.sub_(log_q)  # log P - log Q; log_p is not needed any more
        kl[rows] = torch.sum(p * log_ratio, dim=1)
        if grad_b is not None:
            grad_b[rows] = log_q.exp_().sub_(p).mul_(grad_scale)
        if grad_a is not None:
            grad_a[rows] = log_ratio.sub_(kl[rows, None]).mul_(p).mul_(grad_scale)
    return kl


def _gradient_buffers(a: torch.Tensor, b: torch.Tensor, need_grad_a: bool, need_grad_b: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """The op's gradient outputs, unfilled (an empty tensor for an input that needs none)."""
    return a.new_empty(a.shape if need_grad_a else 0), b.new_empty(b.shape if need_grad_b else 0)


def _fake_kd(a, b, temperature, impl, need_grad_a, need_grad_b):
    return a.new_empty((), dtype=torch.float32), *_gradient_buffers(a, b, need_grad_a, need_grad_b)


@fused_loss_op("mmkd::fused_kd", _fake_kd)
def _fused_kd(a: torch.Tensor, b: torch.Tensor, temperature: float, impl: str, need_grad_a: bool, need_grad_b: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The loss, and the gradients of ``a`` and ``b`` where asked for."""
    grad_a, grad_b = _gradient_buffers(a, b, need_grad_a, need_grad_b)
    run = _kd_triton if impl == "triton" else _kd_chunked
    kl = run(a, b, temperature, grad_a if need_grad_a else None, grad_b if need_grad_b else None)
    return kl.sum() * (temperature**2 / a.shape[0]), grad_a, grad_b


def fused_kd_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    temperature: float = 4.0,
    reverse: bool = False,
    impl: str = "auto",
) -> torch.Tensor:
    """:func:`mmkd.losses.kd_loss` (same arguments and value) computed by a fused path.

    Gradients flow to whichever logits require them (normally the student's only).
    """
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(f"logit shapes differ: student {list(student_logits.shape)} vs teacher {list(teacher_logits.shape)}")
    impl = resolve_impl(impl, student_logits)
    if impl in ("eager", "compiled"):
        from mmkd.losses.logit import kd_loss

        return (compiled(kd_loss) if impl == "compiled" else kd_loss)(student_logits, teacher_logits, temperature, reverse)
    num_classes = student_logits.shape[-1]

    def rows(logits: torch.Tensor) -> torch.Tensor:
        logits = logits.reshape(-1, num_classes)
        return logits if logits.stride(1) == 1 else logits.contiguous()

    student, teacher = rows(student_logits), rows(teacher_logits)
    a, b = (student, teacher) if reverse else (teacher, student)
    grad_enabled = torch.is_grad_enabled()
    return _fused_kd(a, b, float(temperature), impl, a.requires_grad and grad_enabled, b.requires_grad and grad_enabled)
