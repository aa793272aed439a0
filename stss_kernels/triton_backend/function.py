"""The autograd Function tying the forward and backward kernels together."""

from __future__ import annotations

import contextlib

import torch

from stss_kernels.triton_backend.backward import tempered_kl_feature_grad
from stss_kernels.triton_backend.forward import tempered_kl_forward
from stss_kernels.triton_backend.tiles import kept_queries


def _on_device(tensor: torch.Tensor) -> contextlib.AbstractContextManager:
    """Launch on the tensor's GPU, not the current one."""
    return torch.cuda.device(tensor.device) if tensor.is_cuda else contextlib.nullcontext()


class TemperedKLFunction(torch.autograd.Function):
    """kl (B, N) fp32 from student (B, N, Cs) and teacher (B, N, Ct); queries with weight 0 skipped."""

    @staticmethod
    def forward(ctx, student, teacher, frames, tau_student, tau_teacher, query_weight):
        query_index, query_count = kept_queries(query_weight)
        with _on_device(student):
            keep = None if query_weight is None else query_weight != 0
            kl, stats = tempered_kl_forward(
                student, teacher, frames, tau_student, tau_teacher, query_index, query_count, keep
            )
        ctx.save_for_backward(student, teacher, stats, query_index, query_count)
        ctx.temperatures = (tau_student, tau_teacher)
        return kl

    @staticmethod
    def backward(ctx, grad_kl):
        student, teacher, stats, query_index, query_count = ctx.saved_tensors
        row_grad = (grad_kl.float() / stats.shape[1]).contiguous()
        with _on_device(student):
            grads = [
                tempered_kl_feature_grad(
                    student, teacher, stats, row_grad, query_index, query_count, *ctx.temperatures, for_teacher
                )
                if ctx.needs_input_grad[index]
                else None
                for index, for_teacher in enumerate((False, True))
            ]
        return grads[0], grads[1], None, None, None, None
