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
        (dict(BLOCK_M=128, BLOCK_N=64, BLOCK_TAIL=32, BLOCK_K=32, GROUP_M=32), 8, 3),
        (dict(BLOCK_M=128, BLOCK_N=128, BLOCK_TAIL=32, BLOCK_K=64, GROUP_M=32), 8, 3),
        (dict(BLOCK_M=128, BLOCK_N=128, BLOCK_TAIL=128, BLOCK_K=64, GROUP_M=32), 8, 3),
        (dict(BLOCK_M=128, BLOCK_N=128, BLOCK_TAIL=32, BLOCK_K=32, GROUP_M=32), 8, 4),
        (dict(BLOCK_M=64, BLOCK_N=128, BLOCK_TAIL=32, BLOCK_K=64, GROUP_M=32), 4, 3),
        (dict(BLOCK_M=128, BLOCK_N=64, BLOCK_TAIL=32, BLOCK_K=64, GROUP_M=32), 8, 3),
        (dict(BLOCK_M=128, BLOCK_N=64, BLOCK_TAIL=32, BLOCK_K=64, GROUP_M=8), 8, 3),
    ],
    dict(BLOCK_M=16, BLOCK_N=16, BLOCK_TAIL=8, BLOCK_K=32, GROUP_M=2),
)
# The first config of each list is the one used untuned (CUDA-graph capture, tracing, STSS_AUTOTUNE=0): one that
# does not spill on sm_90a nor sm_80 (ptxas, bf16, native grid; with descriptors the wide one holds 128 registers
# on sm_90a: 2 CTAs per SM). Configs whose tiles spill with sm_80's mma.sync are hopper-only.
hopper_only_configs(WIDE_CONFIGS, (1, 2, 3, 4, 5, 6))
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
def side_logits(
    features_ptr,
    query,
    key_descriptor,
    rows,
    row_valid,
    row_start,
    keys,
    key_valid,
    key_start,
    num_channels,
    scale,
    C_PAD: tl.constexpr,
    NARROW: tl.constexpr,
    MASK_KEYS: tl.constexpr,
    DESCRIPTORS: tl.constexpr,
    UPCAST: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """fp32 base-2 logits of one side on (rows, keys): against its resident query tile (NARROW) or by channel
    chunks, loaded through tensor descriptors when DESCRIPTORS (`query` is then the query tiles' descriptor, and
    rows / keys are row_start / key_start + arange: TMA copies on sm_90, no per-element pointers or masks).
    Keys past the frame get a finite floor (not -inf): exp2 gives 0 and their gap is exactly 0, with no
    inf - inf anywhere; real logits are never that low."""
    if NARROW:
        cols = tl.arange(0, C_PAD)
        key_tile = tl.load(
            features_ptr + keys[:, None] * num_channels + cols[None, :],
            mask=key_valid[:, None] & (cols < num_channels)[None, :],
            other=0.0,
        )
        if UPCAST:
            key_tile = key_tile.to(tl.float32)
        gram = tl.dot(query, tl.trans(key_tile), input_precision=PRECISION)
    elif DESCRIPTORS:
        gram = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k in range(0, num_channels, BLOCK_K):
            query_chunk = query.load([row_start, k])
            key_chunk = key_descriptor.load([key_start, k])
            if UPCAST:
                query_chunk = query_chunk.to(tl.float32)
                key_chunk = key_chunk.to(tl.float32)
            gram = tl.dot(query_chunk, tl.trans(key_chunk), gram, input_precision=PRECISION)
    else:
        gram = gram_tile(features_ptr, rows, keys, row_valid, key_valid, num_channels, BLOCK_M, BLOCK_N, BLOCK_K,
                         UPCAST, PRECISION)  # fmt: skip
    logits = gram * scale
    if MASK_KEYS:
        logits = tl.where(key_valid[None, :], logits, LOGIT_FLOOR)
    return logits


@triton.jit
def fold_teacher(logits_t, max_t, sum_t):
    """Fold a tile of teacher logits into the running max and sum, before the student's tile is computed.

    Returns the new max and sum, the rescale of earlier terms, the tile's P_t weights exp2(x_t - max_t) (fp32:
    fp16 weights leave the 16-bit loss less accurate than the naive op's) and the row sums of
    weight * (x_t - max_t) with those same weights.
    """
    new_max_t = tl.maximum(max_t, tl.max(logits_t, axis=1))
    centred_t = logits_t - new_max_t[:, None]
    exp_t = tl.exp2(centred_t)
    rescale_t = tl.exp2(max_t - new_max_t)
    gap_t = tl.sum(exp_t * centred_t, axis=1)
    return new_max_t, sum_t * rescale_t + tl.sum(exp_t, axis=1), rescale_t, exp_t, gap_t


@triton.jit
def fold_student(logits_s, weight, gap_t, max_t, new_max_t, rescale_t, sum_t, max_s, sum_s, weighted_gap):
    """Fold a tile of student logits into the running max, sum and P_t-weighted gap (see fold_teacher).

    sum_t is the teacher's sum before this tile. The gap E_{P_t}[(x_t - max_t) - (x_s - max_s)] is kept relative
    to the running maxima (small numbers): moving them shifts every earlier term by the same amount. The tile's
    part is the difference of two row sums with the same weights, so it is exactly 0 where x_t = x_s.
    """
    new_max_s = tl.maximum(max_s, tl.max(logits_s, axis=1))
    centred_s = logits_s - new_max_s[:, None]
    shift = (new_max_t - max_t) - (new_max_s - max_s)
    weighted_gap = rescale_t * (weighted_gap - sum_t * shift) + (gap_t - tl.sum(weight * centred_s, 1))
    sum_s = sum_s * tl.exp2(max_s - new_max_s) + tl.sum(tl.exp2(centred_s), axis=1)
    return new_max_s, sum_s, weighted_gap


@triton.jit
def fold_key_tile(
    student_ptr,
    teacher_ptr,
    query_s,
    query_t,
    keys_s,
    keys_t,
    rows,
    row_valid,
    row_start,
    keys,
    key_valid,
    key_start,
    Cs,
    Ct,
    scale_s,
    scale_t,
    max_t,
    max_s,
    sum_t,
    sum_s,
    weighted_gap,
    CS_PAD: tl.constexpr,
    CT_PAD: tl.constexpr,
    NARROW: tl.constexpr,
    MASK_KEYS: tl.constexpr,
    DESCRIPTORS: tl.constexpr,
    UPCAST: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """The running statistics after one key tile: the teacher's logits first, folded and dropped, then the
    student's, so one fp32 (BLOCK_M, BLOCK_N) tile is live at a time."""
    logits_t = side_logits(teacher_ptr, query_t, keys_t, rows, row_valid, row_start, keys, key_valid, key_start, Ct,
                           scale_t, CT_PAD, NARROW, MASK_KEYS, DESCRIPTORS, UPCAST, PRECISION, BLOCK_M, BLOCK_N,
                           BLOCK_K)  # fmt: skip
    new_max_t, new_sum_t, rescale_t, weight, gap_t = fold_teacher(logits_t, max_t, sum_t)
    logits_s = side_logits(student_ptr, query_s, keys_s, rows, row_valid, row_start, keys, key_valid, key_start, Cs,
                           scale_s, CS_PAD, NARROW, MASK_KEYS, DESCRIPTORS, UPCAST, PRECISION, BLOCK_M, BLOCK_N,
                           BLOCK_K)  # fmt: skip
    max_s, sum_s, weighted_gap = fold_student(
        logits_s, weight, gap_t, max_t, new_max_t, rescale_t, sum_t, max_s, sum_s, weighted_gap
    )
    return new_max_t, max_s, new_sum_t, sum_s, weighted_gap


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
    DESCRIPTORS: tl.constexpr,
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
        elif DESCRIPTORS:  # row-major (N, C) of this video; rows past N read as zeros
            query_s = tl.make_tensor_descriptor(student_ptr, [N, Cs], [Cs, 1], [BLOCK_M, BLOCK_K])
            query_t = tl.make_tensor_descriptor(teacher_ptr, [N, Ct], [Ct, 1], [BLOCK_M, BLOCK_K])
        else:
            query_s = 0.0
            query_t = 0.0
        if DESCRIPTORS:
            keys_s = tl.make_tensor_descriptor(student_ptr, [N, Cs], [Cs, 1], [BLOCK_N, BLOCK_K])
            keys_t = tl.make_tensor_descriptor(teacher_ptr, [N, Ct], [Ct, 1], [BLOCK_N, BLOCK_K])
            tail_s = tl.make_tensor_descriptor(student_ptr, [N, Cs], [Cs, 1], [BLOCK_TAIL, BLOCK_K])
            tail_t = tl.make_tensor_descriptor(teacher_ptr, [N, Ct], [Ct, 1], [BLOCK_TAIL, BLOCK_K])
        else:
            keys_s = 0.0
            keys_t = 0.0
            tail_s = 0.0
            tail_t = 0.0
        row_start = tile * BLOCK_M
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
            max_t, max_s, sum_t, sum_s, weighted_gap = fold_key_tile(
                student_ptr, teacher_ptr, query_s, query_t, keys_s, keys_t, rows, row_valid, row_start, keys,
                key_valid, (frame_start + key_start).to(tl.int32), Cs, Ct, scale_s, scale_t, max_t, max_s, sum_t, sum_s,
                weighted_gap, CS_PAD, CT_PAD, NARROW, False, DESCRIPTORS, UPCAST, PRECISION, BLOCK_M,
                BLOCK_N, BLOCK_K,
            )  # fmt: skip
        # The frame's last HW - full_keys keys in narrower tiles.
        for key_start in range(full_keys, HW, BLOCK_TAIL):
            keys_in_frame = key_start + tl.arange(0, BLOCK_TAIL)
            key_valid = keys_in_frame < HW
            keys = frame_start + keys_in_frame
            max_t, max_s, sum_t, sum_s, weighted_gap = fold_key_tile(
                student_ptr, teacher_ptr, query_s, query_t, tail_s, tail_t, rows, row_valid, row_start, keys,
                key_valid, (frame_start + key_start).to(tl.int32), Cs, Ct, scale_s, scale_t, max_t, max_s, sum_t, sum_s,
                weighted_gap, CS_PAD, CT_PAD, NARROW, True, DESCRIPTORS, UPCAST, PRECISION, BLOCK_M,
                BLOCK_TAIL, BLOCK_K,
            )  # fmt: skip
        frame_stats = stats_ptr + (b * frames + f) * NUM_STATS * N + rows
        tl.store(frame_stats + STAT_MAX_T * N, max_t, mask=row_valid)
        tl.store(frame_stats + STAT_INV_SUM_T * N, 1.0 / sum_t, mask=row_valid)
        tl.store(frame_stats + STAT_MAX_S * N, max_s, mask=row_valid)
        tl.store(frame_stats + STAT_INV_SUM_S * N, 1.0 / sum_s, mask=row_valid)
        tl.store(frame_stats + STAT_GAP * N, weighted_gap / sum_t, mask=row_valid)


def is_narrow(channels_s: int, channels_t: int) -> bool:
    """Both channel counts small enough for resident query tiles (padded to powers of two, >= 16 for tl.dot)."""
    return max(next_power_of_two(channels_s), next_power_of_two(channels_t)) <= NARROW_CHANNELS


def descriptors_apply(channels_s: int, channels_t: int, dtype: torch.dtype) -> bool:
    """Whether the wide forward loads through tensor descriptors: Triton has them (3.4+; older versions take the
    pointer path) and every row starts 16-byte aligned (TMA's stride rule). Gathered (masked) query rows use
    pointers."""
    return hasattr(tl, "make_tensor_descriptor") and all(c * dtype.itemsize % 16 == 0 for c in (channels_s, channels_t))


def _descriptor_scratch(size: int, alignment: int, stream) -> torch.Tensor:
    return torch.empty(size, dtype=torch.int8, device=torch.device("cuda", torch.cuda.current_device()))


def ensure_descriptor_allocator() -> None:
    """Descriptors made on the device need a little global scratch per program: give Triton a torch allocator
    unless the application has set one (triton.set_allocator)."""
    from triton.runtime import _allocation

    current = getattr(_allocation, "_allocator", None)
    current = current.get() if hasattr(current, "get") else current
    if current is None or isinstance(current, _allocation.NullAllocator):
        triton.set_allocator(_descriptor_scratch)


FORWARD = {
    True: tuned_kernel("tempered_kl.forward.narrow", _tempered_kl_forward_kernel, NARROW_CONFIGS),
    False: tuned_kernel("tempered_kl.forward.wide", _tempered_kl_forward_kernel, WIDE_CONFIGS),
}


def forward_constants(channels_s: int, channels_t: int, has_index: bool, dtype: torch.dtype) -> dict:
    """The constexprs the launcher passes besides the config's blocks (also used by the AOT report)."""
    narrow = is_narrow(channels_s, channels_t)
    return dict(
        DESCRIPTORS=not narrow and not has_index and descriptors_apply(channels_s, channels_t, dtype),
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
    constants = forward_constants(channels_s, channels_t, has_index, student.dtype)
    if constants["DESCRIPTORS"] and student.is_cuda:
        ensure_descriptor_allocator()
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
