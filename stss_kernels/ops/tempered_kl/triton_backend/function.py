"""The forward and backward custom ops tying the kernels together (`stss_kernels::tempered_kl_triton`).

This module does not import Triton: the kernels are imported when the op first runs, so the op is
registered (and torch.compile can trace calls to it) whether or not Triton is installed. Nothing here
syncs the host, so the op can be captured in a CUDA graph once the kernels are tuned.
"""

from __future__ import annotations

import torch

from stss_kernels._core.backends import on_device
from stss_kernels._core.gradients import power_of_two_normalized
from stss_kernels._core.library import define_fused_op
from stss_kernels._core.queries import kept_queries

# fp32 statistics saved per (video, target frame, query): stss_kernels.ops.tempered_kl.triton_backend.tiles.NUM_STATS.
STATS_PER_QUERY = 5
# Saved maximum of a skipped query (base-2 logit units): exp2(logit - it) is 0 for every real logit.
_DROPPED_QUERY_MAX = 1.0e30


def _forward(student, teacher, frames, tau_student, tau_teacher, query_weight):
    """kl (B, N) fp32, and the statistics (B, F, STATS_PER_QUERY, N); queries with weight 0 skipped."""
    from stss_kernels.ops.tempered_kl.triton_backend.forward import tempered_kl_forward
    from stss_kernels.ops.tempered_kl.triton_backend.tiles import STAT_MAX_S, STAT_MAX_T

    keep = None if query_weight is None else query_weight != 0
    query_index, query_count = kept_queries(keep)
    with on_device(student):
        kl, stats = tempered_kl_forward(
            student, teacher, frames, tau_student, tau_teacher, query_index, query_count, keep
        )
    if keep is not None:
        # The kernels leave the skipped queries' statistics unset. Set them (a deterministic output) so that a
        # tile recomputed for them is exactly 0, never inf * 0: maxima far above any logit make every
        # probability 0 (the wide backward visits them under CUDA graph capture, with zero row gradient).
        dropped = ~keep[:, None, :]
        stats.masked_fill_(dropped.unsqueeze(2), 0.0)
        for slot in (STAT_MAX_T, STAT_MAX_S):
            stats[:, :, slot.value].masked_fill_(dropped, _DROPPED_QUERY_MAX)
    return kl, stats


def _forward_fake(student, teacher, frames, tau_student, tau_teacher, query_weight):
    batch, num_tokens, _ = student.shape
    kl = student.new_empty((batch, num_tokens), dtype=torch.float32)
    return kl, kl.new_empty((batch, frames, STATS_PER_QUERY, num_tokens))


def _backward(
    grad_kl, student, teacher, frames, tau_student, tau_teacher, query_weight, stats, need_student, need_teacher
):
    from stss_kernels.ops.tempered_kl.triton_backend.backward import tempered_kl_feature_grad

    keep = None if query_weight is None else query_weight != 0
    query_index, query_count = kept_queries(keep)
    row_grad = grad_kl.float() / frames
    if keep is not None:  # skipped queries pass no gradient (the wide backward may visit them)
        row_grad = torch.where(keep, row_grad, 0.0)
    # The kernels round the tiles of dL/dS to the input dtype: scaled to O(1) so fp16 tiles do not underflow.
    row_grad, scale = power_of_two_normalized(row_grad)
    row_grad = row_grad.contiguous()
    grads = []
    with on_device(student):
        for features, for_teacher, need in ((student, False, need_student), (teacher, True, need_teacher)):
            if not need:
                grads.append(features.new_empty(0))
                continue
            grads.append(
                tempered_kl_feature_grad(
                    student,
                    teacher,
                    stats,
                    row_grad,
                    query_index,
                    query_count,
                    tau_student,
                    tau_teacher,
                    for_teacher,
                    scale,
                )
            )
    return tuple(grads)


_ARGS = "Tensor student, Tensor teacher, int frames, float tau_student, float tau_teacher, Tensor? query_weight"
tempered_kl_triton_op = define_fused_op(
    "tempered_kl_triton",
    forward_schema=f"({_ARGS}) -> (Tensor, Tensor)",
    forward=_forward,
    forward_fake=_forward_fake,
    backward_schema=f"(Tensor grad_kl, {_ARGS}, Tensor stats, bool need_student, bool need_teacher) "
    "-> (Tensor, Tensor)",
    backward=_backward,
    differentiable=2,
    label="tempered_kl (triton backend)",
)
