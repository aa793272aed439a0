"""Naive reference: materialises both N x N similarity matrices (ground truth and benchmark baseline)."""

from __future__ import annotations

import torch

from stss_kernels._core.backends import accumulation_dtype
from stss_kernels.ops.relation_distance.pairs import pair_count, pair_mask


def relation_distance_reference(
    student: torch.Tensor,
    teacher: torch.Tensor,
    frames: int,
    margin: float,
    variant: str,
    query_weight: torch.Tensor | None = None,
) -> torch.Tensor:
    """Per-query relation distance, computed the way a researcher would write it (VideoREPA's TRD).

    student (B, N, Cs), teacher (B, N, Ct), already normalised if cosine similarity is wanted.
    Returns rows (B, N): for query i the mean over its pairs j (see `pairs.VARIANTS`) of
    relu(|S_ij - T_ij| - margin), S = s s^T, T = t t^T; 0 when the variant leaves it no pair.
    float32, or float64 for fp64 inputs. `query_weight` is accepted for interface parity and ignored.
    """
    num_tokens = student.shape[1]
    out_dtype = accumulation_dtype(student.dtype)
    sim_student = torch.bmm(student, student.transpose(1, 2)).to(out_dtype)
    sim_teacher = torch.bmm(teacher, teacher.transpose(1, 2)).to(out_dtype)
    distance = torch.relu((sim_student - sim_teacher).abs() - margin)
    pairs = pair_mask(variant, torch.arange(num_tokens, device=student.device), num_tokens, frames)
    if pairs is not None:
        distance = distance * pairs
    return distance.sum(-1) / max(pair_count(variant, num_tokens, frames), 1)
