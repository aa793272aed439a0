"""Backward kernels: recompute the S - T tiles, never store them.

With G_ij = g_i sign(S_ij - T_ij) [|S_ij - T_ij| > margin] / count on the variant's pairs, the student's
gradient is (G + G^T) s and the teacher's -(G + G^T) t. When every query of a video has the same g_i
(no mask, or uniform weights, under "mean" or "sum"), G is symmetric and (G + G^T) x = 2 G x: a single
row pass (one program per query tile) owns its rows. Otherwise two deterministic passes, no atomics: the
column pass (one program per key tile) writes G^T x into an fp32 buffer, then the row pass adds G x in
place. The row pass multiplies the sign tile, exact in every dtype, by the features and applies g_i to the
fp32 accumulator; the column pass rounds g_i sign(..) to the features' dtype (g is brought to O(1) by a
power of two first). Each program owns one BLOCK_D slice of the output channels. Only kept queries are
visited, and query tiles whose upstream gradient is all zero are skipped.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from stss_kernels._core.backends import triton_interpreting
from stss_kernels._core.tiles import DOT_PRECISION, autotune_configs, load_rows, num_queries, query_rows
from stss_kernels._core.tuning import hopper_only_configs, shape_class, tuned_kernel
from stss_kernels.ops.relation_distance.triton_backend.sign_block import feature_grads_by_chunks
from stss_kernels.ops.relation_distance.triton_backend.tiles import (
    SPATIAL,
    TEMPORAL,
    VARIANT_IDS,
    paired_key_range,
    sign_tile,
)

# python -m bench.compile (bf16): the 8-warp, 2-stage configs (64 x 64 x 64 with BLOCK_D 256, 128 x 64 x 64 and
# 64 x 128 x 64 with BLOCK_D 128) spilled in the row or column passes on sm_90a and were dropped; 64 x 32 x 64
# spills on sm_80 (masked column pass at the native grid): timed on Hopper only.
BACKWARD_CONFIGS = hopper_only_configs(
    autotune_configs(
        [
            (dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=64, BLOCK_D=128), 8, 3),
            (dict(BLOCK_M=64, BLOCK_N=32, BLOCK_K=64, BLOCK_D=32), 4, 3),
        ],
        dict(BLOCK_M=16, BLOCK_N=16, BLOCK_K=32, BLOCK_D=32),
    ),
    (1,),
)
BACKWARD_KEY = ["N", "HW", "Cs", "Ct", "VARIANT", "COLUMN_PASS", "SYMMETRIC", "FOR_TEACHER", "HAS_INDEX"]
# Wider features take the chunked path (sign_block.py): the sign matrix written once per chunk of rows and
# shared by both sides, then matmuls, instead of recomputing the tiles for every BLOCK_D slice.
FUSED_MAX_CHANNELS = 128


@triton.autotune(configs=BACKWARD_CONFIGS, key=BACKWARD_KEY, restore_value=["grad_ptr"])
@triton.jit
def _relation_distance_grad_kernel(
    student_ptr,
    teacher_ptr,
    row_grad_ptr,
    index_ptr,
    count_ptr,
    grad_ptr,
    N,
    HW,
    Cs,
    Ct,
    margin,
    VARIANT: tl.constexpr,
    COLUMN_PASS: tl.constexpr,
    SYMMETRIC: tl.constexpr,
    FOR_TEACHER: tl.constexpr,
    HAS_INDEX: tl.constexpr,
    UPCAST: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """One pass of grad (B, N, C_out) fp32, x = teacher if FOR_TEACHER else student, d = a BLOCK_D slice.

    row_grad (B, N) holds g_i / count / scale. COLUMN_PASS, one program per key tile: grad[keys, d] =
    +-sum over kept query tiles of G[rows, keys]^T x[rows, d]. Otherwise, one program per tile of kept
    queries: grad[rows, d] += +-sum over paired key tiles of G[rows, keys] x[keys, d] (times 2 and written,
    not added, when SYMMETRIC).
    """
    b = tl.program_id(2).to(tl.int64)
    col_start = tl.program_id(1) * BLOCK_D
    cols = col_start + tl.arange(0, BLOCK_D)
    count = num_queries(count_ptr, b, N, HAS_INDEX)
    student_ptr += b * N * Cs
    teacher_ptr += b * N * Ct
    row_grad_ptr += b * N
    index_ptr += b * N
    if FOR_TEACHER:
        features_ptr = teacher_ptr
        num_out = Ct
        direction = -1.0
    else:
        features_ptr = student_ptr
        num_out = Cs
        direction = 1.0
    grad_ptr += b * N * num_out

    if COLUMN_PASS:
        first_key = tl.program_id(0) * BLOCK_N
        keys = (first_key + tl.arange(0, BLOCK_N)).to(tl.int64)
        key_valid = keys < N
        first_frame = first_key // HW
        last_frame = (tl.minimum(first_key + BLOCK_N, N) - 1) // HW
        acc = tl.zeros((BLOCK_N, BLOCK_D), dtype=tl.float32)
        for row_start in range(0, count, BLOCK_M):
            rows, row_valid = query_rows(index_ptr, count, row_start, BLOCK_M, HAS_INDEX)
            row_grad = tl.load(row_grad_ptr + rows, mask=row_valid, other=0.0)
            active = row_grad != 0
            if VARIANT == SPATIAL:
                active = active & (rows // HW >= first_frame) & (rows // HW <= last_frame)
            elif VARIANT == TEMPORAL:
                active = active & ((rows // HW != first_frame) | (first_frame != last_frame))
            if tl.max(active.to(tl.int32), axis=0) > 0:
                sign = sign_tile(
                    student_ptr, teacher_ptr, rows, keys, row_valid, key_valid, N, HW, Cs, Ct, margin,
                    VARIANT, BLOCK_M, BLOCK_N, BLOCK_K, UPCAST, PRECISION,
                )  # fmt: skip
                sources = load_rows(features_ptr, rows, row_valid, num_out, col_start, BLOCK_D, UPCAST)
                grad = (sign * row_grad[:, None]).to(sources.dtype)
                acc = tl.dot(tl.trans(grad), sources, acc, input_precision=PRECISION)
        offsets = keys[:, None] * num_out + cols[None, :]
        tl.store(grad_ptr + offsets, direction * acc, mask=key_valid[:, None] & (cols < num_out)[None, :])
    else:
        rows, row_valid = query_rows(index_ptr, count, tl.program_id(0) * BLOCK_M, BLOCK_M, HAS_INDEX)
        row_grad = tl.load(row_grad_ptr + rows, mask=row_valid, other=0.0)
        if tl.max((row_grad != 0).to(tl.int32), axis=0) > 0:
            key_lo, key_hi = paired_key_range(rows, row_valid, N, HW, VARIANT)
            acc = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
            for key_start in range(key_lo, key_hi, BLOCK_N):
                keys = (key_start + tl.arange(0, BLOCK_N)).to(tl.int64)
                key_valid = keys < key_hi
                sign = sign_tile(
                    student_ptr, teacher_ptr, rows, keys, row_valid, key_valid, N, HW, Cs, Ct, margin,
                    VARIANT, BLOCK_M, BLOCK_N, BLOCK_K, UPCAST, PRECISION,
                )  # fmt: skip
                targets = load_rows(features_ptr, keys, key_valid, num_out, col_start, BLOCK_D, UPCAST)
                acc = tl.dot(sign.to(targets.dtype), targets, acc, input_precision=PRECISION)
            acc = acc * (row_grad * direction)[:, None]
            offsets = rows[:, None] * num_out + cols[None, :]
            mask = row_valid[:, None] & (cols < num_out)[None, :]
            if SYMMETRIC:
                tl.store(grad_ptr + offsets, 2.0 * acc, mask=mask)
            else:
                tl.store(grad_ptr + offsets, acc + tl.load(grad_ptr + offsets, mask=mask, other=0.0), mask=mask)


GRAD = tuned_kernel(
    "relation_distance.grad",
    _relation_distance_grad_kernel.fn,
    _relation_distance_grad_kernel.configs,
    restore=("grad_ptr",),
)


def relation_distance_feature_grad(
    student: torch.Tensor,
    teacher: torch.Tensor,
    row_grad: torch.Tensor,
    query_index: torch.Tensor | None,
    query_count: torch.Tensor | None,
    frames: int,
    margin: float,
    variant: str,
    symmetric: bool,
    for_teacher: bool,
    grad_scale: torch.Tensor | float = 1.0,
) -> torch.Tensor:
    """Gradient of sum_i g_i row_i w.r.t. the student (or the teacher), in its dtype.

    row_grad (B, N) fp32 contiguous = g_i / count / grad_scale, 0 on skipped queries; symmetric: every
    video's g_i are equal (see `uniform_per_video`); query_index, query_count as given to the forward.
    """
    batch, num_tokens, channels_s = student.shape
    features = teacher if for_teacher else student
    grad = torch.zeros_like(features, dtype=torch.float32)
    has_index = query_index is not None
    arguments = dict(
        student_ptr=student, teacher_ptr=teacher, row_grad_ptr=row_grad,
        index_ptr=query_index if has_index else row_grad, count_ptr=query_count if has_index else row_grad,
        grad_ptr=grad, N=num_tokens, HW=num_tokens // frames, Cs=channels_s, Ct=teacher.shape[-1], margin=margin,
    )  # fmt: skip
    flags = dict(
        VARIANT=VARIANT_IDS[variant],
        SYMMETRIC=symmetric,
        FOR_TEACHER=for_teacher,
        HAS_INDEX=has_index,
        UPCAST=triton_interpreting(),
        PRECISION=DOT_PRECISION,
    )
    channel_blocks = lambda blocks: triton.cdiv(features.shape[-1], blocks["BLOCK_D"])
    passes = [(False, lambda blocks: triton.cdiv(num_tokens, blocks["BLOCK_M"]))]
    if not symmetric:
        passes.insert(0, (True, lambda blocks: triton.cdiv(num_tokens, blocks["BLOCK_N"])))
    for column_pass, tiles in passes:
        grid = lambda blocks, tiles=tiles: (tiles(blocks), channel_blocks(blocks), batch)
        key = shape_class(tokens=num_tokens, hw=num_tokens // frames, channels=(channels_s, teacher.shape[-1]),
                          dtype=student.dtype, masked=has_index, variant=variant, column=column_pass,
                          symmetric=symmetric, teacher=for_teacher)  # fmt: skip
        GRAD(grid, key, arguments, dict(flags, COLUMN_PASS=column_pass))
    return grad.mul_(grad_scale).to(features.dtype)


def relation_distance_feature_grads(
    student: torch.Tensor,
    teacher: torch.Tensor,
    row_grad: torch.Tensor,
    query_index: torch.Tensor | None,
    query_count: torch.Tensor | None,
    frames: int,
    margin: float,
    variant: str,
    symmetric: bool,
    needs_grad: tuple[bool, bool],
    grad_scale: torch.Tensor | float = 1.0,
) -> list[torch.Tensor | None]:
    """[student gradient, teacher gradient] in the inputs' dtypes (None where not needed).

    Sides up to FUSED_MAX_CHANNELS wide run the fused passes; wider ones share one sign block per chunk.
    """
    args = (student, teacher, row_grad, query_index, query_count, frames, margin, variant, symmetric)
    grads: list[torch.Tensor | None] = [None, None]
    wide = []
    for index, (features, for_teacher) in enumerate(((student, False), (teacher, True))):
        if not needs_grad[index]:
            continue
        if features.shape[-1] > FUSED_MAX_CHANNELS:
            wide.append(for_teacher)
        else:
            grads[index] = relation_distance_feature_grad(*args, for_teacher, grad_scale)
    if wide:
        for for_teacher, grad in zip(wide, feature_grads_by_chunks(*args, tuple(wide))):
            features = teacher if for_teacher else student
            grads[int(for_teacher)] = grad.mul_(grad_scale).to(features.dtype)
    return grads
