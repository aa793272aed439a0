"""What an op's Triton backend declares so its kernels can be compiled ahead of time (`python -m bench.compile`).

Each `triton_backend` package exposes `aot_kernels() -> list[AotKernel]`: one entry per kernel variant (a set of
non-block constexprs, e.g. the column or row pass), with the kernel, its full GPU autotune list, the runtime
arguments its launcher passes at a given problem size, and a static byte / FLOP model of the launches.
Nothing here needs a GPU, and nothing runs a kernel.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence

import torch

# Triton's pointer-type names of the tensors the kernels take.
TRITON_DTYPES = {
    torch.float32: "fp32",
    torch.float16: "fp16",
    torch.bfloat16: "bf16",
    torch.int32: "i32",
    torch.int64: "i64",
}


@dataclasses.dataclass(frozen=True)
class Pointer:
    """A tensor argument: its dtype, and whether its address is a multiple of 16 bytes (Triton specialises on it)."""

    dtype: torch.dtype
    aligned: bool = True

    @property
    def triton_type(self) -> str:
        return "*" + TRITON_DTYPES[self.dtype]


@dataclasses.dataclass(frozen=True)
class Problem:
    """One loss call: student (batch, frames * hw, cs), teacher (batch, frames * hw, ct); kept queries per video."""

    name: str
    batch: int
    frames: int
    hw: int
    cs: int
    ct: int
    mask_ratio: float = 1.0

    @property
    def tokens(self) -> int:
        return self.frames * self.hw

    def kept(self, masked: bool) -> int:
        """Queries each video's kernels visit: all N unmasked, round(mask_ratio * N) (at least 1) masked."""
        return max(1, round(self.mask_ratio * self.tokens)) if masked else self.tokens


@dataclasses.dataclass(frozen=True)
class LaunchModel:
    """Static model of every launch of one kernel variant in one loss call (all videos, all chunks).

    flops: the math the step needs (real rows, keys and channels, each product once); executed_flops: what the
    tiles compute (padded tiles and recomputation included); bytes: global-memory reads and writes as the
    programs issue them (L2 -> SM traffic; DRAM traffic is lower when L2 hits).
    """

    programs: int
    flops: float
    executed_flops: float
    bytes: float

    @property
    def intensity(self) -> float:
        """Executed FLOPs per byte moved: where the kernel sits on the roofline."""
        return self.executed_flops / self.bytes if self.bytes else 0.0


@dataclasses.dataclass(frozen=True)
class AotKernel:
    """One kernel variant to compile for every config, dtype and mask setting.

    arguments(problem, dtype, masked) -> {parameter: value} as the launcher passes them, block sizes excepted
    (Pointer for tensors, Python numbers for scalars and constexprs). model(problem, dtype, masked, blocks) ->
    LaunchModel, or None when the op does not launch this variant at that problem (e.g. the fused backward
    above its channel limit).
    """

    op: str
    name: str
    variant: str
    kernel: object  # a triton JITFunction
    configs: Sequence  # triton.Config: block sizes, num_warps, num_stages
    arguments: Callable[[Problem, torch.dtype, bool], dict]
    model: Callable[[Problem, torch.dtype, bool, dict], LaunchModel | None]
    masks: tuple[bool, ...] = (False, True)


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def round_up(a: int, b: int) -> int:
    return cdiv(a, b) * b
