"""`python -m bench --op OP --shards 1,2,4`: the op on sharded tokens (`process_group=`) across P processes.

For each P, P processes (gloo on CPU, NCCL with one GPU per rank on CUDA) each hold a contiguous slice of
N / P tokens (the remainder on the first ranks) of one workload and run the op's forward (or forward + backward)
with the group. Per rank: the median time of a call (all ranks start it together after an untimed barrier; on
CPU also the CPU time of the rank's process, which counts its own work whatever else shares the cores), the peak
memory of one call above the inputs (bench.measure.peak_memory_bytes: CUDA's allocator peak, or the growth of the
CPU process's resident set), and the bytes its collectives send (stss_kernels._core.sharding.count_communication).
Beside them, the one-process op without a group in a process of its own ("1 (no group)").

On CPU every rank runs one torch thread (standing in for one device per rank): with more ranks than cores the
ranks share cores, and their times grow by that factor. The backend is the one `--providers` names (one of
reference, torch, triton), else torch on CPU and triton on CUDA.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import statistics
import sys
import tempfile
import time
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from stss_kernels._core.sharding import count_communication
from stss_kernels.ops import op_spec

from .measure import DTYPES, WORKER_ENV, peak_memory_bytes

BACKENDS = ("reference", "torch", "triton")
# Seconds a collective may wait before it fails (instead of hanging the benchmark).
COLLECTIVE_TIMEOUT_S = 300


@dataclasses.dataclass
class ShardCase:
    """One sharded measurement; JSON-serialisable (it crosses into the spawned ranks)."""

    op: str
    batch: int
    frames: int
    hw: int
    cs: int
    ct: int
    backend: str
    mode: str  # "fwd" or "fwd+bwd"
    dtype: str = "float32"
    device: str = "cpu"
    # The op's options (OpOption names of its spec) and their values; the spec's defaults for the rest.
    options: dict = dataclasses.field(default_factory=dict)
    mask_ratio: float = 1.0
    teacher_grad: bool = False
    seed: int = 0
    threads: int = 1
    min_runs: int = 3
    min_time_s: float = 1.0

    @property
    def tokens(self) -> int:
        return self.frames * self.hw


def shard_sizes(tokens: int, shards: int) -> list[int]:
    """Contiguous slice lengths: N // P each, the remainder on the first ranks."""
    return [tokens // shards + (rank < tokens % shards) for rank in range(shards)]


def _whole_inputs(case: ShardCase, device: torch.device):
    """The whole sequence's student (B, N, Cs), teacher (B, N, Ct) and kept-query mask (B, N) or None."""
    gen = torch.Generator().manual_seed(case.seed)
    shape = (case.batch, case.tokens)
    student = torch.randn(*shape, case.cs, generator=gen)
    teacher = 0.5 * student[..., : case.ct] if case.ct <= case.cs else torch.randn(*shape, case.ct, generator=gen)
    teacher = teacher + torch.randn(*shape, case.ct, generator=gen)
    mask = None if case.mask_ratio >= 1.0 else torch.rand(*shape, generator=gen) < case.mask_ratio
    dtype = DTYPES[case.dtype]
    return student.to(device, dtype), teacher.to(device, dtype), None if mask is None else mask.to(device)


def _loss_call(case: ShardCase, student, teacher, mask, group):
    backward = case.mode == "fwd+bwd"
    student.requires_grad_(backward)
    teacher.requires_grad_(backward and case.teacher_grad)
    spec = op_spec(case.op)
    options, op = spec.keyword_arguments(case.options), spec.function

    def call():
        student.grad = teacher.grad = None
        loss = op(
            student, teacher, frames=case.frames, query_mask=mask, backend=case.backend, process_group=group, **options
        )
        if backward:
            loss.backward()
        return loss.detach()

    return call


def _time_ranks(fn, device: torch.device, group, case: ShardCase) -> dict:
    """Median and spread of fn's time in ms over a run count every rank agrees on (each rank must make the same
    number of calls, or their collectives would wait for each other forever)."""

    cpu_times = []

    def timed() -> float:
        if group is not None:  # every rank starts together; the wait is not timed
            dist.barrier(group)
        begin, begin_cpu = time.perf_counter(), time.process_time()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        cpu_times.append((time.process_time() - begin_cpu) * 1e3)
        return (time.perf_counter() - begin) * 1e3

    timed()  # warm-up: autotuning, allocator
    cpu_times.clear()
    first = torch.tensor([timed()], dtype=torch.float64, device=device)
    if group is not None:
        dist.all_reduce(first, op=dist.ReduceOp.MAX, group=group)
    runs = max(case.min_runs, min(100, math.ceil(case.min_time_s * 1e3 / max(first.item(), 1e-3))))
    times = [first.item()] + [timed() for _ in range(runs - 1)]
    quartiles = statistics.quantiles(times, n=4, method="inclusive") if len(times) > 1 else [times[0]] * 3
    return {
        "median": statistics.median(times),
        "q25": quartiles[0],
        "q75": quartiles[2],
        "runs": len(times),
        # CPU time of the rank's process (all its threads): its own work, whatever else shares the cores.
        "cpu_median": statistics.median(cpu_times),
    }


def _worker(rank: int, world: int, case_json: str, grouped: bool, out_dir: str) -> None:
    case = ShardCase(**json.loads(case_json))
    torch.set_num_threads(case.threads)
    cuda = case.device.startswith("cuda")
    device = torch.device("cuda", rank) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    group = None
    if grouped:
        # A file rendezvous in the run's own folder: no TCP port to pick, so no race with other processes for one.
        dist.init_process_group(
            "nccl" if cuda else "gloo",
            init_method=f"file://{Path(out_dir, 'rendezvous')}",
            rank=rank,
            world_size=world,
            timeout=timedelta(seconds=COLLECTIVE_TIMEOUT_S),
        )
        group = dist.group.WORLD
    try:
        student, teacher, mask = _whole_inputs(case, device)
        sizes = shard_sizes(case.tokens, world)
        start = sum(sizes[:rank])
        local = slice(start, start + sizes[rank])
        student, teacher = student[:, local].contiguous(), teacher[:, local].contiguous()
        mask = None if mask is None else mask[:, local].contiguous()
        call = _loss_call(case, student, teacher, mask, group)

        def synchronised_call():
            if group is not None:
                dist.barrier(group)
            return call()

        timing = _time_ranks(call, device, group, case)
        peak = peak_memory_bytes(synchronised_call, device)
        with count_communication() as sent:
            call()
        result = {"rank": rank, "tokens": sizes[rank], "ms": timing, "peak_bytes": peak, "sent_bytes": sum(sent)}
        Path(out_dir, f"rank{rank}.json").write_text(json.dumps(result))
    finally:
        if group is not None:
            dist.destroy_process_group()
    # gloo's worker threads drop their finished collectives' tensors after the caller's wait returns, which takes the
    # GIL: one that asks for it while the interpreter finalises aborts the process (pytorch/pytorch#38228) although
    # the rank's results are written. Leave without finalising.
    os._exit(0)


def run_shards(case: ShardCase, shards: int | None) -> dict:
    """Spawn the ranks (shards=None: one process without a group) and collect their per-rank results."""
    world = shards or 1
    saved = {name: os.environ.get(name) for name in WORKER_ENV}
    os.environ.update(WORKER_ENV)
    with tempfile.TemporaryDirectory() as out_dir:
        args = (world, json.dumps(dataclasses.asdict(case)), shards is not None, out_dir)
        started = time.perf_counter()
        try:
            mp.spawn(_worker, args=args, nprocs=world, join=True)
        finally:
            for name, value in saved.items():
                if value is None:
                    os.environ.pop(name, None)
                else:
                    os.environ[name] = value
        ranks = [json.loads(Path(out_dir, f"rank{rank}.json").read_text()) for rank in range(world)]
    return {
        "shards": shards,
        "ranks": ranks,
        "max_ms": max(rank["ms"]["median"] for rank in ranks),
        "max_peak_bytes": max(rank["peak_bytes"] for rank in ranks),
        "max_sent_bytes": max(rank["sent_bytes"] for rank in ranks),
        "wall_s": time.perf_counter() - started,
    }


def format_table(case: ShardCase, rows: list[dict]) -> str:
    """Markdown table: P, tokens per rank, per-rank time (slowest rank), peak memory and bytes sent per rank."""
    cpu = case.device == "cpu"
    lines = [
        "| P | tokens per rank | time per rank (ms, slowest rank) |"
        + (" CPU time per rank (ms, largest) |" if cpu else "")
        + " peak memory per rank (MiB) | sent per rank (MiB) |",
        "|---|---|---|" + ("---|" if cpu else "") + "---|---|",
    ]
    for row in rows:
        label = "1 (no group)" if row["shards"] is None else str(row["shards"])
        tokens = "/".join(str(rank["tokens"]) for rank in row["ranks"])
        lines.append(
            f"| {label} | {tokens} | {row['max_ms']:.1f} | "
            + (f"{max(rank['ms']['cpu_median'] for rank in row['ranks']):.1f} | " if cpu else "")
            + f"{row['max_peak_bytes'] / 2**20:.1f} | "
            f"{row['max_sent_bytes'] / 2**20:.2f} |"
        )
    return "\n".join(lines)


def _usage_error(message: str) -> None:
    print(f"python -m bench: error: {message}", file=sys.stderr)
    raise SystemExit(2)


def main_shards(args, argv: list[str], meta: dict) -> dict:
    """--shards: one table per mode (the one-process op, then each P) and SHARDS-TAG.json under --out."""
    from .workloads import build_workloads

    shape = {field: getattr(args, field) for field in ("batch", "frames", "hw", "cs", "ct")}
    workload = build_workloads(args.preset, **shape)[0]
    chosen = any(arg.startswith("--providers") for arg in argv)
    backend = args.providers[0] if chosen else ("triton" if args.device.type == "cuda" else "torch")
    if backend not in BACKENDS or (chosen and len(args.providers) > 1):
        _usage_error(f"--shards: --providers must name one of {', '.join(BACKENDS)}, got {','.join(args.providers)}")
    if args.device.type == "cuda" and max(args.shards) > torch.cuda.device_count():
        _usage_error(f"--shards {max(args.shards)} needs one GPU per rank, found {torch.cuda.device_count()}")
    results = {}
    for mode in args.modes:
        case = ShardCase(
            op=args.op, batch=workload.batch, frames=workload.frames, hw=workload.hw, cs=workload.cs,
            ct=workload.ct, backend=backend, mode=mode, dtype=args.dtype, device=str(args.device),
            options=args.options, mask_ratio=args.mask_ratio, teacher_grad=args.teacher_grad,
            seed=args.seed, threads=1, min_runs=args.min_runs, min_time_s=args.min_time_s,
        )  # fmt: skip
        rows = [run_shards(case, None)] + [run_shards(case, shards) for shards in args.shards]
        results[mode] = {"case": dataclasses.asdict(case), "rows": rows}
        print(
            f"{args.op} {backend} {mode}: B={case.batch}, N={case.tokens} ({case.frames} x {case.hw}), "
            f"Cs={case.cs}, Ct={case.ct}, {case.dtype}, {meta['device_name']}, {case.threads} thread(s) per rank, "
            f"{os.cpu_count()} cores"
        )
        print(format_table(case, rows))
    tag = args.tag or f"shards-{args.op}-{args.device.type}-{args.dtype}"
    path = args.out / f"{tag}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"meta": meta, "shards": results}, indent=2) + "\n")
    print(f"wrote {path}")
    return {"meta": meta, "shards": results, "paths": [path]}
