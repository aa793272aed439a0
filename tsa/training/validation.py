"""Checks of a run's paths before any model, cache or folder is built: they read listings and config files,
never weights, and raise UsageError naming the option."""

from __future__ import annotations

import json
import math
from pathlib import Path

from tsa.choices import TEACHER_MODEL_TYPES
from tsa.errors import UsageError

# field -> (low, high, low inclusive, high inclusive); None leaves a side open. Every value must be finite.
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
    "fps": (0, None, False, False),
    "clip_windows": (1, None, True, False),
}


def check_ranges(values, ranges: dict) -> None:
    """Every field of `ranges` that is set in `values` (an object or a mapping) must be a finite number inside
    its range (UsageError)."""
    for name, (low, high, low_inclusive, high_inclusive) in ranges.items():
        value = values.get(name) if isinstance(values, dict) else getattr(values, name, None)
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
                f"{option_flag(name)} must be a finite number{' ' if bounds else ''}{' and '.join(bounds)}, got {value}"
            )


def option_flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def pipeline_family(path) -> str:
    """The model family of a diffusers pipeline folder (model_index.json `_class_name`): its tsa.models.FAMILIES name.

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
    from tsa.training.data import load_video_captions

    try:
        samples = load_video_captions(data, video_column, caption_column)
    except (OSError, ValueError) as error:
        raise UsageError(f"--data: {error}") from None
    missing = [str(sample.video) for sample in samples if not sample.video.is_file()]
    if missing:
        shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        raise UsageError(f"--data {data}: {len(missing)} of the {len(samples)} listed videos are missing: {shown}")
    return len(samples)


def check_given_paths_exist(config) -> None:
    """The input paths a TrainConfig names exist (checked first: a mistyped path is the mistake to report, not
    the options that depend on it). UsageError naming the option."""
    for name in ("model_path", "teacher_path", "data"):
        path = getattr(config, name)
        if path is not None and not Path(path).exists():
            raise UsageError(f"{option_flag(name)} {path} does not exist")
    if config.resume not in (None, "latest") and not Path(config.resume).exists():
        raise UsageError(f"--resume {config.resume} does not exist (give a checkpoint-STEP folder or 'latest')")


def check_training_config(config, *, needs_teacher: bool = True, run_outputs: bool = True) -> None:
    """The paths and values of a TrainConfig (those given; the tiny preset builds the rest), and, with
    `run_outputs` (a training run, not a cache fill), that the output folder holds no run it would overwrite
    (tsa.outputs). UsageError."""
    check_given_paths_exist(config)
    check_ranges(config, TRAINING_RANGES)
    from diffusers.optimization import SchedulerType

    schedulers = [kind.value for kind in SchedulerType]
    if config.lr_scheduler not in schedulers:
        raise UsageError(f"--lr-scheduler must be one of {', '.join(schedulers)}, got {config.lr_scheduler!r}")
    if config.output_dir.exists() and not config.output_dir.is_dir():
        raise UsageError(f"--output-dir {config.output_dir} exists and is not a folder")
    if config.model_path is not None:
        pipeline_family(config.model_path)
    if config.data is not None:
        check_dataset(config.data, config.video_column, config.caption_column)
    if needs_teacher and config.teacher_path is not None and config.align not in ("none", "lamo"):
        check_teacher_folder(config.teacher, config.teacher_path)
    if config.resume not in (None, "latest"):
        path = Path(config.resume)
        if not (path.is_dir() and path.name.rsplit("-", 1)[-1].isdigit()):
            raise UsageError(f"--resume {path} is not a checkpoint-STEP folder written by tsa-train")
        expected = "fsdp/.metadata" if config.fsdp else "model.safetensors"
        if not (path / expected).is_file():
            raise UsageError(f"--resume {path} has no {expected}" + (
                " (a checkpoint of a run without --fsdp)" if config.fsdp else
                " (a checkpoint of a --fsdp run resumes with --fsdp)" if (path / "fsdp").is_dir() else ""))
    if run_outputs and not config.precompute:
        from tsa.outputs import refuse_existing_run

        refuse_existing_run(config.output_dir, resume=config.resume, overwrite=config.overwrite)
