"""bench/gpu_suite.sh: `smoke` runs every step on the CPU; results are written as steps finish and survive a kill;
the budget, the time limits, missing packages and usage mistakes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import pytest
import torch

from bench import gpu_suite

ROOT = Path(__file__).resolve().parent.parent
# What a device call brings back: at most 8 files, in one folder.
RESULT_FILES = {"manifest.json", "results.jsonl", "suite.log", "tuning.json"}


def _env(tmp_path: Path, **extra) -> dict:
    env = {**os.environ, "PYTHON": sys.executable, "OUT": str(tmp_path / "out"), "SUITE_WORK": str(tmp_path / "work")}
    env.pop("TRITON_INTERPRET", None)  # the suite sets it for its steps in smoke mode
    return {**env, **extra}


def _suite(tmp_path: Path, *arguments: str, **extra) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["bash", "bench/gpu_suite.sh", *arguments],
        cwd=ROOT,
        env=_env(tmp_path, **extra),
        capture_output=True,
        text=True,
        timeout=2400,
    )


def _records(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_smoke_runs_every_step_and_records_each(tmp_path):
    completed = _suite(tmp_path, "smoke")
    assert completed.returncode == 0, completed.stdout[-3000:] + completed.stderr[-3000:]
    out = tmp_path / "out"
    assert {path.name for path in out.iterdir()} <= RESULT_FILES
    manifest = json.loads((out / "manifest.json").read_text())
    names = [step.name for step in gpu_suite.STEPS]
    assert [step["name"] for step in manifest["steps"]] == names
    assert manifest["mode"] == "smoke" and manifest["finished"] and manifest["environment"]["torch"]
    assert manifest["source"]["sources_sha256"]
    records = {record["name"]: record for record in _records(out)}
    assert list(records) == names
    for step in gpu_suite.STEPS:
        record = records[step.name]
        if "ncu" in step.needs and record["outcome"] == "skipped":
            assert "ncu" in record["reason"] or "CUDA" in record["reason"]
            continue
        assert record["outcome"] == "ok", record
        if step.pytest:
            assert record["tests"] is not None
        else:  # a bench run: its JSON verbatim, every case checked against the reference
            (document,) = record["files"].values()
            cases = document["results"] if "results" in document else list(document["dit"]["losses"].values())
            assert cases and all(case["status"] == "ok" for case in cases), cases
    assert records["tests-gpu"]["tests"]["tests"] > 0
    log = (out / "suite.log").read_text()
    assert "== summary" in log and all(f"== {name}" in log for name in names)


@pytest.mark.slow
def test_a_killed_run_keeps_the_finished_steps_and_leaves_no_step_running(tmp_path):
    steps = "tempered-kl-tsa-grid,relation-distance-tsa-grid,tempered-kl-cogvideox-native"
    out = tmp_path / "out"
    suite = subprocess.Popen(
        ["bash", "bench/gpu_suite.sh", "smoke", "--steps", steps],
        cwd=ROOT,
        env=_env(tmp_path),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 900
    running_pid = None
    while time.monotonic() < deadline:
        if (out / "results.jsonl").is_file() and (out / "results.jsonl").read_text().count("\n") >= 1:
            manifest = json.loads((out / "manifest.json").read_text())
            running = [step for step in manifest["steps"] if step["outcome"] == "running"]
            if running:
                running_pid = running[0]["pid"]
                break
        assert suite.poll() is None, "the suite ended before it could be killed"
        time.sleep(0.2)
    assert running_pid is not None, "no step finished in time"
    suite.send_signal(signal.SIGKILL)  # no handler runs: what is on disk is all there is
    suite.wait()
    for _ in range(100):  # the running step dies with the suite (no orphan holds the GPU)
        try:
            os.kill(running_pid, 0)
        except ProcessLookupError:
            break
        time.sleep(0.1)
    else:
        os.killpg(running_pid, signal.SIGKILL)
        pytest.fail("the running step outlived the killed suite")
    records = _records(out)
    assert records[0]["name"] == "tempered-kl-tsa-grid" and records[0]["outcome"] == "ok"
    assert records[0]["files"]["tsa-grid-cpu-float32.json"]["results"]
    manifest = json.loads((out / "manifest.json").read_text())
    outcomes = [step["outcome"] for step in manifest["steps"]]
    running = outcomes.index("running")
    assert outcomes[:running] == ["ok"] * running and outcomes[running + 1 :] == ["pending"] * (2 - running)
    assert len(records) == running and manifest["finished"] is None


def test_steps_that_do_not_fit_the_budget_are_skipped_and_recorded(tmp_path):
    completed = _suite(tmp_path, "smoke", SUITE_SECONDS="1")
    assert completed.returncode == 0, completed.stderr
    records = _records(tmp_path / "out")
    assert [record["name"] for record in records] == [step.name for step in gpu_suite.STEPS]
    assert all(record["outcome"] == "skipped" for record in records)
    for step, record in zip(gpu_suite.STEPS, records):
        assert record["reason"].startswith("budget spent") or "ncu" in step.needs, record


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks a machine without a CUDA device")
def test_gpu_modes_skip_every_step_without_a_gpu(tmp_path):
    completed = _suite(tmp_path, "quick")
    assert completed.returncode == 0, completed.stderr
    records = _records(tmp_path / "out")
    assert len(records) == len(gpu_suite.steps_of("quick"))
    assert all(record["outcome"] == "skipped" and "CUDA" in record["reason"] for record in records)


def test_the_plan_fits_the_budget_in_order_of_value(capsys, monkeypatch):
    monkeypatch.delenv("SUITE_SECONDS", raising=False)
    quick = gpu_suite.steps_of("quick")
    assert gpu_suite.DEFAULT_SECONDS["quick"] < 300  # quick fits 5 minutes
    assert [step.name for step in quick] == [step.name for step in gpu_suite.steps_of("all") if step.quick]
    assert gpu_suite.main(["quick", "--dry-run"]) == 0
    plan = capsys.readouterr().out.splitlines()[1:]
    assert len(plan) == len(quick) and all(" runs " in line for line in plan[:4]), plan  # tests, benches, DiT
    monkeypatch.setenv("SUITE_SECONDS", "100")
    assert gpu_suite.main(["all", "--dry-run"]) == 0
    plan = capsys.readouterr().out.splitlines()[1:]
    assert len(plan) == len(gpu_suite.STEPS) and " runs " in plan[0] and "skipped (budget)" in plan[2]


def test_a_step_past_its_limit_is_stopped_with_everything_it_started():
    script = (
        "import subprocess, sys, time; subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)']); "
        "print('started', flush=True); time.sleep(60)"
    )
    lines = []
    start = time.monotonic()
    code, timed_out = gpu_suite.run_process([sys.executable, "-c", script], dict(os.environ), 2, lines.append)
    assert timed_out and code is not None and time.monotonic() - start < 20
    assert lines == ["started\n"]
    code, timed_out = gpu_suite.run_process([sys.executable, "-c", "print('done')"], dict(os.environ), 30, lines.append)
    assert (code, timed_out) == (0, False) and lines[-1] == "done\n"


@pytest.mark.parametrize(
    "arguments, extra, message",
    [
        (("fast",), {}, "argument mode"),
        (("all", "--steps", "tests,nope"), {}, "unknown step nope"),
        (("quick",), {"SUITE_SECONDS": "soon"}, "SUITE_SECONDS"),
        (("quick",), {"SUITE_SECONDS": "-5"}, "SUITE_SECONDS"),
    ],
)
def test_usage_mistakes_are_one_line_and_exit_2(tmp_path, arguments, extra, message):
    completed = _suite(tmp_path, *arguments, **extra)
    assert completed.returncode == 2 and message in completed.stderr
    assert len(completed.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()


def test_an_earlier_run_is_never_overwritten(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "manifest.json").write_text("{}")
    completed = _suite(tmp_path, "quick", SUITE_SECONDS="1")
    assert completed.returncode == 2 and "already holds" in completed.stderr
    assert (out / "manifest.json").read_text() == "{}" and not (out / "results.jsonl").exists()


def _wheel(folder: Path, name: str, version: str) -> Path:
    """A minimal pure-Python wheel whose module `name` defines VERSION."""
    path = folder / f"{name}-{version}-py3-none-any.whl"
    info = f"{name}-{version}.dist-info"
    files = {
        f"{name}.py": f"VERSION = {version!r}\n",
        f"{info}/METADATA": f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n",
        f"{info}/WHEEL": "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
    }
    files[f"{info}/RECORD"] = "".join(f"{file},,\n" for file in files) + f"{info}/RECORD,,\n"
    with zipfile.ZipFile(path, "w") as archive:
        for file, text in files.items():
            archive.writestr(file, text)
    return path


def test_carried_wheels_are_installed_only_where_missing(tmp_path, monkeypatch):
    wheels = tmp_path / "whl"
    wheels.mkdir()
    _wheel(wheels, "stss_absent_package", "1.0")
    _wheel(wheels, "pytest", "0.0.1")  # installed here already: left alone
    monkeypatch.setattr(gpu_suite, "WHEELS_DIR", wheels)
    site, lines = tmp_path / "site", []
    installed = gpu_suite.install_missing_wheels(site, lines.append)
    assert installed == ["stss_absent_package-1.0-py3-none-any.whl"], lines
    assert (site / "stss_absent_package.py").is_file() and not (site / "pytest.py").exists()


def test_pytest_runs_where_pytest_benchmark_is_missing():
    """pyproject's addopts pass --benchmark-skip; without the plugin the option is accepted and the timed tests skip."""
    completed = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-q",
            "-p",
            "no:cacheprovider",
            "-p",
            "no:benchmark",
            "tests/test_bench_cpu.py",
            "-rs",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert completed.returncode == 0, completed.stdout + completed.stderr
    assert "pytest-benchmark is not installed" in completed.stdout


def test_test_counts_come_from_junit_or_from_the_log_of_a_stopped_step(tmp_path):
    (tmp_path / "test_sample.py").write_text(
        "import pytest\n"
        "def test_passes(): pass\n"
        "def test_fails(): assert 1 == 2, 'one is not two'\n"
        "@pytest.mark.skip(reason='not here')\n"
        "def test_skipped(): pass\n"
        "@pytest.mark.parametrize('value', [1, 2])\n"
        "def test_values(value): assert value\n"
    )
    (tmp_path / "pytest.ini").write_text("[pytest]\n")
    command = [sys.executable, "-m", "pytest", "-v", "-rfE", "-p", "no:cacheprovider", "--junitxml", "junit.xml"]
    completed = subprocess.run([*command, "test_sample.py"], cwd=tmp_path, capture_output=True, text=True)
    assert completed.returncode == 1
    expected = {"tests": 5, "passed": 3, "failures": 1, "errors": 0, "skipped": 1}
    for counts in (gpu_suite.junit_counts(tmp_path / "junit.xml"), gpu_suite.log_counts(completed.stdout.splitlines())):
        assert {key: counts[key] for key in expected} == expected
        ((failed,),) = [counts["failed"]]
        assert failed["test"].endswith("test_fails") and "one is not two" in failed["message"]
    assert gpu_suite.junit_counts(tmp_path / "absent.xml") is None
