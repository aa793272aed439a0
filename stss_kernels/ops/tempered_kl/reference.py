"""Naive reference: materialises both N x N similarity matrices (ground truth and benchmark baseline)."""

from __future__ import annotations

import torch

from stss_kernels._core.backends import accumulation_dtype
from stss_kernels._core.library import autocast_disabled
from stss_kernels._core.validation import check_backend_inputs, check_temperature


def tempered_kl_reference(
    student: torch.Tensor,
    teacher: torch.Tensor,
    frames: int,
    tau_student: float,
    tau_teacher: float,
    query_weight: torch.Tensor | None = None,
) -> torch.Tensor:
    """Per-query tempered KL, computed the way a researcher would write it (plain autograd: any order).

    student (B, N, Cs), teacher (B, N, Ct), already normalised if cosine similarity is wanted.
    Returns kl (B, N): the mean over the `frames` target frames of KL(P_t || P_s), where each
    distribution is a softmax over one frame's N / frames keys. float32, or float64 for fp64 inputs,
    computed in the inputs' dtype whether or not autocast is on.
    `query_weight` is accepted for interface parity and ignored (every row is computed).
    """
    frames = check_backend_inputs(student, teacher, frames, query_weight)
    tau_student = check_temperature("tau_student", tau_student)
    tau_teacher = check_temperature("tau_teacher", tau_teacher)
    batch, num_tokens, _ = student.shape
    out_dtype = accumulation_dtype(student.dtype)
    with autocast_disabled(student.device):
        sim_student = torch.bmm(student, student.transpose(1, 2)).to(out_dtype)
        sim_teacher = torch.bmm(teacher, teacher.transpose(1, 2)).to(out_dtype)
        grouped = (batch, num_tokens, frames, num_tokens // frames)
        log_p_student = torch.log_softmax(sim_student.view(grouped) / tau_student, dim=-1)
        log_p_teacher = torch.log_softmax(sim_teacher.view(grouped) / tau_teacher, dim=-1)
        kl = (log_p_teacher.exp() * (log_p_teacher - log_p_student)).sum(-1)
        return kl.mean(-1)
