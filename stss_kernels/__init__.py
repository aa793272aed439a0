"""Fused kernels for relational alignment losses in video diffusion training: the tempered self-similarity KL
(TSA / M-TSA) and the relation distance (VideoREPA's TRD).

Each op lives in its own subpackage of `stss_kernels.ops` (public function and nn.Module, naive
reference, torch and Triton backends) on the shared core `stss_kernels._core`. Importing the package
does not import Triton: the Triton kernels load when a Triton backend first runs.
"""

from stss_kernels._core.tuning import clear_tuning_cache, tuned_configs
from stss_kernels._warmup import warmup
from stss_kernels.ops.relation_distance import (
    RelationDistance,
    relation_distance,
    relation_distance_reference,
    relation_distance_torch,
    relation_distance_triton,
)
from stss_kernels.ops.tempered_kl import (
    TemperedKL,
    tempered_kl,
    tempered_kl_reference,
    tempered_kl_torch,
    tempered_kl_triton,
)

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
