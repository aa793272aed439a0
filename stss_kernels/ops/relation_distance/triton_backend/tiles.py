"""Relation-distance tile helpers: variant ids, the keys a query tile is paired with, S - T and its sign on a tile."""

from __future__ import annotations

import triton
import triton.language as tl

from stss_kernels._core.tiles import accumulate_gram

# The variant as a kernel constexpr.
VARIANT_IDS = {"full": 0, "spatial": 1, "temporal": 2}
FULL: tl.constexpr = tl.constexpr(0)
SPATIAL: tl.constexpr = tl.constexpr(1)
TEMPORAL: tl.constexpr = tl.constexpr(2)


@triton.jit
def paired_key_range(rows, row_valid, N, HW, VARIANT: tl.constexpr):
    """[lo, hi): the keys any valid row of the tile is paired with (its frames for SPATIAL, all keys otherwise)."""
    if VARIANT == SPATIAL:
        frames = rows // HW
        lo = tl.min(tl.where(row_valid, frames, N), axis=0) * HW
        hi = (tl.max(tl.where(row_valid, frames, -1), axis=0) + 1) * HW
    else:
        lo = tl.zeros((), dtype=tl.int64)
        hi = tl.zeros((), dtype=tl.int64) + N
    return lo, hi


@triton.jit
def pair_tile(rows, keys, row_valid, key_valid, HW, VARIANT: tl.constexpr):
    """(BLOCK_M, BLOCK_N) bool: which (row, key) entries of the tile are pairs of the variant."""
    valid = row_valid[:, None] & key_valid[None, :]
    if VARIANT == SPATIAL:
        valid = valid & ((rows // HW)[:, None] == (keys // HW)[None, :])
    elif VARIANT == TEMPORAL:
        valid = valid & ((rows // HW)[:, None] != (keys // HW)[None, :])
    return valid


@triton.jit
def gap_tile(
    student_ptr,
    teacher_ptr,
    rows,
    keys,
    row_valid,
    key_valid,
    Cs,
    Ct,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    UPCAST: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """fp32 S - T on a (rows, keys) tile, as [s | t] [s | -t]^T: one accumulator for both sides' channels."""
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc = accumulate_gram(acc, student_ptr, rows, keys, row_valid, key_valid, Cs, False, BLOCK_K, UPCAST, PRECISION)
    return accumulate_gram(acc, teacher_ptr, rows, keys, row_valid, key_valid, Ct, True, BLOCK_K, UPCAST, PRECISION)


@triton.jit
def sign_tile(
    student_ptr,
    teacher_ptr,
    rows,
    keys,
    row_valid,
    key_valid,
    N,
    HW,
    Cs,
    Ct,
    margin,
    VARIANT: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    UPCAST: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """fp32 sign(S - T) [|S - T| > margin] on the tile's pairs, 0 elsewhere: dL/dS up to the row factor g_i / count."""
    gap = gap_tile(
        student_ptr, teacher_ptr, rows, keys, row_valid, key_valid, Cs, Ct, BLOCK_M, BLOCK_N, BLOCK_K, UPCAST, PRECISION
    )
    sign = tl.where(gap > margin, 1.0, tl.where(gap < -margin, -1.0, 0.0))
    return tl.where(pair_tile(rows, keys, row_valid, key_valid, HW, VARIANT), sign, 0.0)
