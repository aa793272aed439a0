"""Shared test setup.

Without a CUDA device the Triton kernels run under the interpreter: the variable has to be set before
any `@triton.jit` function is created, so it is set here, before the packages are imported.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))

from tsa_helpers import tiny_runs  # noqa: E402, F401 - the session-scoped tiny training run of each family
