"""The portable chunked backend: chunking, row skipping, gradcheck and its O(N) memory."""

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
from helpers import assert_close_to_truth, features, tempered_kl_truth, value_and_grads

from stss_kernels._core.chunking import CHUNK_BUDGET_BYTES
from stss_kernels.ops.tempered_kl.torch_backend import auto_chunk_size, tempered_kl_torch

REPO_ROOT = Path(__file__).resolve().parents[1]


def _unit_features(batch, frames, hw, cs, ct, dtype=torch.float64, seed=0):
    """The shared test features (tests/helpers.py), normalised: what the backend receives from the op."""
    student, teacher = features(batch, frames, hw, cs, ct, dtype=torch.float64, seed=seed)
    return F.normalize(student, dim=-1).to(dtype), F.normalize(teacher, dim=-1).to(dtype)


def _truth(frames, tau_student, tau_teacher):
    """The float64 truth (tests/helpers.py) on already normalised features."""
    return lambda s, t: tempered_kl_truth(s, t, frames, tau_student, tau_teacher, normalize=False)


@pytest.mark.parametrize("chunk_size", [1, 4, 7, 100, None])
def test_chunk_size_does_not_change_the_result(chunk_size):
    frames, hw = 3, 7
    student, teacher = _unit_features(2, frames, hw, 5, 12, seed=1)
    upstream = torch.randn(2, frames * hw, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    actual = value_and_grads(
        lambda s, t: tempered_kl_torch(s, t, frames, 0.1, 0.2, chunk_size=chunk_size), student, teacher, upstream
    )
    expected = value_and_grads(_truth(frames, 0.1, 0.2), student, teacher, upstream)
    assert_close_to_truth(actual, expected, rel_tol=1e-10)


def test_zero_weight_rows_are_skipped():
    frames, hw = 2, 5
    student, teacher = _unit_features(2, frames, hw, 4, 6, seed=4)
    weight = torch.tensor([[1.0, 0, 0.5, 0, 0, 2, 1, 0, 1, 1], [0.0] * 10], dtype=torch.float64)
    upstream = torch.randn(2, frames * hw, dtype=torch.float64, generator=torch.Generator().manual_seed(6))
    actual = value_and_grads(
        lambda s, t: tempered_kl_torch(s, t, frames, 0.1, 0.1, query_weight=weight, chunk_size=3),
        student,
        teacher,
        upstream,
    )
    # Skipped rows: kl 0 and no gradient, i.e. the truth with those rows' upstream gradient zeroed.
    kept = (weight != 0).double()
    expected = value_and_grads(lambda s, t: _truth(frames, 0.1, 0.1)(s, t) * kept, student, teacher, upstream)
    assert_close_to_truth(actual, expected, rel_tol=1e-10)


def test_gradcheck_fp64():
    student, teacher = _unit_features(2, 3, 2, 3, 4, seed=7)
    weight = torch.ones(2, 6, dtype=torch.float64)
    weight[1, 2] = 0
    fn = lambda s, t: tempered_kl_torch(s, t, 3, 0.3, 0.2, query_weight=weight, chunk_size=2)
    assert torch.autograd.gradcheck(fn, (student.requires_grad_(), teacher.requires_grad_()))


def test_frozen_teacher_and_reduced_precision_gradient_dtype():
    student, teacher = _unit_features(1, 4, 3, 5, 7, dtype=torch.float16, seed=9)
    student.requires_grad_()
    kl = tempered_kl_torch(student, teacher, 4, 0.1, 0.1)
    kl.sum().backward()
    assert kl.dtype == torch.float32 and student.grad.dtype == torch.float16 and teacher.grad is None
    expected = _truth(4, 0.1, 0.1)(student.detach().double(), teacher.double())
    torch.testing.assert_close(kl.double(), expected, rtol=1e-5, atol=1e-5)


def test_auto_chunk_size_respects_the_budget():
    num_tokens = 17_550
    rows = auto_chunk_size(num_tokens, torch.bfloat16)
    assert 1 <= rows < num_tokens and rows * num_tokens * 4 * 5 <= CHUNK_BUDGET_BYTES
    assert auto_chunk_size(10, torch.float32) == 10
    assert auto_chunk_size(10**9, torch.float64) == 1


@pytest.mark.parametrize("chunk_size", [0, -3, 2.5, True])
def test_bad_chunk_size(chunk_size):
    student, _ = _unit_features(1, 2, 2, 3, 3)
    with pytest.raises(ValueError, match="chunk_size"):
        tempered_kl_torch(student, student, 2, 0.1, 0.1, chunk_size=chunk_size)


_MEMORY_SCRIPT = textwrap.dedent(
    """
    import json, time
    import torch, torch.nn.functional as F
    from stss_kernels.ops.tempered_kl.torch_backend import tempered_kl_torch

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
    tempered_kl_torch(warm_s, warm_t, 2, 0.1, 0.1).sum().backward()  # one-time allocations
    rss_before = proc_status("VmRSS")
    start = time.perf_counter()
    kl = tempered_kl_torch(student, teacher, frames, 0.1, 0.1)
    kl.sum().backward()
    seconds = time.perf_counter() - start
    finite = all(bool(x.isfinite().all()) for x in (kl, student.grad, teacher.grad))
    print(json.dumps(dict(growth=proc_status("VmHWM") - rss_before, seconds=seconds, finite=finite)))
    """
)


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads peak RSS from /proc")
def test_native_cogvideox_size_memory_stays_far_below_one_similarity_matrix():
    """B=1, frames=13, HW=1350 (N=17,550), C=64 on CPU: forward + backward, measured in a fresh process."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")])))
    result = subprocess.run(
        [sys.executable, "-c", _MEMORY_SCRIPT], env=env, capture_output=True, text=True, timeout=600, check=True
    )
    report = json.loads(result.stdout.strip().splitlines()[-1])
    similarity_matrix_bytes = 17_550**2 * 4  # 1.23 GB
    print(f"peak RSS growth {report['growth'] / 2**20:.0f} MiB, forward+backward {report['seconds']:.1f} s")
    assert report["finite"]
    assert report["growth"] < similarity_matrix_bytes / 3
