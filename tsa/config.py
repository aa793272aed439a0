"""Command line and YAML configuration of tsa-train, tsa-cache and tsa-sample.

Precedence, lowest first: the parser's defaults (the papers' values, docs/method.md), the preset (`--preset`;
default `tiny` when no `--model-path` is given, else none), the YAML file (`--config`), the command line. YAML
keys are the option names with dashes or underscores.
"""

import argparse
import math
from pathlib import Path

from tsa import alignment
from tsa.choices import EXPERTS, GRID_MODES, MODEL_FAMILIES, TEACHER_KINDS, TIMESTEP_SAMPLING
from tsa.validation import TRAINING_RANGES, OneLineArgumentParser, UsageError, check_ranges, pipeline_family

LORA_TARGET_MODULES = "to_q,to_k,to_v,to_out.0"


def _family_presets():
    from tsa.models import FAMILIES, family_class

    presets = {}
    for name in FAMILIES:
        for preset, values in family_class(name).presets.items():
            presets[preset] = {"model_family": name, **values}
    return presets


PRESETS = {
    # Tiny random models and a synthetic mp4 dataset built in the output dir; CPU, about two minutes. With
    # --model-family wan the tiny models are Wan's (OUTPUT_DIR/tiny/wan), else CogVideoX's.
    "tiny": dict(
        height=96, width=144, num_frames=9, align="mtsa", align_layer=2, projector_hidden_dim=64,
        finetune="full", learning_rate=1e-3, lr_warmup_steps=5, train_batch_size=2, max_steps=100,
        checkpointing_steps=50, num_videos=8, predictor_channels=16, predictor_blocks=2,
    ),
    # Each model family's presets (tsa.models): cogvideox-2b-mtsa, cogvideox-5b-lora, wan2.1-1.3b-mtsa, ...
    **_family_presets(),
}


def _positive_int(text):
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text}")
    return value


def build_parser(prog="tsa-train"):
    """The options shared by tsa-train and tsa-cache (tsa-cache ignores the training ones)."""
    parser = OneLineArgumentParser(
        prog=prog,
        description="Fine-tune a video DiT (CogVideoX, Wan2.1 / Wan2.2) with a TSA / M-TSA / TRD / REPA / LaMo "
                    "alignment loss.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--preset", choices=sorted(PRESETS), default=None,
                        help="Named defaults. When neither this nor the YAML names one: tiny without --model-path "
                             "(tiny random models, CPU demo), else none (the defaults shown here, the papers').")
    parser.add_argument("--config", type=Path, default=None, help="YAML file of options.")

    model = parser.add_argument_group("model")
    model.add_argument("--model-path", type=Path, default=None,
                       help="Local diffusers pipeline folder (built in the output dir for tiny).")
    model.add_argument("--model-family", choices=MODEL_FAMILIES, default=None,
                       help="Default: from the model folder's model_index.json (tiny: cogvideox).")
    model.add_argument("--expert", choices=EXPERTS, default="transformer",
                       help="Two-expert pipelines (Wan2.2 A14B): the denoiser this run trains, on its own timestep "
                            "range (transformer: high noise, t >= boundary_ratio * 1000; transformer_2: low noise).")
    model.add_argument("--output-dir", type=Path, default=Path("tsa-output"))
    model.add_argument("--finetune", choices=("full", "lora"), default="full")
    model.add_argument("--lora-rank", type=_positive_int, default=128)
    model.add_argument("--lora-alpha", type=float, default=64.0)
    model.add_argument("--lora-target-modules", default=None,
                       help="Comma-separated module names that get LoRA adapters (default: the family's, "
                            f"{LORA_TARGET_MODULES} for CogVideoX and Wan).")

    data = parser.add_argument_group("data")
    data.add_argument("--data", type=Path, default=None,
                      help="A folder with prompts.txt + videos.txt, or a CSV file with video and caption "
                           "columns (paths relative to its folder). The tiny preset generates one.")
    data.add_argument("--video-column", default="video")
    data.add_argument("--caption-column", default="caption")
    data.add_argument("--height", type=_positive_int, default=480)
    data.add_argument("--width", type=_positive_int, default=720)
    data.add_argument("--num-frames", type=_positive_int, default=49, help="4k+1 frames per clip.")
    data.add_argument("--cache-dir", type=Path, default=None,
                      help="Latent and T5 embedding cache (default: OUTPUT_DIR/cache).")
    data.add_argument("--vae-tiling", action=argparse.BooleanOptionalAction, default=False,
                      help="Encode in overlapping tiles (saves memory at 480x720, slow on tiny models).")
    data.add_argument("--precompute", action="store_true", help="Only fill the cache, then exit.")
    data.add_argument("--dataloader-num-workers", type=int, default=0)
    data.add_argument("--num-videos", type=_positive_int, default=8,
                      help="Size of the synthetic dataset the tiny preset writes.")

    align = parser.add_argument_group("alignment")
    methods = alignment.ALIGNMENT_METHODS.values()
    align.add_argument("--align", choices=alignment.training_methods(), default="mtsa",
                       help="; ".join(f"{method.name}: {method.description.rstrip('.')}" for method in methods)
                       + "; lamo: no alignment loss, LaMo's motion drift loss; none: diffusion loss only.")
    align.add_argument("--align-layer", type=_positive_int, default=None,
                       help="Transformer block, 1-based (default: CogVideoX 18, Wan the block at 60%% depth).")
    align.add_argument("--align-weight", type=float, default=0.5)
    align.add_argument("--grid", choices=GRID_MODES, default="teacher-grid",
                       help="teacher-grid: project the DiT tokens down to the teacher's grid (VideoREPA / TSA); "
                            "native: keep the DiT grid and upsample the teacher's features.")
    align.add_argument("--projector-hidden-dim", type=_positive_int, default=2048)
    for option in alignment.alignment_options().values():  # every option of every registered method
        users = ", ".join(method.name for method in methods if option.name in method.option_names)
        align.add_argument(option.flag, type=option.type, default=option.default, choices=option.choices,
                           help=f"[{users}] {option.help}")
    align.add_argument("--teacher", choices=TEACHER_KINDS, default="videomae")
    align.add_argument("--teacher-path", type=Path, default=None)
    align.add_argument("--teacher-precision", choices=("fp32", "fp16", "bf16"), default="fp32",
                       help="dtype the frozen teacher runs in (fp32 as VideoREPA, whatever --mixed-precision is).")
    align.add_argument("--motion-drift-weight", type=float, default=None,
                       help="LaMo drift loss weight (default 0.4 with --align lamo, else 0).")
    align.add_argument("--predictor-learning-rate", type=float, default=5e-4)
    align.add_argument("--predictor-channels", type=_positive_int, default=256, help="LaMo predictor width.")
    align.add_argument("--predictor-blocks", type=_positive_int, default=8, help="LaMo predictor FiLM blocks.")
    align.add_argument("--predictor-prompt-pooling", choices=("all", "tokens"), default="all",
                       help="LaMo prompt mean-pool: all 226 T5 positions, padding included (LaMo's code), or the "
                            "real tokens only (the paper's text).")
    align.add_argument("--motion-drift-eps", type=float, default=1e-8,
                       help="Floor of the drift loss's denominator ||mu*||^2 (LaMo's code: 1e-8).")

    optim = parser.add_argument_group("optimisation")
    optim.add_argument("--learning-rate", type=float, default=2e-6)
    optim.add_argument("--lr-scheduler", default="constant_with_warmup",
                       help="Any diffusers.optimization.get_scheduler name (linear, cosine, ...).")
    optim.add_argument("--lr-warmup-steps", type=int, default=100)
    optim.add_argument("--adam-beta1", type=float, default=0.9)
    optim.add_argument("--adam-beta2", type=float, default=0.99)
    optim.add_argument("--adam-weight-decay", type=float, default=1e-4)
    optim.add_argument("--adam-epsilon", type=float, default=1e-8)
    optim.add_argument("--max-grad-norm", type=float, default=1.0)
    optim.add_argument("--train-batch-size", type=_positive_int, default=1, help="Per process.")
    optim.add_argument("--gradient-accumulation-steps", type=_positive_int, default=1)
    optim.add_argument("--max-steps", type=_positive_int, default=4000, help="Optimizer steps.")
    optim.add_argument("--mixed-precision", choices=("no", "fp16", "bf16"), default=None,
                       help="Default: the accelerate config's (no without one).")
    optim.add_argument("--gradient-checkpointing", action=argparse.BooleanOptionalAction, default=False)
    optim.add_argument("--seed", type=int, default=0)
    optim.add_argument("--timestep-sampling", choices=TIMESTEP_SAMPLING, default=None,
                       help="Flow-matching families (Wan): training timestep density (default logit-normal, shifted "
                            "by the scheduler's shift).")
    optim.add_argument("--logit-mean", type=float, default=None, help="Logit-normal mean (flow families; 0).")
    optim.add_argument("--logit-std", type=float, default=None, help="Logit-normal std (flow families; 1).")
    optim.add_argument("--flow-shift", type=float, default=None,
                       help="Flow families: timestep shift (default: the model scheduler's).")

    parallel = parser.add_argument_group("past one GPU (docs/distributed.md)")
    parallel.add_argument("--context-parallel", type=_positive_int, default=1,
                          help="Ranks per context-parallel group: the transformer's tokens are split over them "
                               "(diffusers' context parallelism with the family's plan; Wan), the alignment loss runs "
                               "on the token slices; data parallel over the remaining ranks.")
    parallel.add_argument("--fsdp", action="store_true",
                          help="Shard parameters, gradients and optimizer state over all ranks with PyTorch FSDP2 "
                               "(fully_shard per transformer block; CPU / gloo too). Sharded checkpoints.")

    ckpt = parser.add_argument_group("checkpoints and logging")
    ckpt.add_argument("--checkpointing-steps", type=_positive_int, default=500)
    ckpt.add_argument("--checkpoints-total-limit", type=int, default=None,
                      help="Keep at most this many checkpoints (oldest deleted).")
    ckpt.add_argument("--resume", default=None, help="'latest' or a checkpoint folder.")
    ckpt.add_argument("--viz-steps", type=int, default=0,
                      help="Every N optimizer steps, draw the correspondence maps of the first clip to OUTPUT_DIR/viz "
                           "and TensorBoard, with entropy / KL / mask scalars (0 = off; see tsa-viz).")
    ckpt.add_argument("--no-progress", action="store_true", help="Hide the tqdm bar.")
    return parser


def _load_yaml(path, parser):
    import yaml

    if not path.is_file():
        raise FileNotFoundError(f"--config: no such YAML file: {path}")
    values = yaml.safe_load(path.read_text()) or {}
    if not isinstance(values, dict):
        raise ValueError(f"--config: {path} must hold a mapping of option: value, got {type(values).__name__}")
    known = {action.dest: action for action in parser._actions}
    options = {}
    for key, value in values.items():
        dest = str(key).replace("-", "_")
        if dest not in known or dest in ("help", "config"):
            raise ValueError(f"--config: unknown option {key!r} in {path}")
        action = known[dest]
        if value is not None and action.type is not None and not isinstance(value, (bool, list)):
            value = action.type(str(value))
        if action.choices is not None and value not in action.choices:
            raise ValueError(f"--config: {key} must be one of {sorted(action.choices)}, got {value!r}")
        options[dest] = value
    return options


def parse_args(argv=None, prog="tsa-train"):
    """Parse `argv` with the preset and YAML as defaults, so anything on the command line wins."""
    parser = build_parser(prog)
    first, _ = parser.parse_known_args(argv)
    try:
        from_yaml = _load_yaml(first.config, parser) if first.config is not None else {}
    except (OSError, ValueError, argparse.ArgumentTypeError) as error:
        parser.error(str(error))
    except Exception as error:  # noqa: BLE001 - yaml.YAMLError, without importing yaml for --help
        parser.error(f"--config: {first.config} is not valid YAML: {' '.join(str(error).split())}")
    preset = first.preset or from_yaml.get("preset")
    if preset is None and first.model_path is None and from_yaml.get("model_path") is None:
        preset = "tiny"
    parser.set_defaults(**{**PRESETS.get(preset, {}), **from_yaml, "preset": preset})
    args = parser.parse_args(argv)
    return _finalise(args, parser)


def _finalise(args, parser):
    _resolve_family(args, parser)
    from tsa.models import get_family

    family = get_family(args.model_family or "cogvideox")
    message = family.check_frames(args.num_frames)
    if message:
        parser.error(message)
    if args.height % 16 or args.width % 16:
        parser.error(f"--height and --width must be multiples of 16, got {args.height}x{args.width}")
    if args.motion_drift_weight is None:
        args.motion_drift_weight = 0.4 if args.align == "lamo" else 0.0
    if args.motion_drift_weight < 0:
        parser.error(f"--motion-drift-weight must be >= 0, got {args.motion_drift_weight}")
    if (args.align != "none" or args.motion_drift_weight > 0) and args.num_frames < 9:
        parser.error(f"--num-frames must be >= 9 with --align {args.align} or a LaMo drift loss (the projector drops "
                     f"latent frame 0 and the drift loss compares frames 2 apart), got {args.num_frames}")
    if args.checkpoints_total_limit is not None and args.checkpoints_total_limit < 1:
        parser.error(f"--checkpoints-total-limit must be >= 1 (or left out), got {args.checkpoints_total_limit}")
    if args.viz_steps and args.align not in alignment.ALIGNMENT_METHODS:
        parser.error(f"--viz-steps needs a teacher alignment (--align {', '.join(alignment.ALIGNMENT_METHODS)}), "
                     f"not {args.align}")
    if args.fsdp and args.viz_steps:
        parser.error("--viz-steps draws from the full weights on the main process: not with --fsdp (run tsa-viz on "
                     "the saved run instead)")
    for option in ("lr_warmup_steps", "dataloader_num_workers", "viz_steps"):
        if getattr(args, option) < 0:
            parser.error(f"--{option.replace('_', '-')} must be >= 0, got {getattr(args, option)}")
    if args.preset != "tiny":
        for option in ("model_path", "data"):
            if getattr(args, option) is None:
                parser.error(f"--{option.replace('_', '-')} is required with --preset {args.preset}"
                             if args.preset else f"--{option.replace('_', '-')} is required without --preset tiny")
        if args.align in alignment.ALIGNMENT_METHODS and args.teacher_path is None:
            parser.error(f"--teacher-path is required with --align {args.align}")
    modules = args.lora_target_modules
    if modules is None:
        modules = list(family.default_lora_target_modules)
    if isinstance(modules, str):
        modules = modules.split(",")
    args.lora_target_modules = [name.strip() for name in modules if name.strip()]
    if args.cache_dir is None:
        args.cache_dir = args.output_dir / "cache"
    try:
        check_ranges(args, TRAINING_RANGES)
    except UsageError as error:
        parser.error(str(error))
    for option in alignment.alignment_options().values():  # also the options of methods registered at run time
        value = getattr(args, option.name)
        if option.type is float and value is not None and not math.isfinite(value):
            parser.error(f"{option.flag} must be a finite number, got {value}")
        message = option.check(value) if option.check is not None and value is not None else None
        if message:
            parser.error(message)
    if args.align_layer is None and args.model_family != "wan":
        args.align_layer = family.default_align_layer(0)  # CogVideoX: 18; Wan: 60% depth, at load time
    if args.model_family not in (None, "wan") and any(
            getattr(args, name) is not None for name in ("timestep_sampling", "logit_mean", "logit_std", "flow_shift")):
        parser.error(f"--timestep-sampling, --logit-mean, --logit-std and --flow-shift apply to flow-matching "
                     f"families (wan), not {args.model_family}")
    if args.model_family is not None:
        from tsa.models import family_class, model_index

        options = dict(timestep_sampling=args.timestep_sampling, logit_mean=args.logit_mean,
                       logit_std=args.logit_std, shift=args.flow_shift)
        cls = family_class(args.model_family)
        try:  # the expert and the objective options, checked against the model folder when there is one
            if args.model_path is not None and model_index(args.model_path):
                multiple = cls.from_model_path(args.model_path, args.expert, **options).spatial_multiple
                if args.height % multiple or args.width % multiple:
                    raise ValueError(f"--height and --width must be multiples of {multiple} for {args.model_path} "
                                     f"(VAE x patch size), got {args.height}x{args.width}")
            elif args.expert not in cls.experts:
                raise ValueError(f"{cls.name} pipelines have the denoisers {cls.experts}, got expert={args.expert!r}")
            elif args.expert != "transformer" and args.model_path is None:
                raise ValueError(f"--expert {args.expert} needs a two-expert model folder (--model-path); the tiny "
                                 "models have one denoiser")
            else:
                cls._with_options(**options)
        except ValueError as error:
            parser.error(str(error))
    return args


def _resolve_family(args, parser):
    """--model-family from the model folder's model_index.json when not given (tiny: cogvideox); a folder of
    another family, or an unsupported pipeline, is an error."""
    if args.model_path is not None and (Path(args.model_path) / "model_index.json").is_file():
        try:  # the one list of supported pipelines is tsa.models'
            detected = pipeline_family(args.model_path)
        except UsageError as error:
            parser.error(str(error))
        if args.model_family not in (None, detected):
            parser.error(f"--model-family {args.model_family} does not match {args.model_path}, a {detected} pipeline")
        args.model_family = detected
    elif args.model_family is None and args.preset == "tiny" and args.model_path is None:
        args.model_family = "cogvideox"
