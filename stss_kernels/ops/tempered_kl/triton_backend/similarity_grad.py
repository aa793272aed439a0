"""Backward for wide features: dL/dS of a chunk of query rows, written once, then two matmuls.

The fused backward (backward.py) recomputes the similarity tiles once per BLOCK_D slice of output
channels, which is cheap for narrow features and costly for wide ones (C = 768: six recomputes of
both Gram matrices per pass). Here a kernel writes G = dL/dS (or dL/dT) for a chunk of kept query
rows against all N keys, in the features' dtype, recomputing each tile exactly once; the two
products grad[rows] += G x and grad += G^T x[rows] then run as ordinary matmuls (a single
(G + G^T) x when the chunk is the whole video). Memory: one (chunk x N) block, sized by
stss_kernels._core.chunking.CHUNK_BUDGET_BYTES.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from stss_kernels._core.chunking import rows_per_chunk
from stss_kernels._core.tiles import autotune_configs, query_rows
from stss_kernels._core.tuning import shape_class, tuned_kernel
from stss_kernels.ops.tempered_kl.triton_backend.tiles import similarity_grad_tile

# Bytes per (row, key) entry of a chunk, in units of the features' itemsize: the block of dL/dS, block + block^T
# (a whole video) or the two products' operands; sized by stss_kernels._core.chunking.CHUNK_BUDGET_BYTES.
_LIVE_BLOCKS = 4

SIMILARITY_GRAD_CONFIGS = autotune_configs(
    [
        (dict(BLOCK_M=128, BLOCK_N=64, BLOCK_K=64), 8, 3),
        (dict(BLOCK_M=64, BLOCK_N=128, BLOCK_K=64), 8, 3),
        (dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=64), 4, 3),
        (dict(BLOCK_M=128, BLOCK_N=32, BLOCK_K=64), 4, 4),
    ],
    dict(BLOCK_M=16, BLOCK_N=16, BLOCK_K=32),
)


@triton.autotune(configs=SIMILARITY_GRAD_CONFIGS, key=["N", "HW", "Cs", "Ct", "FOR_TEACHER", "HAS_INDEX"])
@triton.jit
def _similarity_grad_kernel(
    student_ptr,
    teacher_ptr,
    stats_ptr,
    row_grad_ptr,
    index_ptr,
    out_ptr,
    N,
    HW,
    Cs,
    Ct,
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
    """out (chunk_rows, N): rows of G for the (kept) query positions chunk_start .. + chunk_rows of one video.

    One program per (tile of chunk rows, key tile of one frame); every pointer is already offset to the video.
    """
    local = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    rows, row_valid = query_rows(index_ptr, chunk_start + chunk_rows, chunk_start + tl.program_id(0) * BLOCK_M,
                                 BLOCK_M, HAS_INDEX)  # fmt: skip
    tiles_per_frame = tl.cdiv(HW, BLOCK_N)
    frame = tl.program_id(1) // tiles_per_frame
    keys_in_frame = (tl.program_id(1) % tiles_per_frame) * BLOCK_N + tl.arange(0, BLOCK_N)
    key_valid = keys_in_frame < HW
    keys = (frame * HW + keys_in_frame).to(tl.int64)
    row_grad = tl.load(row_grad_ptr + rows, mask=row_valid, other=0.0)
    grad = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    if tl.max((row_grad != 0).to(tl.int32), axis=0) > 0:
        grad = similarity_grad_tile(
            student_ptr, teacher_ptr, stats_ptr, rows, keys, row_valid, key_valid, row_grad, frame,
            N, Cs, Ct, scale_s, scale_t, FOR_TEACHER, UPCAST, PRECISION, BLOCK_M, BLOCK_N, BLOCK_K,
        )  # fmt: skip
    offsets = local.to(tl.int64)[:, None] * N + keys[None, :]
    tl.store(out_ptr + offsets, grad.to(out_ptr.dtype.element_ty), mask=row_valid[:, None] & key_valid[None, :])


SIMILARITY_GRAD = tuned_kernel(
    "tempered_kl.similarity_grad", _similarity_grad_kernel.fn, _similarity_grad_kernel.configs
)


def feature_grad_by_chunks(
    features: torch.Tensor,
    kernel_args: tuple,
    scaled_row_grad: torch.Tensor,
    query_index: torch.Tensor | None,
    query_count: torch.Tensor | None,
    flags: dict,
) -> torch.Tensor:
    """fp32 (G + G^T) x for x = features (B, N, C), G written chunk by chunk of kept query rows.

    kernel_args = (student, teacher, stats, N, HW, Cs, Ct, scale_s, scale_t) as the fused backward
    receives them; scaled_row_grad (B, N) fp32 = g_i / F times the side's constant.
    """
    student, teacher, stats, num_tokens, hw, *sizes_and_scales = kernel_args
    batch = features.shape[0]
    grad = torch.zeros(features.shape, dtype=torch.float32, device=features.device)
    counts = [num_tokens] * batch if query_count is None else query_count.tolist()
    step = rows_per_chunk(num_tokens, features.dtype.itemsize * _LIVE_BLOCKS)
    frames = num_tokens // hw
    key = shape_class(tokens=num_tokens, hw=hw, channels=sizes_and_scales[:2], dtype=features.dtype,
                      **{name.lower(): flags[name] for name in ("FOR_TEACHER", "HAS_INDEX")})  # fmt: skip
    for b in range(batch):
        index = scaled_row_grad[b] if query_index is None else query_index[b]
        for start in range(0, counts[b], step):
            rows = min(step, counts[b] - start)
            block = torch.empty(rows, num_tokens, dtype=features.dtype, device=features.device)
            grid = lambda blocks, rows=rows: (
                triton.cdiv(rows, blocks["BLOCK_M"]),
                frames * triton.cdiv(hw, blocks["BLOCK_N"]),
            )
            arguments = dict(
                student_ptr=student[b], teacher_ptr=teacher[b], stats_ptr=stats[b], row_grad_ptr=scaled_row_grad[b],
                index_ptr=index, out_ptr=block, N=num_tokens, HW=hw, Cs=sizes_and_scales[0], Ct=sizes_and_scales[1],
                scale_s=sizes_and_scales[2], scale_t=sizes_and_scales[3], chunk_start=start, chunk_rows=rows,
            )  # fmt: skip
            SIMILARITY_GRAD(grid, key, arguments, flags)
            if rows == num_tokens:  # the whole video (no query dropped): one product for (G + G^T) x
                grad[b] += ((block + block.T) @ features[b]).float()
                continue
            if query_index is None:
                token_ids = torch.arange(start, start + rows, device=features.device)
            else:
                token_ids = query_index[b, start : start + rows].long()
            grad[b].index_add_(0, token_ids, (block @ features[b]).float())
            grad[b] += (block.T @ features[b, token_ids]).float()
    return grad
