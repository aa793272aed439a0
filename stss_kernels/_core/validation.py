"""Argument checks every op runs before any kernel launches; each message names the argument."""

from __future__ import annotations

import math
import numbers

import torch


def flatten_tokens(student, teacher, frames, frames_hint: str = ""):
    """Validate the features and `frames`; return (B, N, C) views and the frame count.

    student (B, N, Cs) with `frames` given, or (B, T, H, W, Cs) with frames = T (teacher likewise, Ct).
    `frames_hint` is appended to the error raised when frames is missing for 3-D input.
    """
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
        raise ValueError("frames is required for (B, N, C) inputs" + (f" ({frames_hint})" if frames_hint else ""))
    num_tokens = student.shape[1]
    if frames < 1 or num_tokens % frames:
        raise ValueError(f"frames must be a positive divisor of the token count N={num_tokens}, got {frames}")
    return student, teacher, int(frames)


def query_weight(query_mask, student, dtype: torch.dtype):
    """The mask (B, N) as float weights in `dtype`, or None. student is the (B, N, C) features."""
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
    """A softmax temperature: a finite number > 0."""
    return check_real(name, tau)


def check_choice(name: str, value, choices):
    if value not in choices:
        raise ValueError(f"{name} must be one of {choices}, got {value!r}")
    return value
