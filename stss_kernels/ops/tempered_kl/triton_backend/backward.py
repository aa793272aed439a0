"""Backward kernels: recompute the similarity tiles from the saved statistics, never store a whole N x N matrix.

With G = dL/dS (or dL/dT) the feature gradient is (G + G^T) x.

Narrow features (both channel counts padded to <= NARROW_CHANNELS): two fused passes, deterministic, no
atomics: the column pass (one program per key tile) writes G^T x, then the row pass adds G x in place. The
channel counts are constexprs, so each program holds the whole output row (no BLOCK_D slices, no
recompute per slice), its own tiles of both sides stay resident across the loop, and the product reuses the
tile just loaded for the Gram (x[keys] in the row pass, x[rows] in the column pass) instead of loading it again.

Wide features: G for a chunk of kept query rows of every video at once (one batched launch), each tile
recomputed once and written in the input dtype; then one kernel computes each fp32 output tile as
G[:, T]^T x[rows] plus, for unmasked chunks, G[T, :] x, accumulating in registers and storing once (adding
to the previous chunk's partial sum in its epilogue). With a query mask a second kernel adds G x to the kept
rows. No G + G^T block, no half-precision products rounded before an fp32 sum, no host synchronisation.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from stss_kernels._core.backends import triton_interpreting
from stss_kernels._core.chunking import rows_per_chunk
from stss_kernels._core.tiles import DOT_PRECISION, LN2, LOG2E, autotune_configs, num_queries, query_rows
from stss_kernels._core.tuning import hopper_only_configs, next_power_of_two, shape_class, tuned_kernel
from stss_kernels.ops.tempered_kl.triton_backend.forward import is_narrow
from stss_kernels.ops.tempered_kl.triton_backend.tiles import (
    NUM_STATS,
    STAT_GAP,
    STAT_INV_SUM_S,
    STAT_INV_SUM_T,
    STAT_MAX_S,
    STAT_MAX_T,
    similarity_grad_tile,
)

# Narrow fused passes, per pass (ptxas, bf16 at C = 64; sm_90a: column 96-159 registers, 2-5 CTAs per SM, the
# row pass 150-254). The first of each list spills on neither sm_90a nor sm_80 (mma.sync needs more registers);
# the others spill on sm_80 and are timed on Hopper only.
COLUMN_CONFIGS = hopper_only_configs(
    autotune_configs(
        [
            (dict(BLOCK_M=64, BLOCK_N=32, BLOCK_TAIL=16), 4, 3),
            (dict(BLOCK_M=128, BLOCK_N=64, BLOCK_TAIL=32), 8, 3),
            (dict(BLOCK_M=64, BLOCK_N=64, BLOCK_TAIL=32), 4, 3),
            (dict(BLOCK_M=128, BLOCK_N=128, BLOCK_TAIL=32), 8, 2),
        ],
        dict(BLOCK_M=16, BLOCK_N=16, BLOCK_TAIL=8),
    ),
    (1, 2, 3),
)
ROW_CONFIGS = hopper_only_configs(
    autotune_configs(
        [
            (dict(BLOCK_M=32, BLOCK_N=32, BLOCK_TAIL=16), 4, 3),
            (dict(BLOCK_M=64, BLOCK_N=32, BLOCK_TAIL=16), 4, 2),
            (dict(BLOCK_M=64, BLOCK_N=32, BLOCK_TAIL=16), 4, 4),
            (dict(BLOCK_M=128, BLOCK_N=32, BLOCK_TAIL=16), 8, 3),
            (dict(BLOCK_M=64, BLOCK_N=64, BLOCK_TAIL=32), 4, 2),
            (dict(BLOCK_M=128, BLOCK_N=64, BLOCK_TAIL=32), 8, 3),
        ],
        dict(BLOCK_M=16, BLOCK_N=16, BLOCK_TAIL=8),
    ),
    (1, 2, 3, 4, 5),
)
SIMILARITY_GRAD_CONFIGS = autotune_configs(
    [
        (dict(BLOCK_M=128, BLOCK_N=64, BLOCK_K=64), 8, 3),
        (dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=64), 8, 3),
        (dict(BLOCK_M=64, BLOCK_N=128, BLOCK_K=64), 4, 3),
        (dict(BLOCK_M=128, BLOCK_N=32, BLOCK_K=64), 4, 4),
    ],
    dict(BLOCK_M=16, BLOCK_N=16, BLOCK_K=32),
)
hopper_only_configs(SIMILARITY_GRAD_CONFIGS, (1, 2))  # 128 x 128 and 64 x 128 spill on sm_80 (mma.sync)
PRODUCT_CONFIGS = autotune_configs(
    [
        (dict(BLOCK_M=128, BLOCK_D=128, BLOCK_K=64), 8, 3),
        (dict(BLOCK_M=128, BLOCK_D=256, BLOCK_K=64), 8, 3),
        (dict(BLOCK_M=128, BLOCK_D=128, BLOCK_K=32), 4, 4),
        (dict(BLOCK_M=64, BLOCK_D=128, BLOCK_K=64), 4, 4),
    ],
    dict(BLOCK_M=16, BLOCK_D=32, BLOCK_K=16),
)
# The row product gathers kept rows (int64 offsets): wider tiles spill there (ptxas, sm_90a, bf16).
ROW_PRODUCT_CONFIGS = autotune_configs(
    [
        (dict(BLOCK_M=128, BLOCK_D=128, BLOCK_K=64), 8, 3),
        (dict(BLOCK_M=64, BLOCK_D=128, BLOCK_K=64), 4, 4),
        (dict(BLOCK_M=64, BLOCK_D=64, BLOCK_K=64), 4, 3),
    ],
    dict(BLOCK_M=16, BLOCK_D=32, BLOCK_K=16),
)


@triton.jit
def grad_from_logits(
    logits_s,
    logits_t,
    stats_ptr,
    rows,
    row_valid,
    key_valid,
    row_grad,
    frame,
    N,
    FOR_TEACHER: tl.constexpr,
):
    """dL/dS (dL/dT when FOR_TEACHER) of a tile whose keys all lie in `frame`, from its base-2 logits (tiles.py)."""
    frame_stats = stats_ptr + tl.cast(frame, tl.int64) * NUM_STATS * N + rows
    max_t = tl.load(frame_stats + STAT_MAX_T * N, mask=row_valid, other=0.0)
    inv_sum_t = tl.load(frame_stats + STAT_INV_SUM_T * N, mask=row_valid, other=0.0)
    max_s = tl.load(frame_stats + STAT_MAX_S * N, mask=row_valid, other=0.0)
    centred_t = logits_t - max_t[:, None]
    centred_s = logits_s - max_s[:, None]
    prob_t = tl.exp2(centred_t) * inv_sum_t[:, None]
    if FOR_TEACHER:
        expected_gap = tl.load(frame_stats + STAT_GAP * N, mask=row_valid, other=0.0)
        grad = prob_t * (centred_t - centred_s - expected_gap[:, None])
    else:
        inv_sum_s = tl.load(frame_stats + STAT_INV_SUM_S * N, mask=row_valid, other=0.0)
        grad = tl.exp2(centred_s) * inv_sum_s[:, None] - prob_t
    return tl.where(key_valid[None, :] & row_valid[:, None], grad * row_grad[:, None], 0.0)


@triton.jit
def load_tile(ptr, rows, valid, num_cols, COLS: tl.constexpr, UPCAST: tl.constexpr):
    """(len(rows), COLS) tile of a row-major (*, num_cols) matrix, zero outside."""
    cols = tl.arange(0, COLS)
    tile = tl.load(ptr + rows[:, None] * num_cols + cols[None, :], mask=valid[:, None] & (cols < num_cols)[None, :],
                   other=0.0)  # fmt: skip
    if UPCAST:
        tile = tile.to(tl.float32)
    return tile


@triton.jit
def row_pass_tile(
    student_ptr,
    teacher_ptr,
    stats_ptr,
    query_s,
    query_t,
    rows,
    row_valid,
    row_grad,
    frame,
    key_start,
    acc,
    N,
    HW,
    Cs,
    Ct,
    scale_s,
    scale_t,
    MASK_KEYS: tl.constexpr,
    FOR_TEACHER: tl.constexpr,
    UPCAST: tl.constexpr,
    PRECISION: tl.constexpr,
    CS_PAD: tl.constexpr,
    CT_PAD: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """acc + G[rows, keys] x[keys] for the key tile key_start .. + BLOCK_N of `frame` (x = the side's features)."""
    keys_in_frame = key_start + tl.arange(0, BLOCK_N)
    if MASK_KEYS:
        key_valid = keys_in_frame < HW
    else:
        key_valid = tl.full((BLOCK_N,), 1, tl.int1)
    keys = frame * HW + keys_in_frame
    keys_s = load_tile(student_ptr, keys, key_valid, Cs, CS_PAD, UPCAST)
    keys_t = load_tile(teacher_ptr, keys, key_valid, Ct, CT_PAD, UPCAST)
    logits_s = tl.dot(query_s, tl.trans(keys_s), input_precision=PRECISION) * scale_s
    logits_t = tl.dot(query_t, tl.trans(keys_t), input_precision=PRECISION) * scale_t
    grad = grad_from_logits(logits_s, logits_t, stats_ptr, rows, row_valid, key_valid, row_grad, frame, N, FOR_TEACHER)
    if FOR_TEACHER:
        acc = tl.dot(grad.to(keys_t.dtype), keys_t, acc, input_precision=PRECISION)
    else:
        acc = tl.dot(grad.to(keys_s.dtype), keys_s, acc, input_precision=PRECISION)
    return acc


@triton.jit
def _feature_grad_kernel(
    student_ptr,
    teacher_ptr,
    stats_ptr,
    row_grad_ptr,
    index_ptr,
    count_ptr,
    grad_ptr,
    N,
    HW,
    Cs,
    Ct,
    frames,
    scale_s,
    scale_t,
    COLUMN_PASS: tl.constexpr,
    FOR_TEACHER: tl.constexpr,
    HAS_INDEX: tl.constexpr,
    UPCAST: tl.constexpr,
    PRECISION: tl.constexpr,
    CS_PAD: tl.constexpr,
    CT_PAD: tl.constexpr,
    OUT_PAD: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_TAIL: tl.constexpr,
):
    """Narrow features: one pass of grad (B, N, C_side) fp32 over the whole channel row, program (tile, video).

    COLUMN_PASS, one program per key tile of one frame (keys resident): grad[keys] = sum over kept query
    tiles of G[rows, keys]^T x[rows]. Otherwise one program per tile of kept queries (queries resident):
    grad[rows] += sum over every frame's key tiles of G[rows, keys] x[keys].
    """
    b = tl.program_id(1).to(tl.int64)
    count = num_queries(count_ptr, b, N, HAS_INDEX)
    student_ptr += b * N * Cs
    teacher_ptr += b * N * Ct
    stats_ptr += b * frames * NUM_STATS * N
    row_grad_ptr += b * N
    index_ptr += b * N
    if FOR_TEACHER:
        num_out = Ct
    else:
        num_out = Cs
    grad_ptr += b * N * num_out
    cols = tl.arange(0, OUT_PAD)
    if COLUMN_PASS:
        tiles_per_frame = tl.cdiv(HW, BLOCK_N)
        frame = tl.program_id(0) // tiles_per_frame
        keys_in_frame = (tl.program_id(0) % tiles_per_frame) * BLOCK_N + tl.arange(0, BLOCK_N)
        key_valid = keys_in_frame < HW
        keys = (frame * HW + keys_in_frame).to(tl.int64)
        keys_s = load_tile(student_ptr, keys, key_valid, Cs, CS_PAD, UPCAST)
        keys_t = load_tile(teacher_ptr, keys, key_valid, Ct, CT_PAD, UPCAST)
        acc = tl.zeros((BLOCK_N, OUT_PAD), dtype=tl.float32)
        for row_start in range(0, count, BLOCK_M):
            rows, row_valid = query_rows(index_ptr, count, row_start, BLOCK_M, HAS_INDEX)
            row_grad = tl.load(row_grad_ptr + rows, mask=row_valid, other=0.0)
            if tl.max((row_grad != 0).to(tl.int32), axis=0) > 0:
                query_s = load_tile(student_ptr, rows, row_valid, Cs, CS_PAD, UPCAST)
                query_t = load_tile(teacher_ptr, rows, row_valid, Ct, CT_PAD, UPCAST)
                logits_s = tl.dot(query_s, tl.trans(keys_s), input_precision=PRECISION) * scale_s
                logits_t = tl.dot(query_t, tl.trans(keys_t), input_precision=PRECISION) * scale_t
                grad = grad_from_logits(logits_s, logits_t, stats_ptr, rows, row_valid, key_valid, row_grad, frame,
                                        N, FOR_TEACHER)  # fmt: skip
                if FOR_TEACHER:
                    acc = tl.dot(tl.trans(grad.to(query_t.dtype)), query_t, acc, input_precision=PRECISION)
                else:
                    acc = tl.dot(tl.trans(grad.to(query_s.dtype)), query_s, acc, input_precision=PRECISION)
        offsets = keys[:, None] * num_out + cols[None, :]
        tl.store(grad_ptr + offsets, acc, mask=key_valid[:, None] & (cols < num_out)[None, :])
    else:
        rows, row_valid = query_rows(index_ptr, count, tl.program_id(0) * BLOCK_M, BLOCK_M, HAS_INDEX)
        row_grad = tl.load(row_grad_ptr + rows, mask=row_valid, other=0.0)
        if tl.max((row_grad != 0).to(tl.int32), axis=0) > 0:
            query_s = load_tile(student_ptr, rows, row_valid, Cs, CS_PAD, UPCAST)
            query_t = load_tile(teacher_ptr, rows, row_valid, Ct, CT_PAD, UPCAST)
            acc = tl.zeros((BLOCK_M, OUT_PAD), dtype=tl.float32)
            full_keys = (HW // BLOCK_N) * BLOCK_N
            for frame in range(0, frames):
                frame_index = tl.cast(frame, tl.int64)
                for key_start in range(0, full_keys, BLOCK_N):
                    acc = row_pass_tile(
                        student_ptr, teacher_ptr, stats_ptr, query_s, query_t, rows, row_valid, row_grad,
                        frame_index, key_start, acc, N, HW, Cs, Ct, scale_s, scale_t,
                        False, FOR_TEACHER, UPCAST, PRECISION, CS_PAD, CT_PAD, BLOCK_N,
                    )  # fmt: skip
                for key_start in range(full_keys, HW, BLOCK_TAIL):
                    acc = row_pass_tile(
                        student_ptr, teacher_ptr, stats_ptr, query_s, query_t, rows, row_valid, row_grad,
                        frame_index, key_start, acc, N, HW, Cs, Ct, scale_s, scale_t,
                        True, FOR_TEACHER, UPCAST, PRECISION, CS_PAD, CT_PAD, BLOCK_TAIL,
                    )  # fmt: skip
            offsets = rows[:, None] * num_out + cols[None, :]
            mask = row_valid[:, None] & (cols < num_out)[None, :]
            tl.store(grad_ptr + offsets, acc + tl.load(grad_ptr + offsets, mask=mask, other=0.0), mask=mask)


@triton.jit
def _similarity_grad_kernel(
    student_ptr,
    teacher_ptr,
    stats_ptr,
    row_grad_ptr,
    index_ptr,
    count_ptr,
    out_ptr,
    N,
    HW,
    Cs,
    Ct,
    frames,
    scale_s,
    scale_t,
    chunk_start,
    chunk_rows,
    FOR_TEACHER: tl.constexpr,
    HAS_INDEX: tl.constexpr,
    UPCAST: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """out (B, chunk_rows, N) in the input dtype: G of the kept query positions chunk_start .. + chunk_rows.

    Program (row tile of the chunk, key tile of one frame, video). Rows past the video's kept count are not
    written (the product kernels stop at the count).
    """
    b = tl.program_id(2).to(tl.int64)
    count = num_queries(count_ptr, b, N, HAS_INDEX)
    local_start = tl.program_id(0) * BLOCK_M
    if chunk_start + local_start < count:
        end = tl.minimum(count, chunk_start + chunk_rows)
        rows, row_valid = query_rows(index_ptr + b * N, end, chunk_start + local_start, BLOCK_M, HAS_INDEX)
        tiles_per_frame = tl.cdiv(HW, BLOCK_N)
        frame = tl.program_id(1) // tiles_per_frame
        keys_in_frame = (tl.program_id(1) % tiles_per_frame) * BLOCK_N + tl.arange(0, BLOCK_N)
        key_valid = keys_in_frame < HW
        keys = (frame * HW + keys_in_frame).to(tl.int64)
        row_grad = tl.load(row_grad_ptr + b * N + rows, mask=row_valid, other=0.0)
        grad = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        if tl.max((row_grad != 0).to(tl.int32), axis=0) > 0:
            grad = similarity_grad_tile(
                student_ptr + b * N * Cs, teacher_ptr + b * N * Ct, stats_ptr + b * frames * NUM_STATS * N, rows,
                keys, row_valid, key_valid, row_grad, frame, N, Cs, Ct, scale_s, scale_t, FOR_TEACHER, UPCAST,
                PRECISION, BLOCK_M, BLOCK_N, BLOCK_K,
            )  # fmt: skip
        local = (local_start + tl.arange(0, BLOCK_M)).to(tl.int64)
        offsets = (b * chunk_rows + local)[:, None] * N + keys[None, :]
        tl.store(out_ptr + offsets, grad.to(out_ptr.dtype.element_ty), mask=row_valid[:, None] & key_valid[None, :])


@triton.jit
def _dual_product_kernel(
    block_ptr,
    features_ptr,
    index_ptr,
    count_ptr,
    grad_ptr,
    N,
    C,
    chunk_start,
    chunk_rows,
    HAS_INDEX: tl.constexpr,
    ACCUMULATE: tl.constexpr,
    UPCAST: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """grad[T, D] (+)= G[:, T]^T x[rows, D] (+ G[T, :] x[:, D] without HAS_INDEX) for one chunk's block G.

    Program (channel tile D, token tile T, video); channel tiles fastest so the programs sharing a strip of G
    run together. block (B, chunk_rows, N); its rows are the kept positions chunk_start .. (query tokens
    themselves without HAS_INDEX). fp32 accumulation in registers; one store (a load-add-store after the
    first chunk).
    """
    b = tl.program_id(2).to(tl.int64)
    count = num_queries(count_ptr, b, N, HAS_INDEX)
    rows_here = tl.minimum(chunk_rows, count - chunk_start)
    tokens = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    token_valid = tokens < N
    cols = tl.program_id(0) * BLOCK_D + tl.arange(0, BLOCK_D)
    col_valid = cols < C
    block_ptr += b * chunk_rows * N
    features_ptr += b * N * C
    acc = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
    if rows_here > 0:
        for local_start in range(0, rows_here, BLOCK_K):
            local = local_start + tl.arange(0, BLOCK_K)
            rows, row_valid = query_rows(index_ptr + b * N, chunk_start + rows_here, chunk_start + local_start,
                                         BLOCK_K, HAS_INDEX)  # fmt: skip
            block_t = tl.load(block_ptr + local.to(tl.int64)[:, None] * N + tokens[None, :],
                              mask=row_valid[:, None] & token_valid[None, :], other=0.0)  # fmt: skip
            sources = tl.load(features_ptr + rows[:, None] * C + cols[None, :],
                              mask=row_valid[:, None] & col_valid[None, :], other=0.0)  # fmt: skip
            if UPCAST:
                block_t = block_t.to(tl.float32)
                sources = sources.to(tl.float32)
            acc = tl.dot(tl.trans(block_t), sources, acc, input_precision=PRECISION)
        if not HAS_INDEX:
            local_rows = tokens - chunk_start
            in_chunk = token_valid & (local_rows >= 0) & (local_rows < rows_here)
            if tl.max(in_chunk.to(tl.int32), axis=0) > 0:
                for key_start in range(0, N, BLOCK_K):
                    keys = key_start + tl.arange(0, BLOCK_K)
                    key_valid = keys < N
                    block = tl.load(block_ptr + local_rows.to(tl.int64)[:, None] * N + keys[None, :],
                                    mask=in_chunk[:, None] & key_valid[None, :], other=0.0)  # fmt: skip
                    targets = tl.load(features_ptr + keys.to(tl.int64)[:, None] * C + cols[None, :],
                                      mask=key_valid[:, None] & col_valid[None, :], other=0.0)  # fmt: skip
                    if UPCAST:
                        block = block.to(tl.float32)
                        targets = targets.to(tl.float32)
                    acc = tl.dot(block, targets, acc, input_precision=PRECISION)
    offsets = (b * N + tokens.to(tl.int64))[:, None] * C + cols[None, :]
    mask = token_valid[:, None] & col_valid[None, :]
    if ACCUMULATE:
        if rows_here > 0:
            tl.store(grad_ptr + offsets, acc + tl.load(grad_ptr + offsets, mask=mask, other=0.0), mask=mask)
    else:
        tl.store(grad_ptr + offsets, acc, mask=mask)


@triton.jit
def _row_product_kernel(
    block_ptr,
    features_ptr,
    index_ptr,
    count_ptr,
    grad_ptr,
    N,
    C,
    chunk_start,
    chunk_rows,
    UPCAST: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """grad[kept rows, D] += G[rows, :] x[:, D] for one chunk (masked queries). Program (D tile, row tile, video)."""
    b = tl.program_id(2).to(tl.int64)
    count = tl.load(count_ptr + b)
    rows_here = tl.minimum(chunk_rows, count - chunk_start)
    local_start = tl.program_id(1) * BLOCK_M
    if local_start < rows_here:
        local = local_start + tl.arange(0, BLOCK_M)
        rows, row_valid = query_rows(index_ptr + b * N, chunk_start + rows_here, chunk_start + local_start,
                                     BLOCK_M, True)  # fmt: skip
        cols = tl.program_id(0) * BLOCK_D + tl.arange(0, BLOCK_D)
        col_valid = cols < C
        block_ptr += b * chunk_rows * N
        features_ptr += b * N * C
        acc = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
        for key_start in range(0, N, BLOCK_K):
            keys = key_start + tl.arange(0, BLOCK_K)
            key_valid = keys < N
            block = tl.load(block_ptr + local.to(tl.int64)[:, None] * N + keys[None, :],
                            mask=row_valid[:, None] & key_valid[None, :], other=0.0)  # fmt: skip
            targets = tl.load(features_ptr + keys.to(tl.int64)[:, None] * C + cols[None, :],
                              mask=key_valid[:, None] & col_valid[None, :], other=0.0)  # fmt: skip
            if UPCAST:
                block = block.to(tl.float32)
                targets = targets.to(tl.float32)
            acc = tl.dot(block, targets, acc, input_precision=PRECISION)
        offsets = (b * N + rows)[:, None] * C + cols[None, :]
        mask = row_valid[:, None] & col_valid[None, :]
        tl.store(grad_ptr + offsets, acc + tl.load(grad_ptr + offsets, mask=mask, other=0.0), mask=mask)


FEATURE_GRAD = {
    True: tuned_kernel("tempered_kl.feature_grad.column", _feature_grad_kernel, COLUMN_CONFIGS),
    False: tuned_kernel("tempered_kl.feature_grad.row", _feature_grad_kernel, ROW_CONFIGS, restore=("grad_ptr",)),
}
SIMILARITY_GRAD = tuned_kernel("tempered_kl.similarity_grad", _similarity_grad_kernel, SIMILARITY_GRAD_CONFIGS)
DUAL_PRODUCT = tuned_kernel("tempered_kl.dual_product", _dual_product_kernel, PRODUCT_CONFIGS, restore=("grad_ptr",))
ROW_PRODUCT = tuned_kernel("tempered_kl.row_product", _row_product_kernel, ROW_PRODUCT_CONFIGS, restore=("grad_ptr",))


def narrow_constants(channels_s: int, channels_t: int, for_teacher: bool) -> dict:
    """Channel counts padded for the narrow kernel (powers of two, >= 16 for tl.dot); OUT_PAD is the side's."""
    pads = dict(CS_PAD=max(16, next_power_of_two(channels_s)), CT_PAD=max(16, next_power_of_two(channels_t)))
    return dict(pads, OUT_PAD=pads["CT_PAD" if for_teacher else "CS_PAD"])


def chunk_rows(batch: int, num_tokens: int, dtype: torch.dtype) -> int:
    """Kept positions per chunk: the (B, rows, N) block of G in the input dtype within CHUNK_BUDGET_BYTES."""
    return rows_per_chunk(num_tokens, dtype.itemsize * batch)


def tempered_kl_feature_grad(
    student: torch.Tensor,
    teacher: torch.Tensor,
    stats: torch.Tensor,
    row_grad: torch.Tensor,
    query_index: torch.Tensor | None,
    query_count: torch.Tensor | None,
    tau_student: float,
    tau_teacher: float,
    for_teacher: bool,
    grad_scale: torch.Tensor | float = 1.0,
) -> torch.Tensor:
    """Gradient of sum_i g_i kl_i w.r.t. the student (or the teacher), in its dtype.

    stats (B, F, NUM_STATS, N) from the forward; row_grad (B, N) fp32 contiguous = g_i / F / grad_scale;
    query_index, query_count as given to the forward (only those queries carry gradient).
    """
    batch, num_tokens, channels_s = student.shape
    channels_t = teacher.shape[-1]
    frames = stats.shape[1]
    hw = num_tokens // frames
    features = teacher if for_teacher else student
    if features.numel() == 0:
        return torch.zeros_like(features)
    has_index = query_index is not None
    scaled_row_grad = row_grad * (LN2 / tau_teacher if for_teacher else 1.0 / tau_student)
    placeholder = scaled_row_grad
    index = query_index if has_index else placeholder
    count = query_count if has_index else placeholder
    scales = dict(scale_s=LOG2E / tau_student, scale_t=LOG2E / tau_teacher)
    sizes = dict(N=num_tokens, HW=hw, Cs=channels_s, Ct=channels_t)
    common = dict(UPCAST=triton_interpreting(), PRECISION=DOT_PRECISION)
    grad = torch.empty_like(features, dtype=torch.float32)
    key = dict(tokens=num_tokens, hw=hw, channels=(channels_s, channels_t), dtype=student.dtype)
    if is_narrow(channels_s, channels_t):
        arguments = dict(
            student_ptr=student, teacher_ptr=teacher, stats_ptr=stats, row_grad_ptr=scaled_row_grad,
            index_ptr=index, count_ptr=count, grad_ptr=grad, **sizes, frames=frames, **scales,
        )  # fmt: skip
        constants = dict(FOR_TEACHER=for_teacher, HAS_INDEX=has_index, **common)
        constants.update(narrow_constants(channels_s, channels_t, for_teacher))
        grids = {
            True: lambda blocks: (frames * triton.cdiv(hw, blocks["BLOCK_N"]), batch),
            False: lambda blocks: (triton.cdiv(num_tokens, blocks["BLOCK_M"]), batch),
        }
        for column_pass in (True, False):
            pass_key = shape_class(**key, masked=has_index, column=column_pass, teacher=for_teacher)
            FEATURE_GRAD[column_pass](
                grids[column_pass], pass_key, arguments, dict(constants, COLUMN_PASS=column_pass)
            )
        return grad.mul_(grad_scale).to(features.dtype)

    channels = features.shape[-1]
    step = chunk_rows(batch, num_tokens, features.dtype)
    block = torch.empty(batch, min(step, num_tokens), num_tokens, dtype=features.dtype, device=features.device)
    similarity_key = shape_class(**key, masked=has_index, teacher=for_teacher)
    channel_tiles = lambda blocks: triton.cdiv(channels, blocks["BLOCK_D"])
    key_tiles = lambda blocks: frames * triton.cdiv(hw, blocks["BLOCK_N"])
    for start in range(0, num_tokens, step):
        rows = min(step, num_tokens - start)
        SIMILARITY_GRAD(
            lambda blocks, rows=rows: (triton.cdiv(rows, blocks["BLOCK_M"]), key_tiles(blocks), batch),
            similarity_key,
            dict(
                student_ptr=student, teacher_ptr=teacher, stats_ptr=stats, row_grad_ptr=scaled_row_grad,
                index_ptr=index, count_ptr=count, out_ptr=block, **sizes, frames=frames, **scales,
                chunk_start=start, chunk_rows=block.shape[1],
            ),
            dict(FOR_TEACHER=for_teacher, HAS_INDEX=has_index, **common),
        )  # fmt: skip
        products = dict(
            block_ptr=block, features_ptr=features, index_ptr=index, count_ptr=count, grad_ptr=grad, N=num_tokens,
            C=channels, chunk_start=start, chunk_rows=block.shape[1],
        )  # fmt: skip
        product_key = shape_class(
            tokens=num_tokens, hw=hw, channels=(channels,), dtype=features.dtype, masked=has_index,
            rows=next_power_of_two(rows),
        )  # fmt: skip
        DUAL_PRODUCT(
            lambda blocks: (channel_tiles(blocks), triton.cdiv(num_tokens, blocks["BLOCK_M"]), batch),
            product_key, products, dict(HAS_INDEX=has_index, ACCUMULATE=start > 0, **common),
        )  # fmt: skip
        if has_index:
            ROW_PRODUCT(
                lambda blocks, rows=rows: (channel_tiles(blocks), triton.cdiv(rows, blocks["BLOCK_M"]), batch),
                product_key, products, common,
            )  # fmt: skip
    return grad.mul_(grad_scale).to(features.dtype)
