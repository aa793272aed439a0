"""torch.library registration shared by every op's fused backends, and the tracing / autocast helpers they use.

A fused backend is a pair of custom ops (torch.library.custom_op, torch >= 2.4), which is what lets
torch.compile(fullgraph=True) trace the op (it sees fake tensors, never the kernels or their host code)
and CUDA graphs capture it:

- forward op ``stss_kernels::<name>(x_0, ..., x_{k-1}, *rest) -> (out, *residuals)``: x_0 .. x_{k-1} are the
  differentiable inputs, the residuals are what the backward needs besides the inputs;
- backward op ``stss_kernels::<name>_backward(grad_out, x_0, ..., *rest, *residuals, need_0, ..., need_{k-1})
  -> (grad_0, ..., grad_{k-1})``: gradients in the inputs' dtypes, an empty tensor where need_i is False.

`define_fused_op` registers both (the backward's fake is generic), wires them with register_autograd, and
makes differentiating the backward (double backward) raise a clear error instead of silently missing terms.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable

import torch
from torch._subclasses.fake_tensor import FakeTensor

NAMESPACE = "stss_kernels"


def is_tracing() -> bool:
    """True while torch.compile (dynamo) traces, or a fake-tensor / export trace runs."""
    compiler = getattr(torch, "compiler", None)
    if compiler is not None and hasattr(compiler, "is_compiling"):
        return bool(compiler.is_compiling())
    return bool(torch._dynamo.is_compiling())


def host_sync_allowed(tensor: torch.Tensor) -> bool:
    """Whether reading a value of `tensor` on the host is allowed now: not while torch.compile traces, not
    while a CUDA graph captures, not for fake / meta tensors."""
    if is_tracing() or tensor.device.type == "meta":
        return False
    if tensor.is_cuda and torch.cuda.is_current_stream_capturing():
        return False
    return not isinstance(tensor, FakeTensor)


def _autocast_enabled(device_type: str) -> bool:
    try:
        return torch.is_autocast_enabled(device_type)
    except (TypeError, RuntimeError):  # torch < 2.4 (no device_type argument), or a device type autocast does not know
        return device_type != "cpu" or torch.is_autocast_cpu_enabled()


def autocast_disabled(device: torch.device) -> contextlib.AbstractContextManager:
    """Autocast off for `device`'s type: the ops compute in their inputs' dtype (with fp32 accumulation)."""
    if not _autocast_enabled(device.type):
        return contextlib.nullcontext()
    try:
        return torch.autocast(device.type, enabled=False)
    except RuntimeError:  # a device type autocast does not know
        return contextlib.nullcontext()


def _without_autocast(impl: Callable) -> Callable:
    @functools.wraps(impl)
    def run(*args):
        device = next(arg.device for arg in args if isinstance(arg, torch.Tensor))
        with autocast_disabled(device):
            return impl(*args)

    return run


def define_fused_op(
    name: str,
    *,
    forward_schema: str,
    forward: Callable,
    forward_fake: Callable,
    backward_schema: str,
    backward: Callable,
    differentiable: int,
    label: str,
):
    """Register ``stss_kernels::<name>`` and ``stss_kernels::<name>_backward`` (see the module docstring).

    forward / backward: the implementations (run with autocast off); forward_fake: the forward's outputs as
    empty tensors of the right shapes and dtypes. `differentiable` = k, the number of leading differentiable
    tensor inputs. `label` names the op and backend in the double-backward error. A forward without
    residuals returns one Tensor (schema "-> Tensor"), a backward with k = 1 likewise. Returns the forward
    op (a callable: `op(*args)`, then [0] for the output when the forward returns a tuple).
    """
    forward_op = torch.library.custom_op(
        f"{NAMESPACE}::{name}", _without_autocast(forward), mutates_args=(), schema=forward_schema
    )
    backward_op = torch.library.custom_op(
        f"{NAMESPACE}::{name}_backward", _without_autocast(backward), mutates_args=(), schema=backward_schema
    )
    forward_op.register_fake(forward_fake)

    @backward_op.register_fake
    def _(grad_out, *args):
        features, needs = args[:differentiable], args[len(args) - differentiable :]
        grads = tuple(x.new_empty(x.shape) if need else x.new_empty(0) for x, need in zip(features, needs))
        return grads[0] if differentiable == 1 else grads

    def setup_context(ctx, inputs, output):
        residuals = output[1:] if isinstance(output, (tuple, list)) else ()
        ctx.scalars = [None if isinstance(x, torch.Tensor) else x for x in inputs]
        ctx.save_for_backward(*(x if isinstance(x, torch.Tensor) else None for x in inputs), *residuals)

    def backward_formula(ctx, grad_out, *_residual_grads):
        saved = ctx.saved_tensors
        inputs = [tensor if scalar is None else scalar for tensor, scalar in zip(saved, ctx.scalars)]
        residuals = saved[len(ctx.scalars) :]
        needs = [bool(need) for need in ctx.needs_input_grad[:differentiable]]
        grads = backward_op(grad_out.contiguous(), *inputs, *residuals, *needs)
        grads = (grads,) if isinstance(grads, torch.Tensor) else grads
        grads = [grad if need else None for grad, need in zip(grads, needs)]
        return (*grads, *([None] * (len(inputs) - differentiable)))

    forward_op.register_autograd(backward_formula, setup_context=setup_context)

    def refuse_double_backward(ctx, *grads):
        raise RuntimeError(
            f"{label}: double backward (differentiating its gradient, e.g. autograd.grad(..., create_graph=True) "
            "then a second grad) is not supported by this backend; use backend='reference' for higher-order "
            "gradients"
        )

    backward_op.register_autograd(refuse_double_backward, setup_context=lambda ctx, inputs, output: None)
    return forward_op
