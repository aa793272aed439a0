"""Shared test setup.

Without a CUDA device the Triton kernels run under the interpreter: the variable has to be set before
any `@triton.jit` function is created, so it is set here, before the packages are imported.

pyproject's addopts pass `--benchmark-skip`, an option of pytest-benchmark; where that plugin is missing the
option is registered here and the tests that time with it are skipped, so the rest of the suite still runs.
"""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))

# pytest-benchmark's switches that pyproject or a command line may pass.
BENCHMARK_OPTIONS = ("--benchmark-skip", "--benchmark-enable", "--benchmark-disable", "--benchmark-only")


def pytest_addoption(parser, pluginmanager):
    if pluginmanager.hasplugin("benchmark"):
        return
    group = parser.getgroup("benchmark", "pytest-benchmark is not installed: its switches are accepted and ignored")
    for option in BENCHMARK_OPTIONS:
        group.addoption(option, action="store_true", help="ignored (pytest-benchmark is not installed)")


def pytest_collection_modifyitems(config, items):
    if config.pluginmanager.hasplugin("benchmark"):
        return
    skip = pytest.mark.skip(reason="pytest-benchmark is not installed")
    for item in items:
        if "benchmark" in getattr(item, "fixturenames", ()) or item.get_closest_marker("benchmark"):
            item.add_marker(skip)


def pytest_make_parametrize_id(config, val, argname):
    """Dtypes by name in test ids (`[bfloat16]`, not `[dtype1]`), so `-k bfloat16` selects the bf16 cases."""
    if isinstance(val, torch.dtype):
        return str(val).removeprefix("torch.")
    return None


from tsa_helpers import tiny_runs  # noqa: E402, F401 - the session-scoped tiny training run of each family
