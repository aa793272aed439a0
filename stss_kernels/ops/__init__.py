"""One subpackage per op: its public function and nn.Module (op.py), naive reference, torch and Triton backends,
and its spec (spec.py: what bench, warmup and the compile report need to know about it).

A new op is a new folder here with those files, and its name in OP_NAMES.
"""

from __future__ import annotations

import functools
import importlib

# The op folders, in the order tools list them; the first is bench's default op.
OP_NAMES = ("tempered_kl", "relation_distance")


@functools.cache
def op_specs() -> dict:
    """{op name: its OpSpec} of every op in OP_NAMES."""
    return {name: importlib.import_module(f"{__name__}.{name}.spec").SPEC for name in OP_NAMES}


def op_spec(name: str):
    """The OpSpec of op `name`; ValueError naming the ops there are otherwise."""
    specs = op_specs()
    if name not in specs:
        raise ValueError(f"op must be one of {tuple(specs)}, got {name!r}")
    return specs[name]
