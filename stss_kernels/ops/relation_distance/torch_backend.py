"""Portable relation distance: a custom autograd Function chunked over query rows.

At most one (chunk x N) block of similarity differences (and a few same-sized temporaries) is alive
at a time, in the forward and in the backward; nothing but the inputs is saved. Runs on any device
PyTorch supports.
"""

from __future__ import annotations

import torch
from torch.autograd.function import once_differentiable

from stss_kernels._core.backends import accumulation_dtype
from stss_kernels._core.chunking import query_chunks, rows_per_chunk
from stss_kernels._core.gradients import add_symmetric_grad
from stss_kernels.ops.relation_distance.pairs import pair_count, pair_mask, uniform_per_video

# How many (chunk x N) buffers are alive at once (S - T, its two products, the pair mask / gradient tile).
_LIVE_TILES = 4


def auto_chunk_size(num_tokens: int, dtype: torch.dtype) -> int:
    """Query rows per chunk so that the chunk's temporaries fit in stss_kernels._core.chunking.CHUNK_BUDGET_BYTES."""
    return rows_per_chunk(num_tokens, accumulation_dtype(dtype).itemsize * _LIVE_TILES)


def _similarity_gap(s: torch.Tensor, t: torch.Tensor, chunk: torch.Tensor) -> torch.Tensor:
    """S - T on the rows `chunk` of one video: (c, N)."""
    return (s[chunk] @ s.T).sub_(t[chunk] @ t.T)


class RelationDistanceTorchFunction(torch.autograd.Function):
    """rows (B, N) from student (B, N, Cs) and teacher (B, N, Ct); saves only the inputs."""

    @staticmethod
    def forward(ctx, student, teacher, frames, margin, variant, query_weight, chunk_size):
        batch, num_tokens, _ = student.shape
        compute_dtype = accumulation_dtype(student.dtype)
        rows = student.new_zeros((batch, num_tokens), dtype=compute_dtype)
        count = pair_count(variant, num_tokens, frames)
        ctx.save_for_backward(student, teacher, query_weight)
        ctx.config = (frames, margin, variant, chunk_size)
        if count == 0:  # "temporal" on a single frame: no pair at all
            return rows
        s_all, t_all = student.to(compute_dtype), teacher.to(compute_dtype)
        for b, chunk in query_chunks(query_weight, student.shape, chunk_size, student.device):
            distance = _similarity_gap(s_all[b], t_all[b], chunk).abs_().sub_(margin).clamp_min_(0)
            pairs = pair_mask(variant, chunk, num_tokens, frames)
            if pairs is not None:
                distance.mul_(pairs)
            rows[b, chunk] = distance.sum(-1) / count
        return rows

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_rows):
        student, teacher, query_weight = ctx.saved_tensors
        frames, margin, variant, chunk_size = ctx.config
        need_student, need_teacher = ctx.needs_input_grad[:2]
        num_tokens = student.shape[1]
        compute_dtype = accumulation_dtype(student.dtype)
        grad_s = torch.zeros(student.shape, dtype=compute_dtype, device=student.device) if need_student else None
        grad_t = torch.zeros(teacher.shape, dtype=compute_dtype, device=teacher.device) if need_teacher else None
        count = pair_count(variant, num_tokens, frames)
        if count > 0 and (need_student or need_teacher):
            # G_ij = g_i sign(S_ij - T_ij) [|S_ij - T_ij| > margin] / count on query i's pairs (0 if skipped)
            row_grad = grad_rows.to(compute_dtype) / count
            if query_weight is not None:
                row_grad = torch.where(query_weight != 0, row_grad, 0.0)
            symmetric = uniform_per_video(row_grad)
            s_all, t_all = student.to(compute_dtype), teacher.to(compute_dtype)
            for b, chunk in query_chunks(query_weight, student.shape, chunk_size, student.device):
                s, t = s_all[b], t_all[b]
                gap = _similarity_gap(s, t, chunk)
                tile = gap.sign().masked_fill_(gap.abs_() <= margin, 0).mul_(row_grad[b, chunk, None])
                del gap
                pairs = pair_mask(variant, chunk, num_tokens, frames)
                if pairs is not None:
                    tile.mul_(pairs)
                if symmetric:  # (G + G^T) x = 2 G x: each chunk owns its rows
                    tile.mul_(2)
                    if need_student:
                        grad_s[b, chunk] = tile @ s
                    if need_teacher:
                        grad_t[b, chunk] = -(tile @ t)
                    continue
                if need_student:
                    add_symmetric_grad(grad_s[b], tile, s, chunk)
                if need_teacher:
                    add_symmetric_grad(grad_t[b], tile.neg_(), t, chunk)
        grad_s = grad_s.to(student.dtype) if need_student else None
        grad_t = grad_t.to(teacher.dtype) if need_teacher else None
        return grad_s, grad_t, None, None, None, None, None


def relation_distance_torch(
    student: torch.Tensor,
    teacher: torch.Tensor,
    frames: int,
    margin: float,
    variant: str,
    query_weight: torch.Tensor | None = None,
    chunk_size: int | None = None,
) -> torch.Tensor:
    """Per-query relation distance (B, N), chunked over query rows (same contract as the reference).

    student (B, N, Cs), teacher (B, N, Ct), already normalised. Rows with query_weight == 0 are
    skipped (0, no gradient). `chunk_size` query rows are processed at a time; None picks it from
    the shared chunk budget. Accumulates in fp32 (fp64 for fp64 inputs); gradients in the input dtype.
    """
    if chunk_size is None:
        chunk_size = auto_chunk_size(student.shape[1], student.dtype)
    elif isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive int or None, got {chunk_size!r}")
    return RelationDistanceTorchFunction.apply(student, teacher, frames, margin, variant, query_weight, chunk_size)
