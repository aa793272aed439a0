"""Kept-query compaction shared by the Triton backends."""

from __future__ import annotations

import torch


def kept_queries(keep: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor] | tuple[None, None]:
    """Per video, the token ids of the kept queries (keep (B, N) bool) first, ascending, and how many there are.

    Returns index (B, N) int32 and count (B,) int32. The kernels walk only these: masked queries cost
    nothing (M-TSA keeps ~20% of them).
    """
    if keep is None:
        return None, None
    dropped = (~keep).to(torch.int8)
    index = torch.argsort(dropped, dim=1, stable=True).to(torch.int32).contiguous()
    return index, (dropped.shape[1] - dropped.sum(1, dtype=torch.int32)).contiguous()
