"""tsa-sample: text-to-video with the weights tsa-train wrote, through the model family's diffusers pipeline.

    tsa-sample tsa-output --prompt "a red ball falls and bounces on the floor"
    tsa-sample runs/lamo --prompts-file prompts.txt --motion-guidance 15     # LaMo motion prior guidance

RUN_DIR is a tsa-train output folder: the base pipeline comes from its training_args.json (or
--model-path), the fine-tuned weights from RUN_DIR/transformer (full fine-tune; transformer_2 for a two-expert
model's second expert) or RUN_DIR/pytorch_lora_weights.safetensors (LoRA, loaded into the trained expert).
Writes one mp4 per prompt to RUN_DIR/samples.
"""

import argparse
import json
import re
from pathlib import Path

import torch

from tsa.data import write_video
from tsa.validation import OneLineArgumentParser, UsageError, check_sampling_args, pipeline_family

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def build_parser():
    parser = OneLineArgumentParser(prog="tsa-sample", description=__doc__.split("\n\n")[0],
                                   formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("run_dir", type=Path, help="A tsa-train --output-dir.")
    parser.add_argument("--prompt", action="append", default=[], help="Repeat for several videos.")
    parser.add_argument("--prompts-file", type=Path, default=None, help="One prompt per line.")
    parser.add_argument("--model-path", type=Path, default=None,
                        help="Base pipeline folder (default: the one the run trained from).")
    parser.add_argument("--output-dir", type=Path, default=None, help="Default: RUN_DIR/samples.")
    parser.add_argument("--height", type=int, default=None, help="Default: the training resolution.")
    parser.add_argument("--width", type=int, default=None)
    parser.add_argument("--num-frames", type=int, default=None)
    parser.add_argument("--num-inference-steps", type=int, default=50)
    parser.add_argument("--guidance-scale", type=float, default=None,
                        help="Classifier-free guidance (default: the family's, CogVideoX 6, Wan 5).")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--fps", type=int, default=None, help="Default: the family's (CogVideoX 8, Wan 16).")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="fp32")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--motion-guidance", type=float, default=0.0, metavar="SCALE",
                        help="LaMo Motion Prior Guidance scale (0 = off; the paper uses 15).")
    parser.add_argument("--motion-guidance-rho", type=float, default=0.8,
                        help="Fraction of the last denoising steps that are guided.")
    parser.add_argument("--motion-guidance-lag", type=int, default=1,
                        help="Frame lag (in latent frames) of the guided motion prediction.")
    parser.add_argument("--motion-guidance-start", choices=("floor", "ceil"), default="floor",
                        help="First guided step: int((1 - rho) * S) (LaMo's code) or the first s >= (1 - rho) * S.")
    parser.add_argument("--predictor", type=Path, default=None,
                        help="MotionPredictor folder (default: RUN_DIR/motion_predictor).")
    return parser


def load_pipeline(run_dir, model_path, dtype, expert="transformer"):
    """The family's pipeline from `model_path` with the run's fine-tuned `expert` or its LoRA weights."""
    from tsa.models import detect_family

    family = detect_family(model_path)
    pipe = family.load_pipeline(model_path, dtype)
    return family.load_run_weights(pipe, Path(run_dir), expert, dtype)


def main(argv=None):
    """Console script tsa-sample."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        check_sampling_args(args)
    except UsageError as error:
        parser.error(str(error))
    prompts = list(args.prompt)
    if args.prompts_file is not None:
        prompts += [line.strip() for line in args.prompts_file.read_text().splitlines() if line.strip()]
    if not prompts:
        parser.error("give at least one --prompt or a --prompts-file")
    trained = {}
    if (args.run_dir / "training_args.json").is_file():
        trained = json.loads((args.run_dir / "training_args.json").read_text())
    model_path = args.model_path or trained.get("model_path")
    if model_path is None:
        parser.error(f"--model-path is needed: {args.run_dir} has no training_args.json")
    try:
        pipeline_family(model_path)
    except UsageError as error:
        parser.error(str(error) + ("" if args.model_path else f" (from {args.run_dir / 'training_args.json'})"))
    from tsa.models import detect_family

    try:
        family = detect_family(model_path, trained.get("expert", "transformer"))
    except ValueError as error:
        parser.error(str(error))
    size = {name: getattr(args, name) or trained.get(name) for name in ("height", "width", "num_frames")}
    for name in ("height", "width"):
        if size[name] is not None and size[name] % family.spatial_multiple:
            parser.error(f"--{name} must be a multiple of {family.spatial_multiple} for {model_path} (VAE x patch "
                         f"size), got {size[name]}")
    predictor_path = args.predictor or args.run_dir / "motion_predictor"
    if args.motion_guidance and not (predictor_path / "config.json").is_file():
        parser.error(f"--motion-guidance needs a MotionPredictor folder, and {predictor_path} is none: train with "
                     "--align lamo or --motion-drift-weight > 0, or pass --predictor")

    pipe = load_pipeline(args.run_dir, Path(model_path), DTYPES[args.dtype], trained.get("expert", "transformer"))
    pipe = pipe.to(args.device)
    guidance_scale = family.default_guidance_scale if args.guidance_scale is None else args.guidance_scale
    fps = family.default_fps if args.fps is None else args.fps
    if args.motion_guidance:
        from tsa.lamo import MotionPredictor, enable_motion_guidance

        predictor = MotionPredictor.from_pretrained(predictor_path).to(args.device)
        enable_motion_guidance(pipe, predictor, scale=args.motion_guidance, rho=args.motion_guidance_rho,
                               lag=args.motion_guidance_lag, start_rounding=args.motion_guidance_start)

    output_dir = args.output_dir or args.run_dir / "samples"
    output_dir.mkdir(parents=True, exist_ok=True)
    for index, prompt in enumerate(prompts):
        generator = torch.Generator(args.device).manual_seed(args.seed + index)
        frames = pipe(prompt, num_inference_steps=args.num_inference_steps, guidance_scale=guidance_scale,
                      generator=generator, output_type="np", **size).frames[0]
        path = output_dir / f"{index:02d}-{re.sub(r'[^a-z0-9]+', '-', prompt.lower()).strip('-')[:60]}.mp4"
        write_video(path, [(frame * 255).round().clip(0, 255).astype("uint8") for frame in frames], fps=fps)
        print(path)


if __name__ == "__main__":
    main()
