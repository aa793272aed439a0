"""Public op: the tempered spatio-temporal self-similarity KL (the TSA loss), and its nn.Module."""

from __future__ import annotations

import importlib
import math
import numbers

import torch

from stss_kernels._utils import accumulation_dtype, triton_available, triton_interpreting

# backend name -> (module, function); imported at call time so that Triton stays optional.
_BACKENDS = {
    "reference": ("stss_kernels.reference", "tempered_kl_reference"),
    "torch": ("stss_kernels.torch_backend", "tempered_kl_torch"),
    "triton": ("stss_kernels.triton_backend", "tempered_kl_triton"),
}
_REDUCTIONS = ("none", "sum", "mean")


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
) -> torch.Tensor:
    """Tempered self-similarity KL between student and teacher token features.

    student (B, N, Cs) and teacher (B, N, Ct) with N = frames * HW tokens in frame-major order, or
    (B, T, H, W, C) with frames = T. For each query i and target frame f, P_t = softmax(T[i, f-block]
    / tau_teacher) with T = t t^T (P_s likewise from the student), and kl[b, i] is the mean over f of
    KL(P_t || P_s). frames=1 is one softmax over all N keys. normalize=True uses cosine similarity.

    query_mask (B, N): bool, or float weights w. reduction "none" -> w * kl (B, N), "sum" -> its sum,
    "mean" -> sum(w * kl) / sum(w) over the whole batch (0 for an empty mask). The result is float32
    (float64 for float64 inputs). backend: "auto", "reference", "torch" or "triton".
    """
    student, teacher, frames = _flatten_tokens(student, teacher, frames)
    weight = _query_weight(query_mask, student)
    tau_student = _check_temperature("tau_student", tau_student)
    tau_teacher = _check_temperature("tau_teacher", tau_teacher)
    _check_choice("reduction", reduction, _REDUCTIONS)
    kl_fn = _backend_function(backend, student.device, student.dtype)
    if normalize:
        student, teacher = _l2_normalize(student), _l2_normalize(teacher)
    skip_hint = None if weight is None else weight.detach()
    kl = kl_fn(student.contiguous(), teacher.contiguous(), frames, tau_student, tau_teacher, query_weight=skip_hint)
    return _reduce(kl, weight, reduction)


class TemperedKL(torch.nn.Module):
    """nn.Module form of `tempered_kl`, holding the temperatures, normalisation, reduction and backend.

    forward(student, teacher, frames=None, query_mask=None) -> the reduced loss (see `tempered_kl`).
    """

    def __init__(
        self,
        tau_student: float = 0.1,
        tau_teacher: float = 0.1,
        normalize: bool = True,
        reduction: str = "mean",
        backend: str = "auto",
    ):
        super().__init__()
        self.tau_student = _check_temperature("tau_student", tau_student)
        self.tau_teacher = _check_temperature("tau_teacher", tau_teacher)
        self.reduction = _check_choice("reduction", reduction, _REDUCTIONS)
        self.backend = _check_choice("backend", backend, ("auto", *_BACKENDS))
        self.normalize = normalize

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
        )

    def extra_repr(self) -> str:
        return (
            f"tau_student={self.tau_student}, tau_teacher={self.tau_teacher}, normalize={self.normalize}, "
            f"reduction={self.reduction!r}, backend={self.backend!r}"
        )


def _flatten_tokens(student, teacher, frames):
    """Validate the features and frames; return (B, N, C) views and the frame count."""
    for name, x in (("student", student), ("teacher", teacher)):
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
        if not x.is_floating_point():
            raise TypeError(f"{name} must be a floating-point tensor (float32, float16, bfloat16), got {x.dtype}")
        if x.dim() not in (3, 5):
            raise ValueError(f"{name} must be (B, N, C) or (B, T, H, W, C), got shape {tuple(x.shape)}")
        if x.numel() == 0:
            raise ValueError(f"{name} must not have an empty dimension, got shape {tuple(x.shape)}")
    if teacher.dtype != student.dtype:
        raise TypeError(f"teacher must have the student's dtype {student.dtype}, got {teacher.dtype}")
    if teacher.device != student.device:
        raise ValueError(f"teacher must be on the student's device {student.device}, got {teacher.device}")
    if teacher.dim() != student.dim():
        raise ValueError(
            f"student and teacher must have the same rank, got shapes {tuple(student.shape)} and {tuple(teacher.shape)}"
        )
    if teacher.shape[:-1] != student.shape[:-1]:
        raise ValueError(
            "student and teacher must share batch and token dimensions, got shapes "
            f"{tuple(student.shape)} and {tuple(teacher.shape)}"
        )
    if frames is not None and (isinstance(frames, bool) or not isinstance(frames, numbers.Integral)):
        raise TypeError(f"frames must be an int, got {type(frames).__name__}")
    if student.dim() == 5:
        if frames is not None and frames != student.shape[1]:
            raise ValueError(f"frames={frames} contradicts the 5-D input's T={student.shape[1]}; omit frames")
        frames = student.shape[1]
        student, teacher = student.flatten(1, 3), teacher.flatten(1, 3)
    elif frames is None:
        raise ValueError("frames is required for (B, N, C) inputs (frames=1 gives one softmax over all N)")
    num_tokens = student.shape[1]
    if frames < 1 or num_tokens % frames:
        raise ValueError(f"frames must be a positive divisor of the token count N={num_tokens}, got {frames}")
    return student, teacher, int(frames)


def _query_weight(query_mask, student):
    """The mask as float weights (B, N) in the result dtype, or None."""
    if query_mask is None:
        return None
    if not isinstance(query_mask, torch.Tensor):
        raise TypeError(f"query_mask must be a torch.Tensor or None, got {type(query_mask).__name__}")
    if query_mask.dtype != torch.bool and not query_mask.is_floating_point():
        raise TypeError(f"query_mask must be bool or floating point, got {query_mask.dtype}")
    if query_mask.shape != student.shape[:2]:
        raise ValueError(
            f"query_mask must have shape (B, N) = {tuple(student.shape[:2])}, got {tuple(query_mask.shape)}"
        )
    if query_mask.device != student.device:
        raise ValueError(f"query_mask must be on the features' device {student.device}, got {query_mask.device}")
    return query_mask.to(accumulation_dtype(student.dtype))


def _check_temperature(name, tau):
    if isinstance(tau, bool) or not isinstance(tau, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {type(tau).__name__}")
    if not (math.isfinite(tau) and tau > 0):
        raise ValueError(f"{name} must be a finite number > 0, got {tau}")
    return float(tau)


def _check_choice(name, value, choices):
    if value not in choices:
        raise ValueError(f"{name} must be one of {choices}, got {value!r}")
    return value


def _backend_function(backend, device, dtype):
    """The backend function for `backend` ("auto" picks Triton on GPU tensors when it imports, but not for fp64)."""
    _check_choice("backend", backend, ("auto", *_BACKENDS))
    if backend == "auto":
        use_triton = device.type == "cuda" and dtype != torch.float64 and triton_available()
        backend = "triton" if use_triton else "torch"
    if backend == "triton":
        if not triton_available():
            raise RuntimeError("backend='triton' needs Triton, which is not installed; use backend='torch'")
        if device.type != "cuda" and not triton_interpreting():
            raise ValueError(
                f"backend='triton' needs CUDA/ROCm tensors, got {device.type} tensors; set TRITON_INTERPRET=1 "
                "to run the kernels in the CPU interpreter, or use backend='torch'"
            )
    module, name = _BACKENDS[backend]
    return getattr(importlib.import_module(module), name)


def _l2_normalize(x):
    """L2-normalise over channels in (at least) fp32, returned in the input dtype."""
    return _L2Normalize.apply(x)


class _L2Normalize(torch.autograd.Function):
    """x / max(||x||, 1e-12) over the last dim, computed in fp32; saves x and the (B, N, 1) inverse norms only.

    (F.normalize on an fp32 copy would keep that copy, twice a bf16 input's size, alive until backward.)
    """

    @staticmethod
    def forward(ctx, x):
        compute_dtype = accumulation_dtype(x.dtype)
        inv_norm = x.to(compute_dtype).square().sum(-1, keepdim=True).clamp_min(1e-24).rsqrt()
        ctx.save_for_backward(x, inv_norm)
        return (x.to(compute_dtype) * inv_norm).to(x.dtype)

    @staticmethod
    def backward(ctx, grad_y):
        x, inv_norm = ctx.saved_tensors
        y = x.to(inv_norm.dtype) * inv_norm
        grad_y = grad_y.to(inv_norm.dtype)
        # d(x / |x|) = (g - y (g . y)) / |x|; below the 1e-12 clamp the map is x * 1e12, whose gradient is g * 1e12.
        radial = torch.where(inv_norm < 1e12, (grad_y * y).sum(-1, keepdim=True), 0.0)
        return ((grad_y - y * radial) * inv_norm).to(x.dtype)


def _reduce(kl, weight, reduction):
    if weight is not None:
        kl = weight * kl
    if reduction == "none":
        return kl
    total = kl.sum()
    if reduction == "sum":
        return total
    if weight is None:
        return total / kl.numel()
    weight_sum = weight.sum()
    # An empty mask gives total == 0: divide by 1 there instead of 0 so value and gradients stay 0.
    return total / torch.where(weight_sum > 0, weight_sum, torch.ones_like(weight_sum))
