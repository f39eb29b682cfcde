"""The fused losses against the eager reference, forward and backward: the chunked torch path and
the Triton kernels (in Triton's interpreter on CPU, on the GPU where there is one), fp32 and
bf16, odd sizes, several blocks per row, non-contiguous inputs; the compiled path on a few of
those cases."""

from __future__ import annotations

import pytest
import torch

from mmkd.losses import FeatureLoss, KDLoss, feature_loss, kd_loss
from mmkd.losses.fused import AUTO_COMPILE_MIN_ELEMENTS, HAS_TRITON, fused_feature_loss, fused_kd_loss, resolve_impl

# padded rows of a block compute -inf - -inf in the interpreter; they are masked out of every store
pytestmark = pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
IMPLS = ["chunked", pytest.param("triton", marks=pytest.mark.skipif(not HAS_TRITON, reason="triton not installed"))]
# (loss rtol, gradient tolerance relative to the gradient's largest entry)
TOLERANCE = {torch.float32: (1e-5, 1e-5), torch.bfloat16: (1e-4, 1e-2)}


def close(got: torch.Tensor, expected: torch.Tensor, tol: float) -> None:
    scale = expected.abs().max().clamp_min(1e-12)
    assert ((got.float() - expected.float()).abs().max() / scale).item() < tol


def reference_and_fused(loss_ref, loss_fused, inputs, weight=1.7):
    """Loss and input gradients of both, with a non-unit upstream gradient (a loss weight)."""
    ref_inputs = [x.detach().float().requires_grad_(x.requires_grad) for x in inputs]
    ref = loss_ref(*ref_inputs)
    ref_grads = torch.autograd.grad(ref * weight, [x for x in ref_inputs if x.requires_grad])
    fused = loss_fused(*inputs)
    fused_grads = torch.autograd.grad(fused * weight, [x for x in inputs if x.requires_grad])
    return ref, ref_grads, fused, fused_grads


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(7, 10), (3, 5, 37), (4, 5000)])  # 5000: two blocks of 4096 per row
@pytest.mark.parametrize("reverse", [False, True])
def test_kd_matches_reference(impl: str, dtype: torch.dtype, shape: tuple, reverse: bool) -> None:
    torch.manual_seed(0)
    student = (3 * torch.randn(shape, device=DEVICE)).to(dtype).requires_grad_()
    teacher = (3 * torch.randn(shape, device=DEVICE)).to(dtype).requires_grad_()  # mutual learning: both get gradients
    ref, ref_grads, fused, fused_grads = reference_and_fused(
        lambda s, t: kd_loss(s, t, 2.0, reverse), lambda s, t: fused_kd_loss(s, t, 2.0, reverse, impl), [student, teacher]
    )
    loss_tol, grad_tol = TOLERANCE[dtype]
    assert fused.dtype == torch.float32
    assert fused.item() == pytest.approx(ref.item(), rel=loss_tol)
    for got, expected in zip(fused_grads, ref_grads):
        assert got.dtype == dtype
        close(got, expected, grad_tol)


@pytest.mark.parametrize("impl", IMPLS)
def test_kd_non_contiguous_inputs(impl: str) -> None:
    torch.manual_seed(1)
    wide = torch.randn(9, 16, device=DEVICE)
    student = wide[:, :11].detach().requires_grad_()  # row stride 16
    teacher = torch.randn(11, 9, device=DEVICE).t()  # transposed
    assert not student.is_contiguous() and not teacher.is_contiguous()
    ref, (ref_grad,), fused, (fused_grad,) = reference_and_fused(
        lambda s, t: kd_loss(s, t, 4.0), lambda s, t: fused_kd_loss(s, t, 4.0, impl=impl), [student, teacher]
    )
    assert fused.item() == pytest.approx(ref.item(), rel=1e-5)
    close(fused_grad, ref_grad, 1e-5)


FEATURE_SHAPES = {
    "tokens": lambda: torch.randn(2, 9, 33),
    "tokens_transposed": lambda: torch.randn(2, 33, 9).transpose(1, 2),
    "nchw": lambda: torch.randn(2, 12, 5, 7),
    "channels_last": lambda: torch.randn(2, 12, 5, 7).contiguous(memory_format=torch.channels_last),
}


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("layout", list(FEATURE_SHAPES))
@pytest.mark.parametrize("kind", ["mse", "smooth_l1", "cosine"])
@pytest.mark.parametrize("normalize", [False, True])
def test_feature_matches_reference(impl: str, dtype: torch.dtype, layout: str, kind: str, normalize: bool) -> None:
    torch.manual_seed(2)
    pred = FEATURE_SHAPES[layout]().to(DEVICE, dtype).requires_grad_()
    target = (2 * FEATURE_SHAPES[layout]() + 1).to(DEVICE, dtype)
    ref, (ref_grad,), fused, (fused_grad,) = reference_and_fused(
        lambda p, t: feature_loss(p, t, kind, normalize, beta=2.0),
        lambda p, t: fused_feature_loss(p, t, kind, normalize, beta=2.0, impl=impl),
        [pred, target],
    )
    loss_tol, grad_tol = TOLERANCE[dtype]
    assert fused.item() == pytest.approx(ref.item(), rel=loss_tol)
    assert fused_grad.shape == pred.shape and fused_grad.dtype == dtype
    close(fused_grad, ref_grad, grad_tol)


@pytest.mark.parametrize("impl", IMPLS)
def test_inputs_are_not_modified_and_no_grad_works(impl: str) -> None:
    torch.manual_seed(3)
    student, teacher = torch.randn(5, 7, device=DEVICE, requires_grad=True), torch.randn(5, 7, device=DEVICE)
    pred, target = torch.randn(2, 4, 3, 3, device=DEVICE, requires_grad=True), torch.randn(2, 4, 3, 3, device=DEVICE)
    saved = [x.detach().clone() for x in (student, teacher, pred, target)]
    loss = fused_kd_loss(student, teacher, 4.0, impl=impl) + fused_feature_loss(pred, target, "cosine", True, impl=impl)
    loss.backward()
    for before, after in zip(saved, (student, teacher, pred, target)):
        assert torch.equal(before, after.detach())
    with torch.no_grad():
        assert fused_kd_loss(student, teacher, 4.0, impl=impl).item() == pytest.approx(kd_loss(student, teacher, 4.0).item(), rel=1e-5)


# torch.compile takes seconds per case on CPU: a few cases that cover both losses, both dtypes and
# non-contiguous layouts, rather than the whole grid above
COMPILED_CASES = {
    "kd_fp32": (torch.float32, lambda: torch.randn(6, 10), lambda s, t: kd_loss(s, t, 2.0), lambda s, t: fused_kd_loss(s, t, 2.0, impl="compiled")),
    "kd_reverse_bf16_transposed": (
        torch.bfloat16, lambda: 3 * torch.randn(37, 5).t(),
        lambda s, t: kd_loss(s, t, 2.0, True), lambda s, t: fused_kd_loss(s, t, 2.0, True, impl="compiled"),
    ),
    "smooth_l1_normalized_channels_last": (
        torch.float32, FEATURE_SHAPES["channels_last"],
        lambda p, t: feature_loss(p, t, "smooth_l1", True, beta=2.0), lambda p, t: fused_feature_loss(p, t, "smooth_l1", True, beta=2.0, impl="compiled"),
    ),
    "cosine_bf16_tokens_transposed": (
        torch.bfloat16, FEATURE_SHAPES["tokens_transposed"],
        lambda p, t: feature_loss(p, t, "cosine", False), lambda p, t: fused_feature_loss(p, t, "cosine", False, impl="compiled"),
    ),
}


@pytest.mark.parametrize("case", list(COMPILED_CASES))
def test_compiled_matches_reference(case: str) -> None:
    torch.manual_seed(4)
    dtype, make, loss_ref, loss_compiled = COMPILED_CASES[case]
    pred, target = make().to(dtype).requires_grad_(), (2 * make() + 1).to(dtype)
    ref, (ref_grad,), fused, (fused_grad,) = reference_and_fused(loss_ref, loss_compiled, [pred, target])
    loss_tol, grad_tol = TOLERANCE[dtype]
    assert fused.item() == pytest.approx(ref.item(), rel=loss_tol)
    assert fused_grad.shape == pred.shape and fused_grad.dtype == dtype
    close(fused_grad, ref_grad, grad_tol)


@pytest.mark.parametrize("impl", IMPLS)
def test_ops_pass_opcheck(impl: str) -> None:
    """The fused paths are torch.library custom ops: opcheck runs each on real, fake and traced
    (AOTAutograd, dynamic shapes) tensors and checks that the schema, the fake kernel's shapes and
    strides, and the registered backward agree with the real kernel."""
    torch.manual_seed(5)
    teacher, student = torch.randn(5, 13, device=DEVICE), torch.randn(5, 13, device=DEVICE, requires_grad=True)
    torch.library.opcheck(torch.ops.mmkd.fused_kd.default, (teacher, student, 2.0, impl, False, True))
    pred = torch.randn(2, 6, 3, 3, device=DEVICE).to(memory_format=torch.channels_last).requires_grad_()
    target = torch.randn(2, 6, 3, 3, device=DEVICE)
    torch.library.opcheck(torch.ops.mmkd.fused_feature.default, (pred, target, "smooth_l1", True, 2.0, impl, True))


@pytest.mark.parametrize("impl", IMPLS)
def test_a_compiled_step_is_one_graph(impl: str) -> None:
    """``torch.compile(fullgraph=True)`` of a step with both fused losses: no graph break (it
    raises on one), and the loss and gradients of the eager reference. On CPU the Triton
    interpreter's kernels run as opaque ops under the aot_eager backend; inductor elsewhere."""
    torch.manual_seed(6)
    student = torch.randn(6, 10, device=DEVICE, requires_grad=True)
    pred = torch.randn(2, 8, 4, 4, device=DEVICE, requires_grad=True)
    teacher, target = torch.randn(6, 10, device=DEVICE), torch.randn(2, 8, 4, 4, device=DEVICE)

    def step(loss_kd, loss_feature):
        return lambda: 0.9 * loss_kd(student, teacher, 4.0) + 2.0 * loss_feature(pred, target, "mse", True)

    backend = "aot_eager" if DEVICE == "cpu" and impl == "triton" else "inductor"
    compiled_step = torch.compile(
        step(lambda *a: fused_kd_loss(*a, impl=impl), lambda *a: fused_feature_loss(*a, impl=impl)), backend=backend, fullgraph=True
    )
    for _ in range(2):  # the second call runs the cached graph
        loss = compiled_step()
        grads = torch.autograd.grad(loss, [student, pred])
    ref = step(kd_loss, feature_loss)()
    ref_grads = torch.autograd.grad(ref, [student, pred])
    assert loss.item() == pytest.approx(ref.item(), rel=1e-5)
    for got, expected in zip(grads, ref_grads):
        close(got, expected, 1e-5)


@pytest.mark.skipif(not torch.cuda.is_available() or not HAS_TRITON, reason="CUDA graphs need a GPU")
def test_cuda_graphs_capture_the_triton_losses() -> None:
    """``mode="reduce-overhead"`` records the step's kernels as CUDA graphs and replays them: the
    fused ops make no host syncs and allocate nothing the graph cannot own."""
    torch.manual_seed(7)
    student = torch.randn(64, 1000, device="cuda", requires_grad=True)
    teacher = torch.randn(64, 1000, device="cuda")
    compiled = torch.compile(lambda s, t: fused_kd_loss(s, t, 4.0, impl="triton"), mode="reduce-overhead", fullgraph=True)
    for _ in range(3):  # warm-up, record, replay
        (grad,) = torch.autograd.grad(compiled(student, teacher), student)
    (ref_grad,) = torch.autograd.grad(kd_loss(student, teacher, 4.0), student)
    close(grad, ref_grad, 1e-5)


def test_loss_modules_dispatch_and_agree() -> None:
    student, teacher = torch.randn(6, 10), torch.randn(6, 10)
    values = {impl: KDLoss(2.0, loss_weight=0.5, impl=impl)(student, teacher).item() for impl in ("auto", "chunked", "eager")}
    assert values["auto"] == values["eager"] and values["chunked"] == pytest.approx(values["eager"], rel=1e-6)
    pred, target = torch.randn(4, 16), torch.randn(4, 16)
    eager = FeatureLoss("smooth_l1", True, beta=2.0, impl="eager")(pred, target)
    assert FeatureLoss("smooth_l1", True, beta=2.0)(pred, target).item() == pytest.approx(eager.item(), rel=1e-6)


def test_second_backward_is_refused() -> None:
    student = torch.randn(4, 5, requires_grad=True)
    loss = fused_kd_loss(student, torch.randn(4, 5), impl="chunked")
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="back-propagated twice; use impl='eager'"):
        loss.backward()


def test_impl_errors_say_what_to_use(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ValueError, match="unknown loss impl 'fast'; choose one of auto, triton, compiled, chunked, eager"):
        resolve_impl("fast", torch.zeros(1))
    assert resolve_impl("auto", torch.zeros(1)) == "eager"  # small CPU inputs: compiling would not pay
    assert resolve_impl("auto", torch.zeros(AUTO_COMPILE_MIN_ELEMENTS)) == "compiled"
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    if HAS_TRITON:
        with pytest.raises(RuntimeError, match="needs CUDA tensors .* impl='chunked'"):
            resolve_impl("triton", torch.zeros(1))
    with pytest.raises(ValueError, match=r"logit shapes differ: student \[2, 3\] vs teacher \[2, 4\]"):
        fused_kd_loss(torch.zeros(2, 3), torch.zeros(2, 4))
