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


def power_of_two_normalized(row_grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """row_grad / scale and scale, an exact power of two bringing max |row_grad| to about 1.

    Kernels that round gradient tiles to fp16 / bf16 run on the scaled values (a mean's 1 / (B N) would
    underflow) and multiply the fp32 result by `scale` afterwards; scale is 1 for an all-zero gradient.
    """
    magnitude = row_grad.abs().amax()
    scale = torch.where(magnitude > 0, torch.exp2(torch.round(torch.log2(magnitude))), 1.0)
    return row_grad / scale, scale
