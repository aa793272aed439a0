"""Forward kernel: per-query sums of relu(|S - T| - margin) over the variant's pairs, tile by tile."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from stss_kernels._core.backends import triton_interpreting
from stss_kernels._core.tiles import DOT_PRECISION, autotune_configs, num_queries, query_rows
from stss_kernels._core.tuning import hopper_only_configs, shape_class, tuned_kernel
from stss_kernels.ops.relation_distance.triton_backend.tiles import VARIANT_IDS, gap_tile, pair_tile, paired_key_range

# S - T is one fp32 accumulator ([s | t] [s | -t]^T), so 128 x 256 tiles fit for all pairs on sm_90a: ~85 FLOP per
# byte of L2 traffic against ~43 at 128 x 64. python -m bench.compile (bf16): the first config (the untuned default)
# spills on neither sm_90a nor sm_80 at tsa-grid and cogvideox-native; every other config spills on sm_80 at one of
# them (and 128 x 256 fp32 exceeds its shared memory): timed on Hopper only.
FORWARD_CONFIGS = hopper_only_configs(
    autotune_configs(
        [
            (dict(BLOCK_M=128, BLOCK_N=64, BLOCK_K=64), 8, 3),
            (dict(BLOCK_M=128, BLOCK_N=256, BLOCK_K=32), 8, 4),
            (dict(BLOCK_M=128, BLOCK_N=256, BLOCK_K=64), 8, 3),
            (dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=64), 8, 3),
            (dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=64), 4, 3),
            (dict(BLOCK_M=128, BLOCK_N=64, BLOCK_K=32), 8, 4),
        ],
        dict(BLOCK_M=16, BLOCK_N=16, BLOCK_K=32),
    ),
    (1, 2, 3, 4, 5),
)
# Spatial and temporal pairs also hold the tile of (row frame == key frame): 128 x 256 spills 0.7-1.4 KB and
# 128 x 128 64 B on sm_90a there.
PAIRED_FORWARD_CONFIGS = autotune_configs(
    [
        (dict(BLOCK_M=128, BLOCK_N=64, BLOCK_K=64), 8, 3),
        (dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=64), 4, 3),
        (dict(BLOCK_M=128, BLOCK_N=64, BLOCK_K=32), 8, 4),
    ],
    dict(BLOCK_M=16, BLOCK_N=16, BLOCK_K=32),
)
# A program walks at least this many keys: splitting the keys further costs more partial sums than it gains.
MIN_KEYS_PER_SPLIT = 1024
# Relative time a smaller split count may lose to the best one (fewer partial sums, fewer pipeline starts).
SPLIT_SLACK = 0.02
# Query-tile size the split count is planned with (the autotuned BLOCK_M is 64 or 128).
PLANNED_BLOCK_M = 128


@triton.autotune(configs=FORWARD_CONFIGS, key=["N", "HW", "Cs", "Ct", "VARIANT", "HAS_INDEX"])
@triton.jit
def _relation_distance_forward_kernel(
    student_ptr,
    teacher_ptr,
    index_ptr,
    count_ptr,
    sums_ptr,
    N,
    HW,
    Cs,
    Ct,
    splits,
    margin,
    VARIANT: tl.constexpr,
    HAS_INDEX: tl.constexpr,
    UPCAST: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """One program per (query tile, key split, video): sums[b, split, rows] = sum of d_ij over the split's keys.

    The keys a tile is paired with (all N, or its rows' frames for SPATIAL) are cut into `splits` contiguous
    runs of whole key tiles, one per program (more programs than query tiles alone: occupancy at batch 1 and
    under a sparse query mask); the caller adds the splits up. With HAS_INDEX the tile's rows are the video's
    kept queries (index_ptr, count_ptr); tiles past the count exit at once.
    """
    split = tl.program_id(1)
    b = tl.program_id(2).to(tl.int64)
    count = num_queries(count_ptr, b, N, HAS_INDEX)
    if tl.program_id(0) * BLOCK_M < count:
        rows, row_valid = query_rows(index_ptr + b * N, count, tl.program_id(0) * BLOCK_M, BLOCK_M, HAS_INDEX)
        student_ptr += b * N * Cs
        teacher_ptr += b * N * Ct
        key_lo, key_hi = paired_key_range(rows, row_valid, N, HW, VARIANT)
        keys_per_split = tl.cdiv(tl.cdiv(key_hi - key_lo, BLOCK_N), splits) * BLOCK_N
        start = key_lo + split * keys_per_split
        stop = tl.minimum(start + keys_per_split, key_hi)
        acc = tl.zeros((BLOCK_M,), dtype=tl.float32)
        for key_start in range(start, stop, BLOCK_N):
            keys = (key_start + tl.arange(0, BLOCK_N)).to(tl.int64)
            key_valid = keys < stop
            gap = gap_tile(
                student_ptr, teacher_ptr, rows, keys, row_valid, key_valid, Cs, Ct,
                BLOCK_M, BLOCK_N, BLOCK_K, UPCAST, PRECISION,
            )  # fmt: skip
            distance = tl.maximum(tl.abs(gap) - margin, 0.0)
            distance = tl.where(pair_tile(rows, keys, row_valid, key_valid, HW, VARIANT), distance, 0.0)
            acc += tl.sum(distance, axis=1)
        tl.store(sums_ptr + (b * splits + split) * N + rows, acc, mask=row_valid)


# Launched through the shape-class cache (stss_kernels._core.tuning), not @triton.autotune's own tuner: no
# timing inside CUDA-graph capture or compile tracing. The decorator keeps the config list with the kernel.
FORWARD = tuned_kernel(
    "relation_distance.forward", _relation_distance_forward_kernel.fn, _relation_distance_forward_kernel.configs
)
PAIRED_FORWARD = tuned_kernel(
    "relation_distance.forward.paired", _relation_distance_forward_kernel.fn, PAIRED_FORWARD_CONFIGS
)


def forward_configs(variant: str) -> list:
    """The launch-config list of the forward for `variant` ("full", "spatial" or "temporal")."""
    return (FORWARD if variant == "full" else PAIRED_FORWARD).configs


def _multiprocessors(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 1


def plan_key_splits(batch: int, num_tokens: int, frames: int, variant: str, multiprocessors: int) -> int:
    """Key runs per query tile: the count whose programs fill their waves best, at least MIN_KEYS_PER_SPLIT keys
    each. With P query programs and s runs each, the forward takes ceil(P s / multiprocessors) waves of 1 / s of
    a query tile's keys; the fewest runs within SPLIT_SLACK of the shortest such time win (a partial last wave,
    e.g. 2.09 waves at P = 138 and s = 2 on 132 SMs, costs as much as a full one)."""
    span = min(num_tokens, 2 * (num_tokens // frames)) if variant == "spatial" else num_tokens
    query_programs = batch * triton.cdiv(num_tokens, PLANNED_BLOCK_M)
    candidates = range(1, max(1, span // MIN_KEYS_PER_SPLIT) + 1)
    time = {splits: triton.cdiv(query_programs * splits, multiprocessors) / splits for splits in candidates}
    shortest = min(time.values())
    return min(splits for splits in candidates if time[splits] <= shortest * (1 + SPLIT_SLACK))


def key_splits(batch: int, num_tokens: int, frames: int, variant: str, device: torch.device) -> int:
    """`plan_key_splits` for the device's multiprocessor count."""
    return plan_key_splits(batch, num_tokens, frames, variant, _multiprocessors(device))


def relation_distance_forward(
    student: torch.Tensor,
    teacher: torch.Tensor,
    frames: int,
    margin: float,
    variant: str,
    query_index: torch.Tensor | None,
    query_count: torch.Tensor | None,
) -> torch.Tensor:
    """Per-query sums of d_ij over the variant's pairs (B, N) fp32 (0 for queries not in query_index).

    student (B, N, Cs), teacher (B, N, Ct) contiguous; query_index (B, N) int32 and query_count (B,) int32
    (see `kept_queries`) restrict the computed queries.
    """
    batch, num_tokens, channels_s = student.shape
    splits = key_splits(batch, num_tokens, frames, variant, student.device)
    sums = torch.zeros(batch, splits, num_tokens, dtype=torch.float32, device=student.device)
    has_index = query_index is not None
    arguments = dict(
        student_ptr=student, teacher_ptr=teacher, index_ptr=query_index if has_index else sums,
        count_ptr=query_count if has_index else sums, sums_ptr=sums, N=num_tokens, HW=num_tokens // frames,
        Cs=channels_s, Ct=teacher.shape[-1], splits=splits, margin=margin,
    )  # fmt: skip
    key = shape_class(tokens=num_tokens, hw=num_tokens // frames, channels=(channels_s, teacher.shape[-1]),
                      dtype=student.dtype, masked=has_index, variant=variant, splits=splits)  # fmt: skip
    (FORWARD if variant == "full" else PAIRED_FORWARD)(
        lambda blocks: (triton.cdiv(num_tokens, blocks["BLOCK_M"]), splits, batch),
        key,
        arguments,
        dict(VARIANT=VARIANT_IDS[variant], HAS_INDEX=has_index, UPCAST=triton_interpreting(), PRECISION=DOT_PRECISION),
    )
    return sums.sum(1)
