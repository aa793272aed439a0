"""Public op: the tempered spatio-temporal self-similarity KL (the TSA loss), and its nn.Module."""

from __future__ import annotations

import functools

import torch

from stss_kernels._core import (
    REDUCTIONS,
    accumulation_dtype,
    check_choice,
    check_temperature,
    flatten_tokens,
    l2_normalize,
    query_weight,
    reduce_rows,
    resolve_backend,
    skip_hint,
)
from stss_kernels._core.sharding import sharded_loss

# backend name -> (module, function); imported at call time so that Triton stays optional.
BACKENDS = {
    "reference": ("stss_kernels.ops.tempered_kl.reference", "tempered_kl_reference"),
    "torch": ("stss_kernels.ops.tempered_kl.torch_backend", "tempered_kl_torch"),
    "triton": ("stss_kernels.ops.tempered_kl.triton_backend", "tempered_kl_triton"),
}


def tempered_kl(
    student: torch.Tensor,
    teacher: torch.Tensor,
    *,
    frames: int | None = None,
    tau_student: float = 0.1,
    tau_teacher: float = 0.1,
    query_mask: torch.Tensor | None = None,
    normalize: bool = True,
    reduction: str = "mean",
    backend: str = "auto",
    process_group=None,
) -> torch.Tensor:
    """Tempered self-similarity KL between student and teacher token features.

    student (B, N, Cs) and teacher (B, N, Ct) with N = frames * HW tokens in frame-major order, or
    (B, T, H, W, C) with frames = T. For each query i and target frame f, P_t = softmax(T[i, f-block]
    / tau_teacher) with T = t t^T (P_s likewise from the student), and kl[b, i] is the mean over f of
    KL(P_t || P_s). frames=1 is one softmax over all N keys. normalize=True uses cosine similarity.

    query_mask (B, N): bool, or float weights w. reduction "none" -> w * kl (B, N), "sum" -> its sum,
    "mean" -> sum(w * kl) / sum(w) over the whole batch (0 for an empty mask); weights must be finite
    and >= 0 (checked except under torch.compile / CUDA graph capture, where the check would sync the
    host). A float mask that requires grad gets d loss / d w (then every row is computed). The result is
    float32 (float64 for float64 inputs), computed in the inputs' dtype whether or not autocast is on.
    backend: "auto", "reference", "torch" or "triton"; the torch and triton backends are torch.library
    custom ops (torch.compile(fullgraph=True) traces them) and refuse double backward.
    Under torch.compile no backend's gradient is differentiable (AOT autograd's rule): a second grad raises,
    with normalize=True as "One of the differentiated Tensors appears to not have been used in the graph"
    (None with allow_unused=True), never a wrong second derivative.

    process_group (a torch.distributed group, e.g. dist.group.WORLD): sharded tokens. Each rank passes its
    contiguous slice (B, n_r, C) of the frame-major sequence (slices in rank order make the whole; uneven sizes
    and split frames allowed), `frames` of the whole sequence and its local query_mask (B, n_r). "mean" / "sum"
    are global and identical on every rank, "none" gives the local rows (B, n_r); each rank's gradients are its
    slice of the one-process gradient. Every rank calls it, and backward. See stss_kernels._core.sharding.
    """
    if process_group is not None:
        return sharded_loss(
            "tempered_kl",
            functools.partial(
                tempered_kl,
                tau_student=tau_student,
                tau_teacher=tau_teacher,
                normalize=False,
                reduction="none",
                backend=backend,
            ),
            student,
            teacher,
            frames=frames,
            query_mask=query_mask,
            normalize=normalize,
            reduction=reduction,
            process_group=process_group,
            options=dict(op="tempered_kl", tau_student=tau_student, tau_teacher=tau_teacher, backend=backend),
            check_options=lambda: _check_options(student, tau_student, tau_teacher, backend),
        )
    student, teacher, frames = flatten_tokens(student, teacher, frames, "frames=1 gives one softmax over all N")
    weight = query_weight(query_mask, student, accumulation_dtype(student.dtype))
    tau_student = check_temperature("tau_student", tau_student)
    tau_teacher = check_temperature("tau_teacher", tau_teacher)
    check_choice("reduction", reduction, REDUCTIONS)
    kl_fn = resolve_backend(BACKENDS, backend, student.device, student.dtype)
    if normalize:
        student, teacher = l2_normalize(student), l2_normalize(teacher)
    skip = skip_hint(weight)
    kl = kl_fn(student.contiguous(), teacher.contiguous(), frames, tau_student, tau_teacher, query_weight=skip)
    return reduce_rows(kl, weight, reduction)


def _check_options(student, tau_student, tau_teacher, backend) -> None:
    """The scalar options' checks (a rank of a sharded call runs them before the first collective)."""
    check_temperature("tau_student", tau_student)
    check_temperature("tau_teacher", tau_teacher)
    if isinstance(student, torch.Tensor):
        resolve_backend(BACKENDS, backend, student.device, student.dtype)


class TemperedKL(torch.nn.Module):
    """nn.Module form of `tempered_kl`, holding the temperatures, normalisation, reduction and backend.

    forward(student, teacher, frames=None, query_mask=None) -> the reduced loss (see `tempered_kl`); with a
    process_group, the inputs are this rank's token slice (see `tempered_kl`).
    """

    def __init__(
        self,
        tau_student: float = 0.1,
        tau_teacher: float = 0.1,
        normalize: bool = True,
        reduction: str = "mean",
        backend: str = "auto",
        process_group=None,
    ):
        super().__init__()
        self.tau_student = check_temperature("tau_student", tau_student)
        self.tau_teacher = check_temperature("tau_teacher", tau_teacher)
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
        return tempered_kl(
            student,
            teacher,
            frames=frames,
            tau_student=self.tau_student,
            tau_teacher=self.tau_teacher,
            query_mask=query_mask,
            normalize=self.normalize,
            reduction=self.reduction,
            backend=self.backend,
            process_group=self.process_group,
        )

    def extra_repr(self) -> str:
        return (
            f"tau_student={self.tau_student}, tau_teacher={self.tau_teacher}, normalize={self.normalize}, "
            f"reduction={self.reduction!r}, backend={self.backend!r}"
        )
