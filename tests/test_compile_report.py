"""`python -m bench.compile`: the ahead-of-time compile report (sm_90a / sm_80, no GPU needed)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from bench import compile as aot

ROOT = Path(__file__).resolve().parents[1]


def _row(**changes):
    row = dict(
        op="tempered_kl", kernel="forward", variant="-", arch="sm_90a", dtype="bf16", masked=False,
        blocks=dict(BLOCK_M=128, BLOCK_N=64, BLOCK_K=64), num_warps=8, num_stages=3, error=None,
        registers=210, stack=0, spill_stores=0, spill_loads=0, shared=72 * 1024, hgmma=8, hmma=0,
        blocks_per_sm=1, limited_by="regs", model=None,
    )  # fmt: skip
    row.update(changes)
    return row


def test_verdict_passes_a_clean_config():
    assert aot.verdict(_row()) == []


@pytest.mark.parametrize("dtype", ["bf16", "fp16"])
def test_verdict_fails_a_spill_in_16_bit(dtype):
    assert aot.verdict(_row(dtype=dtype, spill_stores=8, spill_loads=4)) == ["spills"]
    assert aot.verdict(_row(dtype=dtype, spill_loads=4)) == ["spills"]


def test_verdict_tolerates_fp32_spills():
    assert aot.verdict(_row(dtype="fp32", spill_stores=5600, spill_loads=7200)) == []


def test_verdict_checks_shared_memory_against_each_arch():
    big = 170 * 1024  # over sm_80's 163 KB per block, under sm_90a's 227 KB
    assert aot.verdict(_row(arch="sm_80", shared=big)) == ["shared memory"]
    assert aot.verdict(_row(arch="sm_90a", shared=big)) == []
    assert aot.verdict(_row(arch="sm_90a", shared=228 * 1024, spill_stores=4)) == ["spills", "shared memory"]


def test_verdict_fails_a_compile_error():
    assert aot.verdict(_row(error="PTXASError: ...", registers=None)) == ["compile error"]


def test_blocks_per_sm_limits():
    sm90, sm80 = aot.ARCHS["sm_90a"], aot.ARCHS["sm_80"]
    # 213 registers -> 6912 per warp -> 9 warps of registers: one 8-warp CTA.
    assert aot.blocks_per_sm(sm90, 213, 72 * 1024, 8) == (1, "regs")
    assert aot.blocks_per_sm(sm90, 128, 48 * 1024, 4) == (4, "regs")
    # Shared memory plus 1 KB reserved per CTA: 81 KB twice in 228 KB and in 164 KB, 101 KB once in 164 KB.
    assert aot.blocks_per_sm(sm90, 64, 80 * 1024, 4) == (2, "smem")
    assert aot.blocks_per_sm(sm80, 64, 80 * 1024, 4) == (2, "smem")
    assert aot.blocks_per_sm(sm80, 64, 100 * 1024, 4) == (1, "smem")
    assert aot.blocks_per_sm(sm90, 16, 0, 32) == (2, "warps")


def _report(rows):
    return dict(
        triton="x", preset=dict(name="tsa-grid", batch=4, frames=24, hw=150, cs=768, ct=768, mask_ratio=0.2),
        archs={}, rows=[dict(row, problems=aot.verdict(row)) for row in rows],
        failures=sum(bool(aot.verdict(row)) for row in rows),
    )  # fmt: skip


@pytest.mark.parametrize("spill, code", [(0, 0), (8, 1)])
def test_exit_code_follows_the_verdict(monkeypatch, capsys, spill, code):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)  # else main() re-runs itself in a clean process
    monkeypatch.setattr(aot, "_kernels_interpreted", lambda: False)
    monkeypatch.setattr(aot, "run_report", lambda args: _report([_row(), _row(arch="sm_80", spill_stores=spill)]))
    assert aot.main(["--arch", "sm_80"]) == code
    out = capsys.readouterr().out
    assert ("SPILLS" in out) == bool(code)
    assert f"2 compiles, {code} failing" in out


def test_cli_rejects_bad_options(capsys):
    for argv in (["--arch", "sm_75"], ["--dtype", "fp8"], ["--mask-ratio", "0"], ["--jobs", "0"]):
        with pytest.raises(SystemExit) as error:
            aot.build_parser().parse_args(argv)
        assert error.value.code == 2
    assert "expected a comma-separated subset" in capsys.readouterr().err


def test_build_tasks_compiles_a_hopper_only_config_for_sm90a_only():
    import triton

    from stss_kernels._core.aot import AotKernel, Problem
    from stss_kernels._core.tuning import hopper_only

    configs = [triton.Config(dict(BLOCK_M=16), num_warps=4), hopper_only(triton.Config(dict(BLOCK_M=32), num_warps=4))]
    spec = AotKernel("op", "kernel", "-", None, configs, None, None)
    tasks = aot.build_tasks([spec], aot.build_parser().parse_args([]), Problem("p", 1, 1, 16, 16, 16))
    assert {(config, arch) for _, config, _, _, arch, _ in tasks} == {(0, "sm_90a"), (0, "sm_80"), (1, "sm_90a")}
    assert len(tasks) == 3 * 3 * 2  # x dtypes x masks


@pytest.mark.aot
def test_representative_subset_compiles_for_sm90a_and_sm80(tmp_path):
    """The real compile, in a process without TRITON_INTERPRET (the kernels pick one config under it)."""
    env = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    out = tmp_path / "report.json"
    result = subprocess.run(
        [sys.executable, "-m", "bench.compile", "--subset", "--jobs", "2", "--json", str(out)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    assert result.returncode in (0, 1), result.stderr
    report = json.loads(out.read_text())
    rows = report["rows"]
    assert not [row for row in rows if row["error"]], result.stdout
    failing = [row for row in rows if row["problems"]]
    assert result.returncode == (1 if failing else 0)
    assert report["failures"] == len(failing)
    # Every declared kernel variant is there: both archs unmasked, masked on sm_90a.
    kernels = aot.discover_kernels()
    labels = {(row["kernel"], row["variant"], row["arch"], row["masked"]) for row in rows}
    for spec in kernels:
        for arch, masked in (("sm_90a", False), ("sm_90a", True), ("sm_80", False)):
            if masked in spec.masks and arch in getattr(spec.configs[0], "archs", aot.ARCHS):
                assert (spec.name, spec.variant, arch, masked) in labels
    assert {row["dtype"] for row in rows} == {"bf16", "fp16", "fp32"}
    for row in rows:
        assert row["registers"] > 0 and row["shared"] > 0 and row["blocks_per_sm"] >= 1
        if row["dtype"] == "bf16":  # tensor cores (mma.sync where a tile is too small for wgmma)
            assert row["hgmma"] + row["hmma"] > 0, row
        if row["arch"] == "sm_80":
            assert row["hgmma"] == 0
    bf16_forward = [row for row in rows if row["kernel"] == "forward" and row["dtype"] == "bf16"]
    assert bf16_forward and all(row["hgmma"] > 0 for row in bf16_forward if row["arch"] == "sm_90a")
    assert any(row["model"] and row["model"]["bytes"] > 0 and row["model"]["flops"] > 0 for row in rows)
    # The table lists every row and the summary line counts them.
    table = result.stdout
    assert f"{len(rows)} compiles, {len(failing)} failing" in table
    assert table.count("| sm_90a |") + table.count("| sm_80  |") == len(rows)


def test_tempered_kl_model_counts():
    """The static model against closed forms: forward math 2 N^2 (Cs + Ct) per video, one read of each row per
    frame with whole-frame tiles, and each backward kernel modelled only where the op launches it."""
    import torch

    from stss_kernels._core.aot import Problem
    from stss_kernels.ops.tempered_kl.triton_backend import aot as tempered_kl_aot
    from stss_kernels.ops.tempered_kl.triton_backend.forward import NARROW_CHANNELS

    problem = Problem("tiny", batch=2, frames=3, hw=10, cs=24, ct=40, mask_ratio=0.5)
    n, row_bytes = problem.tokens, (24 + 40) * 2
    whole = dict(BLOCK_M=32, BLOCK_N=16, BLOCK_TAIL=16)  # one query tile, one key tile per frame
    model = tempered_kl_aot.forward_model(True)(problem, torch.bfloat16, False, whole)
    assert model.flops == 2 * 2 * n * n * (24 + 40)
    assert model.bytes == 2 * 3 * ((n + 10) * row_bytes + n * 5 * 4)
    assert model.executed_flops == 2 * 3 * 2 * 32 * 16 * (32 + 64)  # channels padded to powers of two
    masked = tempered_kl_aot.forward_model(True)(problem, torch.bfloat16, True, whole)
    assert masked.flops == model.flops * problem.kept(True) / n == model.flops / 2
    kernels = {(spec.name, spec.variant): spec for spec in tempered_kl_aot.aot_kernels()}
    blocks = dict(BLOCK_M=16, BLOCK_N=16, BLOCK_TAIL=16, BLOCK_K=16, BLOCK_D=16)
    for channels in (NARROW_CHANNELS, NARROW_CHANNELS + 1):
        wide = Problem("c", 1, 2, 8, channels, 8)
        fused = kernels["feature_grad", "row/student"].model(wide, torch.float16, False, blocks)
        chunked = kernels["similarity_grad", "student"].model(wide, torch.float16, False, blocks)
        assert (fused is None) == (channels > NARROW_CHANNELS) and (chunked is None) != (fused is None)


TEMPERED_KL_PROBLEMS = [
    ("tsa-grid", 4, 24, 150, 768, 768, 1.0), ("tsa-grid-c64", 4, 24, 150, 64, 64, 1.0),
    ("cogvideox-native", 1, 13, 1350, 768, 768, 0.2),
]  # fmt: skip


@pytest.mark.parametrize("sizes", TEMPERED_KL_PROBLEMS, ids=lambda sizes: sizes[0])
@pytest.mark.parametrize("masked", [False, True])
def test_tempered_kl_arguments_name_every_kernel_parameter(sizes, masked):
    import inspect

    import torch

    from stss_kernels._core.aot import Pointer, Problem
    from stss_kernels.ops.tempered_kl.triton_backend import aot as tempered_kl_aot

    problem = Problem(*sizes)
    for kernel in tempered_kl_aot.aot_kernels():
        if masked not in kernel.masks:
            continue
        arguments = kernel.arguments(problem, torch.bfloat16, masked)
        names = set(inspect.signature(getattr(kernel.kernel, "fn", kernel.kernel)).parameters)
        for config in kernel.configs:
            assert set(arguments) | set(config.kwargs) == names, (kernel.name, kernel.variant)
            assert not set(arguments) & set(config.kwargs)
        assert isinstance(arguments["student_ptr" if "student_ptr" in arguments else "block_ptr"], Pointer)


@pytest.mark.parametrize("sizes", TEMPERED_KL_PROBLEMS, ids=lambda sizes: sizes[0])
def test_tempered_kl_models_cover_the_launched_kernels(sizes):
    """Exactly the kernels the launcher runs at this width have a model; FLOPs as the loss needs them."""
    import torch

    from stss_kernels._core.aot import Problem
    from stss_kernels.ops.tempered_kl.triton_backend import aot as tempered_kl_aot

    problem = Problem(*sizes)
    masked = problem.mask_ratio < 1
    modelled = set()
    for kernel in tempered_kl_aot.aot_kernels():
        if masked not in kernel.masks:
            continue
        model = kernel.model(problem, torch.bfloat16, masked, dict(kernel.configs[0].kwargs))
        if model is None:
            continue
        modelled.add(kernel.name)
        assert model.programs > 0 and model.bytes > 0 and model.executed_flops >= 0.99 * model.flops > 0
        if kernel.name == "forward":
            kept = problem.kept(masked)
            assert model.flops == pytest.approx(2 * problem.batch * kept * problem.tokens * (problem.cs + problem.ct))
    if problem.cs <= 128:
        assert modelled == {"forward", "feature_grad"}
    else:
        assert modelled == {"forward", "similarity_grad", "dual_product"} | ({"row_product"} if masked else set())
