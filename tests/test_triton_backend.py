"""The fused Triton backend against the float64 truth (tests/helpers.py): values and both gradients.

Without a GPU this runs under TRITON_INTERPRET=1 (set by conftest.py) with 16 x 16 query/key tiles and
32-channel chunks, so the shapes below are ragged against those blocks: HW = 7 (< one key tile),
HW = 20 and 23 (a frame spans two key tiles), channel counts 5, 12, 37 (two chunks), never powers of two.
"""

from __future__ import annotations

import pytest
import torch
from helpers import assert_close_to_truth, features, max_error, tempered_kl_truth

from stss_kernels import tempered_kl_reference
from stss_kernels._core import chunking
from stss_kernels.ops.tempered_kl.triton_backend import forward, tempered_kl_triton

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
gpu_only = pytest.mark.skipif(not CUDA, reason="needs a CUDA device")


def _unit_pair(batch: int, tokens: int, cs: int, ct: int, dtype: torch.dtype, seed: int):
    """The shared test features (tests/helpers.py), normalised (what the backend receives from the op), on DEVICE."""
    student, teacher = features(batch, 1, tokens, cs, ct, dtype=torch.float64, seed=seed)
    return tuple(torch.nn.functional.normalize(x, dim=-1).to(device=DEVICE, dtype=dtype) for x in (student, teacher))


def _kl_and_grads(backend, student, teacher, frames, taus, upstream, query_weight=None, teacher_grad=True):
    """kl and the gradients of sum(upstream * kl) w.r.t. student and teacher (None when not required)."""
    student = student.detach().clone().requires_grad_()
    teacher = teacher.detach().clone().requires_grad_(teacher_grad)
    kl = backend(student, teacher, frames, *taus, query_weight)
    kl.backward(upstream)
    return kl.detach(), student.grad, teacher.grad


def _truth(student, teacher, frames, taus, upstream):
    """kl and gradients of the float64 truth (tests/helpers.py) on the same (possibly rounded) inputs."""
    truth = lambda s, t, frames, tau_s, tau_t, _: tempered_kl_truth(s, t, frames, tau_s, tau_t, normalize=False)
    return _kl_and_grads(truth, student.double().cpu(), teacher.double().cpu(), frames, taus, upstream.double().cpu())


def _assert_matches(actual, truth, rel: float) -> None:
    """Every computed output within rel times its own scale of the float64 truth (plus 1e-12)."""
    names = ("kl", "grad student", "grad teacher")
    computed = [(name, value, expected) for name, value, expected in zip(names, actual, truth) if value is not None]
    assert_close_to_truth([v for _, v, _ in computed], [e for _, _, e in computed], rel, [n for n, _, _ in computed])


@pytest.fixture(params=["fused", "chunked"])
def backward_path(request, monkeypatch):
    """Run the kernels as narrow features do (the resident-query forward and the fused backward) or, as wide
    features do, the channel-loop forward and the chunked dL/dS + product backward. The chunked path's block
    budget is cut so that a video takes several chunks of query rows.
    """
    if request.param == "chunked":
        monkeypatch.setattr(forward, "NARROW_CHANNELS", 0)
        monkeypatch.setattr(chunking, "CHUNK_BUDGET_BYTES", 4 * 17 * 60 * 4)
    return request.param


@pytest.mark.parametrize(
    "batch, frames, hw, cs, ct",
    [
        (2, 3, 7, 5, 12),  # frame smaller than a key tile
        (2, 3, 20, 37, 12),  # frame spans two key tiles; student channels span two chunks
        (1, 1, 23, 6, 9),  # frames=1: one softmax over the whole clip
    ],
)
def test_fp32_matches_fp64_reference(batch, frames, hw, cs, ct, backward_path):
    tokens = frames * hw
    student, teacher = _unit_pair(batch, tokens, cs, ct, torch.float32, 0)
    upstream = torch.randn(batch, tokens, generator=torch.Generator().manual_seed(2)).to(DEVICE)
    taus = (0.1, 0.07)
    actual = _kl_and_grads(tempered_kl_triton, student, teacher, frames, taus, upstream)
    assert actual[0].dtype == torch.float32 and actual[1].dtype == actual[2].dtype == torch.float32
    _assert_matches(actual, _truth(student, teacher, frames, taus, upstream), rel=1e-5)


GPU_HALF_SHAPES = [(2, 4, 150, 96, 80), (2, 4, 150, 768, 768)]  # fused backward, and the wide (chunked) one


@pytest.mark.parametrize("upstream_kind", ["random", "mean"])
@pytest.mark.parametrize(
    "dtype",
    [torch.float16, pytest.param(torch.bfloat16, marks=gpu_only)],
)
def test_half_precision_no_worse_than_pytorch(dtype, upstream_kind, backward_path):
    """Error against the fp64 truth on the same rounded inputs <= same-dtype PyTorch's error + a small tol.

    "mean" is the upstream gradient of reduction="mean", 1 / (B N): tiny dL/dS entries that must not
    underflow when the kernels round them to the input dtype.
    """
    for batch, frames, hw, cs, ct in [(2, 3, 20, 12, 37)] if not CUDA else GPU_HALF_SHAPES:
        tokens = frames * hw
        student, teacher = _unit_pair(batch, tokens, cs, ct, dtype, 3)
        if upstream_kind == "mean":
            upstream = torch.full((batch, tokens), 1.0 / (batch * tokens), device=DEVICE)
        else:
            upstream = torch.randn(batch, tokens, generator=torch.Generator().manual_seed(5)).to(DEVICE)
        taus = (0.1, 0.1)
        truth = _truth(student, teacher, frames, taus, upstream)
        triton_out = _kl_and_grads(tempered_kl_triton, student, teacher, frames, taus, upstream)
        pytorch_out = _kl_and_grads(tempered_kl_reference, student, teacher, frames, taus, upstream)
        assert triton_out[1].dtype == triton_out[2].dtype == dtype
        for name, ours, theirs, expected in zip(("kl", "grad student", "grad teacher"), triton_out, pytorch_out, truth):
            tol = 2e-3 * expected.abs().max().item()
            assert max_error(ours, expected) <= max_error(theirs, expected) + tol, (name, cs)


def test_zero_weight_rows_are_skipped_and_exact_elsewhere(backward_path):
    batch, frames, hw, cs, ct = 2, 2, 20, 5, 12
    tokens = frames * hw
    student, teacher = _unit_pair(batch, tokens, cs, ct, torch.float32, 6)
    generator = torch.Generator().manual_seed(8)
    weight = torch.rand(batch, tokens, generator=generator) + 0.5
    weight[:, 16:32] = 0
    weight[0, 3] = weight[1, 37] = 0
    weight[1, :16] = 0  # video 1 keeps 22 of 40 queries, video 0 keeps 23: kept lists end mid-tile
    weight = weight.to(DEVICE)
    upstream = torch.randn(batch, tokens, generator=generator).to(DEVICE)
    taus = (0.1, 0.1)
    kl, grad_student, grad_teacher = _kl_and_grads(tempered_kl_triton, student, teacher, frames, taus, upstream, weight)
    kept = weight != 0
    assert (kl[~kept] == 0).all()
    # Skipped rows pass no gradient: the result equals the reference's with their upstream gradient zeroed.
    truth = _truth(student, teacher, frames, taus, upstream * kept)
    _assert_matches((kl, grad_student, grad_teacher), (truth[0] * kept.cpu(), *truth[1:]), rel=1e-5)


def test_all_zero_weight_gives_zeros_without_nan(backward_path):
    student, teacher = _unit_pair(1, 14, 5, 6, torch.float32, 9)
    weight = torch.zeros(1, 14, dtype=torch.bool, device=DEVICE)
    kl, grad_student, grad_teacher = _kl_and_grads(
        tempered_kl_triton, student, teacher, 2, (0.1, 0.1), torch.ones(1, 14, device=DEVICE), weight
    )
    for value in (kl, grad_student, grad_teacher):
        assert torch.equal(value, torch.zeros_like(value))


def test_frozen_teacher_and_non_contiguous_inputs(backward_path):
    """Teacher without grad (as in training); student and upstream gradient non-contiguous, partly zero."""
    batch, frames, hw, cs, ct = 2, 2, 7, 5, 12
    tokens = frames * hw
    student, teacher = _unit_pair(batch, tokens, cs, ct, torch.float32, 11)
    student = student.transpose(1, 2).contiguous().transpose(1, 2)
    upstream = torch.randn(tokens, batch, generator=torch.Generator().manual_seed(13)).to(DEVICE).t()
    upstream[:, :8] = 0  # query rows without upstream gradient: tiles of them are skipped in backward
    assert not student.is_contiguous() and not upstream.is_contiguous()
    taus = (0.2, 0.05)
    kl, grad_student, grad_teacher = _kl_and_grads(
        tempered_kl_triton, student, teacher, frames, taus, upstream, teacher_grad=False
    )
    assert grad_teacher is None
    truth = _truth(student, teacher, frames, taus, upstream)
    _assert_matches((kl, grad_student), truth[:2], rel=1e-5)


@pytest.mark.parametrize(
    "change, error",
    [
        (dict(student=torch.float64, teacher=torch.float64), TypeError),
        (dict(teacher=torch.float16), TypeError),
        (dict(frames=4), ValueError),
        (dict(tau_student=0.0), ValueError),
        (dict(query_weight=(2, 5)), ValueError),
    ],
)
def test_bad_input_raises_before_any_kernel(change, error):
    args = dict(student=torch.float32, teacher=torch.float32, frames=2, tau_student=0.1, query_weight=None)
    args.update(change)
    student = torch.zeros(2, 6, 3, dtype=args["student"], device=DEVICE)
    teacher = torch.zeros(2, 6, 4, dtype=args["teacher"], device=DEVICE)
    weight = None if args["query_weight"] is None else torch.ones(args["query_weight"], device=DEVICE)
    with pytest.raises(error):
        tempered_kl_triton(student, teacher, args["frames"], args["tau_student"], 0.1, weight)


@gpu_only
def test_gpu_fp32_realistic_frame_spans_many_key_tiles():
    """HW = 1350 (CogVideoX's 30 x 45 grid) spans many key tiles of every autotune config."""
    batch, frames, hw, cs, ct = 1, 2, 1350, 96, 72
    tokens = frames * hw
    student, teacher = _unit_pair(batch, tokens, cs, ct, torch.float32, 14)
    upstream = torch.randn(batch, tokens, generator=torch.Generator().manual_seed(16)).to(DEVICE)
    taus = (0.1, 0.1)
    actual = _kl_and_grads(tempered_kl_triton, student, teacher, frames, taus, upstream)
    _assert_matches(actual, _truth(student, teacher, frames, taus, upstream), rel=1e-5)


@gpu_only
def test_gpu_bf16_small_temperature_is_finite():
    batch, frames, hw, channels = 2, 4, 150, 64
    tokens = frames * hw
    student, teacher = _unit_pair(batch, tokens, channels, channels, torch.bfloat16, 17)
    upstream = torch.ones(batch, tokens, device=DEVICE)
    outputs = _kl_and_grads(tempered_kl_triton, student, teacher, frames, (0.02, 0.02), upstream)
    for value in outputs:
        assert torch.isfinite(value).all()
