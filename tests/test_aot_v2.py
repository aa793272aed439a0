"""The generation-2 kernels' AOT declarations: arguments match the kernels, the models cover what is launched."""

from __future__ import annotations

import inspect

import pytest
import torch

from stss_kernels._core.aot import Pointer, Problem
from stss_kernels.ops.tempered_kl.triton_backend import aot_v2

PROBLEMS = [Problem("tsa-grid", 4, 24, 150, 768, 768), Problem("tsa-grid-c64", 4, 24, 150, 64, 64),
            Problem("cogvideox-native", 1, 13, 1350, 768, 768, mask_ratio=0.2)]  # fmt: skip


@pytest.mark.parametrize("problem", PROBLEMS, ids=lambda p: p.name)
@pytest.mark.parametrize("masked", [False, True])
def test_arguments_name_every_kernel_parameter(problem, masked):
    for kernel in aot_v2.aot_kernels():
        if masked not in kernel.masks:
            continue
        arguments = kernel.arguments(problem, torch.bfloat16, masked)
        for config in kernel.configs:
            names = set(inspect.signature(getattr(kernel.kernel, "fn", kernel.kernel)).parameters)
            assert set(arguments) | set(config.kwargs) == names, (kernel.name, kernel.variant)
            assert not set(arguments) & set(config.kwargs)
        assert isinstance(arguments["student_ptr" if "student_ptr" in arguments else "block_ptr"], Pointer)


@pytest.mark.parametrize("problem", PROBLEMS, ids=lambda p: p.name)
def test_models_cover_the_launched_kernels(problem):
    """Exactly the kernels the launcher runs at this width have a model; FLOPs as the loss needs them."""
    narrow = problem.cs <= 128
    modelled = set()
    for kernel in aot_v2.aot_kernels():
        masked = problem.mask_ratio < 1
        if masked not in kernel.masks:
            continue
        model = kernel.model(problem, torch.bfloat16, masked, dict(kernel.configs[0].kwargs))
        if model is None:
            continue
        modelled.add(kernel.name)
        assert model.programs > 0 and model.bytes > 0 and model.executed_flops >= 0.99 * model.flops > 0
        if kernel.name == "forward_v2":
            kept = problem.kept(masked)
            assert model.flops == pytest.approx(2 * problem.batch * kept * problem.tokens * (problem.cs + problem.ct))
    if narrow:
        assert modelled == {"forward_v2", "feature_grad_v2"}
    else:
        expected = {"forward_v2", "similarity_grad_v2", "dual_product"} | ({"row_product"} if masked else set())
        assert modelled == expected
