"""Per-query values to the op's result: weights applied, then "none", "sum" or "mean"."""

from __future__ import annotations

import torch

REDUCTIONS = ("none", "sum", "mean")


def skip_hint(weight: torch.Tensor | None) -> torch.Tensor | None:
    """The backends' query_weight: the weights, detached, so rows of weight 0 are skipped; None (every row
    computed) when there are none, or when the weights need their gradient d loss / d w_i, which is row_i on
    every row, zero-weight ones included."""
    if weight is None or (weight.requires_grad and torch.is_grad_enabled()):
        return None
    return weight.detach()


def reduce_rows(rows: torch.Tensor, weight: torch.Tensor | None, reduction: str) -> torch.Tensor:
    """rows (B, N) -> w * rows (B, N), its sum, or sum(w * rows) / sum(w) over the batch (the mean of
    rows without weights). An empty mask gives 0 with zero gradients, never NaN."""
    if weight is not None:
        rows = weight * rows
    if reduction == "none":
        return rows
    total = rows.sum()
    if reduction == "sum":
        return total
    if weight is None:
        return total / rows.numel()
    weight_sum = weight.sum()
    # An empty mask gives total == 0: divide by 1 there instead of 0 so value and gradients stay 0.
    return total / torch.where(weight_sum > 0, weight_sum, torch.ones_like(weight_sum))
