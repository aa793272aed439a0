"""stss_kernels._core.library.define_fused_op on a toy op: rows (B, N) = w_row * sum_c x^3, one differentiable input,
no residuals (the single-output, single-gradient form; tempered_kl's backends cover the tuple form)."""

from __future__ import annotations

import pytest
import torch

from stss_kernels._core.library import define_fused_op, host_sync_allowed


def _forward(x, scale):
    return (x**3).sum(-1) * scale


def _backward(grad_rows, x, scale, need_x):
    if not need_x:
        return x.new_empty(0)
    return 3 * x**2 * (grad_rows * scale).unsqueeze(-1)


_cube_rows = define_fused_op(
    "test_cube_rows",
    forward_schema="(Tensor x, float scale) -> Tensor",
    forward=_forward,
    forward_fake=lambda x, scale: x.new_empty(x.shape[:-1]),
    backward_schema="(Tensor grad_rows, Tensor x, float scale, bool need_x) -> Tensor",
    backward=_backward,
    differentiable=1,
    label="cube_rows (test)",
)


def _inputs():
    return torch.randn(2, 5, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64)


def test_value_and_gradient_match_autograd():
    x = _inputs().requires_grad_()
    upstream = torch.randn(2, 5, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    (grad,) = torch.autograd.grad(_cube_rows(x, 0.5), x, upstream)
    (expected,) = torch.autograd.grad(((x**3).sum(-1) * 0.5 * upstream).sum(), x)
    torch.testing.assert_close(grad, expected)


def test_double_backward_raises_naming_the_op():
    x = _inputs().requires_grad_()
    (grad,) = torch.autograd.grad(_cube_rows(x, 0.5).sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match="cube_rows \\(test\\): double backward"):
        torch.autograd.grad(grad.sum(), x)


def test_autocast_is_off_inside():
    x = torch.randn(2, 5, 3)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        seen = define_fused_op(
            "test_autocast_probe",
            forward_schema="(Tensor x) -> Tensor",
            forward=lambda x: torch.full(x.shape[:1], float(torch.is_autocast_enabled("cpu"))),
            forward_fake=lambda x: x.new_empty(x.shape[:1]),
            backward_schema="(Tensor grad, Tensor x, bool need_x) -> Tensor",
            backward=lambda grad, x, need_x: torch.zeros_like(x),
            differentiable=1,
            label="probe",
        )(x)
        assert torch.is_autocast_enabled("cpu")
    assert (seen == 0).all()


def test_opcheck_and_compile():
    x = _inputs().requires_grad_()
    torch.library.opcheck(torch.ops.stss_kernels.test_cube_rows.default, (x, 0.5))
    compiled = torch.compile(lambda x: _cube_rows(x, 0.5).sum(), fullgraph=True, backend="aot_eager")
    (grad,) = torch.autograd.grad(compiled(x), x)
    (expected,) = torch.autograd.grad(_cube_rows(x, 0.5).sum(), x)
    torch.testing.assert_close(grad, expected)


def test_host_sync_allowed_in_eager_not_while_compiling():
    x = torch.ones(2)
    assert host_sync_allowed(x)
    assert not host_sync_allowed(x.to("meta"))
    seen = []

    def probe(x):
        seen.append(host_sync_allowed(x))
        return x + 1

    torch.compile(probe, fullgraph=True, backend="eager")(x)
    assert seen == [False]
