"""The relation-distance kernels as `python -m bench.compile` compiles them ahead of time, with a static cost model.

Arguments mirror the launchers in forward.py and backward.py; the configs are the `@triton.autotune` lists
themselves. The variant ("full", "spatial", "temporal") is a constexpr, so each is its own compile. Byte counts
are what the programs load and store (every tile load counted: L2 -> SM traffic), FLOPs those of the
tensor-core products. A "spatial" query tile is paired with about HW + BLOCK_M / q keys (its rows' frames; q
the kept fraction); the backward's key loop and the column pass's query loop are modelled the same way.
"""

from __future__ import annotations

import torch

from stss_kernels._core.aot import AotKernel, LaunchModel, Pointer, Problem, cdiv, round_up
from stss_kernels._core.chunking import rows_per_chunk
from stss_kernels._core.tiles import DOT_PRECISION
from stss_kernels.ops.relation_distance.pairs import VARIANTS, pair_count
from stss_kernels.ops.relation_distance.triton_backend import backward, forward, sign_block
from stss_kernels.ops.relation_distance.triton_backend.tiles import VARIANT_IDS

OP = "relation_distance"
# H100 SXM multiprocessors, for the forward's key-split plan.
MULTIPROCESSORS = 132
_MARGIN = 0.1  # only its type (an fp32 scalar) reaches the compiler


def _sizes(problem: Problem) -> dict:
    return dict(N=problem.tokens, HW=problem.hw, Cs=problem.cs, Ct=problem.ct)


def _keys_per_query_tile(problem: Problem, variant: str, masked: bool, block_m: int) -> int:
    """Keys one query tile is paired with: all N, or its rows' frames for "spatial"."""
    if variant != "spatial":
        return problem.tokens
    span = block_m * problem.tokens / problem.kept(masked)  # tokens the tile's kept rows are spread over
    return min(problem.tokens, int(problem.hw + span))


def _gram_flops(rows: int, keys: int, problem: Problem, block_k: int | None = None) -> float:
    if block_k is None:
        return 2.0 * rows * keys * (problem.cs + problem.ct)
    return 2.0 * rows * keys * (round_up(problem.cs, block_k) + round_up(problem.ct, block_k))


def forward_arguments(variant: str):
    def arguments(problem: Problem, dtype: torch.dtype, masked: bool) -> dict:
        sums = Pointer(torch.float32)
        index = Pointer(torch.int32) if masked else sums
        splits = forward.plan_key_splits(problem.batch, problem.tokens, problem.frames, variant, MULTIPROCESSORS)
        return dict(
            student_ptr=Pointer(dtype), teacher_ptr=Pointer(dtype), index_ptr=index, count_ptr=index, sums_ptr=sums,
            **_sizes(problem), splits=splits, margin=_MARGIN,
            VARIANT=VARIANT_IDS[variant], HAS_INDEX=masked, UPCAST=False, PRECISION=DOT_PRECISION,
        )  # fmt: skip

    return arguments


def forward_model(variant: str):
    """One program per (query tile, key split, video); each loads its query tile again for every key tile."""

    def model(problem: Problem, dtype: torch.dtype, masked: bool, blocks: dict) -> LaunchModel | None:
        if pair_count(variant, problem.tokens, problem.frames) == 0:
            return None
        bm, bn, bk = blocks["BLOCK_M"], blocks["BLOCK_N"], blocks["BLOCK_K"]
        kept, batch = problem.kept(masked), problem.batch
        splits = forward.plan_key_splits(batch, problem.tokens, problem.frames, variant, MULTIPROCESSORS)
        query_tiles = cdiv(kept, bm)
        key_tiles = cdiv(_keys_per_query_tile(problem, variant, masked, bm), bn)
        row_bytes = (problem.cs + problem.ct) * dtype.itemsize
        return LaunchModel(
            programs=cdiv(problem.tokens, bm) * splits * batch,
            flops=batch * _gram_flops(kept, pair_count(variant, problem.tokens, problem.frames), problem),
            executed_flops=batch * _gram_flops(query_tiles * bm, key_tiles * bn, problem, bk),
            bytes=batch * (query_tiles * key_tiles * (bm + bn) * row_bytes + splits * problem.tokens * 4),
        )

    return model


def grad_arguments(variant: str, column_pass: bool, symmetric: bool, for_teacher: bool):
    def arguments(problem: Problem, dtype: torch.dtype, masked: bool) -> dict:
        fp32 = Pointer(torch.float32)
        index = Pointer(torch.int32) if masked else fp32
        return dict(
            student_ptr=Pointer(dtype), teacher_ptr=Pointer(dtype), row_grad_ptr=fp32, index_ptr=index,
            count_ptr=index, grad_ptr=fp32, **_sizes(problem), margin=_MARGIN,
            VARIANT=VARIANT_IDS[variant], COLUMN_PASS=column_pass, SYMMETRIC=symmetric, FOR_TEACHER=for_teacher,
            HAS_INDEX=masked, UPCAST=False, PRECISION=DOT_PRECISION,
        )  # fmt: skip

    return arguments


def grad_model(variant: str, column_pass: bool, symmetric: bool, for_teacher: bool):
    """A backward pass: every (query tile, key tile) pair recomputes both Gram tiles once per BLOCK_D slice."""

    def model(problem: Problem, dtype: torch.dtype, masked: bool, blocks: dict) -> LaunchModel | None:
        if pair_count(variant, problem.tokens, problem.frames) == 0 or (symmetric and column_pass):
            return None
        if (problem.ct if for_teacher else problem.cs) > backward.FUSED_MAX_CHANNELS:
            return None
        bm, bn, bk, bd = blocks["BLOCK_M"], blocks["BLOCK_N"], blocks["BLOCK_K"], blocks["BLOCK_D"]
        n, batch, kept = problem.tokens, problem.batch, problem.kept(masked)
        channels = problem.ct if for_teacher else problem.cs
        size = dtype.itemsize
        row_bytes = (problem.cs + problem.ct) * size
        slices = cdiv(channels, bd)
        query_tiles = cdiv(kept, bm)
        tile_pairs = query_tiles * cdiv(_keys_per_query_tile(problem, variant, masked, bm), bn)
        if column_pass:  # G^T x[rows]: x rows loaded per tile pair; fp32 result stored once
            product_bytes = tile_pairs * bm * bd * size + n * channels * 4
            programs = cdiv(n, bn) * slices
        else:  # G x[keys]: x keys loaded per tile pair; fp32 result written (symmetric) or read, added, stored
            product_bytes = tile_pairs * bn * bd * size + (1 if symmetric else 2) * kept * channels * 4
            programs = cdiv(n, bm) * slices
        pairs = pair_count(variant, n, problem.frames)
        return LaunchModel(
            programs=programs * batch,
            flops=batch * (_gram_flops(kept, pairs, problem) + 2.0 * kept * pairs * channels),
            executed_flops=batch * slices * tile_pairs * (
                _gram_flops(bm, bn, problem, bk) + 2.0 * bm * bn * bd
            ),
            bytes=batch * slices * (tile_pairs * (bm + bn) * row_bytes + product_bytes),
        )  # fmt: skip

    return model


def _chunk_rows(num_tokens: int, dtype: torch.dtype) -> int:
    """Query rows per launch of the wide-feature backward, as feature_grads_by_chunks sizes them."""
    return rows_per_chunk(num_tokens, dtype.itemsize * sign_block._LIVE_BLOCKS)


def sign_block_arguments(variant: str):
    def arguments(problem: Problem, dtype: torch.dtype, masked: bool) -> dict:
        n = problem.tokens
        # The launcher passes per-video slices (student[b] ...): aligned when every video's offset is.
        video_aligned = lambda row_bytes: problem.batch == 1 or (n * row_bytes) % 16 == 0  # noqa: E731
        rows = min(_chunk_rows(n, dtype), problem.kept(masked))
        return dict(
            student_ptr=Pointer(dtype, video_aligned(problem.cs * dtype.itemsize)),
            teacher_ptr=Pointer(dtype, video_aligned(problem.ct * dtype.itemsize)),
            index_ptr=Pointer(torch.int32, video_aligned(4)) if masked else Pointer(torch.float32, video_aligned(4)),
            out_ptr=Pointer(dtype), **_sizes(problem), margin=_MARGIN, chunk_start=0, chunk_rows=rows,
            VARIANT=VARIANT_IDS[variant], HAS_INDEX=masked, UPCAST=False, PRECISION=DOT_PRECISION,
        )  # fmt: skip

    return arguments


def sign_block_model(variant: str):
    """Wide-feature backward (student wider than FUSED_MAX_CHANNELS): the sign matrix of every chunk of kept rows,
    each tile once; the matmuls after it are not counted."""

    def model(problem: Problem, dtype: torch.dtype, masked: bool, blocks: dict) -> LaunchModel | None:
        if problem.cs <= backward.FUSED_MAX_CHANNELS or pair_count(variant, problem.tokens, problem.frames) == 0:
            return None
        bm, bn, bk = blocks["BLOCK_M"], blocks["BLOCK_N"], blocks["BLOCK_K"]
        n, batch, kept = problem.tokens, problem.batch, problem.kept(masked)
        step = _chunk_rows(n, dtype)
        chunks = [min(step, kept - start) for start in range(0, kept, step)]
        keys = _keys_per_query_tile(problem, variant, masked, bm)  # tiles outside the pairs store zeros only
        row_bytes = (problem.cs + problem.ct) * dtype.itemsize
        per_video = sum(
            cdiv(rows, bm) * cdiv(keys, bn) * (bm + bn) * row_bytes + rows * n * dtype.itemsize for rows in chunks
        )
        padded_rows = sum(cdiv(rows, bm) * bm for rows in chunks)
        return LaunchModel(
            programs=batch * sum(cdiv(rows, bm) for rows in chunks) * cdiv(n, bn),
            flops=batch * _gram_flops(kept, pair_count(variant, n, problem.frames), problem),
            executed_flops=batch * _gram_flops(padded_rows, cdiv(keys, bn) * bn, problem, bk),
            bytes=batch * per_video,
        )

    return model


def _autotuned(kernel) -> tuple[object, list]:
    """The JITFunction under an @triton.autotune and its config list (the GPU list unless TRITON_INTERPRET=1)."""
    return kernel.fn, list(kernel.configs)


def aot_kernels() -> list[AotKernel]:
    """Every relation-distance kernel variant: the forward per pair variant, and per pair variant the fused
    backward's column and row passes (general G) and its single symmetric row pass for each side, and the
    wide-feature backward's sign block."""
    kernels = []
    fn, configs = _autotuned(forward._relation_distance_forward_kernel)
    for variant in VARIANTS:
        kernels.append(
            AotKernel(OP, "forward", variant, fn, forward.forward_configs(variant), forward_arguments(variant),
                      forward_model(variant))
        )
    fn, configs = _autotuned(backward._relation_distance_grad_kernel)
    passes = (("column", True, False), ("row", False, False), ("symmetric-row", False, True))
    for variant in VARIANTS:
        for pass_name, column_pass, symmetric in passes:
            for for_teacher in (False, True):
                name = f"{variant}/{pass_name}/{'teacher' if for_teacher else 'student'}"
                flags = (variant, column_pass, symmetric, for_teacher)
                kernels.append(AotKernel(OP, "grad", name, fn, configs, grad_arguments(*flags), grad_model(*flags)))
    fn, configs = _autotuned(sign_block._sign_block_kernel)
    for variant in VARIANTS:
        arguments, model = sign_block_arguments(variant), sign_block_model(variant)
        kernels.append(AotKernel(OP, "sign_block", variant, fn, configs, arguments, model))
    return kernels
