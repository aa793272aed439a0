"""The autograd Function tying the forward and backward kernels together."""

from __future__ import annotations

import torch
from torch.autograd.function import once_differentiable

from stss_kernels._core.backends import on_device
from stss_kernels._core.gradients import power_of_two_normalized
from stss_kernels._core.queries import kept_queries
from stss_kernels.ops.relation_distance.pairs import pair_count, uniform_per_video
from stss_kernels.ops.relation_distance.triton_backend.backward import relation_distance_feature_grads
from stss_kernels.ops.relation_distance.triton_backend.forward import relation_distance_forward


class RelationDistanceTritonFunction(torch.autograd.Function):
    """rows (B, N) fp32 from student (B, N, Cs) and teacher (B, N, Ct); queries with weight 0 skipped."""

    @staticmethod
    def forward(ctx, student, teacher, frames, margin, variant, query_weight):
        batch, num_tokens, _ = student.shape
        count = pair_count(variant, num_tokens, frames)
        keep = None if query_weight is None else query_weight != 0
        query_index, query_count = kept_queries(keep)
        ctx.save_for_backward(student, teacher, query_index, query_count, keep)
        ctx.config = (frames, margin, variant)
        if count == 0:  # "temporal" on a single frame: no pair at all
            return torch.zeros(batch, num_tokens, dtype=torch.float32, device=student.device)
        with on_device(student):
            sums = relation_distance_forward(student, teacher, frames, margin, variant, query_index, query_count)
        return sums / count

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_rows):
        student, teacher, query_index, query_count, keep = ctx.saved_tensors
        frames, margin, variant = ctx.config
        count = pair_count(variant, student.shape[1], frames)
        row_grad = grad_rows.float() / max(count, 1)
        if keep is not None:
            row_grad = torch.where(keep, row_grad, 0.0)
        row_grad, scale = power_of_two_normalized(row_grad)
        symmetric = uniform_per_video(row_grad)
        needs_grad = tuple(ctx.needs_input_grad[:2])
        if count == 0:  # no pair: zero gradients
            grads = [torch.zeros_like(x) if need else None for x, need in zip((student, teacher), needs_grad)]
        else:
            with on_device(student):
                grads = relation_distance_feature_grads(
                    student, teacher, row_grad.contiguous(), query_index, query_count, frames, margin, variant,
                    symmetric, needs_grad, scale,
                )  # fmt: skip
        return grads[0], grads[1], None, None, None, None
