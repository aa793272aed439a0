"""Backward for wide features: the sign matrix of a chunk of query rows, written once, then matmuls.

The fused backward (backward.py) recomputes the S - T tiles once per BLOCK_D slice of output channels:
cheap for narrow features, costly for wide ones (C = 768: six recomputes of both Gram matrices per pass
and side). Here a kernel writes sign(S - T) [|S - T| > margin] on the variant's pairs for a chunk of kept
query rows against all N keys, recomputing each tile once; its entries are -1, 0 or 1, exact in the
features' dtype. The same block then serves the student and the teacher through ordinary matmuls:
grad[rows] += g (B x) and grad += B^T (g x[rows]), or grad[rows] = 2 g (B x) when G is symmetric.
Memory: one (chunk x N) block, sized by stss_kernels._core.chunking.CHUNK_BUDGET_BYTES.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from stss_kernels._core.backends import triton_interpreting
from stss_kernels._core.chunking import rows_per_chunk
from stss_kernels._core.library import host_sync_allowed
from stss_kernels._core.tiles import DOT_PRECISION, autotune_configs, query_rows
from stss_kernels._core.tuning import hopper_only_configs, shape_class, tuned_kernel
from stss_kernels.ops.relation_distance.triton_backend.tiles import SPATIAL, TEMPORAL, VARIANT_IDS, sign_tile

# Bytes per (row, key) entry of a chunk, in units of the features' itemsize: the sign block, its transpose's
# operand and the products' temporaries.
_LIVE_BLOCKS = 3

SIGN_BLOCK_CONFIGS = autotune_configs(
    [
        (dict(BLOCK_M=128, BLOCK_N=64, BLOCK_K=64), 8, 3),
        (dict(BLOCK_M=64, BLOCK_N=128, BLOCK_K=64), 8, 3),
        (dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=64), 4, 3),
        (dict(BLOCK_M=128, BLOCK_N=32, BLOCK_K=64), 4, 4),
    ],
    dict(BLOCK_M=16, BLOCK_N=16, BLOCK_K=32),
)
hopper_only_configs(SIGN_BLOCK_CONFIGS, (3,))  # spills on sm_80 for spatial / temporal pairs (native grid)


@triton.autotune(configs=SIGN_BLOCK_CONFIGS, key=["N", "HW", "Cs", "Ct", "VARIANT", "HAS_INDEX"])
@triton.jit
def _sign_block_kernel(
    student_ptr,
    teacher_ptr,
    index_ptr,
    out_ptr,
    N,
    HW,
    Cs,
    Ct,
    margin,
    chunk_start,
    chunk_rows,
    VARIANT: tl.constexpr,
    HAS_INDEX: tl.constexpr,
    UPCAST: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """out (chunk_rows, N): the sign matrix on the (kept) query positions chunk_start .. + chunk_rows of one video.

    One program per (tile of chunk rows, key tile); every pointer is already offset to the video. Tiles
    without a pair of the variant (other frames for SPATIAL, one shared frame for TEMPORAL) store zeros.
    """
    local = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    rows, row_valid = query_rows(index_ptr, chunk_start + chunk_rows, chunk_start + tl.program_id(0) * BLOCK_M,
                                 BLOCK_M, HAS_INDEX)  # fmt: skip
    first_key = tl.program_id(1) * BLOCK_N
    keys = (first_key + tl.arange(0, BLOCK_N)).to(tl.int64)
    key_valid = keys < N
    first_frame = first_key // HW
    last_frame = (tl.minimum(first_key + BLOCK_N, N) - 1) // HW
    active = row_valid
    if VARIANT == SPATIAL:
        active = active & (rows // HW >= first_frame) & (rows // HW <= last_frame)
    elif VARIANT == TEMPORAL:
        active = active & ((rows // HW != first_frame) | (first_frame != last_frame))
    sign = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    if tl.max(active.to(tl.int32), axis=0) > 0:
        sign = sign_tile(
            student_ptr, teacher_ptr, rows, keys, row_valid, key_valid, N, HW, Cs, Ct, margin,
            VARIANT, BLOCK_M, BLOCK_N, BLOCK_K, UPCAST, PRECISION,
        )  # fmt: skip
    offsets = local.to(tl.int64)[:, None] * N + keys[None, :]
    tl.store(out_ptr + offsets, sign.to(out_ptr.dtype.element_ty), mask=row_valid[:, None] & key_valid[None, :])


SIGN_BLOCK = tuned_kernel("relation_distance.sign_block", _sign_block_kernel.fn, _sign_block_kernel.configs)


def feature_grads_by_chunks(
    student: torch.Tensor,
    teacher: torch.Tensor,
    row_grad: torch.Tensor,
    query_index: torch.Tensor | None,
    query_count: torch.Tensor | None,
    frames: int,
    margin: float,
    variant: str,
    symmetric: bool,
    sides: tuple[bool, ...],
) -> list[torch.Tensor]:
    """fp32 gradients (G + G^T) s and -(G + G^T) t for the sides asked for (for_teacher flags), from one sign
    block per chunk of kept query rows. row_grad (B, N) fp32 = g_i / count / scale."""
    batch, num_tokens, channels_s = student.shape
    dtype = student.dtype
    grads = [
        torch.zeros(x.shape, dtype=torch.float32, device=x.device) for x in (teacher if t else student for t in sides)
    ]
    # Reading the kept-query counts syncs the host; where that is not allowed (CUDA graph capture) every
    # position is visited: those past the count hold dropped queries, whose row gradient is 0 (the caller's).
    exact_counts = query_count is not None and host_sync_allowed(query_count)
    counts = query_count.tolist() if exact_counts else [num_tokens] * batch
    step = rows_per_chunk(num_tokens, dtype.itemsize * _LIVE_BLOCKS)
    flags = dict(
        VARIANT=VARIANT_IDS[variant], HAS_INDEX=query_index is not None, UPCAST=triton_interpreting(),
        PRECISION=DOT_PRECISION,
    )  # fmt: skip
    key = shape_class(tokens=num_tokens, hw=num_tokens // frames, channels=(channels_s, teacher.shape[-1]),
                      dtype=dtype, masked=query_index is not None, variant=variant)  # fmt: skip
    for b in range(batch):
        index = row_grad[b] if query_index is None else query_index[b]
        for start in range(0, counts[b], step):
            rows = min(step, counts[b] - start)
            block = torch.empty(rows, num_tokens, dtype=dtype, device=student.device)
            arguments = dict(
                student_ptr=student[b], teacher_ptr=teacher[b], index_ptr=index, out_ptr=block, N=num_tokens,
                HW=num_tokens // frames, Cs=channels_s, Ct=teacher.shape[-1], margin=margin, chunk_start=start,
                chunk_rows=rows,
            )  # fmt: skip
            grid = lambda blocks, rows=rows: (
                triton.cdiv(rows, blocks["BLOCK_M"]),
                triton.cdiv(num_tokens, blocks["BLOCK_N"]),
            )
            SIGN_BLOCK(grid, key, arguments, flags)
            if query_index is None:
                token_ids = torch.arange(start, start + rows, device=student.device)
            else:
                token_ids = query_index[b, start : start + rows].long()
            g = row_grad[b, token_ids, None]
            for grad, for_teacher in zip(grads, sides):
                x = teacher[b] if for_teacher else student[b]
                direction = -1.0 if for_teacher else 1.0
                if symmetric:  # every row of the video is in some chunk: (G + G^T) x = 2 G x, rows owned
                    grad[b, token_ids] = (2.0 * direction) * g * (block @ x).float()
                    continue
                grad[b].index_add_(0, token_ids, direction * g * (block @ x).float())
                grad[b] += direction * (block.T @ (g * x[token_ids].float()).to(dtype)).float()
    return grads
