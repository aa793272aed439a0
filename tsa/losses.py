"""Alignment losses on (B, F, H, W, C) student / teacher features: TSA / M-TSA, TRD (VideoREPA), REPA."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

import stss_kernels
from stss_kernels._core.backends import accumulation_dtype
from tsa import sharding
from tsa.choices import TRD_VARIANTS
from tsa.masks import motion_query_mask


def check_feature_pair(student: torch.Tensor, teacher: torch.Tensor, same_channels: bool = False,
                       sharded: bool = False) -> None:
    """Student and teacher must be (B, F, H, W, C) on the same grid (and width, if `same_channels`); `sharded`:
    (B, n, C) token slices of a context-parallel group, the same n."""
    dims, layout = (3, "(B, n, C) token slices") if sharded else (5, "(B, F, H, W, C) features")
    for name, value in (("student", student), ("teacher", teacher)):
        if not isinstance(value, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
        if value.dim() != dims or not value.is_floating_point():
            raise ValueError(f"{name} must be floating {layout}, got {value.dtype} {tuple(value.shape)}")
    last = dims if same_channels else dims - 1
    if student.shape[:last] != teacher.shape[:last]:
        what = "shapes" if same_channels else "(B, F, H, W) grids"
        raise ValueError(
            f"student and teacher {what} differ: {tuple(student.shape[:last])} vs {tuple(teacher.shape[:last])}"
        )


class TSALoss(nn.Module):
    """Tempered self-similarity alignment (docs/method.md, "TSA" and "M-TSA") on `stss_kernels.tempered_kl`.

    forward(student (B, F, H, W, Cs), teacher (B, F, H, W, Ct), video=None, query_mask=None) -> scalar
    float32: mean over queries and target frames of KL(P_teacher || P_student), cosine similarities,
    one softmax per target frame. query_mask (B, N) bool / float restricts the queries; with
    masked=True (M-TSA) and no query_mask, the mask is `motion_query_mask(video, top_k=top_k)` with the
    tubelet size that maps `video` (B, T, C, H', W') onto the feature grid (pixels or latents).

    Context parallelism: with `process_group`, student and teacher are this rank's (B, n, C) slices of the
    frame-major tokens, `frames` the whole sequence's frame count and `query_mask` the local slice; the result is
    the global loss on every rank (`stss_kernels.tempered_kl` with `process_group`).
    """

    def __init__(self, tau: float = 0.1, tau_teacher: float | None = None, masked: bool = False,
                 top_k: float = 0.2, backend: str = "auto"):
        super().__init__()
        self.tau = tau
        self.tau_teacher = tau if tau_teacher is None else tau_teacher
        self.masked = masked
        self.top_k = top_k
        self.backend = backend

    def forward(self, student: torch.Tensor, teacher: torch.Tensor, video: torch.Tensor | None = None,
                query_mask: torch.Tensor | None = None, *, frames: int | None = None,
                process_group=None) -> torch.Tensor:
        check_feature_pair(student, teacher, sharded=process_group is not None)
        if process_group is not None:
            if self.masked and query_mask is None:
                raise ValueError("masked TSALoss on token slices needs the local `query_mask`")
            return stss_kernels.tempered_kl(
                student, teacher.to(student.dtype), frames=frames, tau_student=self.tau,
                tau_teacher=self.tau_teacher, query_mask=query_mask, backend=self.backend,
                process_group=process_group,
            )
        if self.masked and query_mask is None:
            if video is None:
                raise ValueError("masked TSALoss needs `video` (to build the motion mask) or `query_mask`")
            query_mask = motion_query_mask(video, tubelet_for_grid(video, student.shape[1:4]), self.top_k)
        return stss_kernels.tempered_kl(
            student, teacher.to(student.dtype), tau_student=self.tau, tau_teacher=self.tau_teacher,
            query_mask=query_mask, backend=self.backend,
        )

    def extra_repr(self) -> str:
        return f"tau={self.tau}, tau_teacher={self.tau_teacher}, masked={self.masked}, top_k={self.top_k}"


def tubelet_for_grid(video: torch.Tensor, grid) -> tuple[int, int, int]:
    """The (t, h, w) tubelet that tiles a (B, T, C, H, W) video into the token grid (F, H', W')."""
    if not isinstance(video, torch.Tensor) or video.dim() != 5:
        raise ValueError(f"video must be a (B, T, C, H, W) tensor, got {getattr(video, 'shape', type(video))}")
    sizes = (video.shape[1], *video.shape[-2:])
    if any(size % cells or size < cells for size, cells in zip(sizes, grid)):
        raise ValueError(f"video (T, H, W) = {sizes} does not tile the feature grid {tuple(grid)}")
    return tuple(size // cells for size, cells in zip(sizes, grid))


class TRDLoss(nn.Module):
    """VideoREPA token relation distillation (docs/method.md, "TRD"): mean of relu(|S_ij - T_ij| - margin).

    S, T are cosine Gram matrices of the student / teacher tokens. variant "full": all N x N pairs per
    video; "spatial": per-frame HW x HW Gram matrices; "temporal": cross-frame pairs only (0 for a
    single frame). Runs on `stss_kernels.relation_distance` (fused Triton kernels on GPU, a chunked
    torch backend elsewhere), so no N x N matrix is ever materialised: it fits the DiT's native grid.
    """

    def __init__(self, margin: float = 0.1, variant: str = "full", backend: str = "auto"):
        super().__init__()
        if variant not in TRD_VARIANTS:
            raise ValueError(f"variant must be one of {TRD_VARIANTS}, got {variant!r}")
        self.margin, self.variant, self.backend = margin, variant, backend

    def forward(self, student: torch.Tensor, teacher: torch.Tensor, *, frames: int | None = None,
                process_group=None) -> torch.Tensor:
        """(B, F, H, W, C) features, or with `process_group` (B, n, C) token slices and the global `frames`."""
        check_feature_pair(student, teacher, sharded=process_group is not None)
        if process_group is not None:
            return stss_kernels.relation_distance(
                student, teacher.to(student.dtype), frames=frames, margin=self.margin, variant=self.variant,
                backend=self.backend, process_group=process_group,
            )
        return stss_kernels.relation_distance(
            student, teacher.to(student.dtype), margin=self.margin, variant=self.variant, backend=self.backend
        )

    def extra_repr(self) -> str:
        return f"margin={self.margin}, variant={self.variant!r}, backend={self.backend!r}"


class REPALoss(nn.Module):
    """REPA (docs/method.md): negative mean cosine similarity between student and teacher tokens (same width)."""

    def forward(self, student: torch.Tensor, teacher: torch.Tensor, *, frames: int | None = None,
                process_group=None) -> torch.Tensor:
        """(B, F, H, W, C) features, or with `process_group` (B, n, C) token slices (the mean is global)."""
        check_feature_pair(student, teacher, same_channels=True, sharded=process_group is not None)
        dtype = accumulation_dtype(student.dtype)
        cosine = F.cosine_similarity(student.to(dtype), teacher.to(dtype), dim=-1)
        if process_group is None:
            return -cosine.mean()
        count = torch.tensor(float(cosine.numel()))
        torch.distributed.all_reduce(count, group=process_group)
        return -sharding.global_mean(cosine.sum(), count.item(), process_group)
