"""Fused kernels for relational alignment losses (tempered self-similarity KL) in video diffusion training.

Each op lives in its own subpackage of `stss_kernels.ops` (public function and nn.Module, naive
reference, torch and Triton backends) on the shared core `stss_kernels._core`. Importing the package
does not import Triton: the Triton kernels load when a Triton backend first runs.
"""

from stss_kernels._core.tuning import clear_tuning_cache, tuned_configs
from stss_kernels._warmup import warmup
from stss_kernels.ops.tempered_kl import (
    TemperedKL,
    tempered_kl,
    tempered_kl_reference,
    tempered_kl_torch,
    tempered_kl_triton,
)

__version__ = "0.1.0"

__all__ = [
    "TemperedKL",
    "clear_tuning_cache",
    "tempered_kl",
    "tempered_kl_reference",
    "tempered_kl_torch",
    "tempered_kl_triton",
    "tuned_configs",
    "warmup",
]
