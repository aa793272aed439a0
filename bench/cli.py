"""`python -m bench`: time and memory of an op of stss_kernels.ops across providers, workloads and modes."""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import re
import subprocess
import sys
from pathlib import Path

import torch
from tqdm import tqdm

from stss_kernels._core.spec import OpOption
from stss_kernels.ops import op_specs

from . import report
from .dit import DIT_MODELS, format_dit, run_dit
from .measure import DTYPES, WORKER_ENV, Case, base_result, matmul_tflops, run_case
from .providers import DEFAULT_OP, OPS, PROVIDERS
from .shards import main_shards
from .workloads import PRESETS, build_workloads, flop_count

PROJECT_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUT = PROJECT_ROOT / "bench" / "results"  # the committed results: written only with --update-results
RUNS_DIR = PROJECT_ROOT / "bench" / "runs"  # one folder per run otherwise (git-ignored)

# Options passed to every Case under the same name.
CASE_SETTINGS = (
    "op",
    "dtype",
    "mask_ratio",
    "normalize",
    "teacher_grad",
    "seed",
    "threads",
    "min_runs",
    "min_time_s",
    "check",
)

# The workload sizes an option can override, in plain words.
WORKLOAD_FIELDS = {
    "batch": "videos per batch",
    "frames": "frames per video",
    "hw": "tokens per frame (height x width of the token grid)",
    "cs": "student feature channels",
    "ct": "teacher feature channels",
}

# Loss providers timed beside a DiT step by default (torch.compile of the naive loss is left out: slow to build).
DIT_PROVIDERS = ("reference", "triton")


# Option values that are negative numbers, exponents included ("-1e-4"), are values, not options.
NEGATIVE_NUMBER = re.compile(r"^-(\d+\.?\d*|\.\d+)(e[+-]?\d+)?$|^-inf$", re.IGNORECASE)


def _csv(choices: tuple[str, ...]):
    def parse(text: str) -> list[str]:
        items = [item.strip() for item in text.split(",") if item.strip()]
        unknown = [item for item in items if item not in choices]
        if unknown or not items:
            raise argparse.ArgumentTypeError(f"expected a comma-separated subset of {','.join(choices)}")
        return items

    return parse


def _mask_ratio(text: str) -> float:
    ratio = float(text)
    if not 0.0 < ratio <= 1.0:
        raise argparse.ArgumentTypeError(f"expected a kept fraction in (0, 1], got {text}")
    return ratio


def _shard_counts(text: str) -> list[int]:
    try:
        counts = [int(item) for item in text.split(",") if item.strip()]
    except ValueError:
        counts = []
    if not counts or min(counts) < 1:
        raise argparse.ArgumentTypeError(f"expected comma-separated process counts >= 1, e.g. 1,2,4; got {text!r}")
    return counts


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text}")
    return value


def _non_negative_float(text: str) -> float:
    value = float(text)
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"expected a number >= 0, got {text}")
    return value


def _op_option_type(option: OpOption):
    """argparse type of an op option: its parse, then its check (a bad value is a usage error)."""

    def parse(text: str):
        try:
            value = option.parse(text)
            return value if option.check is None else option.check(option.name, value)
        except (TypeError, ValueError) as error:
            raise argparse.ArgumentTypeError(str(error)) from None

    parse.__name__ = option.parse.__name__  # argparse names the type in its own messages
    return parse


def _op_options() -> dict[str, tuple[OpOption, list[str]]]:
    """{option name: (the option, the ops that have it)} over every registered op."""
    options: dict[str, tuple[OpOption, list[str]]] = {}
    for spec in op_specs().values():
        for option in spec.options:
            known = options.setdefault(option.name, (option, []))
            if known[0].default != option.default or known[0].choices != option.choices:
                raise ValueError(f"ops {known[1]} and {spec.name} define option {option.name!r} differently")
            known[1].append(spec.name)
    return options


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__, allow_abbrev=False)
    parser._negative_number_matcher = NEGATIVE_NUMBER  # argparse's own matcher misses "-1e-4"
    parser.add_argument("--op", choices=OPS, default=DEFAULT_OP, help=f"the op to measure (default: {DEFAULT_OP})")
    parser.add_argument(
        "--preset",
        choices=sorted(PRESETS),
        default="tsa-grid",
        help="the workloads: the TSA alignment grid (tsa-grid, the default), a CogVideoX DiT "
        "grid, or a sweep of N from 1k to 64k tokens",
    )
    for field, meaning in WORKLOAD_FIELDS.items():
        parser.add_argument(f"--{field}", type=_positive_int, help=f"{meaning} (default: the preset's)")
    parser.add_argument(
        "--max-tokens", type=_positive_int, help="leave out workloads with more tokens (default: keep all)"
    )
    parser.add_argument(
        "--providers",
        type=_csv(PROVIDERS),
        help="comma-separated implementations to time: reference (the loss in naive eager PyTorch), compiled "
        "(torch.compile of it), torch and triton (the stss_kernels backends) "
        f"(default: {','.join(PROVIDERS)}; with --dit: {','.join(DIT_PROVIDERS)})",
    )
    parser.add_argument(
        "--modes",
        type=_csv(report.MODES),
        default=list(report.MODES),
        help="comma-separated: fwd times the forward only, fwd+bwd the forward and the "
        f"backward (default: {','.join(report.MODES)})",
    )
    parser.add_argument(
        "--teacher-grad",
        action="store_true",
        help="fwd+bwd also computes the teacher's gradient (default: the student's only)",
    )
    parser.add_argument(
        "--device",
        type=torch.device,
        default="cuda" if torch.cuda.is_available() else "cpu",
        help="where to run (default: cuda when a GPU is present, else cpu)",
    )
    parser.add_argument(
        "--dtype", choices=sorted(DTYPES), help="dtype of the features (default: bfloat16 on a GPU, float32 on the CPU)"
    )
    for name, (option, ops) in _op_options().items():
        parser.add_argument(
            f"--{name.replace('_', '-')}",
            dest=name,
            type=_op_option_type(option),
            choices=option.choices,
            default=None,
            help=f"{', '.join(ops)}: {option.help} (default: {option.default})",
        )
    parser.add_argument(
        "--mask-ratio",
        type=_mask_ratio,
        default=1.0,
        help="fraction of query tokens kept by a random query mask (default: 1, no mask)",
    )
    parser.add_argument(
        "--no-normalize",
        dest="normalize",
        action="store_false",
        help="use raw dot products as similarities (default: cosine similarities)",
    )
    parser.add_argument(
        "--threads",
        type=_positive_int,
        default=torch.get_num_threads(),
        help=f"CPU: torch threads (default: {torch.get_num_threads()}, torch's default here)",
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the random features (default: 0)")
    parser.add_argument("--min-runs", type=_positive_int, default=3, help="CPU: timed runs at least (default: 3)")
    parser.add_argument(
        "--min-time",
        dest="min_time_s",
        type=_non_negative_float,
        default=1.0,
        help="CPU: timed seconds at least (default: 1)",
    )
    parser.add_argument(
        "--no-check",
        dest="check",
        action="store_false",
        help="skip the correctness check against the float64 naive loss (default: check)",
    )
    parser.add_argument(
        "--isolate",
        choices=("auto", "process", "none"),
        default="auto",
        help="run each case in a fresh process (process) or all in this one (none); auto, the "
        "default: a fresh process on the CPU, where peak memory cannot be reset otherwise",
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=None,
        help="folder for the JSON and PNG files (default: a new bench/runs/UTC-TIMESTAMP/)",
    )
    parser.add_argument(
        "--update-results",
        action="store_true",
        help="write to bench/results/, replacing the committed result files of the same tag (default: off)",
    )
    parser.add_argument("--tag", help="file name stem (default: [OP-]PRESET-DEVICE-DTYPE[-maskR][-teacher-grad])")
    parser.add_argument("--no-plot", dest="plot", action="store_false", help="write no PNG plots (default: plot)")
    parser.add_argument(
        "--dit",
        choices=sorted(DIT_MODELS),
        help="time a training step of this DiT beside the loss at its grid (GPU; default: off)",
    )
    parser.add_argument(
        "--shards",
        type=_shard_counts,
        help="time the op on sharded tokens (process_group=) over these comma-separated process counts, beside "
        "the one-process op (bench/shards.py; default: off)",
    )
    parser.add_argument(
        "--tiny",
        action="store_true",
        help="with --dit: a 2-layer model on a small grid, to test on a CPU (default: off)",
    )
    return parser


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.dit and args.device.type != "cuda" and not args.tiny:
        parser.error(f"--dit {args.dit} times the real model and needs a CUDA device; add --tiny for a small CPU run")
    if args.tiny and not args.dit:
        parser.error("--tiny only applies to --dit")
    spec = op_specs()[args.op]
    given = {name: getattr(args, name) for name in _op_options() if getattr(args, name) is not None}
    foreign = sorted(set(given) - {option.name for option in spec.options})
    if foreign:
        ops = _op_options()[foreign[0]][1]
        parser.error(f"--{foreign[0].replace('_', '-')} applies to {', '.join(ops)}, not to --op {args.op}")
    args.options = spec.option_values(given)
    if not args.dit:
        try:
            shape = {field: getattr(args, field) for field in ("batch", "frames", "hw", "cs", "ct")}
            args.workloads = build_workloads(args.preset, max_tokens=args.max_tokens, **shape)
        except ValueError as error:
            parser.error(str(error))
    args.providers = args.providers or list(DIT_PROVIDERS if args.dit else PROVIDERS)
    args.dtype = args.dtype or ("bfloat16" if args.device.type == "cuda" else "float32")
    if args.update_results and args.out is not None:
        parser.error("--update-results writes to bench/results/; leave out --out")
    if args.out is None:
        stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%d-%H%M%S")
        args.out = DEFAULT_OUT if args.update_results else RUNS_DIR / stamp
    return args


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    with open("/proc/cpuinfo") as cpuinfo:
        models = [line.split(":", 1)[1].strip() for line in cpuinfo if line.startswith("model name")]
    threads = torch.get_num_threads()
    return f"{models[0] if models else platform.processor()} ({threads} thread{'s' if threads > 1 else ''})"


def environment(args: argparse.Namespace, argv: list[str]) -> dict:
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    try:
        commit = subprocess.run(
            ["git", "describe", "--always", "--dirty"], cwd=PROJECT_ROOT, capture_output=True, text=True
        ).stdout.strip()
    except OSError:  # no git on this machine
        commit = ""
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": "python -m bench " + " ".join(argv),
        "device": str(args.device),
        "device_name": device_name(args.device),
        "torch": torch.__version__,
        "triton": triton_version,
        "cuda": torch.version.cuda,
        "python": platform.python_version(),
        "git_commit": commit or None,
        "triton_interpret": os.environ.get("TRITON_INTERPRET"),
        "flops": flop_count.__doc__.strip(),
        "measure": sys.modules[run_case.__module__].__doc__.strip(),
    }


def run_isolated(case: Case) -> dict:
    """Run a case in a fresh Python process (its own peak RSS, no allocator or compile caches)."""
    env = {
        **os.environ,
        **WORKER_ENV,
        "PYTHONPATH": os.pathsep.join([str(PROJECT_ROOT), os.environ.get("PYTHONPATH", "")]),
    }
    completed = subprocess.run(
        [sys.executable, "-m", "bench.measure", case.to_json()], capture_output=True, text=True, env=env
    )
    if completed.returncode == 0:
        return json.loads(completed.stdout.strip().splitlines()[-1])
    if completed.returncode == -9:
        return base_result(case, "OOM", "worker killed by SIGKILL (the OOM killer?)")
    stderr = completed.stderr.strip().splitlines()
    return base_result(case, "error", stderr[-1] if stderr else f"worker exited with {completed.returncode}")


def default_tag(args: argparse.Namespace) -> str:
    """PRESET-DEVICE-DTYPE, with -maskRATIO and -teacher-grad when those are set; prefixed by the op (and the
    values of its options that name files, where not their defaults) for ops other than the default op."""
    tag = f"{args.preset}-{args.device.type}-{args.dtype}"
    if args.op != DEFAULT_OP:
        options = op_specs()[args.op].file_name_part(args.options)
        tag = f"{args.op}-" + (f"{options}-" if options else "") + tag
    if args.mask_ratio < 1.0:
        tag += f"-mask{args.mask_ratio:g}"
    return tag + ("-teacher-grad" if args.teacher_grad else "")


def main_dit(args: argparse.Namespace, argv: list[str]) -> dict:
    """--dit: the DiT step, the loss per provider, the loss's share; DIT-DEVICE-DTYPE.json under --out."""
    torch.set_num_threads(args.threads)
    meta = environment(args, argv)
    result = run_dit(args.dit, args.providers, args.device, args.dtype, tiny=args.tiny, batch=args.batch or 1,
                     min_runs=args.min_runs)  # fmt: skip
    print(f"{meta['device_name']}, torch {meta['torch']}, triton {meta['triton']}")
    print(format_dit(result))
    tag = args.tag or f"dit-{args.dit}{'-tiny' if args.tiny else ''}-{args.device.type}-{args.dtype}"
    path = args.out / f"{tag}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"meta": meta, "dit": result}, indent=2) + "\n")
    print(f"wrote {path}")
    return {"meta": meta, "dit": result, "paths": [path]}


def main(argv: list[str] | None = None) -> dict:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    if args.dit:
        return main_dit(args, argv)
    if args.shards:
        return main_shards(args, argv, environment(args, argv))
    workloads = args.workloads
    isolate = args.isolate == "process" or (args.isolate == "auto" and args.device.type == "cpu")
    settings = {field: getattr(args, field) for field in CASE_SETTINGS}
    cases = [
        Case(
            workload=workload, provider=provider, mode=mode, device=str(args.device), options=args.options, **settings
        )  # fmt: skip
        for workload in workloads
        for mode in args.modes
        for provider in args.providers
    ]
    torch.set_num_threads(args.threads)
    meta = environment(args, argv)
    meta["matmul_tflops"] = matmul_tflops(args.device, DTYPES[args.dtype])
    meta["matmul_dtype"] = args.dtype
    meta["isolated_processes"] = isolate
    results = []
    for case in tqdm(cases, desc="bench", unit="case"):
        results.append(run_isolated(case) if isolate else run_case(case))
    report.add_ratios(results, meta["matmul_tflops"])

    tag = args.tag or default_tag(args)
    json_path = args.out / f"{tag}.json"
    report.write_json(json_path, meta, results)
    print(
        f"{args.op}: {meta['device_name']}, torch {meta['torch']}, triton {meta['triton']}, {args.dtype}, "
        f"matmul {meta['matmul_tflops']:.3g} TFLOP/s"
    )
    print(report.format_table(results))
    written = [json_path]
    if args.plot:
        written += report.plot(results, args.out / tag, f"{tag}: {meta['device_name']}")
    print("wrote " + ", ".join(str(p) for p in written))
    return {"meta": meta, "results": results, "paths": written}
