"""Fused Triton backend of the tempered self-similarity KL.

Forward: one program per (query tile, target frame, video) runs the student and teacher
online softmaxes and the KL accumulator over that frame's key tiles (exp2 with logits pre-scaled by
log2(e)/tau) and saves five fp32 statistics per (query, frame) (forward.py). Backward: recomputes the
tiles (backward.py). Queries with query_weight == 0 are never visited: kl 0, no gradient, no cost.
Generation 2 of both (forward_v2.py, backward_v2.py) is selected by KERNEL_GENERATION (generations.py).
"""

from __future__ import annotations

import torch

from stss_kernels._core.backends import triton_interpreting
from stss_kernels.ops.tempered_kl.triton_backend.function import TemperedKLTritonFunction

SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# Kernel generation (1 or 2; None: $STSS_KERNEL_GENERATION, else 1), read at each call: see generations.py.
KERNEL_GENERATION: int | None = None


def _check_inputs(student, teacher, frames, tau_student, tau_teacher, query_weight) -> None:
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
    if tau_student <= 0 or tau_teacher <= 0:
        raise ValueError(f"tau_student, tau_teacher: expected > 0, got {tau_student}, {tau_teacher}")
    if query_weight is not None and query_weight.shape != student.shape[:2]:
        raise ValueError(f"query_weight: expected shape {tuple(student.shape[:2])}, got {tuple(query_weight.shape)}")
    tensors = [student, teacher] + ([] if query_weight is None else [query_weight])
    if any(tensor.device != student.device for tensor in tensors):
        raise ValueError("student, teacher, query_weight: expected all on one device")
    if not student.is_cuda and not triton_interpreting():
        raise ValueError(f"student: the Triton backend needs GPU tensors (got {student.device}), or TRITON_INTERPRET=1")


def tempered_kl_triton(
    student: torch.Tensor,
    teacher: torch.Tensor,
    frames: int,
    tau_student: float,
    tau_teacher: float,
    query_weight: torch.Tensor | None = None,
) -> torch.Tensor:
    """Per-query tempered KL with fused kernels: kl (B, N) float32, O(N * (Cs + Ct)) memory.

    student (B, N, Cs), teacher (B, N, Ct): fp32, fp16 or bf16, tokens frame-major, N = frames * HW.
    kl[b, i] is the mean over the target frames of KL(P_t || P_s). Rows where query_weight is 0
    are skipped: they return 0 and pass no gradient (the weights themselves are not applied).
    """
    _check_inputs(student, teacher, frames, tau_student, tau_teacher, query_weight)
    return TemperedKLTritonFunction.apply(
        student.contiguous(), teacher.contiguous(), frames, float(tau_student), float(tau_teacher), query_weight
    )


__all__ = ["tempered_kl_triton"]
