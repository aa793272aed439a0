"""Portable tempered KL: a pair of custom ops (forward, backward) chunked over query rows.

At most one (chunk x N) block of similarities (and a few same-sized temporaries) is alive at a time,
in the forward and in the backward; only the per-(query, frame) KLs are saved.
Runs on any device PyTorch supports. Registered with torch.library (`stss_kernels::tempered_kl_torch`),
so torch.compile treats it as one opaque op. With a query mask, finding the kept rows syncs the host
once per video (not while a CUDA graph captures: then every row is computed and the others zeroed).
"""

from __future__ import annotations

import torch

from stss_kernels._core.backends import accumulation_dtype
from stss_kernels._core.chunking import query_chunks, rows_per_chunk
from stss_kernels._core.gradients import add_symmetric_grad
from stss_kernels._core.library import define_fused_op
from stss_kernels._core.validation import check_backend_inputs, check_temperature

# How many (chunk x N) buffers are alive at once (logits of both sides, probabilities, gradient tile).
_LIVE_TILES = 5


def auto_chunk_size(num_tokens: int, dtype: torch.dtype) -> int:
    """Query rows per chunk so that the chunk's temporaries fit in stss_kernels._core.chunking.CHUNK_BUDGET_BYTES."""
    return rows_per_chunk(num_tokens, accumulation_dtype(dtype).itemsize * _LIVE_TILES)


def _log_probs(queries, keys, tau, frames):
    """Log-softmax over each frame's keys of queries @ keys^T / tau, and its exp: both (c, F, HW).

    The logits are shifted by their per-frame maximum before the log of the (shifted) sum is subtracted, as
    log_softmax does: subtracting an absolute log-sum-exp would lose about u * |logit| to rounding, which at
    large logits (unnormalised features, small tau) dominates the KL and the teacher gradient. The backward
    therefore recomputes these rather than saving per-(query, frame) log-sum-exps.
    """
    logits = (queries @ keys.T).div_(tau).view(queries.shape[0], frames, -1)
    row_max = logits.amax(-1, keepdim=True)
    shifted = logits.sub_(row_max)
    probs = shifted.exp()
    log_sum = probs.sum(-1, keepdim=True).log_()
    probs.div_(log_sum.exp())
    return shifted.sub_(log_sum), probs


def _forward(student, teacher, frames, tau_student, tau_teacher, query_weight, chunk_size):
    """kl (B, N), and KL (B, N, F) for the backward."""
    batch, num_tokens, _ = student.shape
    compute_dtype = accumulation_dtype(student.dtype)
    kl_frames = student.new_zeros((batch, num_tokens, frames), dtype=compute_dtype)
    s_all, t_all = student.to(compute_dtype), teacher.to(compute_dtype)
    for b, chunk in query_chunks(query_weight, student.shape, chunk_size, student.device):
        s, t = s_all[b], t_all[b]
        log_p_s, _ = _log_probs(s[chunk], s, tau_student, frames)
        log_p_t, p_t = _log_probs(t[chunk], t, tau_teacher, frames)
        kl_frames[b, chunk] = log_p_t.sub_(log_p_s).mul_(p_t).sum(-1)
    if query_weight is not None:  # rows of weight 0 are 0 (already, unless every row was computed)
        kl_frames = torch.where((query_weight != 0).unsqueeze(-1), kl_frames, 0.0)
    return kl_frames.mean(-1), kl_frames


def _forward_fake(student, teacher, frames, tau_student, tau_teacher, query_weight, chunk_size):
    batch, num_tokens, _ = student.shape
    stats = student.new_empty((batch, num_tokens, frames), dtype=accumulation_dtype(student.dtype))
    return stats.new_empty((batch, num_tokens)), stats


def _backward(
    grad_kl, student, teacher, frames, tau_student, tau_teacher, query_weight, chunk_size,
    kl_frames, need_student, need_teacher,
):  # fmt: skip
    compute_dtype = kl_frames.dtype
    grad_s = torch.zeros(student.shape, dtype=compute_dtype, device=student.device) if need_student else None
    grad_t = torch.zeros(teacher.shape, dtype=compute_dtype, device=teacher.device) if need_teacher else None
    # The 1/F of the mean over target frames, folded into the upstream gradient; rows of weight 0 pass none.
    grad_rows = grad_kl.to(compute_dtype) / frames
    if query_weight is not None:
        grad_rows = torch.where(query_weight != 0, grad_rows, 0.0)
    s_all, t_all = student.to(compute_dtype), teacher.to(compute_dtype)
    for b, chunk in query_chunks(query_weight, student.shape, chunk_size, student.device):
        s, t = s_all[b], t_all[b]
        log_p_s, p_s = _log_probs(s[chunk], s, tau_student, frames)
        log_p_t, p_t = _log_probs(t[chunk], t, tau_teacher, frames)
        g = grad_rows[b, chunk].view(-1, 1, 1)
        if need_student:
            # dL/dS = g (P_s - P_t) / tau_s
            tile = p_s.sub_(p_t).mul_(g / tau_student).view(len(chunk), -1)
            add_symmetric_grad(grad_s[b], tile, s, chunk)
        if need_teacher:
            # dL/dT = g P_t (log P_t - log P_s - KL) / tau_t
            log_ratio = log_p_t.sub_(log_p_s).sub_(kl_frames[b, chunk].unsqueeze(-1))
            tile = log_ratio.mul_(p_t).mul_(g / tau_teacher).view(len(chunk), -1)
            add_symmetric_grad(grad_t[b], tile, t, chunk)
    grad_s = grad_s.to(student.dtype) if need_student else student.new_empty(0)
    grad_t = grad_t.to(teacher.dtype) if need_teacher else teacher.new_empty(0)
    return grad_s, grad_t


_ARGS = "Tensor student, Tensor teacher, int frames, float tau_student, float tau_teacher, Tensor? query_weight, "
_ARGS += "int chunk_size"
tempered_kl_torch_op = define_fused_op(
    "tempered_kl_torch",
    forward_schema=f"({_ARGS}) -> (Tensor, Tensor)",
    forward=_forward,
    forward_fake=_forward_fake,
    backward_schema=f"(Tensor grad_kl, {_ARGS}, Tensor kl_frames, "
    "bool need_student, bool need_teacher) -> (Tensor, Tensor)",
    backward=_backward,
    differentiable=2,
    label="tempered_kl (torch backend)",
)


def tempered_kl_torch(
    student: torch.Tensor,
    teacher: torch.Tensor,
    frames: int,
    tau_student: float,
    tau_teacher: float,
    query_weight: torch.Tensor | None = None,
    chunk_size: int | None = None,
) -> torch.Tensor:
    """Per-query tempered KL (B, N), chunked over query rows (same contract as the reference).

    student (B, N, Cs), teacher (B, N, Ct), already normalised. Rows with query_weight == 0 are
    skipped (kl 0, no gradient). `chunk_size` query rows are processed at a time; None picks it from
    the shared chunk budget. Accumulates in fp32 (fp64 for fp64 inputs); gradients in the input dtype.
    Autocast does not change it. Double backward raises (use the reference backend).
    """
    frames = check_backend_inputs(student, teacher, frames, query_weight)
    tau_student = check_temperature("tau_student", tau_student)
    tau_teacher = check_temperature("tau_teacher", tau_teacher)
    if chunk_size is None:
        chunk_size = auto_chunk_size(student.shape[1], student.dtype)
    elif isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive int or None, got {chunk_size!r}")
    weight = None if query_weight is None else query_weight.detach()
    return tempered_kl_torch_op(
        student.contiguous(), teacher.contiguous(), frames, tau_student, tau_teacher, weight, chunk_size
    )[0]
