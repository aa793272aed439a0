"""L2 normalisation over channels, shared by every op's `normalize=True`."""

from __future__ import annotations

import torch

from stss_kernels._core.backends import accumulation_dtype

# Norm below which a token's direction is undefined (F.normalize's eps).
NORM_EPS = 1e-12


def l2_normalize(x: torch.Tensor) -> torch.Tensor:
    """x / max(||x||, 1e-12) over channels in (at least) fp32, returned in the input dtype.

    Values as F.normalize. Gradient: exact for tokens of norm > 1e-12; zero for the others (the all-zero
    token stays zero and gets no gradient), where F.normalize's gradient is 1e12 times the upstream one.
    """
    return _L2Normalize.apply(x)


def _inverse_norm(x: torch.Tensor, compute_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """1 / max(||x||, eps) (B, N, 1) in compute_dtype, and where ||x|| > eps."""
    square_norm = x.to(compute_dtype).square().sum(-1, keepdim=True)
    return square_norm.clamp_min(NORM_EPS**2).rsqrt(), square_norm > NORM_EPS**2


class _L2Normalize(torch.autograd.Function):
    """Computed in fp32; saves x and the (B, N, 1) inverse norms only.

    (F.normalize on an fp32 copy would keep that copy, twice a bf16 input's size, alive until backward.)
    """

    @staticmethod
    def forward(ctx, x):
        inv_norm, regular = _inverse_norm(x, accumulation_dtype(x.dtype))
        ctx.save_for_backward(x, inv_norm, regular)
        return (x.to(inv_norm.dtype) * inv_norm).to(x.dtype)

    @staticmethod
    def backward(ctx, grad_y):
        x, inv_norm, regular = ctx.saved_tensors
        if torch.is_grad_enabled():  # create_graph: recompute the norm differentiably, for a correct double backward
            inv_norm, _ = _inverse_norm(x, inv_norm.dtype)
        y = x.to(inv_norm.dtype) * inv_norm
        grad_y = grad_y.to(inv_norm.dtype)
        # d(x / |x|) = (g - y (g . y)) / |x| where |x| > eps; zero below (the direction is undefined there).
        grad_x = (grad_y - y * (grad_y * y).sum(-1, keepdim=True)) * inv_norm
        return torch.where(regular, grad_x, 0.0).to(x.dtype)
