"""What every op shares: validation, the backend switch, normalisation, reductions, chunking, kept
queries, symmetric feature gradients.

`stss_kernels._core.tiles` holds the Triton tile helpers; it is imported only by the Triton backends.
"""

from stss_kernels._core.backends import (
    accumulation_dtype,
    on_device,
    resolve_backend,
    triton_available,
    triton_interpreting,
)
from stss_kernels._core.chunking import CHUNK_BUDGET_BYTES, query_chunks, rows_per_chunk
from stss_kernels._core.gradients import add_symmetric_grad, power_of_two_normalized
from stss_kernels._core.normalize import l2_normalize
from stss_kernels._core.queries import kept_queries
from stss_kernels._core.reduction import REDUCTIONS, reduce_rows
from stss_kernels._core.validation import check_choice, check_real, check_temperature, flatten_tokens, query_weight

__all__ = [
    "CHUNK_BUDGET_BYTES",
    "REDUCTIONS",
    "accumulation_dtype",
    "add_symmetric_grad",
    "check_choice",
    "check_real",
    "check_temperature",
    "flatten_tokens",
    "kept_queries",
    "l2_normalize",
    "on_device",
    "power_of_two_normalized",
    "query_chunks",
    "query_weight",
    "reduce_rows",
    "resolve_backend",
    "rows_per_chunk",
    "triton_available",
    "triton_interpreting",
]
