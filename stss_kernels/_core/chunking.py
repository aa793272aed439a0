"""One rule for how many query rows a backend processes at once."""

from __future__ import annotations

import torch

from stss_kernels._core.library import host_sync_allowed

# Memory allowed for the (chunk x N) temporaries of one chunk of query rows, in every backend that chunks.
CHUNK_BUDGET_BYTES = 256 << 20


def rows_per_chunk(num_tokens: int, bytes_per_entry: int) -> int:
    """Query rows per chunk so that `bytes_per_entry` bytes for each of the chunk's (row, key) pairs fit in
    CHUNK_BUDGET_BYTES (read at call time, so it can be changed at run time)."""
    return max(1, min(num_tokens, CHUNK_BUDGET_BYTES // (num_tokens * bytes_per_entry)))


def query_chunks(query_weight: torch.Tensor | None, shape: torch.Size, chunk_size: int, device):
    """Yield (video index, query row indices) for each chunk of rows to compute (weight != 0, or all).

    shape = (B, N, ...) of the features. Finding the rows with weight != 0 syncs the host once per video;
    where a sync is not allowed (CUDA graph capture) every row is yielded, and the caller must zero the
    rows with weight 0 itself.
    """
    batch, num_tokens = shape[0], shape[1]
    skip = query_weight is not None and host_sync_allowed(query_weight)
    for b in range(batch):
        rows = torch.nonzero(query_weight[b]).squeeze(1) if skip else torch.arange(num_tokens, device=device)
        for chunk in rows.split(chunk_size):
            if len(chunk):
                yield b, chunk
