"""Forward kernel: both online softmaxes and the KL accumulator over each frame's keys in one pass."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from stss_kernels._core.backends import triton_interpreting
from stss_kernels._core.tiles import DOT_PRECISION, LN2, LOG2E, autotune_configs, num_queries, query_rows
from stss_kernels._core.tuning import hopper_only_configs, shape_class, tuned_kernel
from stss_kernels.ops.tempered_kl.triton_backend.tiles import (
    LOGIT_FLOOR,
    NUM_STATS,
    STAT_GAP,
    STAT_INV_SUM_S,
    STAT_INV_SUM_T,
    STAT_MAX_S,
    STAT_MAX_T,
    logit_tiles,
)

# Configs 1, 2 and 4 spill registers with sm_80's mma.sync (python -m bench.compile): timed on Hopper only.
FORWARD_CONFIGS = hopper_only_configs(
    autotune_configs(
        [
            (dict(BLOCK_M=128, BLOCK_N=64, BLOCK_K=64), 8, 3),
            (dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=64), 8, 3),
            (dict(BLOCK_M=128, BLOCK_N=32, BLOCK_K=64), 4, 3),
            (dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=64), 4, 3),
            (dict(BLOCK_M=64, BLOCK_N=32, BLOCK_K=128), 4, 4),
            (dict(BLOCK_M=128, BLOCK_N=64, BLOCK_K=32), 8, 4),
        ],
        dict(BLOCK_M=16, BLOCK_N=16, BLOCK_K=32),
    ),
    (1, 2, 4),
)


@triton.autotune(configs=FORWARD_CONFIGS, key=["N", "HW", "Cs", "Ct", "HAS_INDEX"])
@triton.jit
def _tempered_kl_forward_kernel(
    student_ptr,
    teacher_ptr,
    index_ptr,
    count_ptr,
    stats_ptr,
    N,
    HW,
    Cs,
    Ct,
    frames,
    scale_s,
    scale_t,
    HAS_INDEX: tl.constexpr,
    UPCAST: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """One program per (query tile, target frame f, video): stats[b, f, :, rows].

    Target frames are independent softmax groups, so they are split across programs (more programs than
    query tiles alone: occupancy at batch 1 and under a sparse query mask). With HAS_INDEX the tile's
    rows are the video's kept queries (index_ptr, count_ptr); tiles past the count exit at once.

    In base-2 logits x = S * log2(e) / tau (scale_s, scale_t), stats (B, F, 5, N) holds max_t, 1/sum_t,
    max_s, 1/sum_s and E = E_{P_t}[(x_t - max_t) - (x_s - max_s)], so that P = exp2(x - max) / sum and
    KL = ln2 * (E + log2(sum_s / sum_t)); the backward reads nothing else. Every saved quantity is
    relative to the maxima (never lse = max + log2 sum): fp32 keeps them exact to a few ulps of O(1)
    numbers instead of the logits' scale (1/tau).
    """
    f = tl.program_id(1).to(tl.int64)
    b = tl.program_id(2).to(tl.int64)
    count = num_queries(count_ptr, b, N, HAS_INDEX)
    rows, row_valid = query_rows(index_ptr + b * N, count, tl.program_id(0) * BLOCK_M, BLOCK_M, HAS_INDEX)
    student_ptr += b * N * Cs
    teacher_ptr += b * N * Ct
    stats_ptr += b * frames * NUM_STATS * N
    if tl.program_id(0) * BLOCK_M < count:
        max_t = tl.full((BLOCK_M,), LOGIT_FLOOR, dtype=tl.float32)
        max_s = tl.full((BLOCK_M,), LOGIT_FLOOR, dtype=tl.float32)
        sum_t = tl.zeros((BLOCK_M,), dtype=tl.float32)
        sum_s = tl.zeros((BLOCK_M,), dtype=tl.float32)
        weighted_gap = tl.zeros((BLOCK_M,), dtype=tl.float32)
        for key_start in range(0, HW, BLOCK_N):
            keys_in_frame = key_start + tl.arange(0, BLOCK_N)
            key_valid = keys_in_frame < HW
            keys = (f * HW + keys_in_frame).to(tl.int64)
            logits_s, logits_t = logit_tiles(
                student_ptr, teacher_ptr, rows, keys, row_valid, key_valid, Cs, Ct, scale_s, scale_t,
                BLOCK_M, BLOCK_N, BLOCK_K, UPCAST, PRECISION,
            )  # fmt: skip
            # Keys past the frame get a finite floor (not -inf): exp2 gives 0 and their gap is exactly 0,
            # with no inf - inf anywhere. Real logits are never that low.
            logits_t = tl.where(key_valid[None, :], logits_t, LOGIT_FLOOR)
            logits_s = tl.where(key_valid[None, :], logits_s, LOGIT_FLOOR)
            new_max_t = tl.maximum(max_t, tl.max(logits_t, axis=1))
            new_max_s = tl.maximum(max_s, tl.max(logits_s, axis=1))
            centred_t = logits_t - new_max_t[:, None]
            centred_s = logits_s - new_max_s[:, None]
            exp_t = tl.exp2(centred_t)
            rescale_t = tl.exp2(max_t - new_max_t)
            # The gap is kept relative to the running maxima (small numbers, little cancellation):
            # moving them shifts every earlier term by the same amount.
            shift = (new_max_t - max_t) - (new_max_s - max_s)
            weighted_gap = rescale_t * (weighted_gap - sum_t * shift)
            weighted_gap += tl.sum(exp_t * (centred_t - centred_s), axis=1)
            sum_t = sum_t * rescale_t + tl.sum(exp_t, axis=1)
            sum_s = sum_s * tl.exp2(max_s - new_max_s) + tl.sum(tl.exp2(centred_s), axis=1)
            max_t = new_max_t
            max_s = new_max_s
        expected_gap = weighted_gap / sum_t
        frame_stats = stats_ptr + f * NUM_STATS * N + rows
        tl.store(frame_stats + STAT_MAX_T * N, max_t, mask=row_valid)
        tl.store(frame_stats + STAT_INV_SUM_T * N, 1.0 / sum_t, mask=row_valid)
        tl.store(frame_stats + STAT_MAX_S * N, max_s, mask=row_valid)
        tl.store(frame_stats + STAT_INV_SUM_S * N, 1.0 / sum_s, mask=row_valid)
        tl.store(frame_stats + STAT_GAP * N, expected_gap, mask=row_valid)


# Launched through the shape-class cache (stss_kernels._core.tuning), not @triton.autotune's own tuner: no
# timing inside CUDA-graph capture or compile tracing. The decorator keeps the config list with the kernel.
FORWARD = tuned_kernel("tempered_kl.forward", _tempered_kl_forward_kernel.fn, _tempered_kl_forward_kernel.configs)


def tempered_kl_forward(
    student: torch.Tensor,
    teacher: torch.Tensor,
    frames: int,
    tau_student: float,
    tau_teacher: float,
    query_index: torch.Tensor | None,
    query_count: torch.Tensor | None,
    keep: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """kl (B, N) fp32 and the saved statistics (B, frames, NUM_STATS, N) fp32.

    student (B, N, Cs), teacher (B, N, Ct) contiguous. With query_index (B, N) int32 and query_count
    (B,) int32 (see `kept_queries`) only the listed queries are computed; keep (B, N) bool marks them:
    kl is 0 on the others and their statistics are left unset.
    """
    batch, num_tokens, channels_s = student.shape
    stats = torch.empty(batch, frames, NUM_STATS, num_tokens, dtype=torch.float32, device=student.device)
    if stats.numel() == 0:
        return torch.zeros(batch, num_tokens, dtype=torch.float32, device=student.device), stats
    has_index = query_index is not None
    arguments = dict(
        student_ptr=student, teacher_ptr=teacher, index_ptr=query_index if has_index else stats,
        count_ptr=query_count if has_index else stats, stats_ptr=stats, N=num_tokens, HW=num_tokens // frames,
        Cs=channels_s, Ct=teacher.shape[-1], frames=frames, scale_s=LOG2E / tau_student, scale_t=LOG2E / tau_teacher,
    )  # fmt: skip
    key = shape_class(tokens=num_tokens, hw=num_tokens // frames, channels=(channels_s, teacher.shape[-1]),
                      dtype=student.dtype, masked=has_index)  # fmt: skip
    FORWARD(
        lambda blocks: (triton.cdiv(num_tokens, blocks["BLOCK_M"]), frames, batch),
        key,
        arguments,
        dict(HAS_INDEX=has_index, UPCAST=triton_interpreting(), PRECISION=DOT_PRECISION),
    )
    # KL = ln2 (E + log2(sum_s / sum_t)) per (query, frame), averaged over the target frames.
    gap, inv_sum_t, inv_sum_s = (stats[:, :, slot.value] for slot in (STAT_GAP, STAT_INV_SUM_T, STAT_INV_SUM_S))
    kl = LN2 * (gap + torch.log2(inv_sum_t) - torch.log2(inv_sum_s)).mean(1)
    return (kl if keep is None else torch.where(keep, kl, 0.0)), stats
