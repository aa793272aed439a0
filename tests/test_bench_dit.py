"""`python -m bench --dit`: the DiT-step harness on tiny configs (CPU), and the real configs' sizes (meta device)."""

from __future__ import annotations

import json

import pytest
import torch

from bench import cli
from bench.dit import DIT_MODELS, TINY_DIT_MODELS


@pytest.mark.parametrize("name", sorted(TINY_DIT_MODELS))
def test_tiny_dit_step_and_loss_share(name, tmp_path, capsys):
    argv = f"--dit {name} --tiny --providers reference,torch --min-runs 1 --out {tmp_path} --tag dit"
    run = cli.main(argv.split())
    table = capsys.readouterr().out
    assert "training step" in table and "loss fwd+bwd: reference" in table and "share of step" in table
    data = json.loads((tmp_path / "dit.json").read_text())
    dit = data["dit"]
    assert dit == json.loads(json.dumps(run["dit"])) and dit["model"] == name and dit["tiny"] is True
    spec = TINY_DIT_MODELS[name]
    assert dit["grid"] == {"frames": 3, "hw": 16, "tokens": 48, "channels": spec.loss_channels}
    assert dit["step"]["time_ms"]["median"] > 0 and dit["step"]["parameters"] > 0
    for provider in ("reference", "torch"):
        loss = dit["losses"][provider]
        assert loss["status"] == "ok" and 0 < loss["share"] < 1
        step_ms, loss_ms = dit["step"]["time_ms"]["median"], loss["time_ms"]["median"]
        assert loss["share"] == pytest.approx(loss_ms / (step_ms + loss_ms))


def test_dit_needs_a_gpu_without_tiny(capsys):
    with pytest.raises(SystemExit):
        cli.parse_args(["--dit", "cogvideox-2b", "--device", "cpu"])
    assert "needs a CUDA device" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli.parse_args(["--tiny"])
    with pytest.raises(SystemExit):
        cli.parse_args(["--dit", "cogvideox-5b", "--tiny"])


def test_real_configs_match_the_published_models():
    """Built on the meta device (no memory): parameter counts and native token grids of the real models."""
    expected = {"cogvideox-2b": (1.69e9, (13, 1350)), "wan2.1-1.3b": (1.42e9, (21, 1560))}
    for name, (parameters, grid) in expected.items():
        spec = DIT_MODELS[name]
        with torch.device("meta"):
            model = spec.build()
        assert sum(p.numel() for p in model.parameters()) == pytest.approx(parameters, rel=0.01), name
        assert spec.grid == grid
    assert DIT_MODELS["cogvideox-2b"].grid[0] * DIT_MODELS["cogvideox-2b"].grid[1] == 17_550
    assert DIT_MODELS["wan2.1-1.3b"].grid[0] * DIT_MODELS["wan2.1-1.3b"].grid[1] == 32_760
