"""Which (query, key) pairs each variant compares, shared by every backend."""

from __future__ import annotations

import torch

# "full": every (i, j), the diagonal included; "spatial": i and j in the same frame; "temporal": different frames.
VARIANTS = ("full", "spatial", "temporal")


def pair_count(variant: str, num_tokens: int, frames: int) -> int:
    """Pairs per query: N, HW or N - HW (every query has the same number)."""
    per_frame = num_tokens // frames
    return {"full": num_tokens, "spatial": per_frame, "temporal": num_tokens - per_frame}[variant]


def pair_mask(variant: str, rows: torch.Tensor, num_tokens: int, frames: int) -> torch.Tensor | None:
    """(len(rows), N) bool: which keys query token `rows` is compared with (None for "full": all of them)."""
    if variant == "full":
        return None
    per_frame = num_tokens // frames
    same_frame = (rows // per_frame)[:, None] == (torch.arange(num_tokens, device=rows.device) // per_frame)[None, :]
    return same_frame if variant == "spatial" else ~same_frame


def uniform_per_video(row_grad: torch.Tensor) -> bool:
    """True when every query of a video has the same gradient g_i (B, N): then G_ij = g_i sign(..) [..] / count is
    symmetric (the pairs are), and (G + G^T) x = 2 G x needs one pass over the rows. Synchronises with the device."""
    return bool((row_grad == row_grad[:, :1]).all())
