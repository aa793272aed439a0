"""pytest-benchmark timings of the CPU providers, forward and forward+backward.

Skipped in the default run (`--benchmark-skip`); run them with
    python -m pytest tests/test_bench_cpu.py -m benchmark --benchmark-enable
"""

import pytest
import torch
from helpers import tempered_kl_truth

from bench.measure import Case, LossCall, make_inputs
from bench.providers import make_loss
from bench.workloads import Workload

pytestmark = pytest.mark.benchmark

WORKLOAD = Workload("cpu-small", batch=1, frames=6, hw=100, cs=128, ct=96)


@pytest.mark.parametrize("mode", ["fwd", "fwd+bwd"])
@pytest.mark.parametrize("provider", ["reference", "compiled", "torch"])
def test_cpu_provider(benchmark, provider, mode):
    student, teacher, _ = make_inputs(WORKLOAD, torch.float32, torch.device("cpu"), mask_ratio=1.0, seed=0)
    expected = tempered_kl_truth(student, teacher, WORKLOAD.frames, 0.1, 0.1, reduction="mean")
    call = LossCall(make_loss(provider, "tempered_kl"), student, teacher, None, Case(WORKLOAD, provider, mode))
    call()  # compilation stays out of the timing
    loss = benchmark(call)
    torch.testing.assert_close(loss.double(), expected, rtol=1e-4, atol=1e-7)
    if mode == "fwd+bwd":
        assert student.grad is not None and teacher.grad is None
