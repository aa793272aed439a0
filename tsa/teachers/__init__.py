"""Frozen video foundation-model teachers: pixels (B, T, 3, H, W) in [-1, 1] -> features (B, F, H', W', C)."""

from __future__ import annotations

import torch

from tsa.choices import TEACHER_KINDS
from tsa.teachers.base import Teacher, resize_video
from tsa.teachers.dinov2 import Dinov2Teacher
from tsa.teachers.videomae import VideoMAETeacher, convert_videomae_v2_checkpoint
from tsa.teachers.vjepa2 import VJEPA2Teacher

TEACHERS = dict(zip(TEACHER_KINDS, (VideoMAETeacher, Dinov2Teacher, VJEPA2Teacher)))

__all__ = [
    "TEACHERS", "Dinov2Teacher", "Teacher", "VJEPA2Teacher", "VideoMAETeacher", "convert_videomae_v2_checkpoint",
    "load_teacher", "resize_video",
]


def load_teacher(kind: str, path, *, dtype: torch.dtype = torch.float32, device=None,
                 drop_first_frame: bool = True) -> Teacher:
    """Load a frozen teacher from a local transformers folder: kind in {"videomae", "dinov2", "vjepa2"}.

    It runs in `dtype`: float32 by default (as VideoREPA runs its teacher), with autocast disabled.

    Raises FileNotFoundError for a missing path and ValueError for a folder holding another model type.
    """
    if kind not in TEACHERS:
        raise ValueError(f"kind must be one of {tuple(TEACHERS)}, got {kind!r}")
    teacher = TEACHERS[kind].from_pretrained(path, drop_first_frame=drop_first_frame)
    return teacher.to(device=device, dtype=dtype)
