"""The benchmark harness end to end on tiny cases: table, JSON, plots, and failures reported as results."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import bench.measure
import bench.providers
from bench import cli, report
from bench.measure import Case, run_case
from bench.providers import DEFAULT_OP, naive_peak_bytes
from bench.workloads import SWEEP_TOKENS, Workload, build_workloads, flop_count
from stss_kernels.ops import op_spec

PROJECT_ROOT = Path(__file__).resolve().parent.parent
TINY = Workload("tiny", batch=2, frames=3, hw=10, cs=12, ct=7)
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def tiny_case(provider: str, mode: str = "fwd+bwd", **fields) -> Case:
    return Case(workload=TINY, provider=provider, mode=mode, min_runs=2, min_time_s=0.0, **fields)


def test_presets_match_the_documented_grids():
    (tsa,) = build_workloads("tsa-grid")
    assert (tsa.batch, tsa.frames, tsa.hw, tsa.cs, tsa.ct, tsa.tokens) == (4, 24, 150, 768, 768, 3600)
    assert build_workloads("cogvideox-native")[0].tokens == 17_550
    assert build_workloads("cogvideox15")[0].tokens == 85_680
    sweep = build_workloads("sweep", frames=8, cs=64)
    assert [w.tokens for w in sweep] == list(SWEEP_TOKENS) and {(w.frames, w.cs) for w in sweep} == {(8, 64)}
    assert [w.tokens for w in build_workloads("sweep", max_tokens=4096)] == [1024, 2048, 4096]
    assert build_workloads("tsa-grid", batch=1, hw=7)[0] == tsa.replace(batch=1, hw=7)
    with pytest.raises(ValueError, match="hw"):
        build_workloads("sweep", hw=64)
    with pytest.raises(ValueError, match="preset"):
        build_workloads("nope")
    with pytest.raises(ValueError, match="frames"):
        build_workloads("tsa-grid", frames=0)


def test_flop_formula():
    b, n, cs, ct = TINY.batch, TINY.tokens, TINY.cs, TINY.ct
    assert flop_count(TINY, "fwd") == 2 * b * n * n * (cs + ct)
    assert flop_count(TINY, "fwd+bwd") == 4 * b * n * n * (cs + ct) + 4 * b * n * n * cs
    assert flop_count(TINY, "fwd+bwd", teacher_grad=True) == 8 * b * n * n * (cs + ct)
    assert flop_count(TINY, "fwd", kept_fraction=0.25) == 0.25 * flop_count(TINY, "fwd")


def test_in_process_run_writes_table_and_json(tmp_path, capsys):
    argv = "--batch 2 --frames 3 --hw 10 --cs 12 --ct 7 --providers reference,torch --mask-ratio 0.5"
    argv += f" --teacher-grad --min-runs 2 --min-time 0 --isolate none --out {tmp_path} --tag tiny --no-plot"
    run = cli.main(argv.split())

    table = capsys.readouterr().out
    assert "time ms median [IQR]" in table and table.count("tsa-grid  30") == 4
    data = json.loads((tmp_path / "tiny.json").read_text())
    assert {"date", "device_name", "torch", "triton", "cuda", "matmul_tflops", "flops", "measure"} <= set(data["meta"])
    assert data["results"] == json.loads(json.dumps(run["results"]))
    assert [(r["provider"], r["mode"]) for r in data["results"]] == [
        ("reference", "fwd"), ("torch", "fwd"), ("reference", "fwd+bwd"), ("torch", "fwd+bwd"),
    ]  # fmt: skip
    for result in data["results"]:
        assert result["status"] == "ok" and result["check"]["passed"] is True, result
        assert result["check"]["error"] < 1e-4 and result["kept_fraction"] == 0.5
        assert 0 < result["time_ms"]["min"] <= result["time_ms"]["median"] <= result["time_ms"]["max"]
        assert result["tflops"] == pytest.approx(result["flops"] / result["time_ms"]["median"] / 1e9)
        assert result["matmul_fraction"] == pytest.approx(result["tflops"] / data["meta"]["matmul_tflops"])
        assert result["input_bytes"] == 4 * TINY.batch * TINY.tokens * (TINY.cs + TINY.ct)
        assert result["peak_bytes"] >= 0 and "speedup_vs_reference" in result
    assert [r["speedup_vs_reference"] for r in data["results"] if r["provider"] == "reference"] == [1.0, 1.0]
    assert not list(tmp_path.glob("*.png"))


def test_isolated_cli_measures_peak_memory_and_plots(tmp_path):
    """`python -m bench` with one process per case: the naive reference's peak RSS growth is several
    N x N fp32 matrices, within the estimate the CPU memory guard uses; the chunked backend's is smaller."""
    command = [sys.executable, "-m", "bench", "--preset", "sweep", "--max-tokens", "1024", "--cs", "16", "--ct", "16"]
    command += ["--providers", "reference,torch", "--modes", "fwd", "--no-check", "--min-runs", "1"]
    command += ["--min-time", "0", "--isolate", "process", "--out", str(tmp_path), "--tag", "iso"]
    completed = subprocess.run(command, cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=240)
    assert completed.returncode == 0, completed.stderr
    assert "sweep-1k" in completed.stdout and "iso.json" in completed.stdout
    data = json.loads((tmp_path / "iso.json").read_text())
    assert data["meta"]["isolated_processes"] is True
    reference, chunked = data["results"]
    matrix = 1024 * 1024 * 4
    (workload,) = build_workloads("sweep", max_tokens=1024, cs=16, ct=16)
    assert 3 * matrix < reference["peak_bytes"] <= naive_peak_bytes(workload, "fwd", torch.float32)
    assert chunked["status"] == "ok" and chunked["peak_bytes"] < reference["peak_bytes"]
    assert chunked["memory_vs_reference"] == pytest.approx(chunked["peak_bytes"] / reference["peak_bytes"])
    for kind in ("time", "memory"):
        assert (tmp_path / f"iso-{kind}.png").read_bytes()[:8] == PNG_MAGIC


def _raising(error: BaseException):
    def loss(*args, **kwargs):
        raise error

    return loss


def test_out_of_memory_is_a_result(monkeypatch):
    monkeypatch.setattr(bench.measure, "make_loss", lambda *_: _raising(torch.cuda.OutOfMemoryError("boom")))
    result = run_case(tiny_case("torch", check=False))
    assert result["status"] == "OOM" and "time_ms" not in result and "OutOfMemoryError" in result["note"]
    cpu_oom = RuntimeError("[enforce fail at alloc_cpu.cpp:117] DefaultCPUAllocator: can't allocate memory")
    monkeypatch.setattr(bench.measure, "make_loss", lambda *_: _raising(cpu_oom))
    assert run_case(tiny_case("reference", check=False))["status"] == "OOM"
    wrapped = RuntimeError("backend compiler failed")
    wrapped.__cause__ = torch.cuda.OutOfMemoryError("CUDA error")
    monkeypatch.setattr(bench.measure, "make_loss", lambda *_: _raising(wrapped))
    assert run_case(tiny_case("compiled", check=False))["status"] == "OOM"
    assert "OOM" in report.format_table([result])


def test_reference_too_big_for_host_memory_is_skipped(monkeypatch):
    monkeypatch.setattr(bench.measure, "memory_budget_bytes", lambda device: 1000)
    skipped = run_case(tiny_case("compiled"))
    assert skipped["status"] == "skipped" and "would need" in skipped["note"]
    chunked = run_case(tiny_case("torch"))  # not guarded; its check has no room for the fp64 reference
    assert chunked["status"] == "ok" and chunked["check"]["passed"] is None and "time_ms" in chunked


def test_errors_and_wrong_results_are_reported(monkeypatch):
    monkeypatch.setattr(bench.measure, "make_loss", lambda *_: _raising(ValueError("unsupported")))
    failed = run_case(tiny_case("compiled"))
    assert failed["status"] == "error" and "ValueError: unsupported" in failed["note"] and failed["traceback"]

    naive_loss = op_spec(DEFAULT_OP).naive_loss
    monkeypatch.setattr(bench.measure, "make_loss", lambda *_: lambda *args, **kw: 1.01 * naive_loss(*args, **kw))
    wrong = run_case(tiny_case("torch"))
    assert wrong["status"] == "mismatch" and wrong["check"]["passed"] is False
    assert wrong["check"]["error"] == pytest.approx(0.01, rel=1e-3)
    assert "FAIL" in report.format_table([wrong])


def test_triton_provider(monkeypatch):
    big = TINY.replace(hw=200)
    assert "interpreter" in run_case(Case(big, "triton", "fwd"))["note"]
    result = run_case(tiny_case("triton"))
    assert result["status"] == "ok" and result["check"]["passed"] is True, result
    monkeypatch.setattr(bench.providers, "triton_interpreting", lambda: False)
    assert run_case(tiny_case("triton"))["status"] == "unavailable"


@pytest.mark.parametrize(
    "argv,message",
    [
        ("--mask-ratio 0", "--mask-ratio: expected a kept fraction in (0, 1], got 0"),
        ("--providers eager", "--providers: expected a comma-separated subset of"),
        ("--modes bwd", "--modes: expected a comma-separated subset of"),
        ("--tau 0", "--tau: tau must be a finite number > 0, got 0.0"),
        ("--tau -1e-4", "--tau: tau must be a finite number > 0, got -0.0001"),  # a negative value, not an option
        ("--op relation_distance --margin -1", "--margin: margin must be a finite number >= 0, got -1.0"),
        ("--margin 0.2", "--margin applies to relation_distance, not to --op tempered_kl"),
        ("--variant spatial", "--variant applies to relation_distance, not to --op tempered_kl"),
        ("--batch 0", "--batch: expected a positive integer, got 0"),
        ("--max-tokens 100", "max_tokens=100 leaves no workload of preset 'tsa-grid'"),
        ("--max-tok 100", "unrecognized arguments: --max-tok"),  # no abbreviations
        ("--tiny", "--tiny only applies to --dit"),
    ],
)
def test_bad_arguments_are_one_line_usage_errors(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.parse_args(argv.split())
    assert exit_info.value.code == 2
    error_line = capsys.readouterr().err.strip().splitlines()[-1]
    assert error_line.startswith("python -m bench: error: ") and message in error_line


def test_help_says_what_each_option_does_and_its_default(capsys):
    with pytest.raises(SystemExit):
        cli.parse_args(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "(default: True)" not in text and "(default: False)" not in text and "(default: None)" not in text
    for option in cli.build_parser()._actions:
        assert option.help, f"{option.option_strings} has no help"
    for fragment in ("--no-check skip the correctness check against the float64 naive loss (default: check)",
                     "--no-normalize use raw dot products as similarities (default: cosine similarities)",
                     "tempered_kl: softmax temperature", "(default: 0.1)", "--preset"):  # fmt: skip
        assert fragment in text


def test_results_go_to_a_run_folder_unless_told_to_update(monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(cli, "RUNS_DIR", tmp_path / "runs")
    assert cli.parse_args([]).out.parent == tmp_path / "runs"  # bench/runs/<timestamp>/
    assert cli.parse_args(["--update-results"]).out == cli.DEFAULT_OUT
    assert cli.parse_args(["--out", str(tmp_path)]).out == tmp_path
    with pytest.raises(SystemExit):
        cli.parse_args(["--update-results", "--out", str(tmp_path)])
    with pytest.raises(SystemExit):
        cli.parse_args(["--help"])


def test_relation_distance_op(tmp_path, capsys):
    """`--op relation_distance`: the same harness, table and JSON; every provider checked against its fp64 truth."""
    argv = "--op relation_distance --variant temporal --margin 0.05 --batch 2 --frames 3 --hw 10 --cs 12 --ct 7"
    argv += " --providers reference,torch,triton --modes fwd+bwd --mask-ratio 0.5 --min-runs 2 --min-time 0"
    argv += f" --isolate none --out {tmp_path} --no-plot"
    run = cli.main(argv.split())
    assert "relation_distance:" in capsys.readouterr().out
    data = json.loads((tmp_path / "relation_distance-temporal-tsa-grid-cpu-float32-mask0.5.json").read_text())
    assert data["results"] == json.loads(json.dumps(run["results"]))
    assert [r["provider"] for r in data["results"]] == ["reference", "torch", "triton"]
    for result in data["results"]:
        assert result["op"] == "relation_distance" and (result["margin"], result["variant"]) == (0.05, "temporal")
        assert result["status"] == "ok" and result["check"]["passed"] is True, result
        assert result["check"]["error"] < 1e-4 and "tau" not in result
    unmasked = Case(TINY, "torch", "fwd+bwd", op="relation_distance", min_runs=1, min_time_s=0.0)
    assert run_case(unmasked)["flops"] == flop_count(TINY, "fwd+bwd", symmetric_grad=True)
    assert flop_count(TINY, "fwd+bwd", symmetric_grad=True) == 4 * 2 * 30 * 30 * 19 + 2 * 2 * 30 * 30 * 12
    with pytest.raises(SystemExit):
        cli.parse_args(["--op", "relation_distance", "--margin", "-1"])
