"""The relation distance's torch and Triton backends against its fp64 reference: chunking, key splits, the
symmetric and general backward paths, row skipping, gradcheck, and the torch backend's O(N) memory.

Without a GPU the Triton kernels run under TRITON_INTERPRET=1 (set by conftest.py) with 16 x 16 query/key
tiles and 32-channel chunks: HW = 7 (< one key tile), 20 (two key tiles), channels 5, 12, 37 (two chunks).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from helpers import assert_close_to_truth, features, relation_distance_truth, value_and_grads

from stss_kernels import relation_distance_reference
from stss_kernels._core.chunking import CHUNK_BUDGET_BYTES
from stss_kernels.ops.relation_distance.torch_backend import auto_chunk_size, relation_distance_torch

REPO_ROOT = Path(__file__).resolve().parents[1]
CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
VARIANTS = ("full", "spatial", "temporal")


def _triton():
    pytest.importorskip("triton")
    from stss_kernels.ops.relation_distance.triton_backend import relation_distance_triton

    return relation_distance_triton


def _pair(batch, num_tokens, cs, ct, dtype=torch.float64, seed=0):
    """The shared test features (tests/helpers.py) with a shared rank-3 component, so |S - T| straddles 0.1,
    normalised (what the backends receive from the op); float64 on the CPU, other dtypes on DEVICE."""
    student, teacher = features(batch, 1, num_tokens, cs, ct, dtype=torch.float64, seed=seed, shared_rank=3)
    device = DEVICE if dtype != torch.float64 else "cpu"
    return tuple(F.normalize(x, dim=-1).to(device, dtype) for x in (student, teacher))


def _clustered_pair(batch, num_tokens, cs, ct, dtype, seed=0):
    """Unit features near orthonormal cluster centres (4 for the student, 5 for the teacher, assigned at random):
    every S_ij and T_ij is within ~0.03 of 0 or 1, so |S - T| sits near 0 or 1, far on both sides of a 0.1
    margin at any size and in any dtype (large GPU cases have pairs arbitrarily close to any margin otherwise)."""
    gen = torch.Generator().manual_seed(seed)

    def side(channels, clusters):
        centres = torch.linalg.qr(torch.randn(channels, clusters, generator=gen, dtype=torch.float64))[0].T
        labels = torch.randint(clusters, (batch, num_tokens), generator=gen)
        noise = torch.randn(batch, num_tokens, channels, generator=gen, dtype=torch.float64)
        return F.normalize(centres[labels] + 0.01 * noise / channels**0.5, dim=-1).to(DEVICE, dtype)

    return side(cs, 4), side(ct, 5)


def _clear_margin(student, teacher, near=0.1):
    """A margin near `near` in the widest gap between the pairs' |S_ij - T_ij| (no pair sits on the kink)."""
    s, t = student.double().cpu(), teacher.double().cpu()
    gaps = (s @ s.transpose(1, 2) - t @ t.transpose(1, 2)).abs().flatten().sort().values
    window = gaps[(gaps > 0.4 * near) & (gaps < 2.5 * near)]
    best = int((window[1:] - window[:-1]).argmax())
    assert window[best + 1] - window[best] > 2e-4, "no clear margin"
    return float((window[best] + window[best + 1]) / 2)


def _truth(student, teacher, frames, margin, variant, upstream):
    """Rows and gradients of the float64 truth (tests/helpers.py) on the (already normalised) features."""
    fn = lambda s, t: relation_distance_truth(s, t, frames, margin, variant, normalize=False)
    return value_and_grads(fn, student.double().cpu(), teacher.double().cpu(), upstream.double().cpu())


def _assert_matches(actual, truth, rel=1e-5):
    """The outputs that were computed (a frozen teacher has no gradient) within rel of their truth's scale."""
    names = ("rows", "grad student", "grad teacher")
    computed = [(name, value, expected) for name, value, expected in zip(names, actual, truth) if value is not None]
    assert_close_to_truth([v for _, v, _ in computed], [e for _, _, e in computed], rel, [n for n, _, _ in computed])


# ---- torch backend ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("chunk_size", [1, 4, 7, 100, None])
@pytest.mark.parametrize("upstream_kind", ["random", "uniform"])
def test_torch_chunk_size_does_not_change_the_result(chunk_size, variant, upstream_kind):
    frames, hw = 3, 7
    student, teacher = _pair(2, frames * hw, 5, 12, seed=1)
    margin = _clear_margin(student, teacher)
    if upstream_kind == "uniform":  # a symmetric G: the single row pass
        upstream = torch.full((2, frames * hw), 0.5, dtype=torch.float64)
    else:
        upstream = torch.randn(2, frames * hw, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    fn = lambda s, t: relation_distance_torch(s, t, frames, margin, variant, chunk_size=chunk_size)
    actual = value_and_grads(fn, student, teacher, upstream)
    expected = _truth(student, teacher, frames, margin, variant, upstream)
    for a, e in zip(actual, expected):
        torch.testing.assert_close(a, e, rtol=1e-10, atol=1e-12)


def test_torch_zero_weight_rows_are_skipped():
    frames, hw = 2, 5
    student, teacher = _pair(2, frames * hw, 4, 6, seed=4)
    weight = torch.tensor([[1.0, 0, 0.5, 0, 0, 2, 1, 0, 1, 1], [0.0] * 10], dtype=torch.float64)
    upstream = torch.randn(2, frames * hw, dtype=torch.float64, generator=torch.Generator().manual_seed(6))
    fn = lambda s, t: relation_distance_torch(s, t, frames, 0.1, "temporal", query_weight=weight, chunk_size=3)
    actual = value_and_grads(fn, student, teacher, upstream)
    kept = (weight != 0).double()
    expected = _truth(student, teacher, frames, 0.1, "temporal", upstream * kept)
    for a, e in zip(actual, (expected[0] * kept, *expected[1:])):
        torch.testing.assert_close(a, e, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("variant", VARIANTS)
def test_torch_gradcheck_fp64(variant):
    student, teacher = _pair(2, 6, 3, 4, seed=7)
    margin = _clear_margin(student, teacher)
    weight = torch.ones(2, 6, dtype=torch.float64)
    weight[1, 2] = 0
    inputs = (student.requires_grad_(), teacher.requires_grad_())
    general = lambda s, t: relation_distance_torch(s, t, 3, margin, variant, query_weight=weight, chunk_size=2)
    symmetric = lambda s, t: relation_distance_torch(s, t, 3, margin, variant, chunk_size=4).sum()
    assert torch.autograd.gradcheck(general, inputs)
    assert torch.autograd.gradcheck(symmetric, inputs)


def test_torch_frozen_teacher_and_reduced_precision_gradient_dtype():
    student, teacher = _pair(1, 12, 5, 7, dtype=torch.float16, seed=9)
    student = student.cpu().requires_grad_()
    rows = relation_distance_torch(student, teacher.cpu(), 4, 0.1, "spatial")
    rows.sum().backward()
    assert rows.dtype == torch.float32 and student.grad.dtype == torch.float16 and teacher.grad is None
    expected = relation_distance_truth(student.detach().cpu(), teacher.cpu(), 4, 0.1, "spatial", normalize=False)
    torch.testing.assert_close(rows.double(), expected, rtol=1e-5, atol=1e-5)


def test_torch_auto_chunk_size_respects_the_budget():
    num_tokens = 17_550
    rows = auto_chunk_size(num_tokens, torch.bfloat16)
    assert 1 <= rows < num_tokens and rows * num_tokens * 4 * 4 <= CHUNK_BUDGET_BYTES
    assert auto_chunk_size(10, torch.float32) == 10 and auto_chunk_size(10**9, torch.float64) == 1


@pytest.mark.parametrize("chunk_size", [0, -3, 2.5, True])
def test_torch_bad_chunk_size(chunk_size):
    student, _ = _pair(1, 4, 3, 3)
    with pytest.raises(ValueError, match="chunk_size"):
        relation_distance_torch(student, student, 2, 0.1, "full", chunk_size=chunk_size)


_MEMORY_SCRIPT = textwrap.dedent(
    """
    import json, time
    import torch, torch.nn.functional as F
    from stss_kernels.ops.relation_distance.torch_backend import relation_distance_torch

    def proc_status(key):
        for line in open("/proc/self/status"):
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024

    def features(num_tokens, gen):
        return F.normalize(torch.randn(1, num_tokens, 64, generator=gen), dim=-1).requires_grad_()

    torch.set_num_threads(2)
    gen = torch.Generator().manual_seed(0)
    frames, hw = 13, 1350
    student, teacher = features(frames * hw, gen), features(frames * hw, gen)
    warm_s, warm_t = features(100, gen), features(100, gen)
    relation_distance_torch(warm_s, warm_t, 2, 0.1, "full").sum().backward()  # one-time allocations
    rss_before = proc_status("VmRSS")
    start = time.perf_counter()
    rows = relation_distance_torch(student, teacher, frames, 0.1, "full")
    (rows * torch.rand(rows.shape, generator=gen)).sum().backward()  # a general (non-symmetric) G
    seconds = time.perf_counter() - start
    finite = all(bool(x.isfinite().all()) for x in (rows, student.grad, teacher.grad))
    print(json.dumps(dict(growth=proc_status("VmHWM") - rss_before, seconds=seconds, finite=finite)))
    """
)


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads peak RSS from /proc")
def test_torch_native_cogvideox_size_memory_stays_far_below_one_similarity_matrix():
    """B=1, frames=13, HW=1350 (N=17,550), C=64 on CPU: forward + backward, measured in a fresh process."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")])))
    result = subprocess.run(
        [sys.executable, "-c", _MEMORY_SCRIPT], env=env, capture_output=True, text=True, timeout=900, check=True
    )
    report = json.loads(result.stdout.strip().splitlines()[-1])
    similarity_matrix_bytes = 17_550**2 * 4  # 1.23 GB
    print(f"peak RSS growth {report['growth'] / 2**20:.0f} MiB, forward+backward {report['seconds']:.1f} s")
    assert report["finite"]
    assert report["growth"] < similarity_matrix_bytes / 3


# ---- Triton backend ---------------------------------------------------------------------------------------


@pytest.fixture(params=["one_split", "key_splits"])
def key_split(request, monkeypatch):
    """Run the forward with one program per query tile, or with the keys split across several programs."""
    from stss_kernels.ops.relation_distance.triton_backend import forward

    if request.param == "key_splits":
        monkeypatch.setattr(forward, "MIN_KEYS_PER_SPLIT", 16)
        monkeypatch.setattr(forward, "_multiprocessors", lambda device: 64)
    return request.param


@pytest.fixture(params=["fused", "chunked"])
def backward_path(request, monkeypatch):
    """Run the backward through the fused passes or, as wide features do, the chunked sign-block + matmul path.

    The chunked path's block budget is cut so that a video takes several chunks of query rows.
    """
    from stss_kernels._core import chunking
    from stss_kernels.ops.relation_distance.triton_backend import backward

    if request.param == "chunked":
        monkeypatch.setattr(backward, "FUSED_MAX_CHANNELS", 0)
        monkeypatch.setattr(chunking, "CHUNK_BUDGET_BYTES", 3 * 17 * 60 * 4)
    return request.param


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize(
    "batch, frames, hw, cs, ct",
    [
        (2, 3, 7, 5, 12),  # frame smaller than a key tile
        (1, 2, 20, 37, 12),  # frame spans two key tiles; student channels span two chunks
    ],
)
@pytest.mark.parametrize("upstream_kind", ["random", "uniform"])
def test_triton_fp32_matches_fp64_reference(
    batch, frames, hw, cs, ct, variant, upstream_kind, key_split, backward_path
):
    triton_fn = _triton()
    tokens = frames * hw
    student, teacher = _pair(batch, tokens, cs, ct, dtype=torch.float32, seed=10)
    margin = _clear_margin(student, teacher)
    if upstream_kind == "uniform":  # a symmetric G: the single row pass
        upstream = torch.full((batch, tokens), 1.0 / (batch * tokens), device=DEVICE)
    else:
        upstream = torch.randn(batch, tokens, generator=torch.Generator().manual_seed(2)).to(DEVICE)
    actual = value_and_grads(lambda s, t: triton_fn(s, t, frames, margin, variant), student, teacher, upstream)
    assert actual[0].dtype == torch.float32 and actual[1].dtype == actual[2].dtype == torch.float32
    _assert_matches(actual, _truth(student, teacher, frames, margin, variant, upstream))


@pytest.mark.parametrize("variant", VARIANTS)
def test_triton_zero_weight_rows_are_skipped_and_exact_elsewhere(variant, key_split, backward_path):
    triton_fn = _triton()
    batch, frames, hw, cs, ct = 2, 2, 20, 5, 12
    tokens = frames * hw
    student, teacher = _pair(batch, tokens, cs, ct, dtype=torch.float32, seed=6)
    margin = _clear_margin(student, teacher)
    generator = torch.Generator().manual_seed(8)
    weight = torch.rand(batch, tokens, generator=generator) + 0.5
    weight[:, 16:32] = 0
    weight[0, 3] = weight[1, 37] = 0
    weight[1, :16] = 0  # video 1 keeps 22 of 40 queries, video 0 keeps 23: kept lists end mid-tile
    weight = weight.to(DEVICE)
    upstream = torch.ones(batch, tokens, device=DEVICE)  # uniform, but the mask makes G non-symmetric
    fn = lambda s, t: triton_fn(s, t, frames, margin, variant, weight)
    rows, grad_student, grad_teacher = value_and_grads(fn, student, teacher, upstream)
    kept = weight != 0
    assert (rows[~kept] == 0).all()
    truth = _truth(student, teacher, frames, margin, variant, upstream * kept)
    _assert_matches((rows, grad_student, grad_teacher), (truth[0] * kept.cpu(), *truth[1:]))


def test_triton_all_zero_weight_and_single_frame_temporal_give_zeros(backward_path):
    triton_fn = _triton()
    student, teacher = _pair(1, 14, 5, 6, dtype=torch.float32, seed=9)
    empty = torch.zeros(1, 14, dtype=torch.bool, device=DEVICE)
    upstream = torch.ones(1, 14, device=DEVICE)
    for fn in (lambda s, t: triton_fn(s, t, 2, 0.1, "full", empty), lambda s, t: triton_fn(s, t, 1, 0.1, "temporal")):
        for value in value_and_grads(fn, student, teacher, upstream):
            assert torch.equal(value, torch.zeros_like(value))


def test_triton_frozen_teacher_and_non_contiguous_inputs(backward_path):
    """Teacher without grad (as in training); student and upstream gradient non-contiguous, partly zero."""
    triton_fn = _triton()
    batch, frames, hw, cs, ct = 2, 2, 7, 5, 12
    tokens = frames * hw
    student, teacher = _pair(batch, tokens, cs, ct, dtype=torch.float32, seed=11)
    student = student.transpose(1, 2).contiguous().transpose(1, 2)
    upstream = torch.randn(tokens, batch, generator=torch.Generator().manual_seed(13)).to(DEVICE).t()
    upstream[:, :8] = 0  # query rows without upstream gradient: tiles of them are skipped in backward
    assert not student.is_contiguous() and not upstream.is_contiguous()
    margin = _clear_margin(student, teacher)
    fn = lambda s, t: triton_fn(s, t, frames, margin, "temporal")
    rows, grad_student, grad_teacher = value_and_grads(fn, student, teacher, upstream, teacher_grad=False)
    assert grad_teacher is None
    truth = _truth(student, teacher, frames, margin, "temporal", upstream)
    _assert_matches((rows, grad_student), truth[:2])


BFLOAT16_ON_GPU = pytest.param(torch.bfloat16, marks=pytest.mark.skipif(not CUDA, reason="needs a CUDA device"))


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("upstream_kind", ["random", "mean"])
@pytest.mark.parametrize("dtype", [torch.float16, BFLOAT16_ON_GPU])
def test_triton_half_precision_no_worse_than_pytorch(dtype, upstream_kind, variant, backward_path):
    """Error against the fp64 truth on the same rounded inputs <= same-dtype PyTorch's error + a small tol.

    "mean" is the upstream gradient of reduction="mean", 1 / (B N): a symmetric G whose tiny row factors
    must not underflow when the column pass rounds them to the input dtype (exercised by "random").
    """
    triton_fn = _triton()
    batch, frames, hw, cs, ct = (2, 3, 20, 12, 37) if not CUDA else (2, 4, 150, 96, 80)
    tokens = frames * hw
    if CUDA:
        student, teacher = _clustered_pair(batch, tokens, cs, ct, dtype, seed=3)
        margin = 0.1
    else:
        student, teacher = _pair(batch, tokens, cs, ct, dtype=dtype, seed=3)
        margin = _clear_margin(student, teacher)
    if upstream_kind == "mean":
        upstream = torch.full((batch, tokens), 1.0 / (batch * tokens), device=DEVICE)
    else:
        upstream = torch.randn(batch, tokens, generator=torch.Generator().manual_seed(5)).to(DEVICE) / tokens**2
    truth = _truth(student, teacher, frames, margin, variant, upstream)
    ours = value_and_grads(lambda s, t: triton_fn(s, t, frames, margin, variant), student, teacher, upstream)
    pytorch = value_and_grads(
        lambda s, t: relation_distance_reference(s, t, frames, margin, variant), student, teacher, upstream
    )
    assert ours[1].dtype == ours[2].dtype == dtype
    for name, a, r, expected in zip(("rows", "grad student", "grad teacher"), ours, pytorch, truth):
        error = (a.double().cpu() - expected).abs().max().item()
        reference_error = (r.double().cpu() - expected).abs().max().item()
        # Gradients are rounded once to the input dtype: half an ulp of their scale is the slack.
        half_ulp = 2**-9 if dtype == torch.bfloat16 else 2**-11
        assert error <= reference_error + half_ulp * expected.abs().max().item(), (name, variant)


@pytest.mark.parametrize(
    "change, error",
    [
        (dict(student=torch.float64, teacher=torch.float64), TypeError),
        (dict(teacher=torch.float16), TypeError),
        (dict(frames=4), ValueError),
        (dict(margin=-0.1), ValueError),
        (dict(variant="cross"), ValueError),
        (dict(query_weight=(2, 5)), ValueError),
    ],
)
def test_triton_bad_input_raises_before_any_kernel(monkeypatch, change, error):
    triton_fn = _triton()
    from stss_kernels.ops.relation_distance import triton_backend

    def launched(*args):
        raise AssertionError("a kernel was launched on bad input")

    monkeypatch.setattr(triton_backend, "relation_distance_triton_op", launched)
    args = dict(student=torch.float32, teacher=torch.float32, frames=2, margin=0.1, variant="full", query_weight=None)
    args.update(change)
    student = torch.zeros(2, 6, 3, dtype=args["student"], device=DEVICE)
    teacher = torch.zeros(2, 6, 4, dtype=args["teacher"], device=DEVICE)
    weight = None if args["query_weight"] is None else torch.ones(args["query_weight"], device=DEVICE)
    with pytest.raises(error):
        triton_fn(student, teacher, args["frames"], args["margin"], args["variant"], weight)


@pytest.mark.skipif(not CUDA, reason="needs a CUDA device")
@pytest.mark.parametrize("variant", VARIANTS)
def test_triton_gpu_fp32_realistic_frame_spans_many_key_tiles(variant):
    """HW = 1350 (CogVideoX's 30 x 45 grid) spans many key tiles of every autotune config; keys split."""
    triton_fn = _triton()
    batch, frames, hw, cs, ct = 1, 3, 1350, 160, 72  # a wide student (chunked backward), a narrow teacher (fused)
    tokens = frames * hw
    student, teacher = _clustered_pair(batch, tokens, cs, ct, torch.float32, seed=14)
    margin = 0.1
    for upstream in (
        torch.full((batch, tokens), 1.0 / tokens, device=DEVICE),
        torch.randn(batch, tokens, generator=torch.Generator().manual_seed(16)).to(DEVICE),
    ):
        actual = value_and_grads(lambda s, t: triton_fn(s, t, frames, margin, variant), student, teacher, upstream)
        _assert_matches(actual, _truth(student, teacher, frames, margin, variant, upstream), rel=1e-4)
