"""tempered_kl at the edges: autocast, double backward, mask weights (values and their gradient),
temperatures at the float limit, zero-norm tokens, and validation of the directly importable backends."""

from __future__ import annotations

import contextlib
import importlib

import pytest
import torch
from helpers import assert_close_to_truth, features, tempered_kl_truth

from stss_kernels import tempered_kl, tempered_kl_reference, tempered_kl_torch
from stss_kernels._core.backends import triton_available


def _triton_backend_importable() -> bool:
    try:
        return hasattr(importlib.import_module("stss_kernels.ops.tempered_kl.triton_backend"), "tempered_kl_triton")
    except ImportError:
        return False


TRITON = pytest.param(
    "triton",
    marks=pytest.mark.skipif(
        not (_triton_backend_importable() and triton_available()), reason="the Triton backend or Triton is missing"
    ),
)
BACKENDS = ["reference", "torch", TRITON]
FUSED_BACKENDS = ["torch", TRITON]
CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
# (batch, frames, hw, student channels, teacher channels): ragged against every block size.
SHAPE = (2, 3, 7, 5, 12)
TAUS = dict(tau_student=0.1, tau_teacher=0.15)


def _weights(batch, num_tokens, seed=1):
    """Float weights in [0, 2) with about a third of them exactly 0."""
    gen = torch.Generator().manual_seed(seed)
    weight = torch.rand(batch, num_tokens, generator=gen).mul(2)
    return torch.where(torch.rand(batch, num_tokens, generator=gen) < 0.35, 0.0, weight)


def _truth_kl(student, teacher, frames, tau_student=0.1, tau_teacher=0.15):
    """Per-query KL (B, N) of the float64 truth (tests/helpers.py), cosine similarities."""
    return tempered_kl_truth(student.double(), teacher.double(), frames, tau_student, tau_teacher)


def _loss_and_grads(fn, student, teacher, forward_context=contextlib.nullcontext):
    student = student.detach().requires_grad_()
    teacher = teacher.detach().requires_grad_()
    with forward_context():
        loss = fn(student, teacher)
    return (loss.detach(), *torch.autograd.grad(loss, (student, teacher)))


# --- autocast --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("masked", [False, True], ids=["unmasked", "masked"])
def test_autocast_changes_nothing(backend, dtype, masked):
    """A forward under CPU bf16 autocast computes exactly what it computes outside it (in the inputs' dtype);
    the backward runs outside autocast, as PyTorch recommends."""
    if backend == "triton" and dtype == torch.bfloat16:
        pytest.skip("bf16 features need a GPU for the Triton backend")
    batch, frames, hw, cs, ct = SHAPE
    student, teacher = features(*SHAPE, dtype=dtype, seed=2)
    mask = _weights(batch, frames * hw) if masked else None
    fn = lambda s, t: tempered_kl(s, t, frames=frames, query_mask=mask, backend=backend, **TAUS)
    expected = _loss_and_grads(fn, student, teacher)
    actual = _loss_and_grads(fn, student, teacher, lambda: torch.autocast("cpu", dtype=torch.bfloat16))
    for a, e in zip(actual, expected):
        assert a.dtype == e.dtype
        torch.testing.assert_close(a, e, rtol=1e-6, atol=1e-7)


@CUDA
@pytest.mark.parametrize("backend", BACKENDS)
def test_autocast_changes_nothing_cuda(backend):
    student, teacher = features(2, 3, 50, 40, 24, device="cuda", seed=3)
    mask = _weights(2, 150).cuda()
    fn = lambda s, t: tempered_kl(s, t, frames=3, query_mask=mask, backend=backend, **TAUS)
    expected = _loss_and_grads(fn, student, teacher)
    actual = _loss_and_grads(fn, student, teacher, lambda: torch.autocast("cuda", dtype=torch.bfloat16))
    for a, e in zip(actual, expected):
        torch.testing.assert_close(a, e, rtol=1e-5, atol=1e-6)


# --- double backward -------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", FUSED_BACKENDS)
def test_double_backward_raises_a_clear_error(backend):
    """Differentiating the fused backends' gradient again is refused, never silently wrong."""
    student, teacher = features(*SHAPE[:3], 5, 12, seed=4)
    student.requires_grad_()
    loss = tempered_kl(student, teacher, frames=SHAPE[1], backend=backend, **TAUS)
    (grad,) = torch.autograd.grad(loss, student, create_graph=True)
    with pytest.raises(RuntimeError, match="double backward.*backend='reference'"):
        torch.autograd.grad(grad.square().sum(), student)


@pytest.mark.parametrize("backend", FUSED_BACKENDS)
def test_create_graph_first_order_gradient_is_right(backend):
    """create_graph=True alone (e.g. a penalty elsewhere in the graph) still gives the right first gradient."""
    student, teacher = features(*SHAPE, seed=5)
    fn = lambda s, t: tempered_kl(s, t, frames=SHAPE[1], backend=backend, **TAUS)
    expected = _loss_and_grads(fn, student, teacher)
    s, t = student.clone().requires_grad_(), teacher.clone().requires_grad_()
    grads = torch.autograd.grad(fn(s, t), (s, t), create_graph=True)
    for a, e in zip(grads, expected[1:]):
        torch.testing.assert_close(a.detach(), e)


def test_double_backward_reference_is_exact():
    student, teacher = features(1, 2, 3, 3, 4, dtype=torch.float64, seed=6)
    fn = lambda s, t: tempered_kl(s, t, frames=2, tau_student=0.3, tau_teacher=0.2, backend="reference")
    assert torch.autograd.gradgradcheck(fn, (student.requires_grad_(), teacher.requires_grad_()))


# --- mask weights ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("bad", [-0.5, float("nan"), float("inf"), -float("inf")], ids=["neg", "nan", "inf", "-inf"])
def test_bad_mask_weights_are_refused(bad):
    """The op layer's check, before it picks a backend (test_tempered_kl.py checks that for every backend)."""
    student, teacher = features(*SHAPE)
    mask = _weights(2, 21)
    mask[1, 4] = bad
    with pytest.raises(ValueError, match="query_mask"):
        tempered_kl(student, teacher, frames=3, query_mask=mask)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("reduction", ["none", "sum", "mean"])
def test_mask_that_requires_grad_gets_the_exact_gradient(backend, reduction):
    """d loss / d w on every row, zero-weight rows included, against an fp64 computation."""
    batch, frames, hw, cs, ct = SHAPE
    student, teacher = features(*SHAPE, seed=7)
    weight = _weights(batch, frames * hw, seed=8)
    upstream = torch.randn(batch, frames * hw, generator=torch.Generator().manual_seed(9))

    def loss_fn(w, s, t, **kwargs):
        out = tempered_kl(s, t, frames=frames, query_mask=w, reduction=reduction, **TAUS, **kwargs)
        return (out * upstream.to(out)).sum() if reduction == "none" else out

    mask = weight.clone().requires_grad_()
    student_grad = student.clone().requires_grad_()
    loss = loss_fn(mask, student_grad, teacher, backend=backend)
    grad_mask, grad_student = torch.autograd.grad(loss, (mask, student_grad))

    kl = _truth_kl(student, teacher, frames)
    w64 = weight.double().requires_grad_()
    s64 = student.double().requires_grad_()
    truth_kl = _truth_kl(s64, teacher, frames)
    if reduction == "none":
        truth = (w64 * truth_kl * upstream.double()).sum()
    elif reduction == "sum":
        truth = (w64 * truth_kl).sum()
    else:
        truth = (w64 * truth_kl).sum() / w64.sum()
    truth_grad_mask, truth_grad_student = torch.autograd.grad(truth, (w64, s64))
    assert (truth_grad_mask[weight == 0].abs() > 1e-3).any(), "degenerate test: zero rows need a gradient"
    assert kl.abs().max() > 0.1
    assert_close_to_truth(
        (loss, grad_mask, grad_student),
        (truth, truth_grad_mask, truth_grad_student),
        rel_tol=1e-5,
        names=("value", "grad_mask", "grad_student"),
    )


# --- temperatures ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["tau_student", "tau_teacher"])
@pytest.mark.parametrize("tau", [1e-320, 1e-40, 5e-324])
def test_temperature_with_infinite_reciprocal_is_refused(name, tau):
    """The op layer's check (the backends' own: test_backends_validate_their_arguments)."""
    student, teacher = features(*SHAPE)
    with pytest.raises(ValueError, match=name):
        tempered_kl(student, teacher, frames=3, **{name: tau})


def test_small_but_representable_temperature_is_accepted():
    student, teacher = features(*SHAPE)
    loss = tempered_kl(student, teacher, frames=3, tau_student=1e-30, tau_teacher=1e-30, backend="torch")
    assert loss.isfinite()


# --- zero-norm tokens -------------------------------------------------------------------------------------


def _zero_token_cases():
    for backend in ("reference", "torch"):
        for dtype in (torch.float32, torch.float16, torch.bfloat16):
            yield pytest.param(backend, dtype)
    for dtype in (torch.float32, torch.float16):
        yield pytest.param(*TRITON.values, dtype, marks=TRITON.marks)


@pytest.mark.parametrize("backend,dtype", _zero_token_cases())
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_zero_norm_tokens_stay_zero_with_zero_gradient(backend, dtype, reduction):
    """normalize=True: an all-zero token normalises to zero (similarity 0 to every key) and gets zero gradient;
    value and the other tokens' gradients are finite and, in fp32, match the fp64 truth."""
    batch, frames, hw, cs, ct = SHAPE
    student, teacher = features(*SHAPE, seed=10)
    student[0, 4] = 0
    student[1, 20] = 0
    teacher[0, 4] = 0
    teacher[1, 0] = 0
    student, teacher = student.to(dtype), teacher.to(dtype)
    upstream = torch.randn(batch, frames * hw, generator=torch.Generator().manual_seed(11))

    def loss_fn(s, t):
        out = tempered_kl(s, t, frames=frames, reduction=reduction, backend=backend, **TAUS)
        return (out * upstream.to(out)).sum() if reduction == "none" else out

    value, grad_s, grad_t = _loss_and_grads(loss_fn, student, teacher)
    assert value.isfinite() and grad_s.isfinite().all() and grad_t.isfinite().all()
    assert (grad_s[0, 4] == 0).all() and (grad_s[1, 20] == 0).all()
    assert (grad_t[0, 4] == 0).all() and (grad_t[1, 0] == 0).all()
    if dtype != torch.float32:
        return
    s64, t64 = student.double().requires_grad_(), teacher.double().requires_grad_()
    truth_rows = _truth_kl(s64, t64, frames)
    truth = (truth_rows * upstream.double()).sum() if reduction == "none" else truth_rows.mean()
    truth_s, truth_t = torch.autograd.grad(truth, (s64, t64))
    for zero_rows, g in (([(0, 4), (1, 20)], truth_s), ([(0, 4), (1, 0)], truth_t)):
        for b, i in zero_rows:
            g[b, i] = 0  # the convention: no gradient where the direction is undefined
    assert_close_to_truth((value, grad_s, grad_t), (truth, truth_s, truth_t), rel_tol=1e-5)


# --- the directly importable backends validate like the op ------------------------------------------------


def _backend_functions():
    yield pytest.param(tempered_kl_reference, id="reference")
    yield pytest.param(tempered_kl_torch, id="torch")
    if _triton_backend_importable():
        from stss_kernels.ops.tempered_kl.triton_backend import tempered_kl_triton

        yield pytest.param(tempered_kl_triton, id="triton")


def _bad_backend_args():
    s, t = features(2, 3, 4, 5, 6)
    ok = dict(student=s, teacher=t, frames=3, tau_student=0.1, tau_teacher=0.1, query_weight=None)
    return [
        ("student_list", dict(ok, student=s.tolist()), TypeError, "student"),
        ("student_int", dict(ok, student=s.long()), TypeError, "student"),
        ("student_5d", dict(ok, student=s.view(2, 3, 2, 2, 5)), ValueError, "student"),
        ("dtype_mismatch", dict(ok, teacher=t.half()), TypeError, "teacher"),
        ("token_mismatch", dict(ok, teacher=t[:, :6]), ValueError, "teacher"),
        ("batch_mismatch", dict(ok, teacher=t[:1]), ValueError, "teacher"),
        ("frames_not_dividing", dict(ok, frames=5), ValueError, "frames"),
        ("frames_float", dict(ok, frames=3.0), TypeError, "frames"),
        ("tau_zero", dict(ok, tau_student=0.0), ValueError, "tau_student"),
        ("tau_tiny", dict(ok, tau_teacher=1e-320), ValueError, "tau_teacher"),
        ("tau_nan", dict(ok, tau_teacher=float("nan")), ValueError, "tau_teacher"),
        ("weight_shape", dict(ok, query_weight=torch.ones(2, 11)), ValueError, "query_weight"),
        ("weight_dtype", dict(ok, query_weight=torch.ones(2, 12, dtype=torch.long)), TypeError, "query_weight"),
        ("weight_device", dict(ok, query_weight=torch.ones(2, 12, device="meta")), ValueError, "query_weight"),
    ]


@pytest.mark.parametrize("fn", _backend_functions())
@pytest.mark.parametrize("case", _bad_backend_args(), ids=lambda case: case[0])
def test_backends_validate_their_arguments(fn, case):
    _, kwargs, error, argument = case
    with pytest.raises(error, match=argument):
        fn(**kwargs)


# --- double backward under torch.compile ---------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("normalize", [True, False], ids=["cosine", "dot"])
def test_compiled_double_backward_never_gives_a_second_derivative(backend, normalize):
    """As the op's docstring says: compiled, the gradient's own gradient is an error (or, with allow_unused=True,
    None), on every backend, never a value."""
    torch._dynamo.reset()
    student, teacher = features(1, 2, 4, 5, 6, seed=12)
    student.requires_grad_()
    compiled = torch.compile(
        lambda s, t: tempered_kl(s, t, frames=2, normalize=normalize, backend=backend, **TAUS),
        fullgraph=True,
        backend="aot_eager",
    )
    (grad,) = torch.autograd.grad(compiled(student, teacher), student, create_graph=True)
    with pytest.raises(RuntimeError, match="double backward|not have been used|does not require grad"):
        torch.autograd.grad(grad.square().sum(), student)
    try:
        second = torch.autograd.grad(grad.square().sum(), student, allow_unused=True)
    except RuntimeError as error:
        assert "double backward" in str(error)
    else:
        assert second == (None,)
