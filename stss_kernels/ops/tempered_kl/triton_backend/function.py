"""The autograd Function tying the forward and backward kernels together."""

from __future__ import annotations

import torch
from torch.autograd.function import once_differentiable

from stss_kernels._core.backends import on_device
from stss_kernels._core.queries import kept_queries
from stss_kernels.ops.tempered_kl.triton_backend.generations import kernel_generation, kernels


class TemperedKLTritonFunction(torch.autograd.Function):
    """kl (B, N) fp32 from student (B, N, Cs) and teacher (B, N, Ct); queries with weight 0 skipped."""

    @staticmethod
    def forward(ctx, student, teacher, frames, tau_student, tau_teacher, query_weight):
        keep = None if query_weight is None else query_weight != 0
        query_index, query_count = kept_queries(keep)
        ctx.generation = kernel_generation()
        tempered_kl_forward = kernels(ctx.generation)[0]
        with on_device(student):
            kl, stats = tempered_kl_forward(
                student, teacher, frames, tau_student, tau_teacher, query_index, query_count, keep
            )
        ctx.save_for_backward(student, teacher, stats, query_index, query_count)
        ctx.temperatures = (tau_student, tau_teacher)
        return kl

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_kl):
        student, teacher, stats, query_index, query_count = ctx.saved_tensors
        row_grad = grad_kl.float() / stats.shape[1]
        # The kernels round the tiles of dL/dS to the input dtype: bring the upstream gradient (e.g. 1 / (B N)
        # under a mean) to O(1) by an exact power of two so fp16 tiles do not underflow; undone in fp32 below.
        magnitude = row_grad.abs().amax()
        scale = torch.where(magnitude > 0, torch.exp2(torch.round(torch.log2(magnitude))), 1.0)
        row_grad = (row_grad / scale).contiguous()
        tempered_kl_feature_grad = kernels(ctx.generation)[1]
        with on_device(student):
            grads = [
                tempered_kl_feature_grad(
                    student,
                    teacher,
                    stats,
                    row_grad,
                    query_index,
                    query_count,
                    *ctx.temperatures,
                    for_teacher,
                    scale,
                )
                if ctx.needs_input_grad[index]
                else None
                for index, for_teacher in enumerate((False, True))
            ]
        return grads[0], grads[1], None, None, None, None
