"""Shared helpers of the tsa tests: the one tiny training run per model family (session-scoped fixture
`tiny_runs`, registered in conftest.py), the options that reuse its assets, and the accelerate reset."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

QUIET = ["--no-progress"]
# The shared tiny run: 4 steps of --preset tiny (M-TSA, full fine-tune), a checkpoint every 2 steps (only the
# last kept), correspondence maps every 2 steps (tsa-viz's tests read them).
TINY_RUN_OPTIONS = ["--max-steps", "4", "--checkpointing-steps", "2", "--checkpoints-total-limit", "1",
                    "--num-videos", "6", "--viz-steps", "2", *QUIET]


def reset_accelerate() -> None:
    """Forget accelerate's process-wide singletons, so the next in-process run builds its own Accelerator."""
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


def train_cli(argv) -> list[dict]:
    """tsa.train on a tsa-train command line (in this process), then reset accelerate."""
    from tsa.cli.options import parse_config
    from tsa.training import train

    try:
        return train(parse_config([str(arg) for arg in argv]))
    finally:
        reset_accelerate()


def assets(run: Path, family: str, cache: bool = True) -> list[str]:
    """Options reusing a tiny run's models, teacher, dataset and (keyed, so safely shared) latent cache."""
    tiny = run / "tiny"
    options = ["--preset", "tiny", "--model-path", str(tiny / family), "--teacher-path", str(tiny / "videomae"),
               "--data", str(tiny / "data")]
    return options + (["--cache-dir", str(run / "cache")] if cache else [])


@pytest.fixture(scope="session")
def tiny_runs(tmp_path_factory):
    """family -> (output dir, loss history) of `tsa-train --preset tiny --model-family FAMILY` with
    TINY_RUN_OPTIONS, trained once per session on first use. The output dir is given relative to the working
    directory (tsa-sample then runs from another one)."""
    runs = {}

    def run(family: str):
        if family not in runs:
            output = tmp_path_factory.mktemp(f"tiny-{family}")
            cwd = os.getcwd()
            os.chdir(output.parent)
            try:
                history = train_cli(["--output-dir", output.name, "--model-family", family, *TINY_RUN_OPTIONS])
            finally:
                os.chdir(cwd)
            runs[family] = (output, history)
        return runs[family]

    return run
