"""Nothing is lost: the one guard every command calls before it writes. A training run refuses an output folder
that already holds a run unless it resumes it or is told to overwrite it; tsa-sample and tsa-viz refuse to replace
an existing file without --overwrite. Both checks run before anything is built."""

from __future__ import annotations

import shutil
from pathlib import Path

from tsa.errors import UsageError

# What a tsa-train run writes into its --output-dir (the tiny preset's assets in tiny/ and the keyed latent cache
# in cache/ are reusable inputs, not part of a run).
RUN_OUTPUTS = ("checkpoints", "losses.json", "loss_curve.png", "training_args.json", "logs", "viz", "projector",
               "motion_predictor")


def run_files(output_dir) -> list[Path]:
    """The checkpoints and final weights of a run in `output_dir` (empty when it holds none)."""
    folder = Path(output_dir)
    if not folder.is_dir():
        return []
    found = sorted((folder / "checkpoints").glob("checkpoint-*"))
    found += [folder / name for name in ("losses.json", "projector", "motion_predictor") if (folder / name).exists()]
    found += sorted(path for path in folder.glob("transformer*") if (path / "config.json").is_file())
    found += sorted(folder.glob("*lora_weights*.safetensors"))
    return found


def refuse_existing_run(output_dir, *, resume=None, overwrite: bool = False) -> None:
    """UsageError when `output_dir` holds a run and the new one neither resumes it nor overwrites it."""
    if resume is not None or overwrite:
        return
    found = run_files(output_dir)
    if found:
        shown = ", ".join(str(path.relative_to(output_dir)) for path in found[:3])
        raise UsageError(f"--output-dir {output_dir} already holds a run ({shown}{', ...' if len(found) > 3 else ''}): "
                         "add --resume latest to continue it, --overwrite to replace it, or choose another "
                         "--output-dir")


def clear_run(output_dir) -> None:
    """Remove the run in `output_dir` (--overwrite), keeping the tiny preset's assets and the latent cache."""
    folder = Path(output_dir)
    for path in [*(folder / name for name in RUN_OUTPUTS), *run_files(folder)]:
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()


def refuse_existing_files(paths, overwrite: bool = False) -> None:
    """UsageError naming the first of `paths` that exists, unless `overwrite`."""
    if overwrite:
        return
    existing = [Path(path) for path in paths if path is not None and Path(path).exists()]
    if existing:
        more = f" (and {len(existing) - 1} more)" if len(existing) > 1 else ""
        raise UsageError(f"{existing[0]}{more} already exists: add --overwrite to replace it, or choose another "
                         "output")
