"""Portable tempered KL: a custom autograd Function chunked over query rows.

At most one (chunk x N) block of similarities (and a few same-sized temporaries) is alive at a time,
in the forward and in the backward; only the per-(query, frame) log-sum-exps and KLs are saved.
Runs on any device PyTorch supports.
"""

from __future__ import annotations

import torch
from torch.autograd.function import once_differentiable

from stss_kernels._core.backends import accumulation_dtype
from stss_kernels._core.chunking import query_chunks, rows_per_chunk
from stss_kernels._core.gradients import add_symmetric_grad

# How many (chunk x N) buffers are alive at once (logits of both sides, probabilities, gradient tile).
_LIVE_TILES = 5


def auto_chunk_size(num_tokens: int, dtype: torch.dtype) -> int:
    """Query rows per chunk so that the chunk's temporaries fit in stss_kernels._core.chunking.CHUNK_BUDGET_BYTES."""
    return rows_per_chunk(num_tokens, accumulation_dtype(dtype).itemsize * _LIVE_TILES)


def _log_probs(queries, keys, tau, frames, lse=None):
    """Log-softmax over each frame's keys of queries @ keys^T / tau: (c, F, HW), and the lse (c, F).

    With `lse` given (the backward) it is reused instead of recomputed.
    """
    logits = (queries @ keys.T).div_(tau).view(queries.shape[0], frames, -1)
    if lse is None:
        lse = logits.logsumexp(-1)
    return logits.sub_(lse.unsqueeze(-1)), lse


class TemperedKLTorchFunction(torch.autograd.Function):
    """kl (B, N) from student (B, N, Cs) and teacher (B, N, Ct); saves lse_s, lse_t and KL (B, N, F)."""

    @staticmethod
    def forward(ctx, student, teacher, frames, tau_student, tau_teacher, query_weight, chunk_size):
        batch, num_tokens, _ = student.shape
        compute_dtype = accumulation_dtype(student.dtype)
        kl_frames = student.new_zeros((batch, num_tokens, frames), dtype=compute_dtype)
        lse_student = torch.zeros_like(kl_frames)
        lse_teacher = torch.zeros_like(kl_frames)
        s_all, t_all = student.to(compute_dtype), teacher.to(compute_dtype)
        for b, chunk in query_chunks(query_weight, student.shape, chunk_size, student.device):
            s, t = s_all[b], t_all[b]
            log_p_s, lse_s = _log_probs(s[chunk], s, tau_student, frames)
            log_p_t, lse_t = _log_probs(t[chunk], t, tau_teacher, frames)
            p_t = log_p_t.exp()
            kl_frames[b, chunk] = log_p_t.sub_(log_p_s).mul_(p_t).sum(-1)
            lse_student[b, chunk] = lse_s
            lse_teacher[b, chunk] = lse_t
        ctx.save_for_backward(student, teacher, query_weight, lse_student, lse_teacher, kl_frames)
        ctx.config = (frames, tau_student, tau_teacher, chunk_size)
        return kl_frames.mean(-1)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_kl):
        student, teacher, query_weight, lse_student, lse_teacher, kl_frames = ctx.saved_tensors
        frames, tau_student, tau_teacher, chunk_size = ctx.config
        need_student, need_teacher = ctx.needs_input_grad[:2]
        compute_dtype = kl_frames.dtype
        grad_s = torch.zeros(student.shape, dtype=compute_dtype, device=student.device) if need_student else None
        grad_t = torch.zeros(teacher.shape, dtype=compute_dtype, device=teacher.device) if need_teacher else None
        # The 1/F of the mean over target frames, folded into the upstream gradient.
        grad_rows = grad_kl.to(compute_dtype) / frames
        s_all, t_all = student.to(compute_dtype), teacher.to(compute_dtype)
        for b, chunk in query_chunks(query_weight, student.shape, chunk_size, student.device):
            s, t = s_all[b], t_all[b]
            log_p_s, _ = _log_probs(s[chunk], s, tau_student, frames, lse_student[b, chunk])
            log_p_t, _ = _log_probs(t[chunk], t, tau_teacher, frames, lse_teacher[b, chunk])
            p_t = log_p_t.exp()
            g = grad_rows[b, chunk].view(-1, 1, 1)
            if need_student:
                # dL/dS = g (P_s - P_t) / tau_s
                tile = log_p_s.exp().sub_(p_t).mul_(g / tau_student).view(len(chunk), -1)
                add_symmetric_grad(grad_s[b], tile, s, chunk)
            if need_teacher:
                # dL/dT = g P_t (log P_t - log P_s - KL) / tau_t
                log_ratio = log_p_t.sub_(log_p_s).sub_(kl_frames[b, chunk].unsqueeze(-1))
                tile = log_ratio.mul_(p_t).mul_(g / tau_teacher).view(len(chunk), -1)
                add_symmetric_grad(grad_t[b], tile, t, chunk)
        grad_s = grad_s.to(student.dtype) if need_student else None
        grad_t = grad_t.to(teacher.dtype) if need_teacher else None
        return grad_s, grad_t, None, None, None, None, None


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
    """
    if chunk_size is None:
        chunk_size = auto_chunk_size(student.shape[1], student.dtype)
    elif isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive int or None, got {chunk_size!r}")
    return TemperedKLTorchFunction.apply(student, teacher, frames, tau_student, tau_teacher, query_weight, chunk_size)
