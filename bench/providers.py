"""The implementations compared: naive eager PyTorch, torch.compile of it, and the stss_kernels backends.

Every provider of an op is a loss function with the op's signature,
    loss(student (B, N, Cs), teacher (B, N, Ct), *, frames, query_mask (B, N) bool | None, normalize,
         **op keyword arguments) -> scalar float32 loss (mean over the kept queries),
the op keyword arguments coming from its spec (stss_kernels/ops/<op>/spec.py), so every provider does the
same work, normalisation and masked mean included.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from stss_kernels._core.backends import triton_available, triton_interpreting
from stss_kernels.ops import OP_NAMES, op_spec

from .workloads import Workload

PROVIDERS = ("reference", "compiled", "torch", "triton")
OPS = OP_NAMES
DEFAULT_OP = OP_NAMES[0]

# The Triton interpreter runs every program instance in numpy: keep it to tiny problems.
INTERPRETER_MAX_TOKENS = 512

LossFn = Callable[..., torch.Tensor]


def _backend_loss(backend: str, op: str) -> LossFn:
    function = op_spec(op).function

    def loss(student, teacher, *, frames, query_mask, normalize, **arguments):
        return function(student, teacher, frames=frames, query_mask=query_mask, normalize=normalize,
                        reduction="mean", backend=backend, **arguments)  # fmt: skip

    return loss


def unavailable_reason(provider: str, workload: Workload, device: torch.device, op: str = DEFAULT_OP) -> str | None:
    """Why `provider` cannot run `op` on `workload` on `device` here, or None when it can."""
    if provider not in PROVIDERS:
        raise ValueError(f"provider must be one of {PROVIDERS}, got {provider!r}")
    spec = op_spec(op)
    if provider != "triton":
        return None
    if not spec.triton_kernels:
        return f"{op} has no Triton backend"
    if not triton_available():
        return "Triton is not installed"
    if device.type == "cpu" and not triton_interpreting():
        return "no GPU (TRITON_INTERPRET=1 runs it on CPU at tiny sizes)"
    if device.type == "cpu" and workload.tokens > INTERPRETER_MAX_TOKENS:
        return f"Triton interpreter limited to N <= {INTERPRETER_MAX_TOKENS}"
    return None


def make_loss(provider: str, op: str = DEFAULT_OP) -> LossFn:
    """A fresh loss function of `op` for `provider` (`compiled` starts from an empty dynamo cache)."""
    naive_loss = op_spec(op).naive_loss
    if provider == "reference":
        return naive_loss
    if provider == "compiled":
        torch._dynamo.reset()
        return torch.compile(naive_loss, dynamic=False)
    return _backend_loss(provider, op)


def naive_peak_bytes(workload: Workload, mode: str, dtype: torch.dtype, op: str = DEFAULT_OP) -> int:
    """Estimated peak memory of `reference` above its inputs: the op's live B x N x N buffers (its spec's
    naive_live_matrices, measured on CPU as peak RSS growth and rounded up). Accumulation is float64 for
    float64 inputs, float32 otherwise."""
    element = 8 if dtype == torch.float64 else 4
    return op_spec(op).naive_live_matrices[mode] * workload.batch * workload.tokens**2 * element
