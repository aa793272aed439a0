"""The GPU suite: `bash bench/gpu_suite.sh quick|all|smoke [--steps NAME,...] [--dry-run]`.

One command runs, in order of value, the GPU tests, the benchmarks against the naive op and torch.compile,
and the loss's share of a DiT training step; `smoke` runs every step on the CPU (Triton interpreter, toy
sizes) so the suite is tested where no GPU is. Each step runs under a time limit: its own, cut to what is
left of the budget (SUITE_SECONDS, default per mode below); a step that finds too little left is skipped,
so the steps that fit are the most valuable ones. A failing or timed-out step is recorded and the suite
goes on; exit status 0 when every step that ran passed, 1 otherwise, 2 on a usage mistake.

Results go to $OUT (else bench/runs/gpu-suite-UTC-TIMESTAMP/), each file rewritten or appended as a step
finishes, so a run killed at any point keeps every finished step:
    manifest.json   date, command, environment (device, driver, versions), the plan and each step's outcome
    results.jsonl   one JSON line per finished step: outcome, test counts and failures, the JSON files the
                    step wrote (bench results verbatim), the end of its log
    suite.log       every step's output
    tuning.json     launch configs, tuned by the first step that meets a shape class and read by the later
                    ones (STSS_TUNING_FILE); a file named by the caller's STSS_TUNING_FILE is the start
Four files, one folder: what a device call brings back whole. Per-step files (bench JSON, JUnit XML, the
Triton and Inductor caches) live in a scratch folder ($SUITE_WORK, else a temporary one).

Wheels in .whl/ (bench/fetch_wheels.sh: pytest, pytest-benchmark, diffusers) are installed first, each only
where its distribution is missing. A step whose tool is missing all the same (pytest for the tests,
diffusers for the DiT share, ncu and a GPU for the profile) is skipped with the reason.

This module uses the standard library only: the steps are separate processes (`python -m pytest`,
`python -m bench`, `ncu`), so a crash, a hang or a missing package in one costs only that step.
"""

from __future__ import annotations

import argparse
import ctypes
import dataclasses
import datetime
import hashlib
import importlib.metadata
import json
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import xml.etree.ElementTree as ElementTree
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parent.parent
RUNS_DIR = PROJECT_ROOT / "bench" / "runs"
WHEELS_DIR = PROJECT_ROOT / ".whl"

MODES = ("quick", "all", "smoke")
# Budget when SUITE_SECONDS is not set: quick fits 5 minutes, all one 10-minute device command.
DEFAULT_SECONDS = {"quick": 280, "all": 540, "smoke": 1800}
# A smoke step's limit, in place of its GPU limit: the interpreter on a busy CPU is slow (seconds when idle).
SMOKE_STEP_SECONDS = 300
# A step that would get less than this is skipped (it could not finish anything useful).
MIN_STEP_SECONDS = 15
# Grace between SIGTERM and SIGKILL of a step that ran out of time.
KILL_GRACE_SECONDS = 10
LOG_TAIL_LINES = 60
# pytest-xdist processes for the test steps where the plugin is installed (SUITE_TEST_WORKERS; 0: one process).
DEFAULT_TEST_WORKERS = 4
# stss_kernels' switch for launch-config tuning (stss_kernels._core.tuning.AUTOTUNE_ENV; not imported: no torch here).
AUTOTUNE_ENV = "STSS_AUTOTUNE"
# Case statuses that make a bench step fail (an OOM or an unavailable provider is a finding, not a failure).
BAD_STATUSES = ("mismatch", "error")

# The test files that exercise the ops' backends (Triton paths included) on a GPU.
OP_TEST_FILES = (
    "tests/test_triton_backend.py",
    "tests/test_tempered_kl.py",
    "tests/test_tempered_kl_edge_cases.py",
    "tests/test_tempered_kl_compile.py",
    "tests/test_torch_backend.py",
    "tests/test_relation_distance.py",
    "tests/test_relation_distance_backends.py",
    "tests/test_relation_distance_op_layer.py",
    "tests/test_tuning.py",
    "tests/test_tuning_file.py",
)
# Test ids of the GPU-only and half-precision cases (dtypes appear by name in ids: see tests/conftest.py).
GPU_CASES = "cuda or gpu or bf16 or float16 or half"

# Appended to a step's arguments in smoke mode (later options win): CPU, toy sizes, one timed run.
SMOKE_BENCH = tuple(
    "--device cpu --dtype float32 --batch 1 --frames 2 --hw 8 --cs 8 --ct 8 --min-runs 1 --min-time 0 "
    "--isolate none --providers reference,triton --modes fwd+bwd".split()
)
SMOKE_DIT = ("--tiny", "--device", "cpu", "--min-runs", "1", "--providers", "reference,triton")


@dataclasses.dataclass(frozen=True)
class Step:
    """One command of the suite.

    seconds: its time limit on an H100-class GPU; command: argv, where "{python}" is this interpreter and
    "{dir}" the step's scratch folder; smoke: arguments appended in smoke mode, or None to run it unchanged;
    needs: what must be present ("pytest", "diffusers", "ncu", "cuda"); quick: part of the quick mode.
    """

    name: str
    seconds: int
    command: tuple[str, ...]
    smoke: tuple[str, ...] | None = None
    needs: tuple[str, ...] = ()
    quick: bool = False
    pytest: bool = False


def _pytest(name: str, seconds: int, selection: tuple[str, ...], smoke: tuple[str, ...], quick: bool) -> Step:
    """A pytest step over the op test files: every test runs (no -x), the default launch configs (STSS_AUTOTUNE=0:
    exactness, not speed), names printed as they finish so a killed step still shows what passed."""
    options = "-v -rfE -p no:cacheprovider --junitxml {dir}/junit.xml --durations 15".split()
    command = ("{python}", "-m", "pytest", *options, *selection, "{test_files}")
    return Step(name, seconds, command, smoke=smoke, needs=("pytest",), quick=quick, pytest=True)


# Providers of a bench step: the naive op (reference), the portable torch backend and the Triton kernels; a
# separate step times torch.compile of the naive op (slow to build), so a step cut short loses only itself.
KERNEL_PROVIDERS = "reference,torch,triton"
COMPILED_PROVIDERS = "reference,compiled"


def _bench(name: str, seconds: int, *arguments: str, providers: str = KERNEL_PROVIDERS, quick: bool = False) -> Step:
    """A `python -m bench` run: each case checked against an fp64 truth, then timed (fwd and fwd+bwd)."""
    command = ("{python}", "-m", "bench", *arguments, "--providers", providers, "--no-plot", "--out", "{dir}")
    return Step(name, seconds, command, smoke=SMOKE_BENCH, quick=quick)


def _dit(name: str, model: str, seconds: int, quick: bool = False) -> Step:
    command = ("{python}", "-m", "bench", "--dit", model, "--providers", KERNEL_PROVIDERS, "--out", "{dir}")
    return Step(name, seconds, command, smoke=SMOKE_DIT, needs=("diffusers",), quick=quick)


def _ncu(name: str, preset: str, seconds: int) -> Step:
    """Nsight Compute on one Triton forward: L2 hit rate, DRAM bytes, tensor-pipe use and stall reasons."""
    sections = ("SpeedOfLight", "MemoryWorkloadAnalysis", "ComputeWorkloadAnalysis", "WarpStateStats")
    metrics = "lts__t_sector_hit_rate.pct,dram__bytes_read.sum,dram__bytes_write.sum"
    command = (
        *"ncu --profile-from-start off --kernel-name regex:tempered_kl_forward".split(),
        *(part for section in sections for part in ("--section", section)),
        *f"--metrics {metrics} --csv --page details --log-file {{dir}}/ncu.csv".split(),
        *"{python} -m bench.profile_forward --preset".split(),
        preset,
    )
    return Step(name, seconds, command, needs=("ncu", "cuda"))


# Every step, in order of value; `quick` runs the ones marked quick, in this order.
# fmt: off
STEPS = (
    _pytest("tests-gpu", 90, ("-m", "not aot", "-k", GPU_CASES), smoke=("-k", "cuda"), quick=True),
    _bench("tempered-kl-tsa-grid", 60, "--preset", "tsa-grid", quick=True),
    _bench("tempered-kl-cogvideox-native", 75, "--preset", "cogvideox-native", quick=True),
    _dit("dit-cogvideox-2b", "cogvideox-2b", 60, quick=True),
    _bench("tempered-kl-tsa-grid-compiled", 45, "--preset", "tsa-grid", providers=COMPILED_PROVIDERS, quick=True),
    _bench("tempered-kl-cogvideox-native-compiled", 60, "--preset", "cogvideox-native", providers=COMPILED_PROVIDERS,
           quick=True),
    _pytest("tests", 240, ("-m", "not aot", "-k", f"not ({GPU_CASES})"), smoke=("--collect-only",), quick=False),
    _bench("relation-distance-tsa-grid", 45, "--op", "relation_distance", "--preset", "tsa-grid"),
    _bench("relation-distance-cogvideox-native", 60, "--op", "relation_distance", "--preset", "cogvideox-native"),
    _bench("tempered-kl-cogvideox-native-mask0.2", 45, "--preset", "cogvideox-native", "--mask-ratio", "0.2"),
    _bench("tempered-kl-cogvideox-native-c64", 45, "--preset", "cogvideox-native", "--cs", "64", "--ct", "64"),
    _bench("tempered-kl-tsa-grid-mask0.2", 40, "--preset", "tsa-grid", "--mask-ratio", "0.2"),
    _bench("tempered-kl-tsa-grid-c64", 40, "--preset", "tsa-grid", "--cs", "64", "--ct", "64"),
    _ncu("ncu-forward-cogvideox-native", "cogvideox-native", 60),
    _ncu("ncu-forward-tsa-grid", "tsa-grid", 45),
    _dit("dit-wan2.1-1.3b", "wan2.1-1.3b", 75),
)
# fmt: on


def step_seconds(step: Step, mode: str) -> int:
    return SMOKE_STEP_SECONDS if mode == "smoke" else step.seconds


def steps_of(mode: str, names: list[str] | None = None) -> list[Step]:
    """The steps a mode runs, in order; names (from --steps) keeps only those."""
    chosen = [step for step in STEPS if mode != "quick" or step.quick]
    return [step for step in chosen if names is None or step.name in names]


class OneLineParser(argparse.ArgumentParser):
    """A usage mistake prints one line and exits 2."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = OneLineParser(
        prog="bench/gpu_suite.sh", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "mode",
        choices=MODES,
        help="quick: the steps marked quick; all: every step; smoke: every step on the CPU at toy sizes",
    )
    parser.add_argument("--steps", help="comma-separated step names: run only these (e.g. to rerun one)")
    parser.add_argument("--dry-run", action="store_true", help="print the plan and write nothing")
    args = parser.parse_args(argv)
    names = [step.name for step in STEPS]
    if args.steps is not None:
        args.steps = [name.strip() for name in args.steps.split(",") if name.strip()]
        unknown = [name for name in args.steps if name not in names]
        if unknown or not args.steps:
            parser.error(f"--steps: unknown step {','.join(unknown) or '(none given)'}; steps: {','.join(names)}")
    budget = os.environ.get("SUITE_SECONDS", str(DEFAULT_SECONDS[args.mode]))
    try:
        args.budget = float(budget)
    except ValueError:
        args.budget = -1.0
    if not args.budget > 0:
        parser.error(f"SUITE_SECONDS must be a positive number of seconds, got {budget!r}")
    return args


def now_utc() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def write_json_atomic(path: Path, data) -> None:
    """Replace `path` in one step (a run killed mid-write leaves the previous version)."""
    temporary = path.with_name(path.name + ".tmp")
    temporary.write_text(json.dumps(data, indent=2) + "\n")
    os.replace(temporary, path)


def distribution_installed(name: str) -> bool:
    try:
        importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return False
    return True


def install_missing_wheels(site: Path, log) -> list[str]:
    """pip-install (no index, no dependencies) each wheel of .whl/ whose distribution is missing, into `site`."""
    wheels = sorted(WHEELS_DIR.glob("*.whl")) if WHEELS_DIR.is_dir() else []
    by_distribution = {wheel.name.split("-")[0].lower(): wheel for wheel in wheels}  # one per name: pip refuses two
    missing = [wheel for name, wheel in by_distribution.items() if not distribution_installed(name)]
    if not missing:
        return []
    options = "install -q --no-index --no-deps --no-compile --no-cache-dir --target".split()
    command = [sys.executable, "-m", "pip", *options, str(site), *map(str, missing)]
    completed = subprocess.run(command, capture_output=True, text=True)
    log(f"wheels: pip install {' '.join(wheel.name for wheel in missing)}: exit {completed.returncode}")
    if completed.returncode != 0:
        log(completed.stdout + completed.stderr)
        return []
    return [wheel.name for wheel in missing]


# Printed as JSON by a child interpreter, so this process never imports torch or touches the GPU.
PROBE = r"""
import json, platform, sys
info = {"python": platform.python_version()}
try:
    import torch
    info.update(torch=torch.__version__, cuda=torch.version.cuda, cuda_available=torch.cuda.is_available())
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        info.update(gpu=props.name, capability=f"sm_{props.major}{props.minor}",
                    gpu_memory_gib=round(props.total_memory / 2**30, 1), multiprocessors=props.multi_processor_count)
except Exception as error:
    info["torch_error"] = repr(error)
for name in ("triton", "diffusers", "pytest", "pytest_benchmark", "xdist", "numpy", "einops"):
    try:
        module = __import__(name)
        info[name] = getattr(module, "__version__", "installed")
    except Exception as error:
        info[name] = None
print(json.dumps(info))
"""


def probe_environment(env: dict) -> dict:
    completed = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, env=env, cwd=PROJECT_ROOT)
    try:
        info = json.loads(completed.stdout.strip().splitlines()[-1])
    except (IndexError, json.JSONDecodeError):
        info = {"probe_error": (completed.stderr.strip().splitlines() or ["no output"])[-1]}
    info["platform"] = platform.platform()
    info["cpus"] = os.cpu_count()
    if shutil.which("nvidia-smi"):
        query = "name,driver_version,memory.total,clocks.max.sm,power.limit"
        smi = subprocess.run(
            ["nvidia-smi", f"--query-gpu={query}", "--format=csv,noheader"], capture_output=True, text=True
        )
        info["nvidia_smi"] = smi.stdout.strip() or smi.stderr.strip()
    if shutil.which("ncu"):
        ncu = subprocess.run(["ncu", "--version"], capture_output=True, text=True)
        info["ncu"] = (ncu.stdout.strip().splitlines() or [""])[-1]
    return info


def source_identity() -> dict:
    """The git commit where there is one, and a hash of the Python sources either way (a copied tree has no .git)."""
    digest = hashlib.sha256()
    for folder in ("stss_kernels", "bench", "tests"):
        for path in sorted((PROJECT_ROOT / folder).rglob("*.py")):
            digest.update(str(path.relative_to(PROJECT_ROOT)).encode() + b"\0" + path.read_bytes())
    commit = None
    if shutil.which("git"):
        described = subprocess.run(
            ["git", "describe", "--always", "--dirty"], cwd=PROJECT_ROOT, capture_output=True, text=True
        )
        commit = described.stdout.strip() or None
    return {"git_commit": commit, "sources_sha256": digest.hexdigest()}


def missing_need(step: Step, environment: dict, smoke: bool) -> str | None:
    """Why the step cannot run here, or None."""
    for need in step.needs:
        if need == "pytest" and not environment.get("pytest"):
            return "pytest is not installed (bash bench/fetch_wheels.sh here, then carry .whl)"
        if need == "diffusers" and not environment.get("diffusers"):
            return "diffusers is not installed (bash bench/fetch_wheels.sh here, then carry .whl)"
        if need == "ncu" and not shutil.which("ncu"):
            return "ncu (Nsight Compute) is not on the PATH"
        if need == "cuda" and not environment.get("cuda_available"):
            return "needs a CUDA device"
    if not smoke and "cuda" not in step.needs and not environment.get("cuda_available"):
        return "no CUDA device (run `smoke` on a CPU)"
    return None


def junit_counts(junit: Path) -> dict | None:
    """Counts and failed test ids from a JUnit XML file (None if the step died before writing it)."""
    if not junit.is_file():
        return None
    try:
        root = ElementTree.parse(junit).getroot()
    except ElementTree.ParseError:
        return None
    counts = {"tests": 0, "failures": 0, "errors": 0, "skipped": 0, "failed": []}
    for suite in root.iter("testsuite"):
        for field in ("tests", "failures", "errors", "skipped"):
            counts[field] += int(suite.get(field, 0))
    for case in root.iter("testcase"):
        problem = case.find("failure")
        problem = problem if problem is not None else case.find("error")
        if problem is not None:
            name = f"{case.get('classname', '')}::{case.get('name', '')}"
            counts["failed"].append({"test": name, "message": (problem.get("message") or "")[:500]})
    counts["passed"] = counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"]
    return counts


# A test's outcome as `pytest -v` prints it: "tests/f.py::test[id] PASSED [ 5%]" ("[gw0] [ 5%] PASSED tests/..."
# under xdist).
VERBOSE_OUTCOME = re.compile(r"(?:^|\s)(PASSED|FAILED|ERROR|SKIPPED|XFAIL|XPASS)(?:\s|$)")
TEST_ID = re.compile(r"\S+\.py::\S+")


def log_counts(lines: list[str]) -> dict:
    """Counts and failed test ids from `pytest -v` output: what a step stopped before its JUnit XML still shows.
    A line that starts with the outcome is the short summary at the end (`-rfE`): its message is kept."""
    outcomes, messages = {}, {}
    for line in lines:
        outcome, test = VERBOSE_OUTCOME.search(line), TEST_ID.search(line)
        if outcome is None or test is None:
            continue
        if line.startswith(outcome.group(1)):
            messages[test.group(0)] = line.partition(" - ")[2].strip()[:500]
        else:
            outcomes[test.group(0)] = outcome.group(1)
    kinds = list(outcomes.values())
    counts = {
        "tests": len(kinds),
        "failures": kinds.count("FAILED"),
        "errors": kinds.count("ERROR"),
        "skipped": kinds.count("SKIPPED") + kinds.count("XFAIL"),
        "failed": [
            {"test": test, "message": messages.get(test, "")}
            for test, kind in outcomes.items()
            if kind in ("FAILED", "ERROR")
        ],
        "from_log": True,
    }
    counts["passed"] = counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"]
    return counts


def statuses(data) -> list[str]:
    """Every "status" value in a bench JSON document (cases, DiT losses), wherever it is nested."""
    found = []
    if isinstance(data, dict):
        if isinstance(data.get("status"), str):
            found.append(data["status"])
        for value in data.values():
            found += statuses(value)
    elif isinstance(data, list):
        for value in data:
            found += statuses(value)
    return found


# The step processes running now (one at a time), for the SIGTERM handler.
RUNNING: list[subprocess.Popen] = []
PR_SET_PDEATHSIG = 1  # prctl option (Linux): a signal the process gets when its parent ends


def start_step_process() -> None:
    """In a step's process before exec: a process group of its own, so a timeout stops its whole tree, and SIGKILL
    when the suite ends, so a killed suite leaves no step running."""
    os.setpgrp()
    try:
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    except (OSError, AttributeError):  # not Linux: the step outlives a killed suite
        pass


def run_process(command: list[str], env: dict, limit: float, sink, started=lambda pid: None) -> tuple[int | None, bool]:
    """Run `command`, each output line to sink(line), started(pid) once it runs; stop it after `limit` seconds.

    Returns (exit status, timed out)."""
    process = subprocess.Popen(
        command,
        cwd=PROJECT_ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
        text=True,
        errors="replace",
        bufsize=1,
        preexec_fn=start_step_process,
    )
    RUNNING.append(process)
    started(process.pid)

    def pump():
        for line in process.stdout:
            sink(line)

    reader = threading.Thread(target=pump, daemon=True)
    reader.start()
    timed_out = False
    try:
        process.wait(timeout=limit)
    except subprocess.TimeoutExpired:
        timed_out = True
        stop_group(process, signal.SIGTERM)
        try:
            process.wait(timeout=KILL_GRACE_SECONDS)
        except subprocess.TimeoutExpired:
            stop_group(process, signal.SIGKILL)
            process.wait()
    stop_group(process, signal.SIGKILL)  # what the step left behind (workers of its own) must not hold the GPU
    reader.join(timeout=5)
    RUNNING.remove(process)
    return process.returncode, timed_out


def stop_group(process: subprocess.Popen, sig: int) -> None:
    try:
        os.killpg(process.pid, sig)
    except ProcessLookupError:
        pass


class Suite:
    """The run: its output folder, scratch folder, environment for the steps, and the manifest."""

    def __init__(self, args: argparse.Namespace, out: Path, work: Path):
        self.args, self.out, self.work = args, out, work
        self.smoke = args.mode == "smoke"
        self.log_file = open(out / "suite.log", "a", buffering=1)
        self.results = out / "results.jsonl"
        self.tuning = out / "tuning.json"
        self.started = time.monotonic()
        self.deadline = self.started + args.budget
        self.manifest: dict = {}

    def log(self, text: str) -> None:
        text = text if text.endswith("\n") else text + "\n"
        sys.stdout.write(text)
        sys.stdout.flush()
        self.log_file.write(text)

    def step_env(self, site: Path) -> dict:
        env = dict(os.environ)
        paths = [str(PROJECT_ROOT)] + ([str(site)] if site.is_dir() else [])
        env["PYTHONPATH"] = os.pathsep.join(paths + [p for p in [env.get("PYTHONPATH")] if p])
        env.update(
            PYTHONUNBUFFERED="1",
            TQDM_DISABLE="1",
            STSS_PRINT_AUTOTUNING="1",
            STSS_TUNING_FILE=str(self.tuning),
            TRITON_CACHE_DIR=str(self.work / "triton-cache"),  # one compile per kernel for the whole suite
            TORCHINDUCTOR_CACHE_DIR=str(self.work / "inductor-cache"),
        )
        if self.smoke:
            env["TRITON_INTERPRET"] = "1"
            env["CUDA_VISIBLE_DEVICES"] = ""
        return env

    def start(self, argv: list[str]) -> dict:
        site = self.work / "site-packages"
        installed = install_missing_wheels(site, self.log)
        self.env = self.step_env(site)
        caller_tuning = os.environ.get("STSS_TUNING_FILE")
        if caller_tuning and Path(caller_tuning).is_file() and not self.tuning.exists():
            shutil.copyfile(caller_tuning, self.tuning)
        environment = probe_environment(self.env)
        self.environment = environment
        self.manifest = {
            "suite": "bench/gpu_suite.sh",
            "mode": self.args.mode,
            "command": "bash bench/gpu_suite.sh " + " ".join(argv),
            "started": now_utc(),
            "finished": None,
            "budget_s": self.args.budget,
            "environment": environment,
            "wheels_installed": installed,
            "source": source_identity(),
            "settings": {
                name: value
                for name, value in sorted(self.env.items())
                if name.startswith(("STSS_", "SUITE_", "TRITON_", "TORCHINDUCTOR_", "CUDA_VISIBLE"))
            },
            "files": {"results": self.results.name, "log": "suite.log", "tuning": self.tuning.name},
            "steps": [
                {"name": step.name, "limit_s": step_seconds(step, self.args.mode), "outcome": "pending"}
                for step in self.plan()
            ],
        }
        write_json_atomic(self.out / "manifest.json", self.manifest)
        self.log(f"gpu suite {self.args.mode}: budget {self.args.budget:g}s, results in {self.out}")
        self.log(json.dumps(environment))
        return environment

    def plan(self) -> list[Step]:
        return steps_of(self.args.mode, self.args.steps)

    def command_of(self, step: Step, folder: Path) -> list[str]:
        command = []
        for part in step.command:
            if part == "{test_files}":
                command += [path for path in OP_TEST_FILES if (PROJECT_ROOT / path).is_file()]
            else:
                command.append(part.replace("{python}", sys.executable).replace("{dir}", str(folder)))
        if step.pytest and not self.smoke and self.environment.get("xdist"):
            # Test processes compile their kernels in parallel; the GPU has room for several.
            workers = os.environ.get("SUITE_TEST_WORKERS", str(DEFAULT_TEST_WORKERS))
            if workers != "0":
                command += ["-n", workers]
        if self.smoke and step.smoke:
            command += list(step.smoke)
        return command

    def record(self, index: int, record: dict) -> None:
        """Append the step's line to results.jsonl and its outcome to the manifest, each durably, now."""
        with open(self.results, "a") as results:
            results.write(json.dumps(record) + "\n")
            results.flush()
            os.fsync(results.fileno())
        summary = {
            key: record[key]
            for key in ("name", "limit_s", "outcome", "seconds", "exit_code", "reason")
            if key in record
        }
        if record.get("tests"):
            summary["tests"] = {key: value for key, value in record["tests"].items() if key != "failed"}
        self.manifest["steps"][index] = summary
        write_json_atomic(self.out / "manifest.json", self.manifest)

    def run_step(self, index: int, step: Step) -> dict:
        left = self.deadline - time.monotonic()
        record = {"name": step.name, "limit_s": step_seconds(step, self.args.mode)}
        reason = missing_need(step, self.environment, self.smoke)
        if reason is None and left < MIN_STEP_SECONDS:
            reason = f"budget spent ({left:.0f}s left of SUITE_SECONDS={self.args.budget:g})"
        if reason is not None:
            self.log(f"== {step.name}: skipped: {reason}")
            return {**record, "outcome": "skipped", "reason": reason}
        limit = min(step_seconds(step, self.args.mode), left)
        folder = self.work / step.name
        folder.mkdir(parents=True, exist_ok=True)
        command = self.command_of(step, folder)
        self.log(f"== {step.name} (limit {limit:.0f}s): {' '.join(command)}")
        tail: list[str] = []
        test_lines: list[str] = []

        def sink(line: str) -> None:
            self.log(line)
            tail.append(line.rstrip("\n"))
            del tail[:-LOG_TAIL_LINES]
            if step.pytest and VERBOSE_OUTCOME.search(line):
                test_lines.append(line)

        def started(pid: int) -> None:
            self.manifest["steps"][index].update(outcome="running", pid=pid)
            write_json_atomic(self.out / "manifest.json", self.manifest)

        start = time.monotonic()
        env = dict(self.env)
        if step.pytest:  # the tests check exactness with the default launch configs: nothing tuned or read
            env[AUTOTUNE_ENV] = "0"
            env.pop("STSS_TUNING_FILE")
        exit_code, timed_out = run_process(command, env, limit, sink, started)
        record.update(
            command=command, seconds=round(time.monotonic() - start, 1), exit_code=exit_code, limit_s=round(limit)
        )
        files = {}
        for path in sorted(folder.glob("*.json")):
            try:
                files[path.name] = json.loads(path.read_text())
            except json.JSONDecodeError:
                files[path.name] = path.read_text()
        if (folder / "ncu.csv").is_file():
            files["ncu.csv"] = (folder / "ncu.csv").read_text()
        record["files"] = files
        if step.pytest:
            record["tests"] = junit_counts(folder / "junit.xml") or log_counts(test_lines)
        bad = [status for status in statuses(files) if status in BAD_STATUSES]
        if timed_out:
            record["outcome"] = "timed out"
        elif exit_code != 0:
            record["outcome"] = "failed"
        elif bad:
            record.update(outcome="failed", reason=f"{len(bad)} case(s) with status {'/'.join(sorted(set(bad)))}")
        else:
            record["outcome"] = "ok"
        record["log_tail"] = tail
        self.log(
            f"== {step.name}: {record['outcome']} in {record['seconds']:.0f}s"
            + (f" ({record['reason']})" if record.get("reason") else "")
        )
        return record

    def run(self) -> int:
        outcomes = []
        for index, step in enumerate(self.plan()):
            record = self.run_step(index, step)
            self.record(index, record)
            outcomes.append((step.name, record))
        self.manifest["finished"] = now_utc()
        write_json_atomic(self.out / "manifest.json", self.manifest)
        self.log("== summary")
        for name, record in outcomes:
            line = f"{name:40s} {record['outcome']:10s}"
            if "seconds" in record:
                line += f" {record['seconds']:6.0f}s"
            tests = record.get("tests")
            if tests:
                failed = tests["failures"] + tests["errors"]
                line += f"  {tests['passed']} passed, {failed} failed, {tests['skipped']} skipped"
            if record.get("reason"):
                line += f"  {record['reason']}"
            self.log(line)
        self.log(f"results: {self.out}")
        return 1 if any(record["outcome"] in ("failed", "timed out") for _, record in outcomes) else 0


def default_out() -> Path:
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%d-%H%M%S")
    return RUNS_DIR / f"gpu-suite-{stamp}"


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    if args.dry_run:
        print(
            f"{args.mode}, SUITE_SECONDS={args.budget:g}, if every step takes its whole limit (a step that "
            "finishes early leaves its time to the next):"
        )
        left = args.budget
        for step in steps_of(args.mode, args.steps):
            limit = min(step_seconds(step, args.mode), left)
            fits = "runs" if limit >= MIN_STEP_SECONDS else "skipped (budget)"
            print(f"{step.name:40s} limit {limit:4.0f}s  {fits}  needs {','.join(step.needs) or '-'}")
            left -= max(limit, 0)
        return 0
    out = Path(os.environ["OUT"]) if os.environ.get("OUT") else default_out()
    out.mkdir(parents=True, exist_ok=True)
    if (out / "manifest.json").exists():
        print(
            f"bench/gpu_suite.sh: error: {out} already holds a suite's results; set OUT to a new folder",
            file=sys.stderr,
        )
        return 2
    work = (
        Path(os.environ["SUITE_WORK"]) if os.environ.get("SUITE_WORK") else Path(tempfile.mkdtemp(prefix="gpu-suite-"))
    )
    work.mkdir(parents=True, exist_ok=True)
    suite = Suite(args, out, work)

    def interrupted(signum, frame):
        for process in list(RUNNING):
            stop_group(process, signal.SIGKILL)
        for entry in suite.manifest.get("steps", []):
            if entry.get("outcome") == "running":
                entry["outcome"] = "interrupted"
        if suite.manifest:
            suite.manifest["finished"] = now_utc()
            write_json_atomic(out / "manifest.json", suite.manifest)
        raise SystemExit(1)

    signal.signal(signal.SIGTERM, interrupted)
    signal.signal(signal.SIGINT, interrupted)
    suite.start(argv)
    return suite.run()


if __name__ == "__main__":
    raise SystemExit(main())
