"""M-TSA motion query mask (docs/method.md, "M-TSA")."""

from __future__ import annotations

import math

import torch


def motion_saliency(video: torch.Tensor, patch_size: tuple[int, int, int] = (2, 16, 16)) -> torch.Tensor:
    """Tubelet L1 temporal differences: video (B, T, C, H, W) -> D (B, T/pt, H/ph, W/pw), float32.

    D[t, h, w] = sum over the tubelet's pixels of |Y[t] - Y[t-1]|, Y[t] the tubelet at temporal
    position t; position 0 copies position 1 (0 everywhere for a single position).
    """
    if not isinstance(video, torch.Tensor) or video.dim() != 5:
        raise ValueError(f"video must be a (B, T, C, H, W) tensor, got {getattr(video, 'shape', type(video))}")
    patch_t, patch_h, patch_w = _check_patch_size(patch_size)
    batch, frames, _, height, width = video.shape
    if frames % patch_t or height % patch_h or width % patch_w or min(frames, height, width) == 0:
        raise ValueError(
            f"video (T, H, W) = ({frames}, {height}, {width}) must be non-empty multiples of "
            f"patch_size {patch_size}"
        )
    grid = (frames // patch_t, height // patch_h, width // patch_w)
    if grid[0] == 1:
        return video.new_zeros(batch, *grid, dtype=torch.float32)
    change = (video[:, patch_t:].float() - video[:, :-patch_t].float()).abs().sum(2)  # (B, T - pt, H, W)
    change = change.view(batch, grid[0] - 1, patch_t, grid[1], patch_h, grid[2], patch_w).sum((2, 4, 6))
    return torch.cat([change[:, :1], change], dim=1)


def motion_query_mask(
    video: torch.Tensor, patch_size: tuple[int, int, int] = (2, 16, 16), top_k: float = 0.2
) -> torch.Tensor:
    """Per-frame top-k motion mask: video (B, T, C, H, W) -> bool (B, N), N = F*H'*W' frame-major.

    Works on pixels (tubelets of the teacher's patch, e.g. 2x16x16) and on latents (e.g. 1x2x2).
    Each of the F = T/pt frames keeps round(top_k * H'W') tokens (nearest integer, at least 1) with
    the largest `motion_saliency` (ties, e.g. a static clip, are broken arbitrarily).
    """
    if isinstance(top_k, bool) or not isinstance(top_k, (int, float)) or not 0.0 < top_k <= 1.0:
        raise ValueError(f"top_k must be a fraction in (0, 1], got {top_k!r}")
    saliency = motion_saliency(video, patch_size)
    batch, frames, height, width = saliency.shape
    per_frame = height * width
    keep = min(per_frame, max(1, math.floor(top_k * per_frame + 0.5)))
    scores = saliency.view(batch, frames, per_frame)
    mask = torch.zeros_like(scores, dtype=torch.bool)
    mask.scatter_(-1, scores.topk(keep, dim=-1).indices, True)
    return mask.view(batch, frames * per_frame)


def _check_patch_size(patch_size) -> tuple[int, int, int]:
    patch = tuple(patch_size) if isinstance(patch_size, (tuple, list)) else ()
    if len(patch) != 3 or any(isinstance(p, bool) or not isinstance(p, int) or p < 1 for p in patch):
        raise ValueError(f"patch_size must be three positive ints (t, h, w), got {patch_size!r}")
    return patch
