"""The tempered-KL kernels as `python -m bench.compile` compiles them ahead of time, with their static cost model.

Arguments mirror the launchers in forward.py, backward.py and similarity_grad.py; the configs are the
`@triton.autotune` lists themselves. Byte counts are what the programs load and store (valid rows and channels
only, every tile load counted: L2 -> SM traffic), FLOPs those of the tensor-core products.
"""

from __future__ import annotations

import torch

from stss_kernels._core.aot import AotKernel, LaunchModel, Pointer, Problem, cdiv, round_up
from stss_kernels._core.chunking import rows_per_chunk
from stss_kernels._core.tiles import DOT_PRECISION, LOG2E
from stss_kernels.ops.tempered_kl.triton_backend import aot_v2, backward, forward, similarity_grad
from stss_kernels.ops.tempered_kl.triton_backend.tiles import NUM_STATS

OP = "tempered_kl"
# Bytes per row of the fp32 statistics one similarity-grad tile reads (4 of the 5), the row gradient and index.
_STATS_READ = 4 * 4
_ROW_EXTRAS = 4 + 4
# Default temperatures: only their type (fp32 scalars) reaches the compiler.
_SCALES = dict(scale_s=LOG2E / 0.5, scale_t=LOG2E / 0.1)


def _chunk_rows(num_tokens: int, dtype: torch.dtype) -> int:
    """Query rows per launch of the wide-feature backward, as feature_grad_by_chunks sizes them."""
    return rows_per_chunk(num_tokens, dtype.itemsize * similarity_grad._LIVE_BLOCKS)


def _sizes(problem: Problem) -> dict:
    return dict(N=problem.tokens, HW=problem.hw, Cs=problem.cs, Ct=problem.ct)


def _gram_flops(rows: int, keys: int, problem: Problem, block_k: int | None = None) -> float:
    """FLOPs of the student and teacher Gram products of rows x keys (channels padded to block_k if given)."""
    if block_k is None:
        return 2.0 * rows * keys * (problem.cs + problem.ct)
    return 2.0 * rows * keys * (round_up(problem.cs, block_k) + round_up(problem.ct, block_k))


def forward_arguments(problem: Problem, dtype: torch.dtype, masked: bool) -> dict:
    stats = Pointer(torch.float32)
    index = Pointer(torch.int32) if masked else stats
    return dict(
        student_ptr=Pointer(dtype), teacher_ptr=Pointer(dtype), index_ptr=index, count_ptr=index, stats_ptr=stats,
        **_sizes(problem), frames=problem.frames, **_SCALES,
        HAS_INDEX=masked, UPCAST=False, PRECISION=DOT_PRECISION,
    )  # fmt: skip


def forward_model(problem: Problem, dtype: torch.dtype, masked: bool, blocks: dict) -> LaunchModel:
    """One program per (query tile, target frame, video); each loads its query tile once per key tile."""
    bm, bn, bk = blocks["BLOCK_M"], blocks["BLOCK_N"], blocks["BLOCK_K"]
    n, hw, frames, batch = problem.tokens, problem.hw, problem.frames, problem.batch
    kept = problem.kept(masked)
    query_tiles, key_tiles = cdiv(kept, bm), cdiv(hw, bn)
    row_bytes = (problem.cs + problem.ct) * dtype.itemsize
    per_frame = (kept * key_tiles + query_tiles * hw) * row_bytes + kept * (NUM_STATS.value * 4 + (4 if masked else 0))
    return LaunchModel(
        programs=cdiv(n, bm) * frames * batch,
        flops=batch * _gram_flops(kept, n, problem),
        executed_flops=batch * frames * _gram_flops(query_tiles * bm, key_tiles * bn, problem, bk),
        bytes=batch * frames * per_frame,
    )


def feature_grad_arguments(column_pass: bool, for_teacher: bool):
    def arguments(problem: Problem, dtype: torch.dtype, masked: bool) -> dict:
        fp32 = Pointer(torch.float32)
        index = Pointer(torch.int32) if masked else fp32
        return dict(
            student_ptr=Pointer(dtype), teacher_ptr=Pointer(dtype), stats_ptr=fp32, row_grad_ptr=fp32,
            index_ptr=index, count_ptr=index, grad_ptr=fp32, **_sizes(problem), frames=problem.frames, **_SCALES,
            COLUMN_PASS=column_pass, FOR_TEACHER=for_teacher, HAS_INDEX=masked, UPCAST=False,
            PRECISION=DOT_PRECISION,
        )  # fmt: skip

    return arguments


def feature_grad_model(column_pass: bool, for_teacher: bool):
    """Fused backward pass (features up to FUSED_MAX_CHANNELS): the Gram tiles are recomputed per BLOCK_D slice."""

    def model(problem: Problem, dtype: torch.dtype, masked: bool, blocks: dict) -> LaunchModel | None:
        channels = problem.ct if for_teacher else problem.cs
        if channels > backward.FUSED_MAX_CHANNELS:
            return None
        bm, bn, bk, bd = blocks["BLOCK_M"], blocks["BLOCK_N"], blocks["BLOCK_K"], blocks["BLOCK_D"]
        n, hw, frames, batch = problem.tokens, problem.hw, problem.frames, problem.batch
        kept = problem.kept(masked)
        query_tiles, key_tiles, slices = cdiv(kept, bm), frames * cdiv(hw, bn), cdiv(channels, bd)
        size = dtype.itemsize
        row_bytes = (problem.cs + problem.ct) * size
        # Every (query tile, key tile) pair of every slice recomputes both Gram tiles.
        gram_bytes = slices * (key_tiles * kept * (row_bytes + _STATS_READ + _ROW_EXTRAS) + query_tiles * n * row_bytes)
        if column_pass:  # G^T x[rows]: x rows loaded per (key tile, query tile); fp32 result stored once
            product_bytes = key_tiles * kept * channels * size + n * channels * 4
            programs = key_tiles * slices
        else:  # G x[keys]: x keys loaded per (query tile, key tile); fp32 result read, added, stored
            product_bytes = query_tiles * n * channels * size + 2 * kept * channels * 4
            programs = cdiv(n, bm) * slices
        padded_rows, padded_keys = query_tiles * bm, key_tiles * bn
        return LaunchModel(
            programs=programs * batch,
            flops=batch * (_gram_flops(kept, n, problem) + 2.0 * kept * n * channels),
            executed_flops=batch * slices * (
                _gram_flops(padded_rows, padded_keys, problem, bk) + 2.0 * padded_rows * padded_keys * bd
            ),
            bytes=batch * (gram_bytes + product_bytes),
        )  # fmt: skip

    return model


def similarity_grad_arguments(for_teacher: bool):
    def arguments(problem: Problem, dtype: torch.dtype, masked: bool) -> dict:
        n = problem.tokens
        # The launcher passes per-video slices (student[b] ...): aligned when every video's offset is
        # (row_bytes per token; the statistics hold frames * NUM_STATS fp32 per token).
        video_aligned = lambda row_bytes: problem.batch == 1 or (n * row_bytes) % 16 == 0  # noqa: E731
        row_grad = Pointer(torch.float32, video_aligned(4))
        rows = min(_chunk_rows(n, dtype), problem.kept(masked))
        return dict(
            student_ptr=Pointer(dtype, video_aligned(problem.cs * dtype.itemsize)),
            teacher_ptr=Pointer(dtype, video_aligned(problem.ct * dtype.itemsize)),
            stats_ptr=Pointer(torch.float32, video_aligned(4 * problem.frames * NUM_STATS.value)),
            row_grad_ptr=row_grad,
            index_ptr=Pointer(torch.int32, video_aligned(4)) if masked else row_grad, out_ptr=Pointer(dtype),
            **_sizes(problem), **_SCALES, chunk_start=0, chunk_rows=rows,
            FOR_TEACHER=for_teacher, HAS_INDEX=masked, UPCAST=False, PRECISION=DOT_PRECISION,
        )  # fmt: skip

    return arguments


def similarity_grad_model(for_teacher: bool):
    """Wide-feature backward: dL/dS for chunks of kept rows, each tile once; the matmuls after it are not counted."""

    def model(problem: Problem, dtype: torch.dtype, masked: bool, blocks: dict) -> LaunchModel | None:
        channels = problem.ct if for_teacher else problem.cs
        if channels <= backward.FUSED_MAX_CHANNELS:
            return None
        bm, bn, bk = blocks["BLOCK_M"], blocks["BLOCK_N"], blocks["BLOCK_K"]
        n, hw, frames, batch = problem.tokens, problem.hw, problem.frames, problem.batch
        kept = problem.kept(masked)
        key_tiles = frames * cdiv(hw, bn)
        step = _chunk_rows(n, dtype)
        chunks = [min(step, kept - start) for start in range(0, kept, step)]
        row_bytes = (problem.cs + problem.ct) * dtype.itemsize
        per_video = sum(
            key_tiles * rows * (row_bytes + _STATS_READ + _ROW_EXTRAS) + cdiv(rows, bm) * n * row_bytes
            + rows * n * dtype.itemsize
            for rows in chunks
        )  # fmt: skip
        padded_rows = sum(cdiv(rows, bm) * bm for rows in chunks)
        return LaunchModel(
            programs=batch * sum(cdiv(rows, bm) for rows in chunks) * key_tiles,
            flops=batch * _gram_flops(kept, n, problem),
            executed_flops=batch * _gram_flops(padded_rows, key_tiles * bn, problem, bk),
            bytes=batch * per_video,
        )

    return model


def _autotuned(kernel) -> tuple[object, list]:
    """The JITFunction under an @triton.autotune and its config list (the GPU list unless TRITON_INTERPRET=1)."""
    return kernel.fn, list(kernel.configs)


def aot_kernels() -> list[AotKernel]:
    """Every tempered-KL kernel variant: generation 1 (forward, fused backward in 4 passes, wide-feature backward
    for 2 sides), then generation 2 (aot_v2.py)."""
    kernels = []
    fn, configs = _autotuned(forward._tempered_kl_forward_kernel)
    kernels.append(AotKernel(OP, "forward", "-", fn, configs, forward_arguments, forward_model))
    fn, configs = _autotuned(backward._feature_grad_kernel)
    for column_pass in (True, False):
        for for_teacher in (False, True):
            variant = f"{'column' if column_pass else 'row'}/{'teacher' if for_teacher else 'student'}"
            arguments = feature_grad_arguments(column_pass, for_teacher)
            model = feature_grad_model(column_pass, for_teacher)
            kernels.append(AotKernel(OP, "feature_grad", variant, fn, configs, arguments, model))
    fn, configs = _autotuned(similarity_grad._similarity_grad_kernel)
    for for_teacher in (False, True):
        side = "teacher" if for_teacher else "student"
        arguments, model = similarity_grad_arguments(for_teacher), similarity_grad_model(for_teacher)
        kernels.append(AotKernel(OP, "similarity_grad", side, fn, configs, arguments, model))
    return kernels + aot_v2.aot_kernels()
