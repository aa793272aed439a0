"""Backend availability, the accumulation dtype, and the backend switch every op shares."""

from __future__ import annotations

import contextlib
import importlib
import os
import sys
from collections.abc import Callable

import torch

from stss_kernels._core.validation import check_choice

_TRITON_IMPORTS: dict[str, bool] = {}


def triton_available() -> bool:
    """True when Triton imports (it is only installed on Linux). Cached in a dict, not functools.cache, which
    torch.compile warns about."""
    if "triton" not in _TRITON_IMPORTS:
        try:
            import triton  # noqa: F401
        except ImportError:
            _TRITON_IMPORTS["triton"] = False
        else:
            _TRITON_IMPORTS["triton"] = True
    return _TRITON_IMPORTS["triton"]


def triton_interpreting() -> bool:
    """True when Triton kernels run in the CPU interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "yes", "on")


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype similarities, softmaxes and losses accumulate in: float64 for float64 inputs, else float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def on_device(tensor: torch.Tensor) -> contextlib.AbstractContextManager:
    """Launch kernels on the tensor's GPU, not the current one."""
    return torch.cuda.device(tensor.device) if tensor.is_cuda else contextlib.nullcontext()


def check_triton_runs(what: str, device: torch.device, instead: str) -> None:
    """Raise unless Triton kernels can run on `device`: Triton installed, and CUDA/ROCm tensors or the CPU
    interpreter (TRITON_INTERPRET=1). `what` names the caller, `instead` the portable alternative."""
    if not triton_available():
        raise RuntimeError(f"{what} needs Triton, which is not installed; use {instead}")
    if device.type != "cuda" and not triton_interpreting():
        raise ValueError(
            f"{what} needs CUDA/ROCm tensors, got {device.type} tensors; set TRITON_INTERPRET=1 "
            f"to run the kernels in the CPU interpreter, or use {instead}"
        )


def resolve_backend(
    backends: dict[str, tuple[str, str]], backend: str, device: torch.device, dtype: torch.dtype
) -> Callable:
    """The function of `backend` from an op's table {name: (module, function)}.

    "auto" picks "triton" for CUDA/ROCm tensors when Triton imports (not for float64), else "torch".
    A module not yet imported is imported here (so Triton stays optional); one already imported is read
    from sys.modules, which torch.compile traces without a graph break.
    """
    check_choice("backend", backend, ("auto", *backends))
    if backend == "auto":
        use_triton = device.type == "cuda" and dtype != torch.float64 and triton_available()
        backend = "triton" if use_triton else "torch"
    if backend == "triton":
        check_triton_runs("backend='triton'", device, "backend='torch'")
    module, name = backends[backend]
    loaded = sys.modules.get(module)
    return getattr(loaded if loaded is not None else importlib.import_module(module), name)
