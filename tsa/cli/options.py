"""The options of tsa-train and tsa-cache, and how they become a TrainConfig.

Precedence, lowest first: TrainConfig's defaults (the papers' values, docs/method.md), the preset (`--preset`;
default `tiny` when no `--model-path` is given, else none), the YAML file (`--config`), the command line. YAML
keys are the option names with dashes or underscores.
"""

import argparse
import dataclasses
from pathlib import Path

from tsa import alignment
from tsa.choices import GRID_MODES, TEACHER_KINDS
from tsa.cli.common import OneLineArgumentParser, add_debug_option, positive_int
from tsa.errors import UsageError
from tsa.models import DEFAULT_FAMILY, FAMILIES, TIMESTEP_SAMPLING, all_experts, family_class
from tsa.training.config import LATENTS, PRESETS, TASKS, TrainConfig, preset_values, resolve_config
from tsa.training.data import CLIP_START, FRAME_SAMPLING
from tsa.training.validation import check_given_paths_exist

DEFAULTS = {item.name: item.default for item in dataclasses.fields(TrainConfig)
            if item.default is not dataclasses.MISSING}  # the one place defaults live is TrainConfig


def build_parser(prog="tsa-train") -> OneLineArgumentParser:
    """The options shared by tsa-train and tsa-cache (tsa-cache ignores the training ones)."""
    parser = OneLineArgumentParser(
        prog=prog,
        description="Fine-tune a video DiT (CogVideoX, Wan2.1 / Wan2.2) with a TSA / M-TSA / TRD / REPA / LaMo "
                    "alignment loss.",
        epilog="The defaults shown are those of a run without a preset (the papers' values). --preset tiny, the "
               "default without --model-path, sets " + ", ".join(f"--{key.replace('_', '-')} {value}"
                                                             for key, value in PRESETS["tiny"].items()) + ".",
    )
    parser.add_argument("--preset", choices=sorted(PRESETS), default=None,
                        help="Named defaults. When neither this nor the YAML names one: tiny without --model-path "
                             "(tiny random models, CPU demo), else none (the defaults shown here, the papers').")
    parser.add_argument("--config", type=Path, default=None, help="YAML file of options.")

    model = parser.add_argument_group("model")
    model.add_argument("--model-path", type=Path, default=DEFAULTS["model_path"],
                       help="Local diffusers pipeline folder (built in the output dir for tiny).")
    model.add_argument("--model-family", choices=tuple(FAMILIES), default=DEFAULTS["model_family"],
                       help=f"Default: from the model folder's model_index.json (tiny: {DEFAULT_FAMILY}).")
    model.add_argument("--expert", choices=all_experts(), default=DEFAULTS["expert"],
                       help="Two-expert pipelines (Wan2.2 A14B): the denoiser this run trains, on its own timestep "
                            "range (transformer: high noise, t >= boundary_ratio * 1000; transformer_2: low noise).")
    model.add_argument("--task", choices=TASKS, default=DEFAULTS["task"],
                       help="t2v, or i2v (first-frame conditioned, the image-to-video pipelines); default: the model "
                            "folder's (model_index.json), t2v for tiny (i2v builds a tiny image-to-video model).")
    model.add_argument("--output-dir", type=Path, default=DEFAULTS["output_dir"],
                       help="Folder of the run: checkpoints, logs, losses, final weights. A folder that already "
                            "holds a run is refused unless --resume or --overwrite is given.")
    model.add_argument("--finetune", choices=("full", "lora"), default=DEFAULTS["finetune"],
                       help="Train every transformer weight (full) or LoRA adapters on a frozen transformer (lora).")
    model.add_argument("--lora-rank", type=positive_int, default=DEFAULTS["lora_rank"],
                       help="Rank of the LoRA adapters (--finetune lora); 32 (finetrainers, DiffSynth-Studio) "
                            "unless a preset says otherwise.")
    model.add_argument("--lora-alpha", type=float, default=DEFAULTS["lora_alpha"],
                       help="LoRA scale numerator: the adapters' output is multiplied by alpha / rank; 32 unless a "
                            "preset says otherwise.")
    model.add_argument("--lora-target-modules", default=DEFAULTS["lora_target_modules"],
                       help="Modules that get LoRA adapters: attn (the default), attn+ffn (also the feed-forward "
                            "layers, as musubi-tuner and DiffSynth-Studio), or comma-separated module names; "
                            + "; ".join(f"{name}: attn = {','.join(family_class(name).default_lora_target_modules)}, "
                                        f"ffn = {','.join(family_class(name).ffn_lora_target_modules)}"
                                        for name in FAMILIES) + ".")

    data = parser.add_argument_group("data")
    data.add_argument("--data", type=Path, default=DEFAULTS["data"],
                      help="A folder with prompts.txt + videos.txt, or a CSV file with video and caption "
                           "columns (paths relative to its folder). The tiny preset generates one.")
    data.add_argument("--video-column", default=DEFAULTS["video_column"],
                      help="CSV --data: the column holding the video paths.")
    data.add_argument("--caption-column", default=DEFAULTS["caption_column"],
                      help="CSV --data: the column holding the captions.")
    data.add_argument("--height", type=positive_int, default=DEFAULTS["height"],
                      help="Training height in pixels (clips are resized to cover it, then centre-cropped).")
    data.add_argument("--width", type=positive_int, default=DEFAULTS["width"], help="Training width in pixels.")
    data.add_argument("--num-frames", type=positive_int, default=DEFAULTS["num_frames"], help="4k+1 frames per clip.")
    data.add_argument("--cache-dir", type=Path, default=DEFAULTS["cache_dir"],
                      help="Latent and T5 embedding cache (default: OUTPUT_DIR/cache).")
    data.add_argument("--frame-sampling", choices=FRAME_SAMPLING, default=DEFAULTS["frame_sampling"],
                      help="fps: consecutive frames at --fps, resampled from each clip's own rate (a clip too short "
                           "is refused by name); spread: frames spread evenly over the whole clip.")
    data.add_argument("--fps", type=float, default=DEFAULTS["fps"],
                      help="Frame rate of the training clips with --frame-sampling fps (default: the model's "
                           "sampling fps: CogVideoX 8, Wan 16, Wan2.2 TI2V-5B 24).")
    data.add_argument("--clip-start", choices=CLIP_START, default=DEFAULTS["clip_start"],
                      help="With --frame-sampling fps: start at the first frame, or at a random one per clip "
                           "(drawn from --seed).")
    data.add_argument("--clip-windows", type=positive_int, default=DEFAULTS["clip_windows"],
                      help="With --clip-start random: how many random windows of each clip are cached; epoch e "
                           "trains on window e mod K, so K >= the number of epochs gives every epoch a new start "
                           "(each window is encoded once: K times the cache).")
    data.add_argument("--latents", choices=LATENTS, default=DEFAULTS["latents"],
                      help="Train on the VAE posterior's mean (deterministic) or a fresh sample of it each step "
                           "(default: the family's reference, "
                           + ", ".join(f"{name}: {family_class(name).default_latents}" for name in FAMILIES) + ").")
    data.add_argument("--vae-tiling", action=argparse.BooleanOptionalAction, default=DEFAULTS["vae_tiling"],
                      help="Encode in overlapping tiles (saves memory at 480x720, slow on tiny models).")
    data.add_argument("--precompute", action="store_true", help="Only fill the latent cache, then exit (as tsa-cache).")
    data.add_argument("--dataloader-num-workers", type=int, default=DEFAULTS["dataloader_num_workers"],
                      help="Processes loading cached batches (0: in the training process).")
    data.add_argument("--num-videos", type=positive_int, default=DEFAULTS["num_videos"],
                      help="Size of the synthetic dataset the tiny preset writes.")

    align = parser.add_argument_group("alignment")
    methods = alignment.ALIGNMENT_METHODS.values()
    align.add_argument("--align", choices=alignment.training_methods(), default=DEFAULTS["align"],
                       help="; ".join(f"{method.name}: {method.description.rstrip('.')}" for method in methods)
                       + "; lamo: no alignment loss, LaMo's motion drift loss; none: diffusion loss only.")
    align.add_argument("--align-layer", type=positive_int, default=DEFAULTS["align_layer"],
                       help="Transformer block, 1-based (default: CogVideoX 18, Wan the block at 60%% depth).")
    align.add_argument("--align-weight", type=float, default=DEFAULTS["align_weight"],
                       help="Weight of the alignment loss added to the diffusion loss.")
    align.add_argument("--grid", choices=GRID_MODES, default=DEFAULTS["grid"],
                       help="teacher-grid: project the DiT tokens down to the teacher's grid (VideoREPA / TSA); "
                            "native: keep the DiT grid and upsample the teacher's features.")
    align.add_argument("--projector-hidden-dim", type=positive_int, default=DEFAULTS["projector_hidden_dim"],
                       help="Hidden width of the MLP projecting DiT tokens to the teacher's feature size.")
    for option in alignment.alignment_options().values():  # every option of every registered method
        users = ", ".join(method.name for method in methods if option.name in method.option_names)
        align.add_argument(option.flag, type=option.type, default=option.default, choices=option.choices,
                           help=f"[{users}] {option.help}")
    align.add_argument("--teacher", choices=TEACHER_KINDS, default=DEFAULTS["teacher"],
                       help="Kind of frozen video encoder whose features the DiT is aligned to.")
    align.add_argument("--teacher-path", type=Path, default=DEFAULTS["teacher_path"],
                       help="Local transformers folder of the teacher (needed with a teacher alignment; tiny: built "
                            "in the output dir).")
    align.add_argument("--teacher-precision", choices=("fp32", "fp16", "bf16"), default=DEFAULTS["teacher_precision"],
                       help="dtype the frozen teacher runs in (fp32 as VideoREPA, whatever --mixed-precision is).")
    align.add_argument("--motion-drift-weight", type=float, default=DEFAULTS["motion_drift_weight"],
                       help="LaMo drift loss weight (default 0.4 with --align lamo, else 0).")
    align.add_argument("--predictor-learning-rate", type=float, default=DEFAULTS["predictor_learning_rate"],
                       help="LaMo motion predictor's learning rate.")
    align.add_argument("--predictor-channels", type=positive_int, default=DEFAULTS["predictor_channels"],
                       help="LaMo predictor width.")
    align.add_argument("--predictor-blocks", type=positive_int, default=DEFAULTS["predictor_blocks"],
                       help="LaMo predictor FiLM blocks.")
    align.add_argument("--predictor-prompt-pooling", choices=("all", "tokens"),
                       default=DEFAULTS["predictor_prompt_pooling"],
                       help="LaMo prompt mean-pool: all 226 T5 positions, padding included (LaMo's code), or the "
                            "real tokens only (the paper's text).")
    align.add_argument("--motion-drift-eps", type=float, default=DEFAULTS["motion_drift_eps"],
                       help="Floor of the drift loss's denominator ||mu*||^2 (LaMo's code: 1e-8).")

    optim = parser.add_argument_group("optimisation")
    optim.add_argument("--learning-rate", type=float, default=DEFAULTS["learning_rate"],
                       help="AdamW learning rate of the transformer (or its adapters) and the projector: "
                            "2e-6 for a full fine-tune (the papers'), 1e-4 for LoRA (DiffSynth-Studio), "
                            "unless a preset says otherwise.")
    optim.add_argument("--lr-scheduler", default=DEFAULTS["lr_scheduler"],
                       help="Any diffusers.optimization.get_scheduler name (linear, cosine, ...).")
    optim.add_argument("--lr-warmup-steps", type=int, default=DEFAULTS["lr_warmup_steps"],
                       help="Optimizer steps of linear learning-rate warm-up.")
    optim.add_argument("--adam-beta1", type=float, default=DEFAULTS["adam_beta1"], help="AdamW beta1.")
    optim.add_argument("--adam-beta2", type=float, default=DEFAULTS["adam_beta2"], help="AdamW beta2.")
    optim.add_argument("--adam-weight-decay", type=float, default=DEFAULTS["adam_weight_decay"],
                       help="AdamW decoupled weight decay.")
    optim.add_argument("--adam-epsilon", type=float, default=DEFAULTS["adam_epsilon"],
                       help="AdamW epsilon (added to the denominator).")
    optim.add_argument("--max-grad-norm", type=float, default=DEFAULTS["max_grad_norm"],
                       help="Clip the gradient norm to this (0: no clipping).")
    optim.add_argument("--train-batch-size", type=positive_int, default=DEFAULTS["train_batch_size"],
                       help="Clips per micro-batch, per process.")
    optim.add_argument("--gradient-accumulation-steps", type=positive_int,
                       default=DEFAULTS["gradient_accumulation_steps"],
                       help="Micro-batches summed into each optimizer step.")
    optim.add_argument("--max-steps", type=positive_int, default=DEFAULTS["max_steps"],
                       help="Optimizer steps of the run (counted over resumes).")
    optim.add_argument("--mixed-precision", choices=("no", "fp16", "bf16"), default=DEFAULTS["mixed_precision"],
                       help="Default: the accelerate config's (no without one).")
    optim.add_argument("--gradient-checkpointing", action=argparse.BooleanOptionalAction,
                       default=DEFAULTS["gradient_checkpointing"],
                       help="Recompute the transformer's activations in the backward pass (less memory, slower).")
    optim.add_argument("--seed", type=int, default=DEFAULTS["seed"],
                       help="Seed of the data order, noise and timesteps (a resumed run repeats them).")
    optim.add_argument("--timestep-sampling", choices=TIMESTEP_SAMPLING, default=DEFAULTS["timestep_sampling"],
                       help="Flow-matching families (Wan): training timestep density (default logit-normal, shifted "
                            "by the scheduler's shift).")
    optim.add_argument("--logit-mean", type=float, default=DEFAULTS["logit_mean"],
                       help="Logit-normal mean (flow families; 0).")
    optim.add_argument("--logit-std", type=float, default=DEFAULTS["logit_std"],
                       help="Logit-normal std (flow families; 1).")
    optim.add_argument("--flow-shift", type=float, default=DEFAULTS["flow_shift"],
                       help="Flow families: timestep shift (default: the model scheduler's).")

    parallel = parser.add_argument_group("past one GPU (docs/distributed.md)")
    parallel.add_argument("--context-parallel", type=positive_int, default=DEFAULTS["context_parallel"],
                          help="Ranks per context-parallel group: the transformer's tokens are split over them "
                               "(diffusers' context parallelism with the family's plan; Wan), the alignment loss runs "
                               "on the token slices; data parallel over the remaining ranks.")
    parallel.add_argument("--fsdp", action="store_true",
                          help="Shard parameters, gradients and optimizer state over all ranks with PyTorch FSDP2 "
                               "(fully_shard per transformer block; CPU / gloo too). Sharded checkpoints.")

    ckpt = parser.add_argument_group("checkpoints and logging")
    ckpt.add_argument("--checkpointing-steps", type=positive_int, default=DEFAULTS["checkpointing_steps"],
                      help="Save a checkpoint every N optimizer steps, and at the last one (and on Ctrl-C / "
                           "SIGTERM, at the step it stops).")
    ckpt.add_argument("--checkpoints-total-limit", type=int, default=DEFAULTS["checkpoints_total_limit"],
                      help="Keep at most this many checkpoints, the oldest deleted (default: keep all).")
    ckpt.add_argument("--resume", default=DEFAULTS["resume"],
                      help="Continue from a checkpoint: 'latest' (the newest in OUTPUT_DIR/checkpoints) or a "
                           "checkpoint-STEP folder (default: start from step 0).")
    ckpt.add_argument("--overwrite", action="store_true",
                      help="Replace the run already in --output-dir (its checkpoints, logs and weights; the tiny "
                           "assets and the latent cache stay).")
    ckpt.add_argument("--viz-steps", type=int, default=DEFAULTS["viz_steps"],
                      help="Every N optimizer steps, draw the correspondence maps of the first clip to OUTPUT_DIR/viz "
                           "and TensorBoard, with entropy / KL / mask scalars (0 = off; see tsa-viz).")
    ckpt.add_argument("--no-progress", action="store_true", help="Hide the tqdm bar.")
    add_debug_option(parser)
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
        if dest not in known or dest in ("help", "config", "debug"):
            raise ValueError(f"--config: unknown option {key!r} in {path}")
        action = known[dest]
        if value is not None and action.type is not None and not isinstance(value, (bool, list)):
            value = action.type(str(value))
        if action.choices is not None and value not in action.choices:
            raise ValueError(f"--config: {key} must be one of {sorted(action.choices)}, got {value!r}")
        options[dest] = value
    return options


def parse_args(argv=None, prog="tsa-train") -> argparse.Namespace:
    """Parse `argv` with the preset and YAML as defaults, so anything on the command line wins."""
    parser = build_parser(prog)
    return _parse(parser, argv)


def _parse(parser, argv):
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
    values = preset_values(preset, first.model_family or from_yaml.get("model_family"),
                           first.model_path or from_yaml.get("model_path"))
    parser.set_defaults(**{**values, **from_yaml, "preset": preset})
    return parser.parse_args(argv)


def parse_config(argv=None, prog="tsa-train") -> TrainConfig:
    """The resolved TrainConfig of a tsa-train / tsa-cache command line; a mistake ends the program with one
    line and exit status 2."""
    return parse_command(argv, prog)[0]


def parse_command(argv=None, prog="tsa-train") -> tuple[TrainConfig, bool]:
    """(resolved TrainConfig, --debug) of a tsa-train / tsa-cache command line. The input paths are checked
    first, then the values; a mistake ends the program with one line and exit status 2."""
    parser = build_parser(prog)
    options = vars(_parse(parser, argv))
    options.pop("config")
    debug = options.pop("debug")
    try:
        config = TrainConfig.from_dict(options)
        check_given_paths_exist(config)
        return resolve_config(config), debug
    except UsageError as error:
        parser.error(str(error))
