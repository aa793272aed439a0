"""Text-to-video with the weights a training run wrote, through the model family's own diffusers pipeline.

    paths = tsa.sample("tsa-output", ["a red ball falls and bounces on the floor"], num_inference_steps=30)

RUN_DIR is a training output folder: the base pipeline comes from its training_args.json (or `model_path`), the
fine-tuned weights from RUN_DIR/EXPERT (full fine-tune) or RUN_DIR/pytorch_lora_weights.safetensors (LoRA, loaded
into the trained expert). One mp4 per prompt goes to RUN_DIR/samples (or `output_dir`), each with a settings file
beside it (same name, .json) that `read_settings` turns back into the arguments reproducing it. Steps, guidance,
flow shift, negative prompt and fps default to the model variant's own recipe (ModelFamily.sampling_defaults).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch

from tsa.errors import UsageError
from tsa.outputs import refuse_existing_files
from tsa.training.data import write_video
from tsa.training.validation import check_ranges, pipeline_family

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}

# option -> (low, high, low inclusive, high inclusive), as tsa.training.config.TRAINING_RANGES
SAMPLING_RANGES = {
    "num_inference_steps": (1, None, True, False),
    "guidance_scale": (0, None, True, False),
    "guidance_scale_2": (0, None, True, False),
    "flow_shift": (0, None, False, False),
    "fps": (1, None, True, False),
    "motion_guidance": (0, None, True, False),
    "motion_guidance_rho": (0, 1, True, True),
    "motion_guidance_lag": (1, None, True, False),
    "seed": (0, 2**32 - 1, True, True),
    "height": (16, None, True, False),
    "width": (16, None, True, False),
    "num_frames": (1, None, True, False),
}


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def load_pipeline(run_dir, model_path, dtype, expert="transformer", image_to_video=False):
    """The family's pipeline from `model_path` (its image-to-video one with `image_to_video`) with the run's
    fine-tuned `expert` or its LoRA weights."""
    from tsa.models import detect_family

    family = detect_family(model_path)
    # families whose folders do one task need not take image_to_video
    pipe = family.load_pipeline(model_path, dtype, image_to_video=True) if image_to_video else family.load_pipeline(
        model_path, dtype)
    return family.load_run_weights(pipe, Path(run_dir), expert, dtype)


def run_options(run_dir) -> dict:
    """The options a run was trained with (RUN_DIR/training_args.json; {} when there is none)."""
    path = Path(run_dir) / "training_args.json"
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as error:
        raise UsageError(f"RUN_DIR {run_dir}: training_args.json does not read as JSON: {error}") from None


def check_sampling(run_dir, *, output_dir=None, device="cpu", num_frames=None, height=None, width=None,
                   **values) -> None:
    """The run folder, output folder, device and values (SAMPLING_RANGES) of a sampling job. UsageError."""
    check_ranges({**values, "num_frames": num_frames, "height": height, "width": width}, SAMPLING_RANGES)
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise UsageError(f"RUN_DIR {run_dir} does not exist or is not a folder")
    trained = run_options(run_dir)
    expert = trained.get("expert") if isinstance(trained, dict) else None
    expert = expert or "transformer"
    if not ((run_dir / expert).is_dir() or (run_dir / "pytorch_lora_weights.safetensors").is_file()):
        raise UsageError(
            f"RUN_DIR {run_dir} holds neither {expert}/ nor pytorch_lora_weights.safetensors "
            "(the final weights of a finished tsa-train run)"
        )
    if num_frames is not None and (num_frames - 1) % 4:
        raise UsageError(f"--num-frames must be 4k+1 (the VAE compresses time by 4), got {num_frames}")
    for name, value in (("height", height), ("width", width)):
        if value is not None and value % 16:
            raise UsageError(f"--{name} must be a multiple of 16, got {value}")
    if output_dir is not None and Path(output_dir).exists() and not Path(output_dir).is_dir():
        raise UsageError(f"--output-dir {output_dir} exists and is not a folder")
    try:
        device = torch.device(device)
    except (RuntimeError, ValueError):
        raise UsageError(f"--device {device!r} is not a torch device (cpu, cuda, cuda:1, ...)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"--device {device}: no CUDA device is available here (use --device cpu)")


SETTINGS_VERSION = 1


def library_versions() -> dict:
    """Versions of the libraries a sample depends on (recorded in its settings file)."""
    from importlib.metadata import PackageNotFoundError, version

    versions = {}
    for name in ("tsa", "torch", "diffusers", "transformers", "peft", "accelerate"):
        try:
            versions[name] = version(name)
        except PackageNotFoundError:
            versions[name] = None
    return versions


def read_settings(path) -> dict:
    """The keyword arguments of `sample` that reproduce the video a settings file describes (UsageError)."""
    path = Path(path)
    if not path.is_file():
        raise UsageError(f"--settings {path} does not exist")
    try:
        settings = json.loads(path.read_text())
    except (OSError, ValueError) as error:
        raise UsageError(f"--settings {path} does not read as JSON: {error}") from None
    if not isinstance(settings, dict) or settings.get("tsa_sample_settings") != SETTINGS_VERSION:
        raise UsageError(f"--settings {path} is not a tsa-sample settings file (version {SETTINGS_VERSION})")
    guidance = settings.get("motion_guidance") or {}
    return {
        "run_dir": settings["run_dir"], "prompts": [settings["prompt"]], "model_path": settings["model_path"],
        "height": settings["height"], "width": settings["width"], "num_frames": settings["num_frames"],
        "num_inference_steps": settings["num_inference_steps"], "guidance_scale": settings["guidance_scale"],
        "guidance_scale_2": settings.get("guidance_scale_2"), "flow_shift": settings.get("flow_shift"),
        "negative_prompt": settings["negative_prompt"], "image": settings.get("image"), "seed": settings["seed"],
        "fps": settings["fps"],
        "dtype": settings["dtype"], "motion_guidance": guidance.get("scale", 0.0),
        "motion_guidance_rho": guidance.get("rho", 0.8), "motion_guidance_lag": guidance.get("lag", 1),
        "motion_guidance_start": guidance.get("start", "floor"), "predictor": guidance.get("predictor"),
    }


def is_flow_model(model_path) -> bool:
    """Whether the pipeline folder's scheduler samples rectified flow (from scheduler_config.json alone)."""
    path = Path(model_path) / "scheduler" / "scheduler_config.json"
    config = json.loads(path.read_text()) if path.is_file() else {}
    return bool(config.get("use_flow_sigmas") or config.get("prediction_type") == "flow_prediction"
                or str(config.get("_class_name", "")).startswith("FlowMatch"))


def sample(
    run_dir,
    prompts: list[str],
    *,
    model_path=None,
    output_dir=None,
    height: int | None = None,
    width: int | None = None,
    num_frames: int | None = None,
    num_inference_steps: int | None = None,
    guidance_scale: float | None = None,
    guidance_scale_2: float | None = None,
    flow_shift: float | None = None,
    negative_prompt: str | None = None,
    image=None,
    seed: int = 0,
    fps: int | None = None,
    dtype: str = "fp32",
    device: str | None = None,
    motion_guidance: float = 0.0,
    motion_guidance_rho: float = 0.8,
    motion_guidance_lag: int = 1,
    motion_guidance_start: str = "floor",
    predictor=None,
    overwrite: bool = False,
) -> list[Path]:
    """Write one mp4 per prompt (seed + its index; an image-to-video model starts each from `image`, a file),
    each with a settings file beside it (same name, .json, see `read_settings`), and return the mp4 paths.
    Size and frame count left None take the run's (training_args.json); steps, guidance scale(s), flow shift,
    negative prompt and fps left None take the model variant's own recipe (ModelFamily.sampling_defaults).
    `motion_guidance` > 0 turns on LaMo's Motion Prior Guidance with the run's motion predictor (or
    `predictor`, a folder). Everything is checked before a model loads (UsageError), including that no mp4 it
    would write exists unless `overwrite`."""
    device = device or default_device()
    run_dir = Path(run_dir)
    check_sampling(run_dir, output_dir=output_dir, device=device, num_frames=num_frames, height=height, width=width,
                   num_inference_steps=num_inference_steps, guidance_scale=guidance_scale,
                   guidance_scale_2=guidance_scale_2, flow_shift=flow_shift, seed=seed, fps=fps,
                   motion_guidance=motion_guidance, motion_guidance_rho=motion_guidance_rho,
                   motion_guidance_lag=motion_guidance_lag)
    if dtype not in DTYPES:
        raise UsageError(f"--dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    if not prompts:
        raise UsageError("give at least one --prompt or a --prompts-file")
    output_dir = Path(output_dir) if output_dir is not None else run_dir / "samples"
    paths = [sample_path(output_dir, index, prompt) for index, prompt in enumerate(prompts)]
    refuse_existing_files(paths, overwrite)
    trained = run_options(run_dir)
    given = model_path is not None
    model_path = model_path if given else trained.get("model_path")
    if model_path is None:
        raise UsageError(f"--model-path is needed: {run_dir} has no training_args.json")
    try:
        pipeline_family(model_path)
    except UsageError as error:
        raise UsageError(str(error) + ("" if given else f" (from {run_dir / 'training_args.json'})")) from None
    from tsa.models import detect_family

    expert = trained.get("expert", "transformer")
    try:
        family = detect_family(model_path, expert)
    except ValueError as error:
        raise UsageError(str(error)) from None
    size = {"height": height or trained.get("height"), "width": width or trained.get("width"),
            "num_frames": num_frames or trained.get("num_frames")}
    for name in ("height", "width"):
        if size[name] is not None and size[name] % family.spatial_multiple:
            raise UsageError(f"--{name} must be a multiple of {family.spatial_multiple} for {model_path} (VAE x "
                             f"patch size), got {size[name]}")
    lora = not (run_dir / expert).is_dir()
    if lora:
        try:  # the LoRA file names the expert it adapts; a run folder that says otherwise is refused
            family.lora_expert(run_dir, expert)
        except ValueError as error:
            raise UsageError(str(error)) from None
    tasks = family.tasks(model_path)
    if "t2v" not in tasks and image is None:
        raise UsageError(f"--image is needed: {model_path} is an image-to-video model (the first frame)")
    if image is not None and "i2v" not in tasks:
        raise UsageError(f"--image needs an image-to-video model, and {model_path} is text-to-video")
    if image is not None and not Path(image).is_file():
        raise UsageError(f"--image {image} does not exist")
    recipe = family.sampling_defaults(model_path, size["height"], size["width"])
    if guidance_scale_2 is not None and recipe.guidance_scale_2 is None:
        raise UsageError(f"--guidance-scale-2 sets a two-expert model's second expert, and {model_path} "
                         f"({recipe.variant}) has one")
    if flow_shift is not None and not is_flow_model(model_path):
        raise UsageError(f"--flow-shift sets a flow-matching scheduler's shift, and {model_path} ({recipe.variant}) "
                         "does not sample by flow matching")
    predictor_path = Path(predictor) if predictor is not None else run_dir / "motion_predictor"
    if motion_guidance and not (predictor_path / "config.json").is_file():
        raise UsageError(f"--motion-guidance needs a MotionPredictor folder, and {predictor_path} is none: train "
                         "with --align lamo or --motion-drift-weight > 0, or pass --predictor")
    steps = recipe.num_inference_steps if num_inference_steps is None else num_inference_steps
    guidance_scale = recipe.guidance_scale if guidance_scale is None else guidance_scale
    guidance_scale_2 = recipe.guidance_scale_2 if guidance_scale_2 is None else guidance_scale_2
    flow_shift = recipe.flow_shift if flow_shift is None else flow_shift
    negative_prompt = recipe.negative_prompt if negative_prompt is None else negative_prompt
    fps = recipe.fps if fps is None else fps

    pipe = load_pipeline(run_dir, Path(model_path), DTYPES[dtype], expert, image_to_video=image is not None).to(device)
    if flow_shift is not None:
        from tsa.models.base import with_flow_shift

        pipe.scheduler = with_flow_shift(pipe.scheduler, flow_shift)
    options = {"num_inference_steps": steps, "guidance_scale": guidance_scale, "negative_prompt": negative_prompt,
               **size}
    if guidance_scale_2 is not None:
        options["guidance_scale_2"] = guidance_scale_2
    if image is not None:
        from diffusers.utils import load_image

        options["image"] = load_image(str(image))
    if motion_guidance:
        from tsa.lamo import MotionPredictor, enable_motion_guidance

        motion_predictor = MotionPredictor.from_pretrained(predictor_path).to(device)
        enable_motion_guidance(pipe, motion_predictor, scale=motion_guidance, rho=motion_guidance_rho,
                               lag=motion_guidance_lag, start_rounding=motion_guidance_start)
    settings = {
        "tsa_sample_settings": SETTINGS_VERSION,
        "run_dir": str(run_dir.resolve()),
        "model_path": str(Path(model_path).resolve()),
        "variant": recipe.variant,
        "weights": {"kind": "lora" if lora else "full", "experts": [expert], "lora_scale": 1.0 if lora else None},
        "image": str(Path(image).resolve()) if image is not None else None,
        "negative_prompt": negative_prompt,
        "num_inference_steps": steps,
        "guidance_scale": guidance_scale,
        "guidance_scale_2": guidance_scale_2,
        "flow_shift": flow_shift,
        **size,
        "fps": fps,
        "dtype": dtype,
        "device": str(device),
        "motion_guidance": {"scale": motion_guidance, "rho": motion_guidance_rho, "lag": motion_guidance_lag,
                            "start": motion_guidance_start,
                            "predictor": str(predictor_path.resolve()) if motion_guidance else None},
        "defaults_from": recipe.source,
        "versions": library_versions(),
    }

    output_dir.mkdir(parents=True, exist_ok=True)
    for index, (prompt, path) in enumerate(zip(prompts, paths)):
        generator = torch.Generator(device).manual_seed(seed + index)
        frames = pipe(prompt=prompt, generator=generator, output_type="np", **options).frames[0]
        write_video(path, [(frame * 255).round().clip(0, 255).astype("uint8") for frame in frames], fps=fps)
        record = {**settings, "video": path.name, "prompt": prompt, "seed": seed + index}
        path.with_suffix(".json").write_text(json.dumps(record, indent=2, ensure_ascii=False) + "\n")
    return paths


def sample_path(output_dir, index: int, prompt: str) -> Path:
    """The mp4 of the index-th prompt: its number and the prompt's words."""
    return Path(output_dir) / f"{index:02d}-{re.sub(r'[^a-z0-9]+', '-', prompt.lower()).strip('-')[:60]}.mp4"
