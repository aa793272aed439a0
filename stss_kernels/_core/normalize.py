"""L2 normalisation over channels, shared by every op's `normalize=True`."""

from __future__ import annotations

import torch

from stss_kernels._core.backends import accumulation_dtype


def l2_normalize(x: torch.Tensor) -> torch.Tensor:
    """L2-normalise over channels in (at least) fp32, returned in the input dtype."""
    return _L2Normalize.apply(x)


class _L2Normalize(torch.autograd.Function):
    """x / max(||x||, 1e-12) over the last dim, computed in fp32; saves x and the (B, N, 1) inverse norms only.

    (F.normalize on an fp32 copy would keep that copy, twice a bf16 input's size, alive until backward.)
    """

    @staticmethod
    def forward(ctx, x):
        compute_dtype = accumulation_dtype(x.dtype)
        inv_norm = x.to(compute_dtype).square().sum(-1, keepdim=True).clamp_min(1e-24).rsqrt()
        ctx.save_for_backward(x, inv_norm)
        return (x.to(compute_dtype) * inv_norm).to(x.dtype)

    @staticmethod
    def backward(ctx, grad_y):
        x, inv_norm = ctx.saved_tensors
        y = x.to(inv_norm.dtype) * inv_norm
        grad_y = grad_y.to(inv_norm.dtype)
        # d(x / |x|) = (g - y (g . y)) / |x|; below the 1e-12 clamp the map is x * 1e12, whose gradient is g * 1e12.
        radial = torch.where(inv_norm < 1e12, (grad_y * y).sum(-1, keepdim=True), 0.0)
        return ((grad_y - y * radial) * inv_norm).to(x.dtype)
