"""The tempered self-similarity KL (TSA / M-TSA loss): op, reference, torch and Triton backends."""

from stss_kernels.ops.tempered_kl.op import TemperedKL, tempered_kl
from stss_kernels.ops.tempered_kl.reference import tempered_kl_reference
from stss_kernels.ops.tempered_kl.torch_backend import tempered_kl_torch

__all__ = ["TemperedKL", "tempered_kl", "tempered_kl_reference", "tempered_kl_torch"]
