"""Alignment losses on (B, F, H, W, C) student / teacher features: TSA / M-TSA, TRD (VideoREPA), REPA."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

import stss_kernels
from stss_kernels._core.backends import accumulation_dtype
from tsa.choices import TRD_VARIANTS
from tsa.masks import motion_query_mask


def check_feature_pair(student: torch.Tensor, teacher: torch.Tensor, same_channels: bool = False) -> None:
    """Student and teacher must be (B, F, H, W, C) on the same grid (and width, if `same_channels`)."""
    for name, value in (("student", student), ("teacher", teacher)):
        if not isinstance(value, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
        if value.dim() != 5 or not value.is_floating_point():
            raise ValueError(
                f"{name} must be floating (B, F, H, W, C) features, got {value.dtype} {tuple(value.shape)}"
            )
    last = 5 if same_channels else 4
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
                query_mask: torch.Tensor | None = None) -> torch.Tensor:
        check_feature_pair(student, teacher)
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
    single frame). Plain PyTorch, `chunk_size` query rows at a time in the forward and in the
    analytic backward (dX = 2 G x, G = sign(S - T) [|S - T| > margin] is symmetric), so at most one
    (B, chunk, N) block is alive.
    """

    def __init__(self, margin: float = 0.1, variant: str = "full", chunk_size: int = 1024):
        super().__init__()
        if variant not in TRD_VARIANTS:
            raise ValueError(f"variant must be one of {TRD_VARIANTS}, got {variant!r}")
        if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
            raise ValueError(f"chunk_size must be a positive int, got {chunk_size!r}")
        self.margin, self.variant, self.chunk_size = margin, variant, chunk_size

    def forward(self, student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
        check_feature_pair(student, teacher)
        batch, frames, height, width = student.shape[:4]
        dtype = accumulation_dtype(student.dtype)
        s = F.normalize(student.to(dtype), dim=-1)
        t = F.normalize(teacher.to(dtype), dim=-1)
        per_frame = height * width
        if self.variant == "spatial":
            s, t = s.reshape(batch * frames, per_frame, -1), t.reshape(batch * frames, per_frame, -1)
            pairs = batch * frames * per_frame**2
        else:
            s, t = s.reshape(batch, frames * per_frame, -1), t.reshape(batch, frames * per_frame, -1)
            pairs = batch * (frames * per_frame) ** 2
            if self.variant == "temporal":
                pairs -= batch * frames * per_frame**2
        cross_frame = per_frame if self.variant == "temporal" else 0
        total = _RelationExcess.apply(s, t, self.margin, self.chunk_size, cross_frame)
        return total / max(pairs, 1)

    def extra_repr(self) -> str:
        return f"margin={self.margin}, variant={self.variant!r}, chunk_size={self.chunk_size}"


def _relation_gap(s, t, start: int, stop: int, cross_frame: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """S - T for rows [start, stop) (B, rows, N), and the same-frame mask when cross_frame = HW > 0."""
    gap = s[:, start:stop] @ s.transpose(1, 2) - t[:, start:stop] @ t.transpose(1, 2)
    if not cross_frame:
        return gap, None
    rows = torch.arange(start, stop, device=s.device) // cross_frame
    cols = torch.arange(s.shape[1], device=s.device) // cross_frame
    return gap, rows[:, None] == cols[None, :]


class _RelationExcess(torch.autograd.Function):
    """sum over (b, i, j) of relu(|S_ij - T_ij| - margin), S = s s^T, T = t t^T, row chunk by row chunk."""

    @staticmethod
    def forward(ctx, s, t, margin: float, chunk_size: int, cross_frame: int):
        ctx.save_for_backward(s, t)
        ctx.margin, ctx.chunk_size, ctx.cross_frame = margin, chunk_size, cross_frame
        total = s.new_zeros(())
        for start in range(0, s.shape[1], chunk_size):
            gap, same_frame = _relation_gap(s, t, start, min(start + chunk_size, s.shape[1]), cross_frame)
            excess = (gap.abs() - margin).clamp_min_(0)
            if same_frame is not None:
                excess.masked_fill_(same_frame, 0)
            total += excess.sum()
        return total

    @staticmethod
    def backward(ctx, grad_total):
        s, t = ctx.saved_tensors
        grad_s = torch.zeros_like(s) if ctx.needs_input_grad[0] else None
        grad_t = torch.zeros_like(t) if ctx.needs_input_grad[1] else None
        for start in range(0, s.shape[1], ctx.chunk_size):
            stop = min(start + ctx.chunk_size, s.shape[1])
            gap, same_frame = _relation_gap(s, t, start, stop, ctx.cross_frame)
            sign = torch.where(gap.abs() > ctx.margin, gap.sign(), 0) * (2 * grad_total)
            if same_frame is not None:
                sign.masked_fill_(same_frame, 0)
            if grad_s is not None:
                grad_s[:, start:stop] = sign @ s
            if grad_t is not None:
                grad_t[:, start:stop] = -(sign @ t)
        return grad_s, grad_t, None, None, None


class REPALoss(nn.Module):
    """REPA (docs/method.md): negative mean cosine similarity between student and teacher tokens (same width)."""

    def forward(self, student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
        check_feature_pair(student, teacher, same_channels=True)
        dtype = accumulation_dtype(student.dtype)
        return -F.cosine_similarity(student.to(dtype), teacher.to(dtype), dim=-1).mean()
