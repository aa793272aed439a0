"""Forward kernel: both online softmaxes and the KL accumulator over each frame's keys in one pass.

One program per (query tile, target frame, video) saves five fp32 statistics per (query, frame) (see the
kernel's docstring); the backward reads nothing else. Structure:
- one flat grid in grouped order: GROUP_M query tiles x all target frames of one video run next to each
  other, so concurrently resident programs share a few query tiles and frames in L2;
- narrow features (both channel counts padded to <= NARROW_CHANNELS): the channel counts are constexprs,
  the query tiles of both sides are loaded once and stay resident across all key tiles, and the key loop is
  the only loop (software-pipelined); the key tile's channels come in one load;
- a frame's keys are walked in full BLOCK_N tiles (no key mask) then BLOCK_TAIL tiles, so at most
  BLOCK_TAIL - 1 padded keys per frame (HW = 150: 128 + 32 = 160 instead of 192 or 256).
Wide features keep a channel loop per tile: 2 x BLOCK_M x C of queries (393 KB at C = 768) exceed shared memory.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from stss_kernels._core.backends import triton_interpreting
from stss_kernels._core.tiles import DOT_PRECISION, LN2, LOG2E, autotune_configs, gram_tile, num_queries, query_rows
from stss_kernels._core.tuning import hopper_only_configs, next_power_of_two, shape_class, tuned_kernel
from stss_kernels.ops.tempered_kl.triton_backend.tiles import (
    LOGIT_FLOOR,
    NUM_STATS,
    STAT_GAP,
    STAT_INV_SUM_S,
    STAT_INV_SUM_T,
    STAT_MAX_S,
    STAT_MAX_T,
)

# Padded channel counts up to this take the resident-query path (both sides' tiles live in shared memory).
NARROW_CHANNELS = 128

NARROW_CONFIGS = autotune_configs(
    [
        (dict(BLOCK_M=128, BLOCK_N=64, BLOCK_TAIL=32, GROUP_M=8), 8, 3),
        (dict(BLOCK_M=128, BLOCK_N=32, BLOCK_TAIL=16, GROUP_M=8), 4, 3),
        (dict(BLOCK_M=64, BLOCK_N=64, BLOCK_TAIL=32, GROUP_M=16), 4, 3),
        (dict(BLOCK_M=128, BLOCK_N=128, BLOCK_TAIL=32, GROUP_M=8), 8, 2),
        (dict(BLOCK_M=64, BLOCK_N=32, BLOCK_TAIL=16, GROUP_M=16), 4, 4),
    ],
    dict(BLOCK_M=16, BLOCK_N=16, BLOCK_TAIL=8, GROUP_M=2),
)
# A narrow tail tile re-reads the query tile for few keys: BLOCK_TAIL = BLOCK_N (one padded tile) is the better
# trade when the forward is bound by L2 traffic rather than by tensor-core time, so both are candidates.
WIDE_CONFIGS = autotune_configs(
    [
        (dict(BLOCK_M=128, BLOCK_N=64, BLOCK_TAIL=32, BLOCK_K=64, GROUP_M=32), 8, 3),
        (dict(BLOCK_M=128, BLOCK_N=128, BLOCK_TAIL=32, BLOCK_K=64, GROUP_M=32), 8, 3),
        (dict(BLOCK_M=128, BLOCK_N=128, BLOCK_TAIL=128, BLOCK_K=64, GROUP_M=32), 8, 3),
        (dict(BLOCK_M=128, BLOCK_N=128, BLOCK_TAIL=32, BLOCK_K=32, GROUP_M=32), 8, 4),
        (dict(BLOCK_M=64, BLOCK_N=128, BLOCK_TAIL=32, BLOCK_K=64, GROUP_M=32), 4, 3),
        (dict(BLOCK_M=128, BLOCK_N=64, BLOCK_TAIL=32, BLOCK_K=64, GROUP_M=8), 8, 3),
    ],
    dict(BLOCK_M=16, BLOCK_N=16, BLOCK_TAIL=8, BLOCK_K=32, GROUP_M=2),
)
# The first config of each list is the one used untuned (CUDA-graph capture, tracing, STSS_AUTOTUNE=0): one that
# does not spill on sm_90a nor sm_80 (ptxas, bf16). Configs whose tiles spill with sm_80's mma.sync are hopper-only.
hopper_only_configs(WIDE_CONFIGS, (1, 2, 3, 4))
hopper_only_configs(NARROW_CONFIGS, (3,))


@triton.jit
def grouped_tile(pid, query_tiles, frames, GROUP_M: tl.constexpr):
    """(query tile, frame) of program `pid` of one video: GROUP_M query tiles, query tile fastest, then frames."""
    group_size = GROUP_M * frames
    first_tile = (pid // group_size) * GROUP_M
    tiles_in_group = tl.minimum(query_tiles - first_tile, GROUP_M)
    within = pid % group_size
    return first_tile + within % tiles_in_group, within // tiles_in_group


@triton.jit
def online_update(
    logits_s,
    logits_t,
    key_valid,
    max_t,
    max_s,
    sum_t,
    sum_s,
    weighted_gap,
    MASK_KEYS: tl.constexpr,
):
    """Fold one tile of base-2 logits into the running maxima, sums and P_t-weighted gap.

    Masked keys get a finite floor (not -inf): exp2 gives 0 and their gap is exactly 0, with no inf - inf.
    The gap is kept relative to the running maxima (small numbers, little cancellation): moving them
    shifts every earlier term by the same amount.
    """
    if MASK_KEYS:
        logits_t = tl.where(key_valid[None, :], logits_t, LOGIT_FLOOR)
        logits_s = tl.where(key_valid[None, :], logits_s, LOGIT_FLOOR)
    new_max_t = tl.maximum(max_t, tl.max(logits_t, axis=1))
    new_max_s = tl.maximum(max_s, tl.max(logits_s, axis=1))
    centred_t = logits_t - new_max_t[:, None]
    centred_s = logits_s - new_max_s[:, None]
    exp_t = tl.exp2(centred_t)
    rescale_t = tl.exp2(max_t - new_max_t)
    shift = (new_max_t - max_t) - (new_max_s - max_s)
    weighted_gap = rescale_t * (weighted_gap - sum_t * shift) + tl.sum(exp_t * (centred_t - centred_s), axis=1)
    sum_t = sum_t * rescale_t + tl.sum(exp_t, axis=1)
    sum_s = sum_s * tl.exp2(max_s - new_max_s) + tl.sum(tl.exp2(centred_s), axis=1)
    return new_max_t, new_max_s, sum_t, sum_s, weighted_gap


@triton.jit
def key_tile_logits(
    student_ptr,
    teacher_ptr,
    query_s,
    query_t,
    rows,
    row_valid,
    keys,
    key_valid,
    Cs,
    Ct,
    scale_s,
    scale_t,
    CS_PAD: tl.constexpr,
    CT_PAD: tl.constexpr,
    NARROW: tl.constexpr,
    UPCAST: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """Base-2 logits of both sides on (rows, keys): against the resident query tiles (NARROW) or by channel chunks."""
    if NARROW:
        cols_s = tl.arange(0, CS_PAD)
        cols_t = tl.arange(0, CT_PAD)
        keys_s = tl.load(
            student_ptr + keys[:, None] * Cs + cols_s[None, :],
            mask=key_valid[:, None] & (cols_s < Cs)[None, :],
            other=0.0,
        )
        keys_t = tl.load(
            teacher_ptr + keys[:, None] * Ct + cols_t[None, :],
            mask=key_valid[:, None] & (cols_t < Ct)[None, :],
            other=0.0,
        )
        if UPCAST:
            keys_s = keys_s.to(tl.float32)
            keys_t = keys_t.to(tl.float32)
        gram_s = tl.dot(query_s, tl.trans(keys_s), input_precision=PRECISION)
        gram_t = tl.dot(query_t, tl.trans(keys_t), input_precision=PRECISION)
    else:
        gram_s = gram_tile(student_ptr, rows, keys, row_valid, key_valid, Cs, BLOCK_M, BLOCK_N, BLOCK_K, UPCAST,
                           PRECISION)  # fmt: skip
        gram_t = gram_tile(teacher_ptr, rows, keys, row_valid, key_valid, Ct, BLOCK_M, BLOCK_N, BLOCK_K, UPCAST,
                           PRECISION)  # fmt: skip
    return gram_s * scale_s, gram_t * scale_t


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
    CS_PAD: tl.constexpr,
    CT_PAD: tl.constexpr,
    NARROW: tl.constexpr,
    HAS_INDEX: tl.constexpr,
    UPCAST: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_TAIL: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    """Program (pid, video): stats[b, f, :, rows] of one (query tile, target frame f), in grouped order.

    With HAS_INDEX the tile's rows are the video's kept queries (index_ptr, count_ptr); tiles past the count
    exit at once. NARROW: Cs <= CS_PAD and Ct <= CT_PAD, query tiles resident.

    In base-2 logits x = S * log2(e) / tau (scale_s, scale_t), stats (B, F, 5, N) holds max_t, 1/sum_t,
    max_s, 1/sum_s and E = E_{P_t}[(x_t - max_t) - (x_s - max_s)], so that P = exp2(x - max) / sum and
    KL = ln2 * (E + log2(sum_s / sum_t)). Every saved quantity is relative to the maxima (never
    lse = max + log2 sum): fp32 keeps them exact to a few ulps of O(1) numbers instead of the logits' scale (1/tau).
    """
    b = tl.program_id(1).to(tl.int64)
    query_tiles = tl.cdiv(N, BLOCK_M)
    tile, frame = grouped_tile(tl.program_id(0), query_tiles, frames, GROUP_M)
    f = frame.to(tl.int64)
    count = num_queries(count_ptr, b, N, HAS_INDEX)
    if tile * BLOCK_M < count:
        rows, row_valid = query_rows(index_ptr + b * N, count, tile * BLOCK_M, BLOCK_M, HAS_INDEX)
        student_ptr += b * N * Cs
        teacher_ptr += b * N * Ct
        if NARROW:
            cols_s = tl.arange(0, CS_PAD)
            cols_t = tl.arange(0, CT_PAD)
            query_s = tl.load(
                student_ptr + rows[:, None] * Cs + cols_s[None, :],
                mask=row_valid[:, None] & (cols_s < Cs)[None, :],
                other=0.0,
            )
            query_t = tl.load(
                teacher_ptr + rows[:, None] * Ct + cols_t[None, :],
                mask=row_valid[:, None] & (cols_t < Ct)[None, :],
                other=0.0,
            )
            if UPCAST:
                query_s = query_s.to(tl.float32)
                query_t = query_t.to(tl.float32)
        else:
            query_s = 0.0
            query_t = 0.0
        max_t = tl.full((BLOCK_M,), LOGIT_FLOOR, dtype=tl.float32)
        max_s = tl.full((BLOCK_M,), LOGIT_FLOOR, dtype=tl.float32)
        sum_t = tl.zeros((BLOCK_M,), dtype=tl.float32)
        sum_s = tl.zeros((BLOCK_M,), dtype=tl.float32)
        weighted_gap = tl.zeros((BLOCK_M,), dtype=tl.float32)
        frame_start = f * HW
        full_keys = (HW // BLOCK_N) * BLOCK_N
        # Full key tiles: no key mask.
        for key_start in range(0, full_keys, BLOCK_N):
            keys = frame_start + key_start + tl.arange(0, BLOCK_N)
            key_valid = tl.full((BLOCK_N,), 1, tl.int1)
            logits_s, logits_t = key_tile_logits(
                student_ptr, teacher_ptr, query_s, query_t, rows, row_valid, keys, key_valid, Cs, Ct,
                scale_s, scale_t, CS_PAD, CT_PAD, NARROW, UPCAST, PRECISION, BLOCK_M, BLOCK_N, BLOCK_K,
            )  # fmt: skip
            max_t, max_s, sum_t, sum_s, weighted_gap = online_update(
                logits_s, logits_t, key_valid, max_t, max_s, sum_t, sum_s, weighted_gap, False
            )
        # The frame's last HW - full_keys keys in narrower tiles.
        for key_start in range(full_keys, HW, BLOCK_TAIL):
            keys_in_frame = key_start + tl.arange(0, BLOCK_TAIL)
            key_valid = keys_in_frame < HW
            keys = frame_start + keys_in_frame
            logits_s, logits_t = key_tile_logits(
                student_ptr, teacher_ptr, query_s, query_t, rows, row_valid, keys, key_valid, Cs, Ct,
                scale_s, scale_t, CS_PAD, CT_PAD, NARROW, UPCAST, PRECISION, BLOCK_M, BLOCK_TAIL, BLOCK_K,
            )  # fmt: skip
            max_t, max_s, sum_t, sum_s, weighted_gap = online_update(
                logits_s, logits_t, key_valid, max_t, max_s, sum_t, sum_s, weighted_gap, True
            )
        frame_stats = stats_ptr + (b * frames + f) * NUM_STATS * N + rows
        tl.store(frame_stats + STAT_MAX_T * N, max_t, mask=row_valid)
        tl.store(frame_stats + STAT_INV_SUM_T * N, 1.0 / sum_t, mask=row_valid)
        tl.store(frame_stats + STAT_MAX_S * N, max_s, mask=row_valid)
        tl.store(frame_stats + STAT_INV_SUM_S * N, 1.0 / sum_s, mask=row_valid)
        tl.store(frame_stats + STAT_GAP * N, weighted_gap / sum_t, mask=row_valid)


def is_narrow(channels_s: int, channels_t: int) -> bool:
    """Both channel counts small enough for resident query tiles (padded to powers of two, >= 16 for tl.dot)."""
    return max(next_power_of_two(channels_s), next_power_of_two(channels_t)) <= NARROW_CHANNELS


FORWARD = {
    True: tuned_kernel("tempered_kl.forward.narrow", _tempered_kl_forward_kernel, NARROW_CONFIGS),
    False: tuned_kernel("tempered_kl.forward.wide", _tempered_kl_forward_kernel, WIDE_CONFIGS),
}


def forward_constants(channels_s: int, channels_t: int, has_index: bool) -> dict:
    """The constexprs the launcher passes besides the config's blocks (also used by the AOT report)."""
    narrow = is_narrow(channels_s, channels_t)
    return dict(
        CS_PAD=max(16, next_power_of_two(channels_s)) if narrow else 16,
        CT_PAD=max(16, next_power_of_two(channels_t)) if narrow else 16,
        NARROW=narrow,
        HAS_INDEX=has_index,
        UPCAST=triton_interpreting(),
        PRECISION=DOT_PRECISION,
        **({"BLOCK_K": 16} if narrow else {}),  # the narrow path loads whole channel rows; BLOCK_K is unused
    )


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
    channels_t = teacher.shape[-1]
    stats = torch.empty(batch, frames, NUM_STATS, num_tokens, dtype=torch.float32, device=student.device)
    if stats.numel() == 0:
        return torch.zeros(batch, num_tokens, dtype=torch.float32, device=student.device), stats
    has_index = query_index is not None
    constants = forward_constants(channels_s, channels_t, has_index)
    arguments = dict(
        student_ptr=student, teacher_ptr=teacher, index_ptr=query_index if has_index else stats,
        count_ptr=query_count if has_index else stats, stats_ptr=stats, N=num_tokens, HW=num_tokens // frames,
        Cs=channels_s, Ct=channels_t, frames=frames, scale_s=LOG2E / tau_student, scale_t=LOG2E / tau_teacher,
    )  # fmt: skip
    narrow = constants["NARROW"]
    key = shape_class(
        tokens=num_tokens, hw=num_tokens // frames, channels=(channels_s, channels_t), dtype=student.dtype,
        masked=has_index,
    )  # fmt: skip
    grid = lambda blocks: (triton.cdiv(num_tokens, blocks["BLOCK_M"]) * frames, batch)
    FORWARD[narrow](grid, key, arguments, constants)
    gap, inv_sum_t, inv_sum_s = (stats[:, :, slot.value] for slot in (STAT_GAP, STAT_INV_SUM_T, STAT_INV_SUM_S))
    kl = LN2 * (gap + torch.log2(inv_sum_t) - torch.log2(inv_sum_s)).mean(1)
    return (kl if keep is None else torch.where(keep, kl, 0.0)), stats
