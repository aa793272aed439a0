"""One benchmark case: correctness check against reference, then time and peak memory.

Time: on CUDA `triton.testing.do_bench` (L2 flushed between calls, every run kept); on CPU
`time.perf_counter` after warm-up calls, at least `min_runs` runs and `min_time_s` seconds.
Peak memory above the inputs: on CUDA `torch.cuda.max_memory_allocated` after
`reset_peak_memory_stats`, minus what was allocated before the call (inputs included); on CPU the
process's resident set: its high-water mark VmHWM is reset to the current RSS (writing 5 to
/proc/self/clear_refs), one call runs, and the growth of VmHWM over the RSS before the call is the
peak. CPU cases run in a fresh process each (`python -m bench.measure CASE_JSON`) started with
MALLOC_MMAP_THRESHOLD_ set, so freed buffers go back to the OS instead of being reused unseen.
"""

from __future__ import annotations

import dataclasses
import gc
import json
import math
import re
import statistics
import sys
import time
import traceback
from collections.abc import Callable

import torch

from stss_kernels.ops import op_spec

from .providers import DEFAULT_OP, make_loss, naive_peak_bytes, unavailable_reason
from .workloads import Workload, flop_count

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "float64": torch.float64}

# Acceptance rule of the correctness check: error against fp64 truth no worse than twice the error of the
# naive reference in the same dtype, plus this tolerance. Errors are relative (loss and gradients' L2 norm).
CHECK_TOLERANCE = {torch.float64: 1e-9, torch.float32: 1e-4, torch.bfloat16: 1e-2, torch.float16: 1e-2}

# Large freed buffers go back to the OS at once, so a CPU worker's resident set tracks live tensors (the environment
# of the processes that measure CPU cases).
WORKER_ENV = {"MALLOC_MMAP_THRESHOLD_": "65536"}

# Rank of the component shared by student and teacher tokens, so the softmaxes are far from uniform.
SHARED_RANK = 8


@dataclasses.dataclass
class Case:
    """Everything one measurement needs; JSON-serialisable so it can cross a process boundary."""

    workload: Workload
    provider: str
    mode: str  # "fwd" or "fwd+bwd"
    op: str = DEFAULT_OP  # a name of stss_kernels.ops.OP_NAMES
    dtype: str = "float32"
    device: str = "cpu"
    # The op's options (OpOption names of its spec) and their values; the spec's defaults for the rest.
    options: dict = dataclasses.field(default_factory=dict)
    mask_ratio: float = 1.0
    normalize: bool = True
    teacher_grad: bool = False
    seed: int = 0
    threads: int | None = None
    min_runs: int = 3
    min_time_s: float = 1.0
    check: bool = True

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self))

    @classmethod
    def from_json(cls, text: str) -> Case:
        fields = json.loads(text)
        return cls(**{**fields, "workload": Workload(**fields["workload"])})


def make_inputs(
    workload: Workload, dtype: torch.dtype, device: torch.device, *, mask_ratio: float, seed: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Correlated random student (B, N, Cs) and teacher (B, N, Ct) features, and a query mask keeping
    round(mask_ratio * N) random queries per video (None when mask_ratio is 1)."""
    generator = torch.Generator().manual_seed(seed)
    batch, tokens = workload.batch, workload.tokens
    shared = torch.randn(batch, tokens, SHARED_RANK, generator=generator)

    def features(channels: int) -> torch.Tensor:
        mixing = torch.randn(SHARED_RANK, channels, generator=generator)
        noise = torch.randn(batch, tokens, channels, generator=generator)
        return (shared @ mixing + 0.5 * math.sqrt(SHARED_RANK) * noise).to(device=device, dtype=dtype)

    student, teacher = features(workload.cs), features(workload.ct)
    if mask_ratio >= 1.0:
        return student, teacher, None
    kept = max(1, round(mask_ratio * tokens))
    order = torch.rand(batch, tokens, generator=generator).argsort(dim=1)
    mask = torch.zeros(batch, tokens, dtype=torch.bool).scatter_(1, order[:, :kept], True)
    return student, teacher, mask.to(device)


def kept_fraction(tokens: int, mask_ratio: float) -> float:
    return 1.0 if mask_ratio >= 1.0 else max(1, round(mask_ratio * tokens)) / tokens


class LossCall:
    """A zero-argument call of one provider on fixed inputs; forward only, or forward + backward."""

    def __init__(self, loss_fn, student, teacher, mask, case: Case):
        self.loss_fn, self.student, self.teacher, self.mask, self.case = loss_fn, student, teacher, mask, case
        self.backward = case.mode == "fwd+bwd"
        student.requires_grad_(self.backward)
        teacher.requires_grad_(self.backward and case.teacher_grad)
        self.leaves = [x for x in (student, teacher) if x.requires_grad]

    def zero_grad(self) -> None:
        for leaf in self.leaves:
            leaf.grad = None

    def __call__(self) -> torch.Tensor:
        self.zero_grad()
        case = self.case
        arguments = op_spec(case.op).keyword_arguments(case.options)
        loss = self.loss_fn(self.student, self.teacher, frames=case.workload.frames, query_mask=self.mask,
                            normalize=case.normalize, **arguments)  # fmt: skip
        if self.backward:
            loss.backward()
        return loss.detach()

    def outputs(self) -> list[torch.Tensor]:
        """The loss and the gradients of every leaf (after a call), in float64."""
        loss = self()
        return [loss.double()] + [leaf.grad.double() for leaf in self.leaves]


def time_call(fn: Callable[[], object], device: torch.device, *, min_runs: int = 3, min_time_s: float = 1.0) -> dict:
    """Median, quartiles, min and max of the call's time in milliseconds."""
    if device.type == "cuda":
        from triton.testing import do_bench

        with torch.cuda.device(device):  # do_bench records events on the current device
            times = [float(t) for t in do_bench(fn, warmup=25, rep=100, return_mode="all")]
    else:
        fn()  # warm-up: compilation, allocator
        times, start = [], time.perf_counter()
        while len(times) < min_runs or (time.perf_counter() - start < min_time_s and len(times) < 100):
            begin = time.perf_counter()
            fn()
            times.append((time.perf_counter() - begin) * 1e3)
    quartiles = statistics.quantiles(times, n=4, method="inclusive") if len(times) > 1 else [times[0]] * 3
    return {
        "median": statistics.median(times),
        "q25": quartiles[0],
        "q75": quartiles[2],
        "min": min(times),
        "max": max(times),
        "runs": len(times),
    }


def _proc_field_kib(path: str, field: str) -> int:
    with open(path) as table:
        return int(re.search(rf"^{field}:\s+(\d+) kB", table.read(), re.MULTILINE).group(1))


def _proc_status_kib(field: str) -> int:
    return _proc_field_kib("/proc/self/status", field)


def _meminfo_kib(field: str) -> int:
    return _proc_field_kib("/proc/meminfo", field)


def peak_memory_bytes(fn: Callable[[], object], device: torch.device) -> int:
    """Peak memory of one call above what was allocated before it (inputs included in the baseline).

    A LossCall's gradients from earlier calls are dropped first: the call frees them itself, so they
    must not sit in the baseline.
    """
    if isinstance(fn, LossCall):
        fn.zero_grad()
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        baseline = torch.cuda.memory_allocated(device)
        fn()
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) - baseline
    with open("/proc/self/clear_refs", "w") as clear_refs:
        clear_refs.write("5")  # resets VmHWM to the current RSS
    baseline = _proc_status_kib("VmRSS")
    fn()
    return max(0, _proc_status_kib("VmHWM") - baseline) * 1024  # RSS can shrink during the call


def matmul_tflops(device: torch.device, dtype: torch.dtype) -> float:
    """Dense matmul throughput of this device in `dtype` (8192^3 on GPU, 2048^3 on CPU)."""
    size = 8192 if device.type == "cuda" else 2048
    a, b = (torch.randn(size, size, device=device, dtype=dtype) for _ in range(2))
    median_ms = time_call(lambda: torch.matmul(a, b), device, min_runs=3, min_time_s=0.2)["median"]
    return 2 * size**3 / (median_ms * 1e-3) / 1e12


def memory_budget_bytes(device: torch.device) -> int:
    """Memory a run may use here: free GPU memory, or 80% of the available host memory."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    return int(0.8 * _meminfo_kib("MemAvailable") * 1024)


def is_out_of_memory(error: BaseException | None) -> bool:
    """CUDA or host allocation failure, also when wrapped (e.g. by torch.compile) in another exception."""
    while error is not None:
        message = str(error).lower()
        if isinstance(error, torch.cuda.OutOfMemoryError) or "out of memory" in message or "allocate memory" in message:
            return True
        error = error.__cause__
    return False


def relative_error(value: torch.Tensor, truth: torch.Tensor) -> float:
    return (torch.linalg.vector_norm(value - truth) / torch.linalg.vector_norm(truth).clamp_min(1e-30)).item()


def check_case(case: Case, loss_fn, device: torch.device) -> dict:
    """Compare the provider with the naive reference in fp64 (the truth) and in the case's dtype.

    Runs on the case's workload when the fp64 reference fits in memory, else on a slice
    (batch 1, at most 2 frames, the same HW and channels).
    """
    dtype = DTYPES[case.dtype]
    workload = case.workload
    budget = memory_budget_bytes(device) // 4  # leaves room for the estimate's error and the case's inputs
    if naive_peak_bytes(workload, "fwd+bwd", torch.float64, case.op) > budget:
        workload = workload.replace(batch=1, frames=min(workload.frames, 2))
    if naive_peak_bytes(workload, "fwd+bwd", torch.float64, case.op) > budget:
        return {"passed": None, "note": "skipped: the fp64 reference does not fit even on a 2-frame slice"}
    check = dataclasses.replace(case, workload=workload)
    student, teacher, mask = make_inputs(workload, dtype, device, mask_ratio=case.mask_ratio, seed=case.seed + 1)

    def outputs(fn, cast: torch.dtype) -> list[torch.Tensor]:
        return LossCall(fn, student.detach().to(cast), teacher.detach().to(cast), mask, check).outputs()

    naive_loss = op_spec(case.op).naive_loss
    truth = outputs(naive_loss, torch.float64)
    same_dtype_reference = outputs(naive_loss, dtype)
    provider = same_dtype_reference if case.provider == "reference" else outputs(loss_fn, dtype)
    error = max(relative_error(v, t) for v, t in zip(provider, truth))
    reference_error = max(relative_error(v, t) for v, t in zip(same_dtype_reference, truth))
    tolerance = 2 * reference_error + CHECK_TOLERANCE[dtype]
    return {
        "error": error,
        "reference_error": reference_error,
        "tolerance": tolerance,
        "passed": bool(error <= tolerance),
        "workload": dataclasses.asdict(workload),
    }


def base_result(case: Case, status: str = "ok", note: str = "") -> dict:
    """The fields every result has: what was run, and how it went."""
    workload, spec = case.workload, op_spec(case.op)
    fraction = kept_fraction(workload.tokens, case.mask_ratio)
    return {
        "workload": dataclasses.asdict(workload),
        "tokens": workload.tokens,
        "op": case.op,
        "provider": case.provider,
        "mode": case.mode,
        "dtype": case.dtype,
        **spec.option_values(case.options),
        "mask_ratio": case.mask_ratio,
        "kept_fraction": fraction,
        "teacher_grad": case.teacher_grad,
        "flops": flop_count(
            workload,
            case.mode,
            kept_fraction=fraction,
            teacher_grad=case.teacher_grad,
            symmetric_grad=spec.symmetric_gradient and fraction == 1.0,
        ),
        "status": status,
        "note": note,
    }


def run_case(case: Case) -> dict:
    """Check, time and measure one case. Failures (OOM included) become the result's status."""
    device, dtype, workload = torch.device(case.device), DTYPES[case.dtype], case.workload
    if case.threads:
        torch.set_num_threads(case.threads)
    result = base_result(case)
    reason = unavailable_reason(case.provider, workload, device, case.op)
    if reason is not None:
        return {**result, "status": "unavailable", "note": reason}
    if case.provider in ("reference", "compiled") and device.type == "cpu":
        needed, budget = naive_peak_bytes(workload, case.mode, dtype, case.op), memory_budget_bytes(device)
        if needed > budget:
            note = f"would need ~{needed / 2**30:.1f} GB, {budget / 2**30:.1f} GB available"
            return {**result, "status": "skipped", "note": note}
    try:
        loss_fn = make_loss(case.provider, case.op)
        if case.check:
            result["check"] = check_case(case, loss_fn, device)
            if result["check"]["passed"] is False:
                result["status"] = "mismatch"
        student, teacher, mask = make_inputs(workload, dtype, device, mask_ratio=case.mask_ratio, seed=case.seed)
        result["input_bytes"] = sum(x.numel() * x.element_size() for x in (student, teacher))
        call = LossCall(loss_fn, student, teacher, mask, case)
        time_ms = time_call(call, device, min_runs=case.min_runs, min_time_s=case.min_time_s)
        result["peak_bytes"] = peak_memory_bytes(call, device)  # warm: compiled, autotuned
        result["time_ms"] = time_ms
    except Exception as error:  # noqa: BLE001 - every failure is reported as a result
        out_of_memory = is_out_of_memory(error)
        result = {**result, "status": "OOM" if out_of_memory else "error", "note": _one_line(error)}
        if not out_of_memory:
            result["traceback"] = traceback.format_exc()
    finally:
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    if "time_ms" in result:
        result["tflops"] = result["flops"] / (result["time_ms"]["median"] * 1e-3) / 1e12
    return result


def _one_line(error: BaseException) -> str:
    return f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"[:200]


if __name__ == "__main__":
    print(json.dumps(run_case(Case.from_json(sys.argv[1]))))
