"""The tempered self-similarity KL (TSA / M-TSA loss): op, reference, torch and Triton backends."""

from stss_kernels.ops.tempered_kl.op import TemperedKL, tempered_kl
from stss_kernels.ops.tempered_kl.reference import tempered_kl_reference
from stss_kernels.ops.tempered_kl.torch_backend import tempered_kl_torch
from stss_kernels.ops.tempered_kl.triton_backend import tempered_kl_triton  # registers its custom op; no Triton import

__all__ = ["TemperedKL", "tempered_kl", "tempered_kl_reference", "tempered_kl_torch", "tempered_kl_triton"]
