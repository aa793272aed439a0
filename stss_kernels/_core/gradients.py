"""Feature gradients of a loss on a self-similarity matrix S = x x^T, shared by the chunked backends."""

from __future__ import annotations

import torch


def add_symmetric_grad(grad: torch.Tensor, tile: torch.Tensor, features: torch.Tensor, chunk: torch.Tensor) -> None:
    """grad += (G + G^T) x for the rows `chunk` of G = dL/d(x x^T), given as `tile` (c, N).

    grad (N, C) and features x (N, C) of one video; chunk holds c token ids.
    """
    if len(chunk) == len(features):  # the chunk is the whole video: one product instead of two
        grad.addmm_(tile + tile.T, features)
        return
    grad.index_add_(0, chunk, tile @ features)
    grad.addmm_(tile.T, features[chunk])
