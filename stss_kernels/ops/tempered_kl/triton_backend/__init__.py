"""Fused Triton backend of the tempered self-similarity KL.

Forward: one program per (query tile, target frame, video) runs the student and teacher
online softmaxes and the KL accumulator over that frame's key tiles (exp2 with logits pre-scaled by
log2(e)/tau) and saves five fp32 statistics per (query, frame) (forward.py). Backward: recomputes the
tiles (backward.py). Queries with query_weight == 0 are never visited: kl 0, no gradient, no cost.
The kernels run inside the custom ops of function.py; importing this package does not import Triton.
"""

from __future__ import annotations

import torch

from stss_kernels._core.backends import check_triton_runs
from stss_kernels._core.validation import check_backend_inputs, check_temperature
from stss_kernels.ops.tempered_kl.triton_backend.function import tempered_kl_triton_op

SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


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
    Autocast does not change it. Double backward raises (use the reference backend).
    """
    frames = check_backend_inputs(student, teacher, frames, query_weight, dtypes=SUPPORTED_DTYPES)
    tau_student = check_temperature("tau_student", tau_student)
    tau_teacher = check_temperature("tau_teacher", tau_teacher)
    check_triton_runs("tempered_kl_triton", student.device, "tempered_kl_torch")
    weight = None if query_weight is None else query_weight.detach()
    student, teacher = student.contiguous(), teacher.contiguous()
    return tempered_kl_triton_op(student, teacher, frames, tau_student, tau_teacher, weight)[0]


__all__ = ["tempered_kl_triton"]
