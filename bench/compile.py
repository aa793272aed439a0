"""Ahead-of-time compile report: every Triton kernel and autotune config for sm_90a and sm_80, no GPU needed.

    python -m bench.compile [--arch sm_90a] [--dtype bf16] [--kernel forward] [--preset tsa-grid] [--subset]
                            [--json report.json] [--jobs 2]

Each kernel variant an op's `triton_backend.aot_kernels()` declares is compiled by `triton.compile` for a
`GPUTarget` with the argument specialisation the launcher would get at the preset's sizes (16-byte divisibility,
scalars equal to 1), for every config of its launch-config list (sm_90a only for a `hopper_only` one),
bf16 / fp16 / fp32, with and without a query mask. Registers and spills come from Triton's bundled ptxas
(`-v`), shared memory from the compiled kernel's metadata, tensor-core instructions are counted in the SASS
(cuobjdump): HGMMA (wgmma, sm_90a) and HMMA (mma.sync). Exit status 1 when a 16-bit config spills registers,
a config needs more shared memory than a block may have, or a compile fails.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import dataclasses
import importlib
import importlib.util
import io
import json
import math
import os
import re
import subprocess
import sys
import tempfile
import warnings

DTYPES = ("bf16", "fp16", "fp32")
SIXTEEN_BIT = ("bf16", "fp16")


@dataclasses.dataclass(frozen=True)
class Arch:
    """Per-SM limits of one compute capability (CUDA occupancy calculator values)."""

    name: str
    capability: int
    shared_per_sm: int
    shared_per_block: int
    registers_per_sm: int = 65536
    max_warps: int = 64
    max_blocks: int = 32
    register_unit: int = 256  # registers are allocated per warp in units of 256
    reserved_shared_per_block: int = 1024


ARCHS = {
    "sm_90a": Arch("sm_90a", 90, shared_per_sm=228 * 1024, shared_per_block=227 * 1024),
    "sm_80": Arch("sm_80", 80, shared_per_sm=164 * 1024, shared_per_block=163 * 1024),
}


def _problems() -> dict:
    from bench.workloads import PRESETS
    from stss_kernels._core.aot import Problem

    problems = {}
    for name in ("tsa-grid", "cogvideox-native"):
        (w,) = PRESETS[name]
        problems[name] = Problem(name, w.batch, w.frames, w.hw, w.cs, w.ct)
    tsa = problems["tsa-grid"]
    problems["tsa-grid-c64"] = dataclasses.replace(tsa, name="tsa-grid-c64", cs=64, ct=64)
    return problems


PRESET_NAMES = ("tsa-grid", "cogvideox-native", "tsa-grid-c64")


def discover_kernels() -> list:
    """AotKernel entries of every registered op (stss_kernels.ops.op_specs) with Triton kernels: what its
    triton_backend's aot_kernels() (in the package or its `aot` module) declares."""
    from stss_kernels.ops import op_specs

    kernels = []
    for spec in op_specs().values():
        if not spec.triton_kernels:
            continue
        backend = f"{spec.package}.triton_backend"
        module = importlib.import_module(backend)
        if not hasattr(module, "aot_kernels") and importlib.util.find_spec(f"{backend}.aot") is not None:
            module = importlib.import_module(f"{backend}.aot")
        if hasattr(module, "aot_kernels"):
            kernels += module.aot_kernels()
    return kernels


# ----------------------------------------------------------------------------------------------------------
# Specialisation, compile, metrics


def specialize(fn, arguments: dict, blocks: dict, backend) -> tuple[dict, dict, dict]:
    """(signature, constexprs, attrs) for triton.compile, as the JIT derives them from these argument values."""
    from triton._C.libtriton import native_specialize_impl
    from triton.backends.compiler import BaseBackend

    from stss_kernels._core.aot import Pointer

    values = {**arguments, **blocks}
    names = [param.name for param in fn.params]
    if set(values) != set(names):
        raise ValueError(
            f"{fn.__name__}: arguments do not match the kernel's parameters: "
            f"missing {sorted(set(names) - set(values))}, unknown {sorted(set(values) - set(names))}"
        )
    signature, constexprs, attrs = {}, {}, {}
    for index, param in enumerate(fn.params):
        value = values[param.name]
        if param.is_constexpr:
            kind, spec = "constexpr", value
        elif isinstance(value, Pointer):
            aligned = value.aligned and not param.do_not_specialize_on_alignment
            kind, spec = value.triton_type, "D" if aligned else ""
        else:
            kind, spec = native_specialize_impl(
                BaseBackend, value, False, not param.do_not_specialize, not param.do_not_specialize_on_alignment
            )
        signature[param.name] = kind
        if kind == "constexpr":
            constexprs[param.name] = spec
        elif isinstance(spec, str) and spec:
            attrs[(index,)] = backend.parse_attr(spec)
    return signature, constexprs, attrs


PTXAS_REGISTERS = re.compile(r"Used (\d+) registers")
PTXAS_SPILLS = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")


def parse_ptxas_log(log: str) -> dict:
    """Registers, stack frame and spill bytes from ptxas -v output."""
    registers = PTXAS_REGISTERS.search(log)
    spills = PTXAS_SPILLS.search(log)
    if registers is None or spills is None:
        raise RuntimeError(f"no ptxas -v resource usage in the compile log:\n{log}")
    stack, stores, loads = (int(x) for x in spills.groups())
    return dict(registers=int(registers.group(1)), stack=stack, spill_stores=stores, spill_loads=loads)


def count_tensor_core_instructions(cubin: bytes) -> dict:
    """HGMMA (wgmma) and HMMA (mma.sync) instructions in the SASS of a cubin (bundled cuobjdump)."""
    from triton import knobs

    with tempfile.NamedTemporaryFile(suffix=".cubin") as file:
        file.write(cubin)
        file.flush()
        sass = subprocess.run(
            [knobs.nvidia.cuobjdump.path, "-sass", file.name], check=True, capture_output=True, text=True
        ).stdout
    return dict(hgmma=len(re.findall(r"\bHGMMA\.", sass)), hmma=len(re.findall(r"\bHMMA\.", sass)))


def blocks_per_sm(arch: Arch, registers: int, shared: int, num_warps: int) -> tuple[int, str]:
    """Resident CTAs per SM and what limits them: 'regs', 'smem', 'warps' or 'blocks'."""
    registers_per_warp = math.ceil(max(registers, 1) * 32 / arch.register_unit) * arch.register_unit
    limits = {
        "regs": (arch.registers_per_sm // registers_per_warp) // num_warps,
        "smem": arch.shared_per_sm // (shared + arch.reserved_shared_per_block),
        "warps": arch.max_warps // num_warps,
        "blocks": arch.max_blocks,
    }
    limiter = min(limits, key=limits.get)
    return limits[limiter], limiter


def verdict(row: dict) -> list[str]:
    """Why a compiled config fails the report (empty when it passes): a compile error, any register spill
    in a 16-bit config, or more shared memory than one block may use on the arch."""
    if row.get("error"):
        return ["compile error"]
    problems = []
    if row["dtype"] in SIXTEEN_BIT and (row["spill_stores"] or row["spill_loads"]):
        problems.append("spills")
    if row["shared"] > ARCHS[row["arch"]].shared_per_block:
        problems.append("shared memory")
    return problems


_KERNELS = None


def _kernels() -> list:
    global _KERNELS
    if _KERNELS is None:
        _KERNELS = discover_kernels()
    return _KERNELS


def compile_task(task: tuple) -> dict:
    """Compile one (kernel, config, dtype, mask, arch) and measure it; errors are recorded, not raised."""
    import torch
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, make_backend

    kernel_index, config_index, dtype_name, masked, arch_name, problem = task
    spec = _kernels()[kernel_index]
    config = spec.configs[config_index]
    arch = ARCHS[arch_name]
    dtype = getattr(torch, {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}[dtype_name])
    blocks = dict(config.kwargs)
    row = dict(
        op=spec.op, kernel=spec.name, variant=spec.variant, arch=arch_name, dtype=dtype_name, masked=masked,
        blocks=blocks, num_warps=config.num_warps, num_stages=config.num_stages, error=None,
    )  # fmt: skip
    model = spec.model(problem, dtype, masked, blocks)
    row["model"] = None if model is None else dict(dataclasses.asdict(model), intensity=model.intensity)
    target = GPUTarget("cuda", arch.capability, 32)
    try:
        signature, constexprs, attrs = specialize(
            spec.kernel, spec.arguments(problem, dtype, masked), blocks, make_backend(target)
        )
        log = io.StringIO()
        with contextlib.redirect_stdout(log), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            compiled = triton.compile(
                ASTSource(spec.kernel, signature, constexprs, attrs),
                target=target,
                options=dict(num_warps=config.num_warps, num_stages=config.num_stages),
            )
        row.update(parse_ptxas_log(log.getvalue()))
        row["shared"] = compiled.metadata.shared
        row.update(count_tensor_core_instructions(compiled.asm["cubin"]))
        row["blocks_per_sm"], row["limited_by"] = blocks_per_sm(arch, row["registers"], row["shared"], config.num_warps)
    except Exception as error:  # a config that does not compile is a finding, not a crash
        row["error"] = f"{type(error).__name__}: {str(error).strip().splitlines()[0] if str(error).strip() else ''}"
    row["problems"] = verdict(row)
    return row


def _init_worker(cache_dir: str) -> None:
    from triton import knobs

    knobs.nvidia.dump_ptxas_log = True  # ptxas -v output goes to stdout, where compile_task reads it
    knobs.compilation.always_compile = True  # a cache hit would skip ptxas and its log
    knobs.cache.dir = cache_dir


def build_tasks(kernels: list, args: argparse.Namespace, problem) -> list[tuple]:
    """Every (kernel, config, dtype, mask, arch) the filters select; --subset keeps a representative few."""
    tasks = []
    for kernel_index, spec in enumerate(kernels):
        label = f"{spec.op}.{spec.name}[{spec.variant}]"
        if args.kernel and not any(text in label for text in args.kernel):
            continue
        # --subset: each variant's first config (the default the launcher runs untuned), bf16, both archs, masked on
        # sm_90a only; fp16 and fp32 for the first kernel.
        config_indices = [0] if args.subset else range(len(spec.configs))
        for config_index in config_indices:
            # A config marked for some archs only (stss_kernels._core.tuning.hopper_only) never runs elsewhere.
            archs = [arch for arch in args.arch if arch in getattr(spec.configs[config_index], "archs", ARCHS)]
            for dtype in args.dtype:
                if args.subset and dtype != "bf16" and kernel_index:
                    continue
                for masked in spec.masks:
                    for arch in archs:
                        if args.subset and masked and arch != "sm_90a" and kernel_index:
                            continue
                        tasks.append((kernel_index, config_index, dtype, masked, arch, problem))
    return tasks


def run_report(args: argparse.Namespace) -> dict:
    problem = dataclasses.replace(_problems()[args.preset], mask_ratio=args.mask_ratio)
    kernels = _kernels()
    tasks = build_tasks(kernels, args, problem)
    if not tasks:
        raise SystemExit(f"error: --kernel {args.kernel} selects none of the kernels")
    rows = []
    with tempfile.TemporaryDirectory(prefix="stss-aot-") as cache_dir, contextlib.ExitStack() as stack:
        if args.jobs > 1:
            import multiprocessing

            pool = stack.enter_context(
                concurrent.futures.ProcessPoolExecutor(
                    args.jobs, mp_context=multiprocessing.get_context("fork"), initializer=_init_worker,
                    initargs=(cache_dir,),
                )
            )  # fmt: skip
            results = pool.map(compile_task, tasks)
        else:
            _init_worker(cache_dir)
            results = map(compile_task, tasks)
        for row in results:
            rows.append(row)
            if len(rows) % 20 == 0 or len(rows) == len(tasks):
                print(f"bench.compile: {len(rows)}/{len(tasks)} compiled", file=sys.stderr, flush=True)
    import triton

    return dict(
        triton=triton.__version__,
        preset=dataclasses.asdict(problem),
        archs={name: dataclasses.asdict(ARCHS[name]) for name in args.arch},
        rows=rows,
        failures=sum(bool(row["problems"]) for row in rows),
    )


# ----------------------------------------------------------------------------------------------------------
# Table


def _config_text(row: dict) -> str:
    """E.g. 'M128 N64 K64 w8 s3': block sizes without their BLOCK_ prefix, warps, pipeline stages."""
    blocks = " ".join(f"{name.removeprefix('BLOCK_')}{value}" for name, value in row["blocks"].items())
    return f"{blocks} w{row['num_warps']} s{row['num_stages']}"


COLUMNS = (
    "kernel", "variant", "config", "dtype", "arch", "mask", "regs", "spill", "smem KB", "HGMMA/HMMA",
    "CTA/SM", "programs", "MB", "GFLOP", "exec/need", "FLOP/B", "verdict",
)  # fmt: skip


def table_rows(report: dict) -> list[list[str]]:
    lines = []
    for row in report["rows"]:
        model = row["model"]
        if model:
            model_cells = [
                str(model["programs"]), f"{model['bytes'] / 1e6:.0f}", f"{model['flops'] / 1e9:.1f}",
                f"{model['executed_flops'] / model['flops']:.2f}", f"{model['intensity']:.0f}",
            ]  # fmt: skip
        else:
            model_cells = ["not launched", "", "", "", ""]
        if row["error"]:
            compiled = ["error", "", "", "", ""]
        else:
            compiled = [
                str(row["registers"]), f"{row['spill_stores']}/{row['spill_loads']}", f"{row['shared'] / 1024:.0f}",
                f"{row['hgmma']}/{row['hmma']}", f"{row['blocks_per_sm']} ({row['limited_by']})",
            ]  # fmt: skip
        lines.append(
            [f"{row['op']}.{row['kernel']}", row["variant"], _config_text(row), row["dtype"], row["arch"],
             "yes" if row["masked"] else "no", *compiled, *model_cells,
             ", ".join(row["problems"]).upper() or "ok"]
        )  # fmt: skip
    return lines


def format_table(report: dict) -> str:
    lines = [list(COLUMNS), *table_rows(report)]
    widths = [max(len(line[i]) for line in lines) for i in range(len(COLUMNS))]
    out = [" | ".join(cell.ljust(width) for cell, width in zip(line, widths)).rstrip() for line in lines]
    out.insert(1, "-|-".join("-" * width for width in widths))
    return "\n".join(out)


def _describe(report: dict) -> str:
    p = report["preset"]
    errors = [row for row in report["rows"] if row["error"]]
    lines = [
        f"Triton {report['triton']}; model at preset {p['name']}: B={p['batch']}, {p['frames']} x {p['hw']} tokens, "
        f"Cs={p['cs']}, Ct={p['ct']}, masked rows keep {p['mask_ratio']:g} of the queries.",
        "regs/spill (store/load bytes) from ptxas -v; smem from the kernel metadata; HGMMA/HMMA counted in the SASS;",
        "CTA/SM with its limiter; programs, MB moved (L2->SM), GFLOP needed, executed/needed FLOPs and executed",
        "FLOP per byte for all launches of that kernel in one loss call.",
        f"{len(report['rows'])} compiles, {report['failures']} failing.",
    ]
    lines += [f"  {row['op']}.{row['kernel']}[{row['variant']}] {_config_text(row)}: {row['error']}" for row in errors]
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------------------
# CLI


def _csv_choice(choices: tuple[str, ...]):
    def parse(text: str) -> list[str]:
        values = [value.strip() for value in text.split(",") if value.strip()]
        unknown = [value for value in values if value not in choices]
        if not values or unknown:
            raise argparse.ArgumentTypeError(f"expected a comma-separated subset of {', '.join(choices)}, got {text!r}")
        return values

    return parse


def _mask_ratio(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not 0.0 < value <= 1.0:
        raise argparse.ArgumentTypeError(f"expected a fraction in (0, 1], got {text!r}")
    return value


def _jobs(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return int(text)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m bench.compile",
        description="Compile every Triton kernel and autotune config ahead of time (no GPU) and report registers, "
        "spills, shared memory, tensor-core instructions, occupancy and a static byte/FLOP model.",
    )
    parser.add_argument(
        "--arch", type=_csv_choice(tuple(ARCHS)), default=list(ARCHS), help="sm_90a,sm_80 (default both)"
    )
    parser.add_argument("--dtype", type=_csv_choice(DTYPES), default=list(DTYPES), help="bf16,fp16,fp32 (default all)")
    parser.add_argument(
        "--kernel", action="append", default=[], help="keep kernels whose 'op.kernel[variant]' contains this text "
        "(repeatable), e.g. forward, feature_grad[row"
    )  # fmt: skip
    parser.add_argument(
        "--preset", choices=PRESET_NAMES, default="tsa-grid", help="sizes for the specialisation and model"
    )
    parser.add_argument("--mask-ratio", type=_mask_ratio, default=0.2, help="fraction of queries kept in masked rows")
    parser.add_argument("--subset", action="store_true", help="a representative subset (the CI check)")
    parser.add_argument("--json", metavar="PATH", help="also write the report as JSON ('-' for stdout, no table)")
    parser.add_argument("--jobs", type=_jobs, default=1, help="parallel compile processes (default 1)")
    return parser


def _kernels_interpreted() -> bool:
    from triton.runtime.jit import JITFunction

    return any(not isinstance(spec.kernel, JITFunction) for spec in _kernels())


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    # Kernels are built when their modules are imported: under TRITON_INTERPRET=1 they are interpreter functions
    # with a single config. Then compile in a fresh process without it (this process's environment is left alone).
    interpret = os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "yes", "on")
    if interpret or _kernels_interpreted():
        argv = sys.argv[1:] if argv is None else argv
        env = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
        return subprocess.run([sys.executable, "-m", "bench.compile", *argv], env=env).returncode
    report = run_report(args)
    if args.json == "-":
        json.dump(report, sys.stdout, indent=1)
        print()
    else:
        print(format_table(report))
        print()
        print(_describe(report))
        if args.json:
            with open(args.json, "w") as file:
                json.dump(report, file, indent=1)
    return 1 if report["failures"] else 0


if __name__ == "__main__":
    sys.exit(main())
