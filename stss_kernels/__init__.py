"""Fused kernels for tempered spatio-temporal self-similarity (STSS) alignment losses."""

from stss_kernels.reference import tempered_kl_reference
from stss_kernels.tempered_kl import TemperedKL, tempered_kl
from stss_kernels.torch_backend import tempered_kl_torch

__version__ = "0.1.0"

__all__ = ["TemperedKL", "tempered_kl", "tempered_kl_reference", "tempered_kl_torch", "tempered_kl_triton"]


def __getattr__(name):
    # The Triton backend is imported on first use: `import stss_kernels` works without Triton.
    if name == "tempered_kl_triton":
        from stss_kernels.triton_backend import tempered_kl_triton

        return tempered_kl_triton
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
