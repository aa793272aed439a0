"""Backward kernels: recompute the similarity tiles, never store them.

With G = dL/dS (or dL/dT), the feature gradient is (G + G^T) x. Two deterministic passes, no atomics:
the column pass (one program per key tile, all keys) writes G^T x into an fp32 buffer, then the row
pass (one program per tile of kept queries) adds G x in place; the caller casts to the input dtype.
Each program owns one BLOCK_D slice of the output channels, so its accumulator fits in registers at
any channel count; the price is that each slice recomputes the similarity tiles (none when C <= BLOCK_D).
Only kept queries are visited (see `kept_queries`), and query tiles whose upstream gradient is all
zero are skipped in both passes.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from stss_kernels._core.backends import triton_interpreting
from stss_kernels._core.tiles import DOT_PRECISION, LN2, LOG2E, autotune_configs, load_rows, num_queries, query_rows
from stss_kernels._core.tuning import hopper_only_configs, shape_class, tuned_kernel
from stss_kernels.ops.tempered_kl.triton_backend.similarity_grad import feature_grad_by_chunks
from stss_kernels.ops.tempered_kl.triton_backend.tiles import NUM_STATS, similarity_grad_tile

# python -m bench.compile: 64x64x64 with BLOCK_D 256 and 128x64x64 with BLOCK_D 128 (8 warps, 2 stages) spilled in
# the row pass on sm_90a and sm_80 and were dropped; 64x128x64 spills on sm_80 only: timed on Hopper only.
BACKWARD_CONFIGS = hopper_only_configs(
    autotune_configs(
        [
            (dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=64, BLOCK_D=128), 8, 3),
            (dict(BLOCK_M=64, BLOCK_N=128, BLOCK_K=64, BLOCK_D=128), 8, 2),
            (dict(BLOCK_M=64, BLOCK_N=32, BLOCK_K=64, BLOCK_D=64), 4, 3),
        ],
        dict(BLOCK_M=16, BLOCK_N=16, BLOCK_K=32, BLOCK_D=32),
    ),
    (1,),
)
BACKWARD_KEY = ["N", "HW", "Cs", "Ct", "COLUMN_PASS", "FOR_TEACHER", "HAS_INDEX"]
# Wider features take the chunked path (similarity_grad.py): G written once, then two matmuls, instead of
# recomputing the similarity tiles for every BLOCK_D slice of output channels.
FUSED_MAX_CHANNELS = 128


@triton.autotune(configs=BACKWARD_CONFIGS, key=BACKWARD_KEY, restore_value=["grad_ptr"])
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
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """One pass of grad (B, N, C_out) fp32, x = teacher if FOR_TEACHER else student, d = a BLOCK_D slice.

    COLUMN_PASS, one program per key tile (of one frame): grad[keys, d] = sum over kept query tiles of
    G[rows, keys]^T x[rows, d]. Otherwise, one program per tile of kept queries:
    grad[rows, d] += sum over all key tiles of G[rows, keys] x[keys, d].
    """
    b = tl.program_id(2).to(tl.int64)
    col_start = tl.program_id(1) * BLOCK_D
    cols = col_start + tl.arange(0, BLOCK_D)
    count = num_queries(count_ptr, b, N, HAS_INDEX)
    student_ptr += b * N * Cs
    teacher_ptr += b * N * Ct
    stats_ptr += b * frames * NUM_STATS * N
    row_grad_ptr += b * N
    index_ptr += b * N
    if FOR_TEACHER:
        features_ptr = teacher_ptr
        num_out = Ct
    else:
        features_ptr = student_ptr
        num_out = Cs
    grad_ptr += b * N * num_out

    if COLUMN_PASS:
        tiles_per_frame = tl.cdiv(HW, BLOCK_N)
        frame = tl.program_id(0) // tiles_per_frame
        keys_in_frame = (tl.program_id(0) % tiles_per_frame) * BLOCK_N + tl.arange(0, BLOCK_N)
        key_valid = keys_in_frame < HW
        keys = (frame * HW + keys_in_frame).to(tl.int64)
        acc = tl.zeros((BLOCK_N, BLOCK_D), dtype=tl.float32)
        for row_start in range(0, count, BLOCK_M):
            rows, row_valid = query_rows(index_ptr, count, row_start, BLOCK_M, HAS_INDEX)
            row_grad = tl.load(row_grad_ptr + rows, mask=row_valid, other=0.0)
            if tl.max((row_grad != 0).to(tl.int32), axis=0) > 0:
                grad = similarity_grad_tile(
                    student_ptr, teacher_ptr, stats_ptr, rows, keys, row_valid, key_valid, row_grad, frame,
                    N, Cs, Ct, scale_s, scale_t, FOR_TEACHER, UPCAST, PRECISION, BLOCK_M, BLOCK_N, BLOCK_K,
                )  # fmt: skip
                sources = load_rows(features_ptr, rows, row_valid, num_out, col_start, BLOCK_D, UPCAST)
                acc = tl.dot(tl.trans(grad.to(sources.dtype)), sources, acc, input_precision=PRECISION)
        offsets = keys[:, None] * num_out + cols[None, :]
        tl.store(grad_ptr + offsets, acc, mask=key_valid[:, None] & (cols < num_out)[None, :])
    else:
        rows, row_valid = query_rows(index_ptr, count, tl.program_id(0) * BLOCK_M, BLOCK_M, HAS_INDEX)
        row_grad = tl.load(row_grad_ptr + rows, mask=row_valid, other=0.0)
        if tl.max((row_grad != 0).to(tl.int32), axis=0) > 0:
            acc = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
            for frame in range(0, frames):
                for key_start in range(0, HW, BLOCK_N):
                    keys_in_frame = key_start + tl.arange(0, BLOCK_N)
                    key_valid = keys_in_frame < HW
                    keys = (frame * HW + keys_in_frame).to(tl.int64)
                    grad = similarity_grad_tile(
                        student_ptr, teacher_ptr, stats_ptr, rows, keys, row_valid, key_valid, row_grad, frame,
                        N, Cs, Ct, scale_s, scale_t, FOR_TEACHER, UPCAST, PRECISION, BLOCK_M, BLOCK_N, BLOCK_K,
                    )  # fmt: skip
                    targets = load_rows(features_ptr, keys, key_valid, num_out, col_start, BLOCK_D, UPCAST)
                    acc = tl.dot(grad.to(targets.dtype), targets, acc, input_precision=PRECISION)
            offsets = rows[:, None] * num_out + cols[None, :]
            mask = row_valid[:, None] & (cols < num_out)[None, :]
            tl.store(grad_ptr + offsets, acc + tl.load(grad_ptr + offsets, mask=mask, other=0.0), mask=mask)


# Launched through the shape-class cache (stss_kernels._core.tuning); the row pass adds into grad, so timing
# runs restore it.
FEATURE_GRAD = tuned_kernel(
    "tempered_kl.feature_grad", _feature_grad_kernel.fn, _feature_grad_kernel.configs, restore=("grad_ptr",)
)


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
    frames = stats.shape[1]
    features = teacher if for_teacher else student
    if features.numel() == 0:
        return torch.zeros_like(features)
    has_index = query_index is not None
    scaled_row_grad = row_grad * (LN2 / tau_teacher if for_teacher else 1.0 / tau_student)
    sizes_and_scales = (num_tokens, num_tokens // frames, channels_s, teacher.shape[-1])
    scales = (LOG2E / tau_student, LOG2E / tau_teacher)
    flags = dict(
        FOR_TEACHER=for_teacher,
        HAS_INDEX=has_index,
        UPCAST=triton_interpreting(),
        PRECISION=DOT_PRECISION,
    )
    if features.shape[-1] > FUSED_MAX_CHANNELS:
        grad = feature_grad_by_chunks(
            features, (student, teacher, stats, *sizes_and_scales, *scales), scaled_row_grad, query_index,
            query_count, flags,
        )  # fmt: skip
        return grad.mul_(grad_scale).to(features.dtype)
    grad = torch.empty_like(features, dtype=torch.float32)
    arguments = dict(
        student_ptr=student, teacher_ptr=teacher, stats_ptr=stats, row_grad_ptr=scaled_row_grad,
        index_ptr=query_index if has_index else row_grad, count_ptr=query_count if has_index else row_grad,
        grad_ptr=grad, N=num_tokens, HW=num_tokens // frames, Cs=channels_s, Ct=teacher.shape[-1], frames=frames,
        scale_s=scales[0], scale_t=scales[1],
    )  # fmt: skip
    channel_blocks = lambda blocks: triton.cdiv(features.shape[-1], blocks["BLOCK_D"])
    key_tiles = lambda blocks: frames * triton.cdiv(num_tokens // frames, blocks["BLOCK_N"])
    query_tiles = lambda blocks: triton.cdiv(num_tokens, blocks["BLOCK_M"])
    for column_pass, tiles in ((True, key_tiles), (False, query_tiles)):
        grid = lambda blocks, tiles=tiles: (tiles(blocks), channel_blocks(blocks), batch)
        key = shape_class(tokens=num_tokens, hw=num_tokens // frames, channels=(channels_s, teacher.shape[-1]),
                          dtype=student.dtype, masked=has_index, column=column_pass, teacher=for_teacher)  # fmt: skip
        FEATURE_GRAD(grid, key, arguments, dict(flags, COLUMN_PASS=column_pass))
    return grad.mul_(grad_scale).to(features.dtype)
