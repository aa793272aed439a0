"""Tempered-KL tile helpers: the saved statistics' slots and dL/dS on a tile."""

from __future__ import annotations

import triton
import triton.language as tl

from stss_kernels._core.tiles import gram_tile

# Saved per (video, target frame, query), in base-2 logit units relative to the running maxima:
# stats (B, F, NUM_STATS, N)[:, :, slot] for these slots.
STAT_MAX_T: tl.constexpr = tl.constexpr(0)  # max_j x_t
STAT_INV_SUM_T: tl.constexpr = tl.constexpr(1)  # 1 / sum_j exp2(x_t - max_t)
STAT_MAX_S: tl.constexpr = tl.constexpr(2)  # max_j x_s
STAT_INV_SUM_S: tl.constexpr = tl.constexpr(3)  # 1 / sum_j exp2(x_s - max_s)
STAT_GAP: tl.constexpr = tl.constexpr(4)  # E_{P_t}[(x_t - max_t) - (x_s - max_s)]
NUM_STATS: tl.constexpr = tl.constexpr(5)
# Logit of a masked key and initial running maximum (base-2 units).
LOGIT_FLOOR: tl.constexpr = tl.constexpr(-1.0e30)


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
    HALF_TILES: tl.constexpr,
    UPCAST: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """fp32 dL/dS (dL/dT when FOR_TEACHER) on a (rows, keys) tile whose keys all lie in `frame`.

    row_grad already holds g_i / F / tau_s (ln2 * g_i / F / tau_t for the teacher). The teacher's Gram tile is
    computed first and reduced to what the gradient needs of it, P_t (and P_t (x_t - max_t - E) for the
    teacher), rounded to fp16 when HALF_TILES (the tile is then stored in a 16-bit dtype anyway); the student's
    tile is accumulated after, so one fp32 (BLOCK_M, BLOCK_N) accumulator is live at a time.
    """
    frame_stats = stats_ptr + tl.cast(frame, tl.int64) * NUM_STATS * N + rows
    max_t = tl.load(frame_stats + STAT_MAX_T * N, mask=row_valid, other=0.0)
    inv_sum_t = tl.load(frame_stats + STAT_INV_SUM_T * N, mask=row_valid, other=0.0)
    max_s = tl.load(frame_stats + STAT_MAX_S * N, mask=row_valid, other=0.0)
    gram_t = gram_tile(teacher_ptr, rows, keys, row_valid, key_valid, Ct, BLOCK_M, BLOCK_N, BLOCK_K, UPCAST, PRECISION)
    centred_t = gram_t * scale_t - max_t[:, None]
    prob_t = tl.exp2(centred_t) * inv_sum_t[:, None]
    if FOR_TEACHER:
        expected_gap = tl.load(frame_stats + STAT_GAP * N, mask=row_valid, other=0.0)
        # dL/dT = P_t ((x_t - max_t) - (x_s - max_s) - E): the teacher-only part now, P_t (x_s - max_s) later.
        teacher_part = prob_t * (centred_t - expected_gap[:, None])
        if HALF_TILES:
            teacher_part = teacher_part.to(tl.float16)
            prob_t = prob_t.to(tl.float16)
        gram_s = gram_tile(student_ptr, rows, keys, row_valid, key_valid, Cs, BLOCK_M, BLOCK_N, BLOCK_K, UPCAST,
                           PRECISION)  # fmt: skip
        centred_s = gram_s * scale_s - max_s[:, None]
        grad = teacher_part.to(tl.float32) - prob_t.to(tl.float32) * centred_s
    else:
        if HALF_TILES:
            prob_t = prob_t.to(tl.float16)
        inv_sum_s = tl.load(frame_stats + STAT_INV_SUM_S * N, mask=row_valid, other=0.0)
        gram_s = gram_tile(student_ptr, rows, keys, row_valid, key_valid, Cs, BLOCK_M, BLOCK_N, BLOCK_K, UPCAST,
                           PRECISION)  # fmt: skip
        grad = tl.exp2(gram_s * scale_s - max_s[:, None]) * inv_sum_s[:, None] - prob_t.to(tl.float32)
    return tl.where(key_valid[None, :] & row_valid[:, None], grad * row_grad[:, None], 0.0)
