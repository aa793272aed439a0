"""Backend availability helpers."""

from __future__ import annotations

import functools
import os


@functools.cache
def triton_available() -> bool:
    """True when Triton imports (it is only installed on Linux)."""
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def triton_interpreting() -> bool:
    """True when Triton kernels run in the CPU interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "yes", "on")
