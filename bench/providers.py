"""The implementations compared: naive eager PyTorch, torch.compile of it, and the stss_kernels backends.

Every provider of an op is a loss function with the op's signature,
    loss(student (B, N, Cs), teacher (B, N, Ct), frames, *op_arguments(case), query_mask (B, N) bool | None,
         normalize) -> scalar float32 loss (mean over the kept queries),
with op arguments (tau_student, tau_teacher) for "tempered_kl" and (margin, variant) for "relation_distance",
so every provider does the same work, normalisation and masked mean included.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

import stss_kernels
from stss_kernels import relation_distance_reference, tempered_kl_reference
from stss_kernels._core.backends import triton_available, triton_interpreting

from .workloads import Workload

PROVIDERS = ("reference", "compiled", "torch", "triton")
OPS = ("tempered_kl", "relation_distance")

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


def _masked_mean(rows: torch.Tensor, query_mask: torch.Tensor | None) -> torch.Tensor:
    if query_mask is None:
        return rows.mean()
    weight = query_mask.to(rows.dtype)
    return (rows * weight).sum() / weight.sum()


def naive_relation_distance_loss(
    student: torch.Tensor,
    teacher: torch.Tensor,
    frames: int,
    margin: float,
    variant: str,
    query_mask: torch.Tensor | None,
    normalize: bool,
) -> torch.Tensor:
    """VideoREPA's TRD as its authors write it in eager PyTorch: full N x N similarities and distances."""
    if normalize:
        student, teacher = F.normalize(student, dim=-1), F.normalize(teacher, dim=-1)
    return _masked_mean(relation_distance_reference(student, teacher, frames, margin, variant), query_mask)


NAIVE_LOSSES = {"tempered_kl": naive_tempered_kl_loss, "relation_distance": naive_relation_distance_loss}


def op_arguments(op: str, tau: float, margin: float, variant: str) -> tuple:
    """The op's own arguments, between `frames` and `query_mask` in every provider's signature."""
    return (tau, tau) if op == "tempered_kl" else (margin, variant)


def _backend_loss(backend: str, op: str) -> LossFn:
    if op == "relation_distance":

        def loss(student, teacher, frames, margin, variant, query_mask, normalize):
            return stss_kernels.relation_distance(
                student,
                teacher,
                frames=frames,
                margin=margin,
                variant=variant,
                query_mask=query_mask,
                normalize=normalize,
                reduction="mean",
                backend=backend,
            )

        return loss

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


def unavailable_reason(provider: str, workload: Workload, device: torch.device, op: str = "tempered_kl") -> str | None:
    """Why `provider` cannot run `op` on `workload` on `device` here, or None when it can."""
    if provider not in PROVIDERS:
        raise ValueError(f"provider must be one of {PROVIDERS}, got {provider!r}")
    if op not in OPS:
        raise ValueError(f"op must be one of {OPS}, got {op!r}")
    if provider in ("torch", "triton") and not hasattr(stss_kernels, op):
        return f"stss_kernels.{op} is not importable"
    if provider != "triton":
        return None
    if not triton_available():
        return "Triton is not installed"
    if device.type == "cpu" and not triton_interpreting():
        return "no GPU (TRITON_INTERPRET=1 runs it on CPU at tiny sizes)"
    if device.type == "cpu" and workload.tokens > INTERPRETER_MAX_TOKENS:
        return f"Triton interpreter limited to N <= {INTERPRETER_MAX_TOKENS}"
    return None


def make_loss(provider: str, op: str = "tempered_kl") -> LossFn:
    """A fresh loss function of `op` for `provider` (`compiled` starts from an empty dynamo cache)."""
    if provider == "reference":
        return NAIVE_LOSSES[op]
    if provider == "compiled":
        torch._dynamo.reset()
        return torch.compile(NAIVE_LOSSES[op], dynamic=False)
    return _backend_loss(provider, op)


# B x N x N buffers of `reference` alive at once, per op and mode (see naive_peak_bytes).
NAIVE_LIVE_MATRICES = {"tempered_kl": {"fwd": 8, "fwd+bwd": 10}, "relation_distance": {"fwd": 6, "fwd+bwd": 8}}


def naive_peak_bytes(workload: Workload, mode: str, dtype: torch.dtype, op: str = "tempered_kl") -> int:
    """Estimated peak memory of `reference` above its inputs: several live B x N x N tensors.

    Measured on CPU (peak RSS growth), about 7 B x N x N fp32 buffers are alive at once in the tempered
    KL's forward (similarities, their scaled copies, log-softmaxes, the KL terms) and in forward+backward;
    the estimate rounds up to 8 and 10. The relation distance's (both similarities, their difference, its
    absolute value, the clipped distance) rounds up to 6 and 8. Accumulation is float64 for float64 inputs.
    """
    element = 8 if dtype == torch.float64 else 4
    return NAIVE_LIVE_MATRICES[op][mode] * workload.batch * workload.tokens**2 * element
