"""The forward and backward custom ops tying the kernels together (`stss_kernels::relation_distance_triton`).

This module does not import Triton: the kernels are imported when the op first runs, so the op is
registered (and torch.compile can trace calls to it) whether or not Triton is installed. Nothing here
syncs the host while a CUDA graph captures.
"""

from __future__ import annotations

import torch

from stss_kernels._core.backends import on_device
from stss_kernels._core.gradients import power_of_two_normalized
from stss_kernels._core.library import define_fused_op
from stss_kernels._core.queries import kept_queries
from stss_kernels.ops.relation_distance.pairs import pair_count, uniform_per_video


def _forward(student, teacher, frames, margin, variant, query_weight):
    """rows (B, N) fp32; queries with weight 0 skipped. The backward needs only the inputs."""
    from stss_kernels.ops.relation_distance.triton_backend.forward import relation_distance_forward

    batch, num_tokens, _ = student.shape
    count = pair_count(variant, num_tokens, frames)
    if count == 0:  # "temporal" on a single frame: no pair at all
        return torch.zeros(batch, num_tokens, dtype=torch.float32, device=student.device)
    keep = None if query_weight is None else query_weight != 0
    query_index, query_count = kept_queries(keep)
    with on_device(student):
        sums = relation_distance_forward(student, teacher, frames, margin, variant, query_index, query_count)
    return sums / count


def _forward_fake(student, teacher, frames, margin, variant, query_weight):
    return student.new_empty(student.shape[:2], dtype=torch.float32)


def _backward(grad_rows, student, teacher, frames, margin, variant, query_weight, need_student, need_teacher):
    from stss_kernels.ops.relation_distance.triton_backend.backward import relation_distance_feature_grads

    count = pair_count(variant, student.shape[1], frames)
    needs_grad = (need_student, need_teacher)
    if count == 0:  # no pair: zero gradients
        grads = [torch.zeros_like(x) if need else None for x, need in zip((student, teacher), needs_grad)]
    else:
        keep = None if query_weight is None else query_weight != 0
        query_index, query_count = kept_queries(keep)
        row_grad = grad_rows.float() / count
        if keep is not None:
            row_grad = torch.where(keep, row_grad, 0.0)
        row_grad, scale = power_of_two_normalized(row_grad)
        symmetric = uniform_per_video(row_grad)
        with on_device(student):
            grads = relation_distance_feature_grads(
                student, teacher, row_grad.contiguous(), query_index, query_count, frames, margin, variant,
                symmetric, needs_grad, scale,
            )  # fmt: skip
    return tuple(x.new_empty(0) if grad is None else grad for x, grad in zip((student, teacher), grads))


_ARGS = "Tensor student, Tensor teacher, int frames, float margin, str variant, Tensor? query_weight"
relation_distance_triton_op = define_fused_op(
    "relation_distance_triton",
    forward_schema=f"({_ARGS}) -> Tensor",
    forward=_forward,
    forward_fake=_forward_fake,
    backward_schema=f"(Tensor grad_rows, {_ARGS}, bool need_student, bool need_teacher) -> (Tensor, Tensor)",
    backward=_backward,
    differentiable=2,
    label="relation_distance (triton backend)",
)
