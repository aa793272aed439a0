"""Triton tile helpers and launch configurations shared by every op's kernels (imported only by Triton backends)."""

from __future__ import annotations

import math

import triton
import triton.language as tl

from stss_kernels._core.backends import triton_interpreting

LOG2E = math.log2(math.e)
LN2 = math.log(2.0)
# tl.dot input precision: exact fp32 products for fp32 inputs (they must match an fp64 reference tightly);
# 16-bit operands ignore it on NVIDIA, and "ieee" is the value every ROCm target accepts.
DOT_PRECISION = "ieee"


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
def accumulate_gram(
    acc,
    ptr,
    rows,
    keys,
    row_valid,
    key_valid,
    num_channels,
    NEGATE: tl.constexpr,
    BLOCK_K: tl.constexpr,
    UPCAST: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """acc + x[rows] @ x[keys]^T (acc - ... when NEGATE: the key rows' sign flipped, exact in any dtype), reduced
    over the channels in BLOCK_K chunks. Two calls give [s | t] [s | -t]^T = S - T in one fp32 accumulator."""
    row_ptrs = ptr + rows[:, None] * num_channels
    key_ptrs = ptr + keys[:, None] * num_channels
    for k in range(0, num_channels, BLOCK_K):
        cols = k + tl.arange(0, BLOCK_K)
        col_valid = (cols < num_channels)[None, :]
        queries = tl.load(row_ptrs + cols[None, :], mask=row_valid[:, None] & col_valid, other=0.0)
        targets = tl.load(key_ptrs + cols[None, :], mask=key_valid[:, None] & col_valid, other=0.0)
        if NEGATE:
            targets = -targets
        if UPCAST:
            queries = queries.to(tl.float32)
            targets = targets.to(tl.float32)
        acc = tl.dot(queries, tl.trans(targets), acc, input_precision=PRECISION)
    return acc
