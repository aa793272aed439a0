"""Which generation of the Triton kernels runs: 1 (forward.py, backward.py) or 2 (forward_v2.py, backward_v2.py).

Both share the saved-statistics contract, so either backward can follow either forward. Set
`stss_kernels.ops.tempered_kl.triton_backend.KERNEL_GENERATION = 2` (read at each call) or the environment
variable STSS_KERNEL_GENERATION=2; the attribute wins. Generation 1 is the default until a GPU has timed both.
"""

from __future__ import annotations

import os

GENERATIONS = (1, 2)
DEFAULT_GENERATION = 1
GENERATION_ENV = "STSS_KERNEL_GENERATION"


def kernel_generation() -> int:
    """The generation in force: the package attribute KERNEL_GENERATION, else $STSS_KERNEL_GENERATION, else 1."""
    from stss_kernels.ops.tempered_kl import triton_backend

    value = triton_backend.KERNEL_GENERATION
    source = "stss_kernels.ops.tempered_kl.triton_backend.KERNEL_GENERATION"
    if value is None:
        value, source = os.environ.get(GENERATION_ENV, str(DEFAULT_GENERATION)), GENERATION_ENV
    try:
        generation = int(value)
    except (TypeError, ValueError):
        generation = None
    if generation not in GENERATIONS:
        raise ValueError(f"{source} must be one of {GENERATIONS}, got {value!r}")
    return generation


def kernels(generation: int):
    """(forward, feature_grad) functions of a generation; both keep forward.py / backward.py's signatures."""
    if generation == 2:
        from stss_kernels.ops.tempered_kl.triton_backend.backward_v2 import tempered_kl_feature_grad_v2
        from stss_kernels.ops.tempered_kl.triton_backend.forward_v2 import tempered_kl_forward_v2

        return tempered_kl_forward_v2, tempered_kl_feature_grad_v2
    from stss_kernels.ops.tempered_kl.triton_backend.backward import tempered_kl_feature_grad
    from stss_kernels.ops.tempered_kl.triton_backend.forward import tempered_kl_forward

    return tempered_kl_forward, tempered_kl_feature_grad
