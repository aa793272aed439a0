"""The relation distance as bench, warmup and the compile report see it (see stss_kernels._core.spec)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from stss_kernels._core.spec import OpOption, OpSpec, masked_mean
from stss_kernels._core.validation import check_real
from stss_kernels.ops.relation_distance.op import relation_distance
from stss_kernels.ops.relation_distance.pairs import VARIANTS
from stss_kernels.ops.relation_distance.reference import relation_distance_reference


def naive_loss(
    student: torch.Tensor,
    teacher: torch.Tensor,
    *,
    frames: int,
    query_mask: torch.Tensor | None,
    normalize: bool,
    margin: float,
    variant: str,
) -> torch.Tensor:
    """VideoREPA's TRD as its authors write it in eager PyTorch: full N x N similarities and distances."""
    if normalize:
        student, teacher = F.normalize(student, dim=-1), F.normalize(teacher, dim=-1)
    return masked_mean(relation_distance_reference(student, teacher, frames, margin, variant), query_mask)


SPEC = OpSpec(
    name="relation_distance",
    package="stss_kernels.ops.relation_distance",
    function=relation_distance,
    naive_loss=naive_loss,
    options=(
        OpOption(
            "margin",
            keywords=("margin",),
            default=0.1,
            check=lambda name, value: check_real(name, value, inclusive=True),
            help="distances between student and teacher similarities up to this margin cost nothing",
        ),
        OpOption(
            "variant",
            keywords=("variant",),
            default="full",
            parse=str,
            choices=VARIANTS,
            in_file_name=True,
            help="which token pairs count: every pair (full), pairs in the same frame (spatial), pairs in "
            "different frames (temporal)",
        ),
    ),
    # Both similarities, their difference, its absolute value, the clipped distance: rounded up.
    naive_live_matrices={"fwd": 6, "fwd+bwd": 8},
    symmetric_gradient=True,
)
