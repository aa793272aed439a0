"""tsa-sample: text-to-video with the weights tsa-train wrote, through the model family's diffusers pipeline.

    tsa-sample tsa-output --prompt "a red ball falls and bounces on the floor"
    tsa-sample runs/lamo --prompts-file prompts.txt --motion-guidance 15     # LaMo motion prior guidance

RUN_DIR is a tsa-train output folder: the base pipeline comes from its training_args.json (or --model-path), the
fine-tuned weights from RUN_DIR/transformer (full fine-tune; transformer_2 for a two-expert model's second expert)
or RUN_DIR/pytorch_lora_weights.safetensors (LoRA, loaded into the trained expert). Writes one mp4 per prompt to
RUN_DIR/samples (tsa.sampling.sample).
"""

from pathlib import Path

from tsa.cli.common import OneLineArgumentParser, add_debug_option, run_command
from tsa.errors import UsageError
from tsa.sampling import DTYPES, default_device, sample


def build_parser():
    parser = OneLineArgumentParser(prog="tsa-sample", description=__doc__.split("\n\n")[0])
    parser.add_argument("run_dir", type=Path, help="A tsa-train --output-dir.")
    parser.add_argument("--prompt", action="append", default=[],
                        help="Text of a video to generate; repeat for several videos.")
    parser.add_argument("--prompts-file", type=Path, default=None,
                        help="A text file with one prompt per line (added to --prompt).")
    parser.add_argument("--model-path", type=Path, default=None,
                        help="Base pipeline folder (default: the one the run trained from).")
    parser.add_argument("--output-dir", type=Path, default=None,
                        help="Folder of the mp4 files (default: RUN_DIR/samples).")
    parser.add_argument("--height", type=int, default=None,
                        help="Video height in pixels (default: the training resolution).")
    parser.add_argument("--width", type=int, default=None, help="Video width in pixels (default: the training one).")
    parser.add_argument("--num-frames", type=int, default=None, help="Frames per video, 4k+1 (default: the training "
                        "clip length).")
    parser.add_argument("--num-inference-steps", type=int, default=50, help="Denoising steps.")
    parser.add_argument("--guidance-scale", type=float, default=None,
                        help="Classifier-free guidance (default: the family's, CogVideoX 6, Wan 5).")
    parser.add_argument("--seed", type=int, default=0, help="Seed of the first video's noise (the next ones add "
                        "their index).")
    parser.add_argument("--fps", type=int, default=None, help="Frames per second of the mp4 (default: the family's, "
                        "CogVideoX 8, Wan 16).")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="fp32", help="Weights and activations.")
    parser.add_argument("--device", default=default_device(), help="torch device (cuda when one is available).")
    parser.add_argument("--overwrite", action="store_true", help="Replace mp4 files that already exist (else "
                        "refused).")
    add_debug_option(parser)
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


def main(argv=None):
    """Console script tsa-sample (also `python -m tsa.cli.sample`): exit 0; one line and exit 2 for a mistake,
    1 for a failure."""
    parser = build_parser()
    options = vars(parser.parse_args(argv))
    debug = options.pop("debug")
    prompts = options.pop("prompt")
    prompts_file = options.pop("prompts_file")
    if prompts_file is not None:
        if not prompts_file.is_file():
            parser.error(f"--prompts-file {prompts_file} does not exist")
        prompts += [line.strip() for line in prompts_file.read_text().splitlines() if line.strip()]

    def run():
        try:
            paths = sample(options.pop("run_dir"), prompts, **options)
        except UsageError as error:
            parser.error(str(error))
        for path in paths:
            print(path)

    run_command("tsa-sample", run, debug=debug)


if __name__ == "__main__":
    main()
