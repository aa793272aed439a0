"""What the tools around an op (bench, warmup, the compile report) need to know about it, in one object.

Each op folder holds a `spec.py` with `SPEC = OpSpec(...)`; `stss_kernels.ops.op_specs()` lists them. Nothing
outside the op folders names an op: bench builds its options, naive baseline, memory estimate and FLOP count
from these fields, `stss_kernels.warmup` and `python -m bench.compile` go through the same registry.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any


@dataclasses.dataclass(frozen=True)
class OpOption:
    """One setting of the op that bench exposes as a command-line option.

    name: the option (`--name` on the command line, with "_" as "-") and its key in a bench result;
    keywords: the op's keyword arguments it sets (one option may set several, e.g. both temperatures);
    parse: text -> value; check(name, value) -> value raises ValueError naming the option for a bad value;
    choices: the allowed values, if a fixed set; help: what it does, in plain words (the default is added).
    """

    name: str
    keywords: tuple[str, ...]
    default: Any
    help: str
    parse: Callable[[str], Any] = float
    check: Callable[[str, Any], Any] | None = None
    choices: tuple | None = None
    in_file_name: bool = False  # a value other than the default is part of bench's result file name


@dataclasses.dataclass(frozen=True)
class OpSpec:
    """One op as bench, warmup and the compile report see it.

    function: the public op, called as function(student (B, N, Cs), teacher (B, N, Ct), frames=, query_mask=,
        normalize=, reduction=, backend=, **op keyword arguments);
    naive_loss: the loss as a researcher writes it in eager PyTorch (full N x N matrices), called as
        naive_loss(student, teacher, frames=, query_mask=, normalize=, **op keyword arguments) -> the mean over
        the kept queries (float32, float64 for float64 inputs); bench's `reference` and `compiled` providers;
    options: the op's own settings (see OpOption), in the order bench lists them;
    naive_live_matrices: {"fwd": k, "fwd+bwd": k'}: how many B x N x N buffers of naive_loss are alive at once
        (bench's memory estimate, which decides what fits before running it);
    symmetric_gradient: the gradient with respect to the similarity matrix is symmetric without a query mask,
        so the feature gradient needs one product instead of two (bench's FLOP model);
    triton_kernels: the op has a Triton backend (`<package>.triton_backend`): warmup tunes it and the compile
        report compiles the kernels its `aot_kernels()` declares.
    """

    name: str
    package: str
    function: Callable[..., Any]
    naive_loss: Callable[..., Any]
    options: tuple[OpOption, ...]
    naive_live_matrices: Mapping[str, int]
    symmetric_gradient: bool = False
    triton_kernels: bool = True

    def option_values(self, values: Mapping[str, Any] | None = None) -> dict[str, Any]:
        """Every option's value: the given ones (by option name), the defaults for the rest."""
        values = dict(values or {})
        unknown = sorted(set(values) - {option.name for option in self.options})
        if unknown:
            raise ValueError(f"{self.name} has no option {unknown[0]!r}; its options: {[o.name for o in self.options]}")
        return {option.name: values.get(option.name, option.default) for option in self.options}

    def keyword_arguments(self, values: Mapping[str, Any] | None = None) -> dict[str, Any]:
        """The op's keyword arguments for these option values (defaults for the rest)."""
        values = self.option_values(values)
        return {keyword: values[option.name] for option in self.options for keyword in option.keywords}

    def file_name_part(self, values: Mapping[str, Any] | None = None) -> str:
        """The values of the `in_file_name` options that differ from their defaults, joined by "-"."""
        values = self.option_values(values)
        return "-".join(
            str(values[option.name])
            for option in self.options
            if option.in_file_name and values[option.name] != option.default
        )


def masked_mean(rows, query_mask):
    """Mean of per-query rows (B, N) over the queries a bool query_mask (B, N) keeps (all of them for None)."""
    if query_mask is None:
        return rows.mean()
    weight = query_mask.to(rows.dtype)
    return (rows * weight).sum() / weight.sum()
