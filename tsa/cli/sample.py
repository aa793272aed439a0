"""tsa-sample: text-to-video with the weights tsa-train wrote, through the model family's diffusers pipeline.

    tsa-sample tsa-output --prompt "a red ball falls and bounces on the floor"
    tsa-sample runs/lamo --prompts-file prompts.txt --motion-guidance 15     # LaMo motion prior guidance

RUN_DIR is a tsa-train output folder: the base pipeline comes from its training_args.json (or --model-path), the
fine-tuned weights from RUN_DIR/transformer (full fine-tune; transformer_2 for a two-expert model's second expert)
or RUN_DIR/pytorch_lora_weights.safetensors (LoRA, loaded into the trained expert). Writes one mp4 per prompt to
RUN_DIR/samples (tsa.sampling.sample).
"""

import argparse
from pathlib import Path

from tsa.cli.common import OneLineArgumentParser
from tsa.errors import UsageError
from tsa.sampling import DTYPES, default_device, sample


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
    parser.add_argument("--device", default=default_device())
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
    """Console script tsa-sample (also `python -m tsa.cli.sample`): one line and exit 2 for a mistake."""
    parser = build_parser()
    options = vars(parser.parse_args(argv))
    prompts = options.pop("prompt")
    prompts_file = options.pop("prompts_file")
    if prompts_file is not None:
        if not prompts_file.is_file():
            parser.error(f"--prompts-file {prompts_file} does not exist")
        prompts += [line.strip() for line in prompts_file.read_text().splitlines() if line.strip()]
    try:
        for path in sample(options.pop("run_dir"), prompts, **options):
            print(path)
    except UsageError as error:
        parser.error(str(error))


if __name__ == "__main__":
    main()
