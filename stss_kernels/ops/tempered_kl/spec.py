"""The tempered KL as bench, warmup and the compile report see it (see stss_kernels._core.spec)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from stss_kernels._core.spec import OpOption, OpSpec, masked_mean
from stss_kernels._core.validation import check_temperature
from stss_kernels.ops.tempered_kl.op import tempered_kl
from stss_kernels.ops.tempered_kl.reference import tempered_kl_reference


def naive_loss(
    student: torch.Tensor,
    teacher: torch.Tensor,
    *,
    frames: int,
    query_mask: torch.Tensor | None,
    normalize: bool,
    tau_student: float,
    tau_teacher: float,
) -> torch.Tensor:
    """The loss as a researcher writes it in eager PyTorch: full N x N similarities and softmaxes."""
    if normalize:
        student, teacher = F.normalize(student, dim=-1), F.normalize(teacher, dim=-1)
    return masked_mean(tempered_kl_reference(student, teacher, frames, tau_student, tau_teacher), query_mask)


SPEC = OpSpec(
    name="tempered_kl",
    package="stss_kernels.ops.tempered_kl",
    function=tempered_kl,
    naive_loss=naive_loss,
    options=(
        OpOption(
            "tau",
            keywords=("tau_student", "tau_teacher"),
            default=0.1,
            check=check_temperature,
            help="softmax temperature of both the student and the teacher similarities",
        ),
    ),
    # Measured on CPU (peak RSS growth): about 7 B x N x N fp32 buffers alive at once in the forward
    # (similarities, their scaled copies, log-softmaxes, the KL terms) and in forward + backward; rounded up.
    naive_live_matrices={"fwd": 8, "fwd+bwd": 10},
)
