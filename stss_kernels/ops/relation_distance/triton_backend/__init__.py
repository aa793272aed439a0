"""Fused Triton backend of the relation distance (VideoREPA's TRD).

Forward: one program per (query tile, key split, video) accumulates relu(|S - T| - margin) over the
variant's pairs in its run of key tiles (forward.py); the splits are summed and divided by the pair
count. Nothing is saved but the inputs. Backward: recomputes the tiles, with a single row pass when
the gradient matrix is symmetric (backward.py). Queries with query_weight == 0 are never visited.
"""

from __future__ import annotations

import torch

from stss_kernels._core.backends import triton_interpreting
from stss_kernels.ops.relation_distance.pairs import VARIANTS
from stss_kernels.ops.relation_distance.triton_backend.function import RelationDistanceTritonFunction

SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _check_inputs(student, teacher, frames, margin, variant, query_weight) -> None:
    if student.dtype not in SUPPORTED_DTYPES:
        raise TypeError(
            f"student: the Triton backend takes float32, float16 or bfloat16, got {student.dtype} "
            "(use backend='torch' or 'reference' for float64)"
        )
    if teacher.dtype != student.dtype:
        raise TypeError(f"teacher: expected dtype {student.dtype} like student, got {teacher.dtype}")
    if student.dim() != 3 or teacher.dim() != 3 or teacher.shape[:2] != student.shape[:2]:
        raise ValueError(
            f"student, teacher: expected (B, N, Cs) and (B, N, Ct), got {tuple(student.shape)} "
            f"and {tuple(teacher.shape)}"
        )
    if frames < 1 or student.shape[1] % frames:
        raise ValueError(f"frames: expected a positive divisor of N={student.shape[1]}, got {frames}")
    if not margin >= 0:
        raise ValueError(f"margin: expected >= 0, got {margin}")
    if variant not in VARIANTS:
        raise ValueError(f"variant: expected one of {VARIANTS}, got {variant!r}")
    if query_weight is not None and query_weight.shape != student.shape[:2]:
        raise ValueError(f"query_weight: expected shape {tuple(student.shape[:2])}, got {tuple(query_weight.shape)}")
    tensors = [student, teacher] + ([] if query_weight is None else [query_weight])
    if any(tensor.device != student.device for tensor in tensors):
        raise ValueError("student, teacher, query_weight: expected all on one device")
    if not student.is_cuda and not triton_interpreting():
        raise ValueError(f"student: the Triton backend needs GPU tensors (got {student.device}), or TRITON_INTERPRET=1")


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
    """
    _check_inputs(student, teacher, frames, margin, variant, query_weight)
    return RelationDistanceTritonFunction.apply(
        student.contiguous(), teacher.contiguous(), frames, float(margin), variant, query_weight
    )


__all__ = ["relation_distance_triton"]
