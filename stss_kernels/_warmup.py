"""`stss_kernels.warmup`: tune the Triton kernels' launch configs for given shapes ahead of time."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch

from stss_kernels._core.backends import triton_interpreting
from stss_kernels._core.tuning import tuned_configs
from stss_kernels.ops import op_specs


def warmup(
    shapes: Iterable[Sequence[int]],
    *,
    dtypes: Iterable[torch.dtype] = (torch.bfloat16,),
    mask_ratios: Iterable[float | None] = (None,),
    backward: bool = True,
    teacher_grad: bool = False,
    device: torch.device | str = "cuda",
    ops: Iterable[str] | None = None,
) -> dict[str, dict]:
    """Run each op (backend="triton", its default settings) once per shape, dtype and mask setting so every
    kernel it launches is tuned now, outside any CUDA-graph capture or torch.compile region; later calls of
    the same shape class reuse the configs. Returns {kernel: {shape class: config}} of everything tuned so far.

    shapes: (batch, frames, hw, cs, ct) each; mask_ratios: None for unmasked, or the kept fraction of queries
    (masked launches are a separate class); backward: also run the backward (student gradient; teacher too
    with teacher_grad); ops: names from stss_kernels.ops.OP_NAMES (None: every op with Triton kernels).
    """
    specs = op_specs()
    ops = [name for name, spec in specs.items() if spec.triton_kernels] if ops is None else list(ops)
    for name in ops:
        if name not in specs or not specs[name].triton_kernels:
            raise ValueError(f"ops: expected names of ops with Triton kernels {tuple(specs)}, got {name!r}")
    device = torch.device(device)
    if device.type != "cuda" and not triton_interpreting():
        raise ValueError(f"device: warmup tunes GPU kernels and needs a CUDA device, got {device}")
    generator = torch.Generator().manual_seed(0)
    for shape in shapes:
        if len(shape) != 5 or any(int(size) < 1 for size in shape):
            raise ValueError(f"shapes: expected (batch, frames, hw, cs, ct) positive ints, got {tuple(shape)}")
        batch, frames, hw, cs, ct = (int(size) for size in shape)
        tokens = frames * hw
        for dtype in dtypes:
            for ratio in mask_ratios:
                student = torch.randn(batch, tokens, cs, generator=generator).to(device, dtype)
                teacher = torch.randn(batch, tokens, ct, generator=generator).to(device, dtype)
                student.requires_grad_(backward)
                teacher.requires_grad_(backward and teacher_grad)
                mask = None
                if ratio is not None:
                    mask = (torch.rand(batch, tokens, generator=generator) < ratio).to(device)
                for name in ops:
                    spec = specs[name]
                    loss = spec.function(student, teacher, frames=frames, query_mask=mask, backend="triton",
                                         **spec.keyword_arguments())  # fmt: skip
                    if backward:
                        loss.backward()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return tuned_configs()
