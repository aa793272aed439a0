"""Tile helpers and launch configurations shared by the forward and backward kernels."""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from stss_kernels._utils import triton_interpreting

LOG2E = math.log2(math.e)
LN2 = math.log(2.0)
# Saved per (video, target frame, query): max_t, 1/sum_t, max_s, 1/sum_s, E_{P_t}[centred x_t - x_s].
NUM_STATS: tl.constexpr = tl.constexpr(5)
# tl.dot input precision: exact fp32 products for fp32 inputs (they must match an fp64 reference tightly);
# 16-bit operands ignore it on NVIDIA, and "ieee" is the value every ROCm target accepts.
DOT_PRECISION = "ieee"
# Logit of a masked key and initial running maximum (base-2 units).
LOGIT_FLOOR: tl.constexpr = tl.constexpr(-1.0e30)


def kept_queries(keep: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor] | tuple[None, None]:
    """Per video, the token ids of the kept queries (keep (B, N) bool) first, ascending, and how many there are.

    The kernels walk only these: masked queries cost nothing (M-TSA keeps ~20% of them).
    """
    if keep is None:
        return None, None
    dropped = (~keep).to(torch.int8)
    index = torch.argsort(dropped, dim=1, stable=True).to(torch.int32).contiguous()
    return index, (dropped.shape[1] - dropped.sum(1, dtype=torch.int32)).contiguous()


def autotune_configs(gpu_blocks: list[tuple[dict, int, int]], interpreter_blocks: dict) -> list[triton.Config]:
    """The GPU config list (blocks, num_warps, num_stages), or the single config the interpreter accepts."""
    if triton_interpreting():
        return [triton.Config(interpreter_blocks, num_warps=4, num_stages=1)]
    return [triton.Config(blocks, num_warps=warps, num_stages=stages) for blocks, warps, stages in gpu_blocks]


@triton.jit
def load_rows(ptr, rows, row_valid, num_cols, col_start, BLOCK_C: tl.constexpr, UPCAST: tl.constexpr):
    """(len(rows), BLOCK_C) tile of a row-major (*, num_cols) matrix, zero outside rows / columns."""
    cols = col_start + tl.arange(0, BLOCK_C)
    tile = tl.load(
        ptr + rows[:, None] * num_cols + cols[None, :],
        mask=row_valid[:, None] & (cols < num_cols)[None, :],
        other=0.0,
    )
    if UPCAST:
        tile = tile.to(tl.float32)
    return tile


@triton.jit
def query_rows(index_ptr, count, start, BLOCK_M: tl.constexpr, HAS_INDEX: tl.constexpr):
    """Token ids (int64) of query positions start .. start + BLOCK_M, and which are < count.

    With HAS_INDEX the positions walk the video's list of kept queries (index_ptr, count of them);
    otherwise they are the tokens themselves (count = N).
    """
    positions = start + tl.arange(0, BLOCK_M)
    valid = positions < count
    if HAS_INDEX:
        rows = tl.load(index_ptr + positions, mask=valid, other=0)
    else:
        rows = positions
    return rows.to(tl.int64), valid


@triton.jit
def num_queries(count_ptr, b, N, HAS_INDEX: tl.constexpr):
    """Number of (kept) queries of video b."""
    if HAS_INDEX:
        return tl.load(count_ptr + b)
    else:
        return N


@triton.jit
def gram_tile(
    ptr,
    rows,
    keys,
    row_valid,
    key_valid,
    num_channels,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    UPCAST: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """fp32 (BLOCK_M, BLOCK_N) tile x[rows] @ x[keys]^T, reduced over the channels in BLOCK_K chunks."""
    # Loads inlined rather than through load_rows: every nested call is expensive in the interpreter.
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    row_ptrs = ptr + rows[:, None] * num_channels
    key_ptrs = ptr + keys[:, None] * num_channels
    for k in range(0, num_channels, BLOCK_K):
        cols = k + tl.arange(0, BLOCK_K)
        col_valid = (cols < num_channels)[None, :]
        queries = tl.load(row_ptrs + cols[None, :], mask=row_valid[:, None] & col_valid, other=0.0)
        targets = tl.load(key_ptrs + cols[None, :], mask=key_valid[:, None] & col_valid, other=0.0)
        if UPCAST:
            queries = queries.to(tl.float32)
            targets = targets.to(tl.float32)
        acc = tl.dot(queries, tl.trans(targets), acc, input_precision=PRECISION)
    return acc


@triton.jit
def logit_tiles(
    student_ptr,
    teacher_ptr,
    rows,
    keys,
    row_valid,
    key_valid,
    Cs,
    Ct,
    scale_s,
    scale_t,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    UPCAST: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """Student and teacher logits S/tau_s and T/tau_t of a (rows, keys) tile, in base-2 units (x log2 e)."""
    gram_s = gram_tile(student_ptr, rows, keys, row_valid, key_valid, Cs, BLOCK_M, BLOCK_N, BLOCK_K, UPCAST, PRECISION)
    gram_t = gram_tile(teacher_ptr, rows, keys, row_valid, key_valid, Ct, BLOCK_M, BLOCK_N, BLOCK_K, UPCAST, PRECISION)
    return gram_s * scale_s, gram_t * scale_t


@triton.jit
def similarity_grad_tile(
    student_ptr,
    teacher_ptr,
    stats_ptr,
    rows,
    keys,
    row_valid,
    key_valid,
    row_grad,
    frame,
    N,
    Cs,
    Ct,
    scale_s,
    scale_t,
    FOR_TEACHER: tl.constexpr,
    UPCAST: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """fp32 dL/dS (dL/dT when FOR_TEACHER) on a (rows, keys) tile whose keys all lie in `frame`.

    row_grad already holds g_i / F / tau_s (ln2 * g_i / F / tau_t for the teacher).
    """
    logits_s, logits_t = logit_tiles(
        student_ptr, teacher_ptr, rows, keys, row_valid, key_valid, Cs, Ct, scale_s, scale_t,
        BLOCK_M, BLOCK_N, BLOCK_K, UPCAST, PRECISION,
    )  # fmt: skip
    frame_stats = stats_ptr + tl.cast(frame, tl.int64) * NUM_STATS * N + rows
    max_t = tl.load(frame_stats, mask=row_valid, other=0.0)
    inv_sum_t = tl.load(frame_stats + N, mask=row_valid, other=0.0)
    max_s = tl.load(frame_stats + 2 * N, mask=row_valid, other=0.0)
    centred_t = logits_t - max_t[:, None]
    centred_s = logits_s - max_s[:, None]
    prob_t = tl.exp2(centred_t) * inv_sum_t[:, None]
    if FOR_TEACHER:
        expected_gap = tl.load(frame_stats + 4 * N, mask=row_valid, other=0.0)
        grad = prob_t * (centred_t - centred_s - expected_gap[:, None])
    else:
        inv_sum_s = tl.load(frame_stats + 3 * N, mask=row_valid, other=0.0)
        grad = tl.exp2(centred_s) * inv_sum_s[:, None] - prob_t
    return tl.where(key_valid[None, :] & row_valid[:, None], grad * row_grad[:, None], 0.0)
