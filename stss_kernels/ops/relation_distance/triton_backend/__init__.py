"""Fused Triton backend of the relation distance (VideoREPA's TRD).

Forward: one program per (query tile, key split, video) accumulates relu(|S - T| - margin) over the
variant's pairs in its run of key tiles (forward.py); the splits are summed and divided by the pair
count. Nothing is saved but the inputs. Backward: recomputes the tiles, with a single row pass when
the gradient matrix is symmetric (backward.py). Queries with query_weight == 0 are never visited.
The kernels run inside the custom ops of function.py; importing this package does not import Triton.
"""

from __future__ import annotations

import torch

from stss_kernels._core.backends import check_triton_runs
from stss_kernels._core.validation import check_backend_inputs, check_choice, check_real
from stss_kernels.ops.relation_distance.pairs import VARIANTS
from stss_kernels.ops.relation_distance.triton_backend.function import relation_distance_triton_op

SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def relation_distance_triton(
    student: torch.Tensor,
    teacher: torch.Tensor,
    frames: int,
    margin: float,
    variant: str,
    query_weight: torch.Tensor | None = None,
) -> torch.Tensor:
    """Per-query relation distance with fused kernels: rows (B, N) float32, O(N * (Cs + Ct)) memory.

    student (B, N, Cs), teacher (B, N, Ct): fp32, fp16 or bf16, tokens frame-major, N = frames * HW.
    rows[b, i] is the mean of relu(|S_ij - T_ij| - margin) over query i's pairs of the variant. Rows where
    query_weight is 0 are skipped: they return 0 and pass no gradient (the weights are not applied).
    Autocast does not change it. Double backward raises (use the reference backend).
    """
    frames = check_backend_inputs(student, teacher, frames, query_weight, dtypes=SUPPORTED_DTYPES)
    margin = check_real("margin", margin, inclusive=True)
    check_choice("variant", variant, VARIANTS)
    check_triton_runs("relation_distance_triton", student.device, "relation_distance_torch")
    weight = None if query_weight is None else query_weight.detach()
    return relation_distance_triton_op(student.contiguous(), teacher.contiguous(), frames, margin, variant, weight)


__all__ = ["relation_distance_triton"]
