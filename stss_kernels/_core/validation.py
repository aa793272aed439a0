"""Argument checks every op runs before any kernel launches; each message names the argument."""

from __future__ import annotations

import math
import numbers

import torch

from stss_kernels._core.library import host_sync_allowed

# Kernels scale logits by log2(e) / tau in float32: a temperature must keep that finite.
_MAX_INVERSE_TEMPERATURE = torch.finfo(torch.float32).max / math.log2(math.e)


def check_feature_pair(student, teacher, ranks: tuple[int, ...] = (3, 5)) -> None:
    """student and teacher: floating tensors of one dtype and device, rank in `ranks`, equal but for channels."""
    shapes = " or ".join({3: "(B, N, C)", 5: "(B, T, H, W, C)"}[rank] for rank in ranks)
    for name, x in (("student", student), ("teacher", teacher)):
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
        if not x.is_floating_point():
            raise TypeError(f"{name} must be a floating-point tensor (float32, float16, bfloat16), got {x.dtype}")
        if x.dim() not in ranks:
            raise ValueError(f"{name} must be {shapes}, got shape {tuple(x.shape)}")
        if x.numel() == 0:
            raise ValueError(f"{name} must not have an empty dimension, got shape {tuple(x.shape)}")
    if teacher.dtype != student.dtype:
        raise TypeError(
            f"teacher must have the student's dtype {student.dtype}, got {teacher.dtype} (autocast does not "
            "cast this op's inputs: cast one of them, e.g. teacher.to(student.dtype))"
        )
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


def check_frames(frames, num_tokens: int) -> int:
    """`frames`: an int dividing the token count."""
    if isinstance(frames, bool) or not isinstance(frames, numbers.Integral):
        raise TypeError(f"frames must be an int, got {type(frames).__name__}")
    if frames < 1 or num_tokens % frames:
        raise ValueError(f"frames must be a positive divisor of the token count N={num_tokens}, got {frames}")
    return int(frames)


def flatten_tokens(student, teacher, frames, frames_hint: str = ""):
    """Validate the features and `frames`; return (B, N, C) views and the frame count.

    student (B, N, Cs) with `frames` given, or (B, T, H, W, Cs) with frames = T (teacher likewise, Ct).
    `frames_hint` is appended to the error raised when frames is missing for 3-D input.
    """
    check_feature_pair(student, teacher)
    if frames is not None and (isinstance(frames, bool) or not isinstance(frames, numbers.Integral)):
        raise TypeError(f"frames must be an int, got {type(frames).__name__}")
    if student.dim() == 5:
        if frames is not None and frames != student.shape[1]:
            raise ValueError(f"frames={frames} contradicts the 5-D input's T={student.shape[1]}; omit frames")
        frames = student.shape[1]
        student, teacher = student.flatten(1, 3), teacher.flatten(1, 3)
    elif frames is None:
        raise ValueError("frames is required for (B, N, C) inputs" + (f" ({frames_hint})" if frames_hint else ""))
    return student, teacher, check_frames(frames, student.shape[1])


def check_query_weight(name: str, weight, student) -> None:
    """A (B, N) bool or floating tensor on the features' device, or None. student is the (B, N, C) features."""
    if weight is None:
        return
    if not isinstance(weight, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor or None, got {type(weight).__name__}")
    if weight.dtype != torch.bool and not weight.is_floating_point():
        raise TypeError(f"{name} must be bool or floating point, got {weight.dtype}")
    if weight.shape != student.shape[:2]:
        raise ValueError(f"{name} must have shape (B, N) = {tuple(student.shape[:2])}, got {tuple(weight.shape)}")
    if weight.device != student.device:
        raise ValueError(f"{name} must be on the features' device {student.device}, got {weight.device}")


def check_weight_values(name: str, weight: torch.Tensor) -> None:
    """Float weights must be finite and >= 0. Reading the verdict syncs the host with the device, so the check
    is skipped while torch.compile traces or a CUDA graph captures (where a sync is not allowed)."""
    if weight.dtype == torch.bool or not host_sync_allowed(weight):
        return
    with torch.no_grad():
        bad = ~(weight.isfinite() & (weight >= 0))
        if bad.any():
            value = weight[bad][0].item()
            raise ValueError(f"{name} weights must be finite and >= 0, got {value} (at {bad.nonzero()[0].tolist()})")


def query_weight(query_mask, student, dtype: torch.dtype):
    """The mask (B, N) as float weights in `dtype`, or None. student is the (B, N, C) features."""
    if query_mask is None:
        return None
    check_query_weight("query_mask", query_mask, student)
    check_weight_values("query_mask", query_mask)
    return query_mask.to(dtype)


def check_real(name: str, value, *, minimum: float = 0.0, inclusive: bool = False) -> float:
    """A finite real number above `minimum` (or equal to it when inclusive), as a float."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
    above = value >= minimum if inclusive else value > minimum
    if not (math.isfinite(value) and above):
        raise ValueError(f"{name} must be a finite number {'>=' if inclusive else '>'} {minimum:g}, got {value}")
    return float(value)


def check_temperature(name: str, tau) -> float:
    """A softmax temperature: a finite number > 0 whose reciprocal (times log2 e) is finite in float32."""
    tau = check_real(name, tau)
    if 1.0 / tau > _MAX_INVERSE_TEMPERATURE:
        raise ValueError(
            f"{name} must be >= {1.0 / _MAX_INVERSE_TEMPERATURE:.3g} (1/{name} must be finite in float32), got {tau}"
        )
    return tau


def check_backend_inputs(student, teacher, frames, query_weight, dtypes: tuple[torch.dtype, ...] | None = None) -> int:
    """What every op's backend functions check (the op's checks for (B, N, C) input, without a host sync):
    the features, `frames` and the query_weight skip hint. Returns frames as an int. `dtypes` restricts the
    feature dtype. The op's own scalars (temperatures, margins) are checked by the backend with check_real /
    check_temperature.
    """
    check_feature_pair(student, teacher, ranks=(3,))
    if dtypes is not None and student.dtype not in dtypes:
        names = ", ".join(str(dtype).removeprefix("torch.") for dtype in dtypes)
        raise TypeError(f"student must be one of {names} for this backend, got {student.dtype}")
    frames = check_frames(frames, student.shape[1])
    check_query_weight("query_weight", query_weight, student)
    return frames


def check_choice(name: str, value, choices):
    if value not in choices:
        raise ValueError(f"{name} must be one of {choices}, got {value!r}")
    return value
