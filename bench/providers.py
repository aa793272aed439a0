"""The implementations compared: naive eager PyTorch, torch.compile of it, and the stss_kernels backends.

`triton` runs the Triton kernels of generation 1 and `triton-v2` those of generation 2 (see
stss_kernels/ops/tempered_kl/triton_backend/generations.py), side by side.

Every provider is a loss function with one signature,
    loss(student (B, N, Cs), teacher (B, N, Ct), frames, tau_student, tau_teacher, query_mask (B, N) bool | None,
         normalize) -> scalar float32 loss (mean tempered KL over the kept queries),
so every provider does the same work, normalisation and masked mean included.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

import stss_kernels
from stss_kernels import tempered_kl_reference
from stss_kernels._core.backends import triton_available, triton_interpreting

from .workloads import Workload

PROVIDERS = ("reference", "compiled", "torch", "triton", "triton-v2")
# Triton providers and the kernel generation each runs.
TRITON_GENERATIONS = {"triton": 1, "triton-v2": 2}

# The Triton interpreter runs every program instance in numpy: keep it to tiny problems.
INTERPRETER_MAX_TOKENS = 512

LossFn = Callable[..., torch.Tensor]


def naive_tempered_kl_loss(
    student: torch.Tensor,
    teacher: torch.Tensor,
    frames: int,
    tau_student: float,
    tau_teacher: float,
    query_mask: torch.Tensor | None,
    normalize: bool,
) -> torch.Tensor:
    """The loss as a researcher writes it in eager PyTorch: full N x N similarities and softmaxes."""
    if normalize:
        student, teacher = F.normalize(student, dim=-1), F.normalize(teacher, dim=-1)
    kl = tempered_kl_reference(student, teacher, frames, tau_student, tau_teacher)
    if query_mask is None:
        return kl.mean()
    weight = query_mask.to(kl.dtype)
    return (kl * weight).sum() / weight.sum()


def _backend_loss(backend: str) -> LossFn:
    def loss(student, teacher, frames, tau_student, tau_teacher, query_mask, normalize):
        return stss_kernels.tempered_kl(
            student,
            teacher,
            frames=frames,
            tau_student=tau_student,
            tau_teacher=tau_teacher,
            query_mask=query_mask,
            normalize=normalize,
            reduction="mean",
            backend=backend,
        )

    return loss


def _generation_loss(generation: int) -> LossFn:
    """The Triton backend's loss with the kernels of `generation` (the backward follows the forward's)."""
    backend_loss = _backend_loss("triton")

    def loss(*args):
        from stss_kernels.ops.tempered_kl import triton_backend

        previous, triton_backend.KERNEL_GENERATION = triton_backend.KERNEL_GENERATION, generation
        try:
            return backend_loss(*args)
        finally:
            triton_backend.KERNEL_GENERATION = previous

    return loss


def unavailable_reason(provider: str, workload: Workload, device: torch.device) -> str | None:
    """Why `provider` cannot run `workload` on `device` here, or None when it can."""
    if provider not in PROVIDERS:
        raise ValueError(f"provider must be one of {PROVIDERS}, got {provider!r}")
    if provider in ("torch", *TRITON_GENERATIONS) and not hasattr(stss_kernels, "tempered_kl"):
        return "stss_kernels.tempered_kl is not importable"
    if provider not in TRITON_GENERATIONS:
        return None
    if not triton_available():
        return "Triton is not installed"
    if device.type == "cpu" and not triton_interpreting():
        return "no GPU (TRITON_INTERPRET=1 runs it on CPU at tiny sizes)"
    if device.type == "cpu" and workload.tokens > INTERPRETER_MAX_TOKENS:
        return f"Triton interpreter limited to N <= {INTERPRETER_MAX_TOKENS}"
    return None


def make_loss(provider: str) -> LossFn:
    """A fresh loss function for `provider` (`compiled` starts from an empty dynamo cache)."""
    if provider == "reference":
        return naive_tempered_kl_loss
    if provider == "compiled":
        torch._dynamo.reset()
        return torch.compile(naive_tempered_kl_loss, dynamic=False)
    if provider in TRITON_GENERATIONS:
        return _generation_loss(TRITON_GENERATIONS[provider])
    return _backend_loss(provider)


def naive_peak_bytes(workload: Workload, mode: str, dtype: torch.dtype) -> int:
    """Estimated peak memory of `reference` above its inputs: several live B x N x N tensors.

    Measured on CPU (peak RSS growth), about 7 B x N x N fp32 buffers are alive at once in the forward
    (similarities, their scaled copies, log-softmaxes, the KL terms) and in forward+backward; the
    estimate rounds up to 8 and 10. Accumulation is float64 for float64 inputs.
    """
    element = 8 if dtype == torch.float64 else 4
    live_matrices = 8 if mode == "fwd" else 10
    return live_matrices * workload.batch * workload.tokens**2 * element
