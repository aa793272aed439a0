"""Public op: the relation distance between student and teacher self-similarities (VideoREPA's TRD loss), and its
nn.Module."""

from __future__ import annotations

import functools

import torch

from stss_kernels._core import (
    REDUCTIONS,
    accumulation_dtype,
    check_choice,
    check_real,
    flatten_tokens,
    l2_normalize,
    query_weight,
    reduce_rows,
    resolve_backend,
    skip_hint,
)
from stss_kernels._core.sharding import sharded_loss
from stss_kernels.ops.relation_distance.pairs import VARIANTS

# backend name -> (module, function); imported at call time so that Triton stays optional.
BACKENDS = {
    "reference": ("stss_kernels.ops.relation_distance.reference", "relation_distance_reference"),
    "torch": ("stss_kernels.ops.relation_distance.torch_backend", "relation_distance_torch"),
    "triton": ("stss_kernels.ops.relation_distance.triton_backend", "relation_distance_triton"),
}


def relation_distance(
    student: torch.Tensor,
    teacher: torch.Tensor,
    *,
    frames: int | None = None,
    margin: float = 0.1,
    variant: str = "full",
    query_mask: torch.Tensor | None = None,
    normalize: bool = True,
    reduction: str = "mean",
    backend: str = "auto",
    process_group=None,
) -> torch.Tensor:
    """Margin-clipped distance between student and teacher token relations (VideoREPA's TRD loss).

    student (B, N, Cs) and teacher (B, N, Ct) with N = frames * HW tokens in frame-major order, or
    (B, T, H, W, C) with frames = T. With S = s s^T and T = t t^T (cosine when normalize=True),
    d_ij = relu(|S_ij - T_ij| - margin) over the variant's pairs: "full" every (i, j), the diagonal
    included; "spatial" pairs in the same frame; "temporal" pairs in different frames (none for a single
    frame: 0). row[b, i] is the mean of d_ij over query i's pairs. `frames` is needed for 3-D input
    except with variant="full", where it does not matter.

    query_mask (B, N): bool, or float weights w. reduction "none" -> w * row (B, N), "sum" -> its sum,
    "mean" -> sum(w * row) / sum(w) over the whole batch (unmasked: the mean of d over every pair,
    VideoREPA's loss; 0 for an empty mask); weights must be finite and >= 0 (checked except under
    torch.compile / CUDA graph capture). A float mask that requires grad gets d loss / d w (then every row is
    computed). The result is float32 (float64 for float64 inputs), computed in the inputs' dtype whether or
    not autocast is on. backend: "auto", "reference", "torch" or "triton"; the torch and triton backends are
    torch.library custom ops (torch.compile(fullgraph=True) traces them) and refuse double backward.
    Under torch.compile no backend's gradient is differentiable (AOT autograd's rule): a second grad raises,
    with normalize=True as "One of the differentiated Tensors appears to not have been used in the graph"
    (None with allow_unused=True), never a wrong second derivative.

    process_group (a torch.distributed group, e.g. dist.group.WORLD): sharded tokens. Each rank passes its
    contiguous slice (B, n_r, C) of the frame-major sequence (slices in rank order make the whole; uneven sizes
    and split frames allowed), `frames` of the whole sequence (for "spatial" / "temporal") and its local
    query_mask (B, n_r). "mean" / "sum" are global and identical on every rank, "none" gives the local rows
    (B, n_r); each rank's gradients are its slice of the one-process gradient. Every rank calls it, and backward.
    See stss_kernels._core.sharding.
    """
    if process_group is not None:
        return sharded_loss(
            "relation_distance",
            functools.partial(
                relation_distance, margin=margin, variant=variant, normalize=False, reduction="none", backend=backend
            ),
            student,
            teacher,
            frames=1 if frames is None and variant == "full" else frames,
            query_mask=query_mask,
            normalize=normalize,
            reduction=reduction,
            process_group=process_group,
            options=dict(op="relation_distance", margin=margin, variant=variant, backend=backend),
            check_options=lambda: _check_options(student, margin, variant, backend),
        )
    check_choice("variant", variant, VARIANTS)
    if variant == "full" and frames is None and isinstance(student, torch.Tensor) and student.dim() == 3:
        frames = 1
    student, teacher, frames = flatten_tokens(student, teacher, frames, "or variant='full'")
    weight = query_weight(query_mask, student, accumulation_dtype(student.dtype))
    margin = check_real("margin", margin, inclusive=True)
    check_choice("reduction", reduction, REDUCTIONS)
    distance_fn = resolve_backend(BACKENDS, backend, student.device, student.dtype)
    if normalize:
        student, teacher = l2_normalize(student), l2_normalize(teacher)
    skip = skip_hint(weight)
    rows = distance_fn(student.contiguous(), teacher.contiguous(), frames, margin, variant, query_weight=skip)
    return reduce_rows(rows, weight, reduction)


def _check_options(student, margin, variant, backend) -> None:
    """The scalar options' checks (a rank of a sharded call runs them before the first collective)."""
    check_choice("variant", variant, VARIANTS)
    check_real("margin", margin, inclusive=True)
    if isinstance(student, torch.Tensor):
        resolve_backend(BACKENDS, backend, student.device, student.dtype)


class RelationDistance(torch.nn.Module):
    """nn.Module form of `relation_distance`, holding the margin, variant, normalisation, reduction and backend.

    forward(student, teacher, frames=None, query_mask=None) -> the reduced loss (see `relation_distance`); with a
    process_group, the inputs are this rank's token slice (see `relation_distance`).
    """

    def __init__(
        self,
        margin: float = 0.1,
        variant: str = "full",
        normalize: bool = True,
        reduction: str = "mean",
        backend: str = "auto",
        process_group=None,
    ):
        super().__init__()
        self.margin = check_real("margin", margin, inclusive=True)
        self.variant = check_choice("variant", variant, VARIANTS)
        self.reduction = check_choice("reduction", reduction, REDUCTIONS)
        self.backend = check_choice("backend", backend, ("auto", *BACKENDS))
        self.normalize = normalize
        self.process_group = process_group

    def forward(
        self,
        student: torch.Tensor,
        teacher: torch.Tensor,
        frames: int | None = None,
        query_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        return relation_distance(
            student,
            teacher,
            frames=frames,
            margin=self.margin,
            variant=self.variant,
            query_mask=query_mask,
            normalize=self.normalize,
            reduction=self.reduction,
            backend=self.backend,
            process_group=self.process_group,
        )

    def extra_repr(self) -> str:
        return (
            f"margin={self.margin}, variant={self.variant!r}, normalize={self.normalize}, "
            f"reduction={self.reduction!r}, backend={self.backend!r}"
        )
