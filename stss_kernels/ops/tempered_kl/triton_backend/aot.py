"""The tempered-KL kernels as `python -m bench.compile` compiles them ahead of time, with their static cost model.

`aot_kernels()` returns one AotKernel per kernel variant, arguments as the
launchers in forward.py / backward.py pass them, and a LaunchModel of every launch in one loss call. Bytes
are what the programs load and store (every tile load counted: L2 -> SM traffic), FLOPs those of the
tensor-core products; executed FLOPs include padded rows, keys and channels.
"""

from __future__ import annotations

import dataclasses

import torch

from stss_kernels._core.aot import AotKernel, LaunchModel, Pointer, Problem, cdiv, round_up
from stss_kernels._core.tiles import DOT_PRECISION, LOG2E
from stss_kernels._core.tuning import next_power_of_two
from stss_kernels.ops.tempered_kl.triton_backend import backward, forward

OP = "tempered_kl"
_SCALES = dict(scale_s=LOG2E / 0.5, scale_t=LOG2E / 0.1)
# fp32 statistics one dL/dS tile reads per row (4 of the 5), and the row gradient + kept-query index.
_STATS_READ = 4 * 4
_ROW_EXTRAS = 4 + 4


def _sizes(problem: Problem) -> dict:
    return dict(N=problem.tokens, HW=problem.hw, Cs=problem.cs, Ct=problem.ct)


def _key_tiles(hw: int, block_n: int, block_tail: int) -> tuple[int, int, int]:
    """(full tiles, tail tiles, padded keys) of one frame walked in BLOCK_N then BLOCK_TAIL tiles."""
    full = hw // block_n
    tails = cdiv(hw - full * block_n, block_tail)
    return full, tails, full * block_n + tails * block_tail


def _channels(problem: Problem, pad: int | None) -> int:
    """Cs + Ct as the tiles compute them: padded to a multiple of `pad` (a BLOCK_K), or to powers of two (narrow)."""
    if pad is None:
        return max(16, next_power_of_two(problem.cs)) + max(16, next_power_of_two(problem.ct))
    return round_up(problem.cs, pad) + round_up(problem.ct, pad)


def _as_launched(problem: Problem, narrow: bool) -> Problem:
    """The problem a variant is compiled at: the preset's, or 64 channels for a narrow variant at a wide preset
    (768 for a wide one at a narrow preset): the launcher never runs it there, and its model is None."""
    if narrow != forward.is_narrow(problem.cs, problem.ct):
        channels = 64 if narrow else 768
        return dataclasses.replace(problem, cs=channels, ct=channels)
    return problem


def forward_arguments(narrow: bool):
    def arguments(problem: Problem, dtype: torch.dtype, masked: bool) -> dict:
        problem = _as_launched(problem, narrow)
        stats = Pointer(torch.float32)
        index = Pointer(torch.int32) if masked else stats
        constants = forward.forward_constants(problem.cs, problem.ct, masked)
        constants["UPCAST"] = False
        return dict(
            student_ptr=Pointer(dtype), teacher_ptr=Pointer(dtype), index_ptr=index, count_ptr=index, stats_ptr=stats,
            **_sizes(problem), frames=problem.frames, **_SCALES, **constants,
        )  # fmt: skip

    return arguments


def forward_model(narrow: bool):
    """One program per (query tile, frame): resident query tiles (narrow) or a query re-read per key tile (wide)."""

    def model(problem: Problem, dtype: torch.dtype, masked: bool, blocks: dict) -> LaunchModel | None:
        if forward.is_narrow(problem.cs, problem.ct) != narrow:
            return None
        bm, bn, bt = blocks["BLOCK_M"], blocks["BLOCK_N"], blocks["BLOCK_TAIL"]
        n, hw, frames, batch = problem.tokens, problem.hw, problem.frames, problem.batch
        kept = problem.kept(masked)
        query_tiles = cdiv(kept, bm)
        full, tails, padded = _key_tiles(hw, bn, bt)
        row_bytes = (problem.cs + problem.ct) * dtype.itemsize
        query_loads = 1 if narrow else full + tails
        # Masked-off (padded) keys are not fetched: each query tile streams the frame's hw key rows.
        per_frame = (kept * query_loads + query_tiles * hw) * row_bytes + kept * (5 * 4 + (4 if masked else 0))
        channels = _channels(problem, None if narrow else blocks["BLOCK_K"])
        return LaunchModel(
            programs=cdiv(n, bm) * frames * batch,
            flops=batch * 2.0 * kept * n * (problem.cs + problem.ct),
            executed_flops=batch * frames * 2.0 * query_tiles * bm * padded * channels,
            bytes=batch * frames * per_frame,
        )

    return model


def feature_grad_arguments(column_pass: bool, for_teacher: bool):
    def arguments(problem: Problem, dtype: torch.dtype, masked: bool) -> dict:
        problem = _as_launched(problem, True)
        fp32 = Pointer(torch.float32)
        index = Pointer(torch.int32) if masked else fp32
        return dict(
            student_ptr=Pointer(dtype), teacher_ptr=Pointer(dtype), stats_ptr=fp32, row_grad_ptr=fp32,
            index_ptr=index, count_ptr=index, grad_ptr=fp32, **_sizes(problem), frames=problem.frames, **_SCALES,
            COLUMN_PASS=column_pass, FOR_TEACHER=for_teacher, HAS_INDEX=masked, UPCAST=False,
            PRECISION=DOT_PRECISION, **backward.narrow_constants(problem.cs, problem.ct, for_teacher),
        )  # fmt: skip

    return arguments


def feature_grad_model(column_pass: bool, for_teacher: bool):
    """Narrow fused pass: whole output rows per program, own tiles resident, the Gram tile reused by the product."""

    def model(problem: Problem, dtype: torch.dtype, masked: bool, blocks: dict) -> LaunchModel | None:
        if not forward.is_narrow(problem.cs, problem.ct):
            return None
        bm, bn, bt = blocks["BLOCK_M"], blocks["BLOCK_N"], blocks["BLOCK_TAIL"]
        n, hw, frames, batch = problem.tokens, problem.hw, problem.frames, problem.batch
        channels = problem.ct if for_teacher else problem.cs
        padded_out = max(16, next_power_of_two(channels))
        kept = problem.kept(masked)
        query_tiles = cdiv(kept, bm)
        row_bytes = (problem.cs + problem.ct) * dtype.itemsize
        gram_channels = _channels(problem, None)
        if column_pass:  # program per key tile (BLOCK_N per frame, padded); query tiles stream past
            key_tiles = frames * cdiv(hw, bn)
            padded_keys = key_tiles * bn
            moved = frames * hw * (row_bytes + channels * 4) + key_tiles * kept * (
                row_bytes + _STATS_READ + _ROW_EXTRAS
            )
            programs = key_tiles
        else:  # program per query tile; every frame's keys stream past (BLOCK_N then BLOCK_TAIL tiles)
            full, tails, padded = _key_tiles(hw, bn, bt)
            padded_keys = frames * padded
            tiles_per_query_tile = frames * (full + tails)
            moved = kept * row_bytes + query_tiles * (n * row_bytes + tiles_per_query_tile * bm * _STATS_READ)
            moved += kept * (_ROW_EXTRAS + 2 * channels * 4)
            programs = cdiv(n, bm)
        padded_rows = query_tiles * bm
        return LaunchModel(
            programs=programs * batch,
            flops=batch * 2.0 * kept * n * (problem.cs + problem.ct + channels),
            executed_flops=batch * 2.0 * padded_rows * padded_keys * (gram_channels + padded_out),
            bytes=batch * moved,
        )

    return model


def _chunks(problem: Problem, dtype: torch.dtype) -> list[int]:
    """Kept positions per launch of the wide backward (every video at once), as tempered_kl_feature_grad cuts."""
    n = problem.tokens
    step = backward.chunk_rows(problem.batch, n, dtype)
    return [min(step, n - start) for start in range(0, n, step)]


def similarity_grad_arguments(for_teacher: bool):
    def arguments(problem: Problem, dtype: torch.dtype, masked: bool) -> dict:
        problem = _as_launched(problem, False)
        fp32 = Pointer(torch.float32)
        index = Pointer(torch.int32) if masked else fp32
        return dict(
            student_ptr=Pointer(dtype), teacher_ptr=Pointer(dtype), stats_ptr=fp32, row_grad_ptr=fp32,
            index_ptr=index, count_ptr=index, out_ptr=Pointer(dtype), **_sizes(problem), frames=problem.frames,
            **_SCALES, chunk_start=0, chunk_rows=_chunks(problem, dtype)[0],
            FOR_TEACHER=for_teacher, HAS_INDEX=masked, UPCAST=False, PRECISION=DOT_PRECISION,
        )  # fmt: skip

    return arguments


def similarity_grad_model(for_teacher: bool):
    """Wide backward, step 1: dL/dS of each chunk's kept rows against all keys, each tile once, in the input dtype."""

    def model(problem: Problem, dtype: torch.dtype, masked: bool, blocks: dict) -> LaunchModel | None:
        if forward.is_narrow(problem.cs, problem.ct):
            return None
        bm, bn, bk = blocks["BLOCK_M"], blocks["BLOCK_N"], blocks["BLOCK_K"]
        n, hw, frames, batch = problem.tokens, problem.hw, problem.frames, problem.batch
        kept = problem.kept(masked)
        key_tiles = frames * cdiv(hw, bn)
        row_bytes = (problem.cs + problem.ct) * dtype.itemsize
        rows_done, moved, padded_rows = 0, 0.0, 0
        for rows in _chunks(problem, dtype):
            live = max(0, min(rows, kept - rows_done))
            rows_done += rows
            padded_rows += cdiv(live, bm) * bm
            moved += key_tiles * live * (row_bytes + _STATS_READ + _ROW_EXTRAS) + cdiv(live, bm) * n * row_bytes
            moved += live * n * dtype.itemsize
        return LaunchModel(
            programs=batch * sum(cdiv(rows, bm) for rows in _chunks(problem, dtype)) * key_tiles,
            flops=batch * 2.0 * kept * n * (problem.cs + problem.ct),
            executed_flops=batch * 2.0 * padded_rows * key_tiles * bn * _channels(problem, bk),
            bytes=batch * moved,
        )

    return model


def product_arguments(row_kernel: bool, for_teacher: bool):
    def arguments(problem: Problem, dtype: torch.dtype, masked: bool) -> dict:
        problem = _as_launched(problem, False)
        fp32 = Pointer(torch.float32)
        index = Pointer(torch.int32) if masked else fp32
        values = dict(
            block_ptr=Pointer(dtype), features_ptr=Pointer(dtype), index_ptr=index, count_ptr=index, grad_ptr=fp32,
            N=problem.tokens, C=problem.ct if for_teacher else problem.cs, chunk_start=0,
            chunk_rows=_chunks(problem, dtype)[0], UPCAST=False, PRECISION=DOT_PRECISION,
        )  # fmt: skip
        if not row_kernel:
            values.update(HAS_INDEX=masked, ACCUMULATE=False)
        return values

    return arguments


def product_model(row_kernel: bool, for_teacher: bool):
    """Wide backward, step 2: fp32 tiles of G^T x[rows] (+ G x when unmasked; the row kernel adds G x when masked)."""

    def model(problem: Problem, dtype: torch.dtype, masked: bool, blocks: dict) -> LaunchModel | None:
        if forward.is_narrow(problem.cs, problem.ct) or (row_kernel and not masked):
            return None
        bm, bd = blocks["BLOCK_M"], blocks["BLOCK_D"]
        n, batch, size = problem.tokens, problem.batch, dtype.itemsize
        channels = problem.ct if for_teacher else problem.cs
        kept = problem.kept(masked)
        channel_tiles = cdiv(channels, bd)
        moved, executed, programs, rows_done = 0.0, 0.0, 0, 0
        for index, rows in enumerate(_chunks(problem, dtype)):
            live = max(0, min(rows, kept - rows_done))
            rows_done += rows
            if row_kernel:  # kept row tiles x channel tiles, each streaming all N keys; fp32 read-add-store
                tiles = cdiv(live, bm) * channel_tiles
                moved += tiles * (n * (bm + bd) * size + bm * bd * 8)
                executed += tiles * 2.0 * bm * n * bd
                programs += cdiv(rows, bm) * channel_tiles
                continue
            tiles = cdiv(n, bm) * channel_tiles
            moved += tiles * (live * (bm + bd) * size + bm * bd * (4 if index == 0 else 8))
            executed += tiles * 2.0 * live * bm * bd
            if not masked:  # token tiles inside the chunk also stream their G rows against all keys
                row_tiles = cdiv(live, bm) * channel_tiles
                moved += row_tiles * n * (bm + bd) * size
                executed += row_tiles * 2.0 * bm * n * bd
            programs += tiles
        products = 1 if (row_kernel or masked) else 2
        return LaunchModel(
            programs=batch * programs,
            flops=batch * 2.0 * kept * n * channels * products,
            executed_flops=batch * executed,
            bytes=batch * moved,
        )

    return model


def aot_kernels() -> list[AotKernel]:
    """Every tempered-KL kernel variant.

    A `model` that returns None marks a variant the launcher does not use at that problem (e.g. the narrow forward
    at C = 768; its arguments then describe it at 64 channels, as it is launched).
    """
    kernels = []
    for narrow in (True, False):
        configs = forward.FORWARD[narrow].configs
        kernels.append(
            AotKernel(OP, "forward", "narrow" if narrow else "wide", forward._tempered_kl_forward_kernel,
                      configs, forward_arguments(narrow), forward_model(narrow))
        )  # fmt: skip
    for column_pass in (True, False):
        for for_teacher in (False, True):
            variant = f"{'column' if column_pass else 'row'}/{'teacher' if for_teacher else 'student'}"
            kernels.append(
                AotKernel(OP, "feature_grad", variant, backward._feature_grad_kernel,
                          backward.FEATURE_GRAD[column_pass].configs,
                          feature_grad_arguments(column_pass, for_teacher),
                          feature_grad_model(column_pass, for_teacher))
            )  # fmt: skip
    for for_teacher in (False, True):
        side = "teacher" if for_teacher else "student"
        kernels.append(
            AotKernel(OP, "similarity_grad", side, backward._similarity_grad_kernel,
                      backward.SIMILARITY_GRAD.configs, similarity_grad_arguments(for_teacher),
                      similarity_grad_model(for_teacher))
        )  # fmt: skip
        kernels.append(
            AotKernel(OP, "dual_product", side, backward._dual_product_kernel, backward.DUAL_PRODUCT.configs,
                      product_arguments(False, for_teacher), product_model(False, for_teacher))
        )  # fmt: skip
        kernels.append(
            AotKernel(OP, "row_product", side, backward._row_product_kernel, backward.ROW_PRODUCT.configs,
                      product_arguments(True, for_teacher), product_model(True, for_teacher), masks=(True,))
        )  # fmt: skip
    return kernels
