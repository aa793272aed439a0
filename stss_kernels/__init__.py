"""Fused kernels for relational alignment losses in video diffusion training: the tempered self-similarity KL
(TSA / M-TSA) and the relation distance (VideoREPA's TRD).

Each op lives in its own subpackage of `stss_kernels.ops` (public function and nn.Module, naive
reference, torch and Triton backends) on the shared core `stss_kernels._core`.
"""

from stss_kernels._core.tuning import clear_tuning_cache, tuned_configs
from stss_kernels._warmup import warmup
from stss_kernels.ops.relation_distance import (
    RelationDistance,
    relation_distance,
    relation_distance_reference,
    relation_distance_torch,
)
from stss_kernels.ops.tempered_kl import TemperedKL, tempered_kl, tempered_kl_reference, tempered_kl_torch

__version__ = "0.1.0"

__all__ = [
    "RelationDistance",
    "TemperedKL",
    "clear_tuning_cache",
    "relation_distance",
    "relation_distance_reference",
    "relation_distance_torch",
    "relation_distance_triton",
    "tempered_kl",
    "tempered_kl_reference",
    "tempered_kl_torch",
    "tempered_kl_triton",
    "tuned_configs",
    "warmup",
]

# Triton backends, imported on first use: `import stss_kernels` works without Triton.
_LAZY = {
    "tempered_kl_triton": "stss_kernels.ops.tempered_kl.triton_backend",
    "relation_distance_triton": "stss_kernels.ops.relation_distance.triton_backend",
}


def __getattr__(name):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
