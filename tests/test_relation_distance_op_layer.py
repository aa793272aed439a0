"""relation_distance at the edges and as custom ops: autocast, double backward, mask weights (values and their
gradient), zero-norm tokens, backend validation, torch.compile(fullgraph=True), opcheck, host syncs."""

from __future__ import annotations

import contextlib

import pytest
import torch
import torch._dynamo.testing
import torch.nn.functional as F
from helpers import features, relation_distance_truth

import stss_kernels
from stss_kernels import relation_distance
from stss_kernels._core.backends import triton_available, triton_interpreting

TRITON = pytest.param(
    "triton",
    marks=pytest.mark.skipif(
        not (triton_available() and (torch.cuda.is_available() or triton_interpreting())), reason="Triton cannot run"
    ),
)
BACKENDS = ["reference", "torch", TRITON]
FUSED = ["torch", TRITON]
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
SHAPE = (2, 3, 7, 5, 12)  # batch, frames, hw, student channels, teacher channels
MARGIN = 0.05


def _weights(batch, num_tokens, seed=1):
    gen = torch.Generator().manual_seed(seed)
    weight = torch.rand(batch, num_tokens, generator=gen).mul(2)
    return torch.where(torch.rand(batch, num_tokens, generator=gen) < 0.35, 0.0, weight).to(DEVICE)


def _truth_rows(student, teacher, frames, variant):
    """Per-query rows (B, N) of the float64 truth (tests/helpers.py), cosine similarities."""
    return relation_distance_truth(student.cpu(), teacher.cpu(), frames, MARGIN, variant).to(DEVICE)


def _loss_and_grads(fn, student, teacher, forward_context=contextlib.nullcontext):
    student = student.detach().requires_grad_()
    teacher = teacher.detach().requires_grad_()
    with forward_context():
        loss = fn(student, teacher)
    return (loss.detach(), *torch.autograd.grad(loss, (student, teacher)))


@pytest.mark.parametrize("backend", BACKENDS)
def test_autocast_changes_nothing(backend):
    student, teacher = features(*SHAPE, seed=2, device=DEVICE)
    mask = _weights(2, 21)
    fn = lambda s, t: relation_distance(s, t, frames=3, margin=MARGIN, variant="spatial", query_mask=mask,
                                        backend=backend)  # fmt: skip
    expected = _loss_and_grads(fn, student, teacher)
    actual = _loss_and_grads(fn, student, teacher, lambda: torch.autocast(DEVICE, dtype=torch.bfloat16))
    for a, e in zip(actual, expected):
        torch.testing.assert_close(a, e, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("backend", FUSED)
def test_double_backward_raises_a_clear_error(backend):
    student, teacher = features(*SHAPE, seed=3, device=DEVICE)
    student.requires_grad_()
    loss = relation_distance(student, teacher, frames=3, margin=MARGIN, backend=backend)
    (grad,) = torch.autograd.grad(loss, student, create_graph=True)
    with pytest.raises(RuntimeError, match="double backward.*backend='reference'"):
        torch.autograd.grad(grad.square().sum(), student)


@pytest.mark.parametrize("bad", [-0.5, float("nan"), float("inf")], ids=["neg", "nan", "inf"])
def test_bad_mask_weights_are_refused(bad):
    """The op layer's check, before it picks a backend (test_relation_distance.py checks that for every backend)."""
    student, teacher = features(*SHAPE, device=DEVICE)
    mask = _weights(2, 21)
    mask[1, 4] = bad
    with pytest.raises(ValueError, match="query_mask"):
        relation_distance(student, teacher, frames=3, query_mask=mask)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("reduction", ["sum", "mean"])
def test_mask_that_requires_grad_gets_the_exact_gradient(backend, reduction):
    student, teacher = features(*SHAPE, seed=4, device=DEVICE)
    weight = _weights(2, 21, seed=5)
    mask = weight.clone().requires_grad_()
    loss = relation_distance(student, teacher, frames=3, margin=MARGIN, variant="temporal", query_mask=mask,
                             reduction=reduction, backend=backend)  # fmt: skip
    (grad_mask,) = torch.autograd.grad(loss, mask)
    w64 = weight.double().requires_grad_()
    rows = _truth_rows(student, teacher, 3, "temporal")
    truth = (w64 * rows).sum() / (w64.sum() if reduction == "mean" else 1)
    (truth_grad,) = torch.autograd.grad(truth, w64)
    assert (truth_grad[weight == 0].abs() > 1e-4).any(), "degenerate test: zero rows need a gradient"
    torch.testing.assert_close(grad_mask.double(), truth_grad, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_zero_norm_tokens_stay_zero_with_zero_gradient(backend, dtype):
    student, teacher = features(*SHAPE, seed=6, device=DEVICE)
    student[0, 4] = 0
    teacher[1, 0] = 0
    value, grad_s, grad_t = _loss_and_grads(
        lambda s, t: relation_distance(s, t, frames=3, margin=MARGIN, backend=backend), student.to(dtype),
        teacher.to(dtype),
    )  # fmt: skip
    assert value.isfinite() and grad_s.isfinite().all() and grad_t.isfinite().all()
    assert (grad_s[0, 4] == 0).all() and (grad_t[1, 0] == 0).all()


def _backend_functions():
    yield pytest.param(stss_kernels.relation_distance_reference, id="reference")
    yield pytest.param(stss_kernels.relation_distance_torch, id="torch")
    yield pytest.param(stss_kernels.relation_distance_triton, id="triton")


def _bad_backend_args():
    s, t = features(2, 3, 4, 5, 6, device=DEVICE)
    ok = dict(student=s, teacher=t, frames=3, margin=0.1, variant="full", query_weight=None)
    return [
        ("student_list", dict(ok, student=s.tolist()), TypeError, "student"),
        ("dtype_mismatch", dict(ok, teacher=t.half()), TypeError, "teacher"),
        ("token_mismatch", dict(ok, teacher=t[:, :6]), ValueError, "teacher"),
        ("frames_not_dividing", dict(ok, frames=5), ValueError, "frames"),
        ("margin_negative", dict(ok, margin=-0.1), ValueError, "margin"),
        ("margin_nan", dict(ok, margin=float("nan")), ValueError, "margin"),
        ("variant_unknown", dict(ok, variant="diagonal"), ValueError, "variant"),
        ("weight_shape", dict(ok, query_weight=torch.ones(2, 11, device=DEVICE)), ValueError, "query_weight"),
    ]


@pytest.mark.parametrize("fn", _backend_functions())
@pytest.mark.parametrize("case", _bad_backend_args(), ids=lambda case: case[0])
def test_backends_validate_their_arguments(fn, case):
    _, kwargs, error, argument = case
    with pytest.raises(error, match=argument):
        fn(**kwargs)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mask_kind", ["none", "bool", "float"])
def test_compile_fullgraph_matches_eager(backend, mask_kind):
    torch._dynamo.reset()
    mask = {"none": None, "bool": _weights(2, 21) > 0, "float": _weights(2, 21)}[mask_kind]

    def loss_fn(student, teacher):
        return relation_distance(student, teacher, frames=3, margin=MARGIN, variant="spatial", query_mask=mask,
                                 backend=backend)  # fmt: skip

    counter = torch._dynamo.testing.CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(loss_fn, fullgraph=True, backend=counter)
    for seed in (0, 1):
        student, teacher = features(*SHAPE, seed=seed, device=DEVICE)
        expected = _loss_and_grads(loss_fn, student, teacher)
        actual = _loss_and_grads(compiled, student, teacher)
        for a, e in zip(actual, expected):
            torch.testing.assert_close(a, e, rtol=1e-6, atol=1e-7)
    assert counter.frame_count == 1


@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize("masked", [False, True], ids=["unmasked", "masked"])
def test_forward_op_passes_opcheck(backend, masked):
    student, teacher = (F.normalize(x, dim=-1) for x in features(*SHAPE, seed=7, device=DEVICE))
    weight = _weights(2, 21) if masked else None
    args = (student.requires_grad_(), teacher.requires_grad_(), 3, MARGIN, "temporal", weight)
    op = getattr(torch.ops.stss_kernels, f"relation_distance_{backend}").default
    torch.library.opcheck(op, (*args, 8) if backend == "torch" else args)


@pytest.mark.parametrize("backend", FUSED)
def test_paths_without_host_sync_match(backend, monkeypatch):
    """Where a host sync is not allowed (CUDA graph capture): every row computed instead of nonzero, the general
    (non-symmetric) backward instead of testing the row gradients, every position instead of the kept counts."""
    from stss_kernels._core import chunking
    from stss_kernels.ops.relation_distance import pairs

    student, teacher = (F.normalize(x, dim=-1) for x in features(*SHAPE, seed=8, device=DEVICE))
    weight = _weights(2, 21)
    upstream = torch.randn(2, 21, generator=torch.Generator().manual_seed(9)).to(DEVICE)
    kl_fn = getattr(stss_kernels, f"relation_distance_{backend}")
    results = []
    for weights, up in ((weight, upstream), (None, torch.ones_like(upstream))):  # masked, and symmetric
        fn = lambda s, t, weights=weights, up=up: (kl_fn(s, t, 3, MARGIN, "spatial", weights) * up).sum()
        results.append(_loss_and_grads(fn, student, teacher))
    monkeypatch.setattr(chunking, "host_sync_allowed", lambda tensor: False)
    monkeypatch.setattr(pairs, "host_sync_allowed", lambda tensor: False)
    if backend == "triton":
        from stss_kernels.ops.relation_distance.triton_backend import sign_block

        monkeypatch.setattr(sign_block, "host_sync_allowed", lambda tensor: False)
    for (weights, up), expected in zip(((weight, upstream), (None, torch.ones_like(upstream))), results):
        fn = lambda s, t, weights=weights, up=up: (kl_fn(s, t, 3, MARGIN, "spatial", weights) * up).sum()
        for a, e in zip(_loss_and_grads(fn, student, teacher), expected):
            torch.testing.assert_close(a, e, rtol=1e-5, atol=1e-6)
