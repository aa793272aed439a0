"""tsa-sample: text- and image-to-video with the weights tsa-train wrote, through the model family's diffusers pipeline.

    tsa-sample tsa-output --prompt "a red ball falls and bounces on the floor"
    tsa-sample runs/lamo --prompts-file prompts.txt --motion-guidance 15     # LaMo motion prior guidance
    tsa-sample --settings tsa-output/samples/00-a-red-ball.json              # the same video again
    tsa-sample runs/i2v --image first.png --prompt "the ball rolls away"     # image-to-video runs

RUN_DIR is a tsa-train output folder: the base pipeline comes from its training_args.json (or --model-path), the
fine-tuned weights from RUN_DIR/transformer (full fine-tune; transformer_2 for a two-expert model's second expert)
or RUN_DIR/pytorch_lora_weights.safetensors (LoRA, loaded into the trained expert). Writes one mp4 per prompt to
RUN_DIR/samples (tsa.sampling.sample), each with a settings file beside it (same name, .json) that --settings
reproduces (into the settings file's folder/reproduced unless --output-dir is given). Steps, guidance scale(s),
flow shift, negative prompt and fps default to the model variant's own recipe (docs/method.md, "Sampling
defaults").
"""

from pathlib import Path

from tsa.cli.common import OneLineArgumentParser, add_debug_option, run_command
from tsa.errors import UsageError
from tsa.sampling import DTYPES, default_device, read_settings, sample


def build_parser():
    parser = OneLineArgumentParser(prog="tsa-sample", description=__doc__.split("\n\n")[0])
    parser.add_argument("run_dir", type=Path, nargs="?", default=None,
                        help="A tsa-train --output-dir (not needed with --settings).")
    parser.add_argument("--settings", type=Path, default=None, metavar="FILE",
                        help="A sample's settings file (the .json beside its mp4): render that sample again; "
                             "other options given override it.")
    parser.add_argument("--prompt", action="append", default=[],
                        help="Text of a video to generate; repeat for several videos.")
    parser.add_argument("--prompts-file", type=Path, default=None,
                        help="A text file with one prompt per line (added to --prompt).")
    parser.add_argument("--model-path", type=Path, default=None,
                        help="Base pipeline folder (default: the one the run trained from).")
    parser.add_argument("--output-dir", type=Path, default=None,
                        help="Folder of the mp4 files (default: RUN_DIR/samples; with --settings, the settings "
                             "file's folder/reproduced).")
    parser.add_argument("--height", type=int, default=None,
                        help="Video height in pixels (default: the training resolution).")
    parser.add_argument("--width", type=int, default=None, help="Video width in pixels (default: the training one).")
    parser.add_argument("--num-frames", type=int, default=None, help="Frames per video, 4k+1 (default: the training "
                        "clip length).")
    parser.add_argument("--num-inference-steps", type=int, default=None,
                        help="Denoising steps (default: the model's, e.g. CogVideoX 50, Wan2.2 A14B 40).")
    parser.add_argument("--guidance-scale", type=float, default=None,
                        help="Classifier-free guidance (default: the model's, e.g. CogVideoX 6, Wan2.1 5; the "
                             "high-noise expert's for a two-expert model).")
    parser.add_argument("--guidance-scale-2", type=float, default=None,
                        help="The second (low-noise) expert's guidance of a two-expert model (default: the "
                             "model's, Wan2.2 T2V-A14B 3.0).")
    parser.add_argument("--flow-shift", type=float, default=None,
                        help="Timestep shift of a flow-matching sampler (default: the model's, e.g. Wan2.1 5, "
                             "Wan2.2 T2V-A14B 12).")
    parser.add_argument("--negative-prompt", default=None,
                        help="Text to guide away from (default: the model's, Wan's sample_neg_prompt; none for "
                             "CogVideoX).")
    parser.add_argument("--image", type=Path, default=None,
                        help="First frame of the video (image-to-video models; required there).")
    parser.add_argument("--seed", type=int, default=0, help="Seed of the first video's noise (the next ones add "
                        "their index).")
    parser.add_argument("--fps", type=int, default=None, help="Frames per second of the mp4 (default: the model's, "
                        "CogVideoX 8, Wan 16, Wan2.2 TI2V-5B 24).")
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
    settings_file = options.pop("settings")
    if settings_file is not None:
        try:
            recorded = read_settings(settings_file)
        except UsageError as error:
            parser.error(str(error))
        parser.set_defaults(**{key: value for key, value in recorded.items() if key != "prompts"},
                            output_dir=settings_file.parent / "reproduced")
        options = vars(parser.parse_args(argv))
        options.pop("settings")
        if not options["prompt"] and options["prompts_file"] is None:
            options["prompt"] = recorded["prompts"]
    if options["run_dir"] is None:
        parser.error("give RUN_DIR (a tsa-train --output-dir) or --settings FILE")
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
