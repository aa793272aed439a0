"""Checks the command-line tools run before they build any model, cache or folder.

A user's mistake ends the tool with one line on stderr, `PROG: error: MESSAGE`, and exit status 2 (as
argparse does, without the long usage text); a broken run (non-finite loss, bad checkpoint) with one line
and exit status 1. Everything here is cheap: it reads listings and config files, never weights (except
`verify_checkpoint`, which reads a checkpoint tensor by tensor).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

from tsa.choices import TEACHER_MODEL_TYPES

# option -> (low, high, low inclusive, high inclusive); None leaves a side open. Every value must be finite.
TRAINING_RANGES = {
    "learning_rate": (0, None, False, False),
    "predictor_learning_rate": (0, None, False, False),
    "align_weight": (0, None, True, False),
    "motion_drift_weight": (0, None, True, False),
    "motion_drift_eps": (0, None, False, False),
    "tau": (0, None, False, False),
    "tau_teacher": (0, None, False, False),
    "top_k": (0, 1, False, True),
    "trd_margin": (0, None, True, False),
    "logit_mean": (None, None, False, False),
    "logit_std": (0, None, False, False),
    "flow_shift": (0, None, False, False),
    "lora_alpha": (0, None, False, False),
    "adam_beta1": (0, 1, True, False),
    "adam_beta2": (0, 1, True, False),
    "adam_weight_decay": (0, None, True, False),
    "adam_epsilon": (0, None, False, False),
    "max_grad_norm": (0, None, True, False),
    "lr_warmup_steps": (0, None, True, False),
    "dataloader_num_workers": (0, None, True, False),
    "seed": (0, 2**32 - 1, True, True),
}
SAMPLING_RANGES = {
    "num_inference_steps": (1, None, True, False),
    "guidance_scale": (0, None, True, False),
    "fps": (1, None, True, False),
    "motion_guidance": (0, None, True, False),
    "motion_guidance_rho": (0, 1, True, True),
    "motion_guidance_lag": (1, None, True, False),
    "seed": (0, 2**32 - 1, True, True),
    "height": (16, None, True, False),
    "width": (16, None, True, False),
    "num_frames": (1, None, True, False),
}


class UsageError(ValueError):
    """A mistake in the options or paths a user gave."""


class NonFiniteError(RuntimeError):
    """A loss, gradient or weight that is NaN or infinite."""


class CheckpointError(ValueError):
    """A checkpoint file that does not load or holds non-finite values."""


class OneLineArgumentParser(argparse.ArgumentParser):
    """argparse, but a mistake prints one line (`PROG: error: MESSAGE`, `--help` for the options), exit 2."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def exit_with_error(prog: str, error: Exception) -> None:
    """End a console script on `error` with one line and no traceback: status 2 for a UsageError, else 1."""
    print(f"{prog}: error: {error}", file=sys.stderr)
    raise SystemExit(2 if isinstance(error, UsageError) else 1)


def option_name(dest: str) -> str:
    return "--" + dest.replace("_", "-")


def check_ranges(args, ranges: dict) -> None:
    """Every option of `ranges` that is set must be a finite number inside its range (UsageError otherwise)."""
    for dest, (low, high, low_inclusive, high_inclusive) in ranges.items():
        value = getattr(args, dest, None)
        if value is None:
            continue
        bounds = []
        if low is not None:
            bounds.append(f"{'>=' if low_inclusive else '>'} {low}")
        if high is not None:
            bounds.append(f"{'<=' if high_inclusive else '<'} {high}")
        inside = (
            isinstance(value, (int, float))
            and not isinstance(value, bool)
            and math.isfinite(value)
            and (low is None or value > low or (low_inclusive and value == low))
            and (high is None or value < high or (high_inclusive and value == high))
        )
        if not inside:
            raise UsageError(
                f"{option_name(dest)} must be a finite number{' ' if bounds else ''}{' and '.join(bounds)}, got {value}"
            )


def pipeline_family(path) -> str:
    """The model family of a diffusers pipeline folder (model_index.json `_class_name`), e.g. "cogvideox".

    Raises UsageError for a folder that does not exist, is not a diffusers pipeline, holds an unsupported
    pipeline, or lacks one of the components its model_index.json lists.
    """
    folder = Path(path)
    if not folder.is_dir():
        raise UsageError(f"--model-path {folder} does not exist or is not a folder")
    index_file = folder / "model_index.json"
    if not index_file.is_file():
        raise UsageError(f"--model-path {folder} has no model_index.json: not a diffusers pipeline folder")
    try:
        index = json.loads(index_file.read_text())
    except (OSError, ValueError) as error:
        raise UsageError(f"--model-path {index_file} does not read as JSON: {error}") from None
    from tsa.models import pipeline_family_name  # the one list of supported pipelines

    try:
        family = pipeline_family_name(index.get("_class_name") if isinstance(index, dict) else None)
    except ValueError as error:
        raise UsageError(f"--model-path {folder}: {error}") from None
    missing = [
        key
        for key, value in index.items()
        if not key.startswith("_") and isinstance(value, list) and value[0] is not None and not (folder / key).is_dir()
    ]
    if missing:
        raise UsageError(
            f"--model-path {folder} is missing the component folder(s) {', '.join(missing)} that its "
            "model_index.json lists"
        )
    return family


def check_teacher_folder(kind: str, path) -> None:
    """A local transformers folder (config.json) holding a model of the type the teacher `kind` loads."""
    folder = Path(path)
    if not folder.is_dir():
        raise UsageError(f"--teacher-path {folder} does not exist or is not a folder")
    config_file = folder / "config.json"
    if not config_file.is_file():
        raise UsageError(f"--teacher-path {folder} has no config.json: not a transformers model folder")
    try:
        model_type = json.loads(config_file.read_text()).get("model_type")
    except (OSError, ValueError, AttributeError) as error:
        raise UsageError(f"--teacher-path {config_file} does not read as a transformers config: {error}") from None
    if model_type not in TEACHER_MODEL_TYPES[kind]:
        raise UsageError(
            f"--teacher-path {folder} holds a {model_type!r} model; --teacher {kind} needs model_type "
            f"{' or '.join(TEACHER_MODEL_TYPES[kind])}"
        )


def check_dataset(data, video_column: str = "video", caption_column: str = "caption") -> int:
    """The listing of --data reads and every video it lists exists; returns the number of videos."""
    from tsa.data import load_video_captions

    try:
        samples = load_video_captions(data, video_column, caption_column)
    except (OSError, ValueError) as error:
        raise UsageError(f"--data: {error}") from None
    missing = [str(sample.video) for sample in samples if not sample.video.is_file()]
    if missing:
        shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        raise UsageError(f"--data {data}: {len(missing)} of the {len(samples)} listed videos are missing: {shown}")
    return len(samples)


def check_training_args(args, *, needs_teacher: bool = True) -> None:
    """tsa-train / tsa-cache options and paths (those given; the tiny preset builds the rest). UsageError."""
    check_ranges(args, TRAINING_RANGES)
    from diffusers.optimization import SchedulerType

    schedulers = [kind.value for kind in SchedulerType]
    if args.lr_scheduler not in schedulers:
        raise UsageError(f"--lr-scheduler must be one of {', '.join(schedulers)}, got {args.lr_scheduler!r}")
    if args.output_dir.exists() and not args.output_dir.is_dir():
        raise UsageError(f"--output-dir {args.output_dir} exists and is not a folder")
    if args.model_path is not None:
        pipeline_family(args.model_path)
    if args.data is not None:
        check_dataset(args.data, args.video_column, args.caption_column)
    if needs_teacher and args.teacher_path is not None and args.align not in ("none", "lamo"):
        check_teacher_folder(args.teacher, args.teacher_path)
    if args.resume not in (None, "latest"):
        path = Path(args.resume)
        if not (path.is_dir() and path.name.rsplit("-", 1)[-1].isdigit()):
            raise UsageError(f"--resume {path} is not a checkpoint-STEP folder written by tsa-train")
        sharded = getattr(args, "fsdp", False)
        expected = "fsdp/.metadata" if sharded else "model.safetensors"
        if not (path / expected).is_file():
            raise UsageError(f"--resume {path} has no {expected}" + (
                " (a checkpoint of a run without --fsdp)" if sharded else
                " (a checkpoint of a --fsdp run resumes with --fsdp)" if (path / "fsdp").is_dir() else ""))
    if getattr(args, "context_parallel", 1) > 1:
        from tsa.models import get_family
        from tsa.parallel import check_context_parallel

        message = check_context_parallel(get_family(args.model_family or "cogvideox"), {}, (), args.context_parallel)
        if message:
            raise UsageError(message)


def check_sampling_args(args) -> None:
    """tsa-sample options and paths. UsageError."""
    check_ranges(args, SAMPLING_RANGES)
    run_dir = Path(args.run_dir)
    if not run_dir.is_dir():
        raise UsageError(f"RUN_DIR {run_dir} does not exist or is not a folder")
    expert = "transformer"
    if (run_dir / "training_args.json").is_file():
        try:
            expert = json.loads((run_dir / "training_args.json").read_text()).get("expert") or expert
        except (OSError, ValueError, AttributeError) as error:
            raise UsageError(f"RUN_DIR {run_dir}: training_args.json does not read as JSON: {error}") from None
    if not ((run_dir / expert).is_dir() or (run_dir / "pytorch_lora_weights.safetensors").is_file()):
        raise UsageError(
            f"RUN_DIR {run_dir} holds neither {expert}/ nor pytorch_lora_weights.safetensors "
            "(the final weights of a finished tsa-train run)"
        )
    if args.prompts_file is not None and not Path(args.prompts_file).is_file():
        raise UsageError(f"--prompts-file {args.prompts_file} does not exist")
    if args.num_frames is not None and (args.num_frames - 1) % 4:
        raise UsageError(f"--num-frames must be 4k+1 (the VAE compresses time by 4), got {args.num_frames}")
    for name in ("height", "width"):
        if getattr(args, name) is not None and getattr(args, name) % 16:
            raise UsageError(f"--{name} must be a multiple of 16, got {getattr(args, name)}")
    if args.output_dir is not None and args.output_dir.exists() and not args.output_dir.is_dir():
        raise UsageError(f"--output-dir {args.output_dir} exists and is not a folder")
    import torch

    try:
        device = torch.device(args.device)
    except (RuntimeError, ValueError):
        raise UsageError(f"--device {args.device!r} is not a torch device (cpu, cuda, cuda:1, ...)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"--device {args.device}: no CUDA device is available here (use --device cpu)")


def verify_checkpoint(path) -> None:
    """Every tensor file of a tsa-train checkpoint loads and holds only finite floating values.

    Reads *.safetensors one tensor at a time, and *.bin (optimizer, scheduler) and accelerate's
    custom_checkpoint_*.pkl (LaMo) with weights_only; raises CheckpointError naming the file (and the tensor).
    """
    import pickle
    import zipfile

    import torch
    from safetensors import safe_open

    folder = Path(path)
    for file in sorted(folder.rglob("*")):
        custom = file.suffix == ".pkl" and file.name.startswith("custom_checkpoint_")
        if not file.is_file() or not (custom or file.suffix in (".safetensors", ".bin", ".pt")):
            continue
        try:
            if file.suffix == ".safetensors":
                with safe_open(str(file), framework="pt") as handle:
                    for name in handle.keys():
                        _check_finite(handle.get_tensor(name), file, name)
                continue
            try:
                state = torch.load(file, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(file))
            except pickle.UnpicklingError:
                if custom:  # holds Python objects besides tensors: accelerate unpickles it as it is
                    continue
                raise
            _check_finite(state, file, "")
        except CheckpointError:
            raise
        except Exception as error:  # noqa: BLE001 - any failure to read is the file's fault
            raise CheckpointError(f"checkpoint file {file} does not load: {type(error).__name__}: {error}") from None


def _check_finite(value, file, name) -> None:
    import torch

    if isinstance(value, torch.Tensor):
        if value.is_floating_point() and not torch.isfinite(value).all():
            raise CheckpointError(
                f"checkpoint file {file} holds non-finite values (NaN or inf) in "
                f"{name or 'a tensor'}: resume from an earlier checkpoint"
            )
    elif isinstance(value, dict):
        for key, item in value.items():
            _check_finite(item, file, f"{name}.{key}" if name else str(key))
    elif isinstance(value, (list, tuple)):
        for index, item in enumerate(value):
            _check_finite(item, file, f"{name}[{index}]")
    elif isinstance(value, float) and not math.isfinite(value):
        raise CheckpointError(f"checkpoint file {file} holds a non-finite value in {name}")


def check_finite_parameters(module, what: str) -> None:
    """NonFiniteError naming the first trainable parameter of `module` that holds NaN or inf."""
    import torch

    for name, parameter in module.named_parameters():
        if parameter.requires_grad and not torch.isfinite(parameter.detach()).all():
            raise NonFiniteError(f"{what}: parameter {name} holds non-finite values; nothing was saved")
