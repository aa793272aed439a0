"""The configuration of one training run: a dataclass built by tsa-train / tsa-cache from options, YAML and a
preset (tsa/cli/options.py), or by a user in Python:

    from tsa.training import TrainConfig, train
    config = TrainConfig.from_preset("tiny", output_dir="runs/tiny", align="tsa", max_steps=20)
    history = train(config)                 # also tsa.train(config)

The defaults are the papers' values (docs/method.md). `resolve_config` fills in what depends on other fields
(model family, default alignment block, LoRA targets, cache folder, LaMo drift weight) and checks the fields
against each other; `tsa.training.validation.check_training_config` checks the paths. Both raise UsageError.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tsa import alignment
from tsa.errors import UsageError
from tsa.training.data import CLIP_START, FRAME_SAMPLING
from tsa.training.validation import TRAINING_RANGES, check_ranges, option_flag, pipeline_family

TINY_PRESET = dict(
    # Tiny random models and a synthetic mp4 dataset built in the output dir; CPU, about two minutes. The tiny
    # models are those of --model-family (OUTPUT_DIR/tiny/FAMILY), by default tsa.models.DEFAULT_FAMILY's.
    # the synthetic clips are shorter than 9 frames at 8 fps on purpose (padding is tested), so they are spread
    height=96, width=144, num_frames=9, frame_sampling="spread", align="mtsa", align_layer=2, projector_hidden_dim=64,
    finetune="full", learning_rate=1e-3, lr_warmup_steps=5, train_batch_size=2, max_steps=100,
    checkpointing_steps=50, num_videos=8, predictor_channels=16, predictor_blocks=2,
)


def family_presets() -> dict[str, dict]:
    """Each registered family's presets (cogvideox-2b-mtsa, wan2.1-1.3b-mtsa, ...), with their model_family."""
    from tsa.models import FAMILIES, family_class

    presets = {}
    for name in FAMILIES:
        for preset, values in family_class(name).presets.items():
            presets[preset] = {"model_family": name, **values}
    return presets


PRESETS = {"tiny": TINY_PRESET, **family_presets()}


def preset_values(preset: str | None, model_family: str | None = None, model_path=None) -> dict:
    """A preset's option values; the tiny preset's with its family's `tiny_preset` on top (the family of
    `model_family`, else of the `model_path` folder, else tsa.models.DEFAULT_FAMILY)."""
    values = dict(PRESETS.get(preset, {}))
    if preset == "tiny":
        from tsa.models import DEFAULT_FAMILY, FAMILIES, family_class, model_index, pipeline_family_name

        if model_family is None and model_path is not None and model_index(model_path):
            try:
                model_family = pipeline_family_name(model_index(model_path).get("_class_name"))
            except ValueError:  # an unsupported folder: resolve_config names the error
                model_family = None
        if model_family in FAMILIES or model_family is None:
            values.update(family_class(model_family or DEFAULT_FAMILY).tiny_preset)
    return values
# The optimiser and adapter defaults a run without a preset gets: a full fine-tune at the papers' rate, and LoRA
# at the rate and size of the LoRA trainers (docs/method.md, "LoRA defaults").
FULL_FINETUNE_DEFAULTS = dict(learning_rate=2e-6, lora_rank=32, lora_alpha=32.0)
LORA_DEFAULTS = dict(learning_rate=1e-4, lora_rank=32, lora_alpha=32.0)

LATENTS = ("mean", "sample")  # what a step trains on: the VAE posterior's mean, or a fresh sample of it

PATH_FIELDS = ("model_path", "output_dir", "data", "cache_dir", "teacher_path")

@dataclass
class TrainConfig:
    """One tsa-train / tsa-cache run. Every field is the command-line option of the same name (dashes for
    underscores, see `tsa-train --help`); None means "the family's / the model's default" where the option's
    help says so. Paths may be given as strings."""

    preset: str | None = None  # "tiny" builds tiny random models and a synthetic dataset under OUTPUT_DIR/tiny
    # model
    model_path: Path | None = None
    model_family: str | None = None
    expert: str = "transformer"
    task: str | None = None  # "t2v" or "i2v" (first-frame conditioned); None: the model folder's, tiny t2v
    output_dir: Path = Path("tsa-output")
    finetune: str = "full"
    lora_rank: int | None = None  # None: LORA_DEFAULTS
    lora_alpha: float | None = None
    lora_target_modules: list[str] | str | None = None  # None or "attn": the family's; "attn+ffn"; or names
    # data
    data: Path | None = None
    video_column: str = "video"
    caption_column: str = "caption"
    height: int = 480
    width: int = 720
    num_frames: int = 49
    cache_dir: Path | None = None
    latents: str | None = None  # "mean" or "sample" of the cached VAE posterior; None: the family's
    frame_sampling: str = "fps"  # "fps": consecutive frames at --fps; "spread": evenly over the whole clip
    fps: float | None = None  # frame rate of the training clips (None: the model's sampling fps)
    clip_start: str = "first"  # "first" frame, or a "random" start per clip drawn from --seed
    clip_windows: int = 1  # with clip_start "random": windows cached per clip; epoch e trains on window e % K
    vae_tiling: bool = False
    precompute: bool = False
    dataloader_num_workers: int = 0
    num_videos: int = 8
    # alignment
    align: str = "mtsa"
    align_layer: int | None = None
    align_weight: float = 0.5
    grid: str = "teacher-grid"
    projector_hidden_dim: int = 2048
    tau: float = alignment.TAU.default
    tau_teacher: float | None = alignment.TAU_TEACHER.default
    backend: str = alignment.BACKEND.default
    top_k: float = alignment.TOP_K.default
    trd_margin: float = alignment.TRD_MARGIN.default
    trd_variant: str = alignment.TRD_VARIANT.default
    extra_alignment_options: dict[str, Any] = field(default_factory=dict)  # options of methods registered later
    teacher: str = "videomae"
    teacher_path: Path | None = None
    teacher_precision: str = "fp32"
    motion_drift_weight: float | None = None
    predictor_learning_rate: float = 5e-4
    predictor_channels: int = 256
    predictor_blocks: int = 8
    predictor_prompt_pooling: str = "all"
    motion_drift_eps: float = 1e-8
    # optimisation
    learning_rate: float | None = None  # None: 2e-6 for a full fine-tune, 1e-4 for LoRA
    lr_scheduler: str = "constant_with_warmup"
    lr_warmup_steps: int = 100
    adam_beta1: float = 0.9
    adam_beta2: float = 0.99
    adam_weight_decay: float = 1e-4
    adam_epsilon: float = 1e-8
    max_grad_norm: float = 1.0
    train_batch_size: int = 1
    gradient_accumulation_steps: int = 1
    max_steps: int = 4000
    mixed_precision: str | None = None
    gradient_checkpointing: bool = False
    seed: int = 0
    timestep_sampling: str | None = None
    logit_mean: float | None = None
    logit_std: float | None = None
    flow_shift: float | None = None
    # past one GPU (docs/distributed.md)
    context_parallel: int = 1  # ranks per context-parallel group (tokens split over them); must divide the ranks
    fsdp: bool = False  # FSDP2 parameter sharding over all ranks
    # checkpoints and logging
    checkpointing_steps: int = 500
    checkpoints_total_limit: int | None = None
    resume: str | None = None
    overwrite: bool = False  # replace the run already in output_dir (else such a folder is refused)
    viz_steps: int = 0
    no_progress: bool = False

    def __post_init__(self):
        for name in PATH_FIELDS:
            value = getattr(self, name)
            if value is not None and not isinstance(value, Path):
                setattr(self, name, Path(value))

    @classmethod
    def from_preset(cls, preset: str, **overrides) -> TrainConfig:
        """A preset's values (PRESETS) with `overrides` on top."""
        if preset not in PRESETS:
            raise UsageError(f"preset must be one of {sorted(PRESETS)}, got {preset!r}")
        values = preset_values(preset, overrides.get("model_family"), overrides.get("model_path"))
        return cls.from_dict({**values, **overrides, "preset": preset})

    @classmethod
    def from_dict(cls, values: dict) -> TrainConfig:
        """From option values by name; names that are no field are options of registered alignment methods
        (UsageError for any other name)."""
        names = {item.name for item in dataclasses.fields(cls)}
        known = {key: value for key, value in values.items() if key in names}
        extra = {key: value for key, value in values.items() if key not in names}
        unknown = sorted(set(extra) - set(alignment.alignment_options()))
        if unknown:
            raise UsageError(f"unknown training option(s) {', '.join(unknown)}")
        if extra:
            known["extra_alignment_options"] = {**known.get("extra_alignment_options", {}), **extra}
        return cls(**known)

    def __getattr__(self, name):
        """The options of alignment methods registered at run time read as fields too (config.cosine_scale)."""
        extra = self.__dict__.get("extra_alignment_options", {})
        if name in extra:
            return extra[name]
        options = alignment.alignment_options()
        if name in options:
            return options[name].default
        raise AttributeError(f"{type(self).__name__} has no field {name!r}")

    def method_options(self) -> dict[str, Any]:
        """Every registered alignment method's options (tau, top_k, trd_margin, backend, ...) by name."""
        return {name: getattr(self, name) for name in alignment.alignment_options()}

    def to_dict(self) -> dict[str, Any]:
        """Flat option values by name (the run's training_args.json)."""
        values = {item.name: getattr(self, item.name) for item in dataclasses.fields(self)}
        return {**{key: value for key, value in values.items() if key != "extra_alignment_options"},
                **self.extra_alignment_options}


def resolve_config(config: TrainConfig) -> TrainConfig:
    """A copy of `config` with the derived fields filled in and the fields checked against each other
    (UsageError naming the option). Resolving a resolved config changes nothing."""
    from tsa.models import DEFAULT_FAMILY, all_objective_options, family_class, get_family, model_index

    config = dataclasses.replace(config, extra_alignment_options=dict(config.extra_alignment_options))
    _resolve_family(config)
    family = get_family(config.model_family or DEFAULT_FAMILY)
    _resolve_task(config, family)
    message = family.check_frames(config.num_frames)
    if message:
        raise UsageError(message)
    if config.height % 16 or config.width % 16:
        raise UsageError(f"--height and --width must be multiples of 16, got {config.height}x{config.width}")
    if config.motion_drift_weight is None:
        config.motion_drift_weight = 0.4 if config.align == "lamo" else 0.0
    if config.motion_drift_weight < 0:
        raise UsageError(f"--motion-drift-weight must be >= 0, got {config.motion_drift_weight}")
    if (config.align != "none" or config.motion_drift_weight > 0) and config.num_frames < 9:
        raise UsageError(f"--num-frames must be >= 9 with --align {config.align} or a LaMo drift loss (the projector "
                         f"drops latent frame 0 and the drift loss compares frames 2 apart), got {config.num_frames}")
    if config.checkpoints_total_limit is not None and config.checkpoints_total_limit < 1:
        raise UsageError(f"--checkpoints-total-limit must be >= 1 (or left out), got {config.checkpoints_total_limit}")
    if config.viz_steps and config.align not in alignment.ALIGNMENT_METHODS:
        raise UsageError(f"--viz-steps needs a teacher alignment (--align {', '.join(alignment.ALIGNMENT_METHODS)}), "
                         f"not {config.align}")
    if isinstance(config.context_parallel, bool) or not isinstance(config.context_parallel, int) or \
            config.context_parallel < 1:
        raise UsageError(f"--context-parallel must be a positive integer, got {config.context_parallel!r}")
    if config.context_parallel > 1:
        from tsa.training.parallel import check_context_parallel

        message = check_context_parallel(family, {}, (), config.context_parallel)
        if message:
            raise UsageError(message)
    if config.fsdp and config.viz_steps:
        raise UsageError("--viz-steps draws from the full weights on the main process: not with --fsdp (run tsa-viz "
                         "on the saved run instead)")
    for name in ("lr_warmup_steps", "dataloader_num_workers", "viz_steps"):
        if getattr(config, name) < 0:
            raise UsageError(f"{option_flag(name)} must be >= 0, got {getattr(config, name)}")
    if config.preset != "tiny":
        for name in ("model_path", "data"):
            if getattr(config, name) is None:
                raise UsageError(f"{option_flag(name)} is required with --preset {config.preset}"
                                 if config.preset else f"{option_flag(name)} is required without --preset tiny")
        if config.align in alignment.ALIGNMENT_METHODS and config.teacher_path is None:
            raise UsageError(f"--teacher-path is required with --align {config.align}")
    for name, value in (LORA_DEFAULTS if config.finetune == "lora" else FULL_FINETUNE_DEFAULTS).items():
        if getattr(config, name) is None:
            setattr(config, name, value)
    try:
        config.lora_target_modules = family.lora_target_modules(config.lora_target_modules)
    except ValueError as error:
        raise UsageError(f"--lora-target-modules: {error}") from None
    if config.cache_dir is None:
        config.cache_dir = config.output_dir / "cache"
    if config.latents is None:
        config.latents = family.default_latents
    if config.frame_sampling not in FRAME_SAMPLING or config.clip_start not in CLIP_START:
        raise UsageError(f"--frame-sampling must be one of {FRAME_SAMPLING} and --clip-start one of {CLIP_START}, got "
                         f"{config.frame_sampling!r} and {config.clip_start!r}")
    if config.clip_windows != 1 and (config.frame_sampling != "fps" or config.clip_start != "random"):
        raise UsageError(f"--clip-windows {config.clip_windows} draws random windows: it needs --frame-sampling fps "
                         f"and --clip-start random (got {config.frame_sampling} and {config.clip_start})")
    if config.fps is None:
        path = config.model_path
        config.fps = float(family.sampling_defaults(path).fps if path is not None and model_index(path)
                           else family.default_fps)
    if config.latents not in LATENTS:
        raise UsageError(f"--latents must be one of {LATENTS}, got {config.latents!r}")
    check_ranges(config, TRAINING_RANGES)
    for option in alignment.alignment_options().values():  # also the options of methods registered at run time
        value = config.method_options()[option.name]
        if option.type is float and value is not None and not math.isfinite(value):
            raise UsageError(f"{option.flag} must be a finite number, got {value}")
        message = option.check(value) if option.check is not None and value is not None else None
        if message:
            raise UsageError(message)
    if config.align_layer is None:
        config.align_layer = family.default_align_layer(None)  # None: the family's depth-dependent default
    for option, users in all_objective_options().items():
        if getattr(config, option) is not None and config.model_family is not None and family.name not in users:
            flags = ", ".join(option_flag(name) for name in all_objective_options())
            raise UsageError(f"{flags} apply to the families that take them ({', '.join(users)}), not "
                             f"{config.model_family}")
    if config.model_family is not None:
        cls = family_class(config.model_family)
        options = cls.options_from(config)
        try:  # the expert and the objective options, checked against the model folder when there is one
            if config.model_path is not None and model_index(config.model_path):
                multiple = cls.from_model_path(config.model_path, config.expert, **options).spatial_multiple
                if config.height % multiple or config.width % multiple:
                    raise ValueError(f"--height and --width must be multiples of {multiple} for {config.model_path} "
                                     f"(VAE x patch size), got {config.height}x{config.width}")
            elif config.expert not in cls.experts:
                raise ValueError(f"{cls.name} pipelines have the denoisers {cls.experts}, got expert={config.expert!r}")
            elif config.expert != "transformer" and config.model_path is None:
                raise ValueError(f"--expert {config.expert} needs a two-expert model folder (--model-path); the tiny "
                                 "models have one denoiser")
            else:
                cls._with_options(**options)
        except ValueError as error:
            raise UsageError(str(error)) from None
    return config


TASKS = ("t2v", "i2v")


def _resolve_task(config: TrainConfig, family) -> None:
    """task from the model folder's pipeline class (tiny: t2v unless --task i2v); a mismatch is an error."""
    from tsa.models import model_index

    if config.task is not None and config.task not in TASKS:
        raise UsageError(f"--task must be one of {TASKS}, got {config.task!r}")
    if config.model_path is not None and model_index(config.model_path):
        tasks = family.tasks(config.model_path)
        if config.task not in (None, *tasks):
            raise UsageError(f"--task {config.task}: {config.model_path} holds a {'/'.join(tasks)} model "
                             f"({model_index(config.model_path).get('_class_name')})")
        config.task = config.task or tasks[0]
    config.task = config.task or "t2v"
    if config.task == "i2v" and not family.image_pipeline_class_names:
        raise UsageError(f"--task i2v: the {family.name} family has no image-to-video pipeline")


def _resolve_family(config: TrainConfig) -> None:
    """model_family from the model folder's model_index.json when not given (tiny: tsa.models.DEFAULT_FAMILY); a
    folder of another family, or an unsupported pipeline, is an error."""
    from tsa.models import DEFAULT_FAMILY, FAMILIES

    if config.model_family is not None and config.model_family not in FAMILIES:
        raise UsageError(f"--model-family must be one of {tuple(FAMILIES)}, got {config.model_family!r}")
    if config.model_path is not None and (Path(config.model_path) / "model_index.json").is_file():
        detected = pipeline_family(config.model_path)  # the one list of supported pipelines is tsa.models'
        if config.model_family not in (None, detected):
            raise UsageError(f"--model-family {config.model_family} does not match {config.model_path}, a {detected} "
                             "pipeline")
        config.model_family = detected
    elif config.model_family is None and config.preset == "tiny" and config.model_path is None:
        config.model_family = DEFAULT_FAMILY
