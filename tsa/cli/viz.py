"""tsa-viz: the correspondence distributions TSA aligns, teacher against student, drawn over a clip through a
finished tsa-train run (tsa.viz.runs.draw_run).

    tsa-viz tsa-output --video tsa-output/tiny/data/videos/clip_000.mp4 --output maps.png
    tsa-viz runs/mtsa --video clip.mp4 --points 360,240 120,300 --query-frame 12 --tau 0.1 --gif
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

from tsa.cli.common import OneLineArgumentParser, add_debug_option, run_command
from tsa.outputs import refuse_existing_files
from tsa.sampling import DTYPES, default_device
from tsa.training.data import VideoDecodeError, read_video
from tsa.viz.maps import DEFAULT_TIMESTEP, MAX_COLUMNS
from tsa.viz.runs import alignment_grid, caption_for, draw_run, read_training_args


def _parse_point(text: str) -> tuple[float, float]:
    try:
        x, y = (float(value) for value in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a pixel position x,y (e.g. 72,40), got {text!r}") from None
    return x, y


def _parse_frames(text: str) -> list:
    try:
        return [int(value) for value in text.split(",") if value.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated frame indices (e.g. 0,4,8), got {text!r}") from None


def build_parser():
    parser = OneLineArgumentParser(
        prog="tsa-viz",
        description="Draw the correspondence distributions of a tsa-train run: for query tokens of one frame, "
        "the teacher's P_t and the student's P_s over every target frame, their KL, and the M-TSA mask.",
    )
    parser.add_argument("run_dir", type=Path, help="A finished tsa-train --output-dir (align tsa, mtsa, trd or repa).")
    parser.add_argument("--video", type=Path, required=True, help="The clip (read at the run's resolution and length).")
    parser.add_argument(
        "--points",
        type=_parse_point,
        nargs="+",
        default=None,
        metavar="X,Y",
        help="Query pixels in the clip at the run's resolution (default: the most dynamic tokens by "
        "the M-TSA saliency, and the centre).",
    )
    parser.add_argument(
        "--query-frame", type=int, default=None, help="Alignment-grid frame of the queries (default: the middle one)."
    )
    parser.add_argument(
        "--frames",
        type=_parse_frames,
        default=None,
        metavar="I,J,...",
        help=f"Target frames shown (default: all, or {MAX_COLUMNS} evenly spaced).",
    )
    parser.add_argument("--tau", type=float, default=None, help="Temperature of both softmaxes (default: the run's).")
    parser.add_argument(
        "--timestep",
        type=int,
        default=DEFAULT_TIMESTEP,
        help="Diffusion timestep at which the student's features are taken.",
    )
    parser.add_argument(
        "--prompt",
        default=None,
        help="Caption for the student (default: the clip's caption in the run's dataset, else empty).",
    )
    parser.add_argument("--output", type=Path, default=None, help="PNG path (default: RUN_DIR/viz/<clip>.png).")
    parser.add_argument("--gif", action="store_true", help="Also write an animated GIF (same path, .gif).")
    parser.add_argument("--no-base", action="store_true", help="Leave out the base model's row.")
    parser.add_argument("--device", default=default_device(), help="torch device (cuda when one is available).")
    parser.add_argument("--overwrite", action="store_true", help="Replace the PNG (and GIF) if they exist (else "
                        "refused).")
    add_debug_option(parser)
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="fp32", help="Weights and activations.")
    parser.add_argument("--seed", type=int, default=0, help="Seed of the diffusion noise.")
    return parser


def main(argv=None):
    """Console script tsa-viz: exit 0 after writing the picture; one line and exit 2 for a mistake (checked
    before a model loads), 1 for a failure."""
    parser = build_parser()
    options = parser.parse_args(argv)
    run_command("tsa-viz", lambda: _draw(parser, options), debug=options.debug)


def _draw(parser, options):

    def refuse(message):
        parser.exit(2, f"{parser.prog}: error: {message}\n")

    try:
        trained = read_training_args(options.run_dir)
        grid = alignment_grid(options.run_dir, trained)
    except (FileNotFoundError, ValueError) as error:
        refuse(str(error))
    except KeyError as error:
        refuse(f"{options.run_dir / 'training_args.json'} lacks the option {error}: not written by this tsa-train")
    if not options.video.is_file():
        refuse(f"--video: no such file: {options.video}")
    try:
        pixels = read_video(options.video, trained["num_frames"], trained["height"], trained["width"])
    except VideoDecodeError as error:
        refuse(f"--video: cannot decode {error}")
    height, width = trained["height"], trained["width"]
    for x, y in options.points or ():
        if not (0 <= x < width and 0 <= y < height):
            refuse(f"--points {x:g},{y:g} is outside the {width}x{height} clip (x in [0, {width}), y in [0, {height}))")
    if options.query_frame is not None and not 0 <= options.query_frame < grid[0]:
        refuse(
            f"--query-frame must be in [0, {grid[0]}) (the alignment grid has {grid[0]} frames), "
            f"got {options.query_frame}"
        )
    bad = [frame for frame in options.frames or () if not 0 <= frame < grid[0]]
    if bad or options.frames == []:
        refuse(
            f"--frames must be frame indices in [0, {grid[0]}) (the alignment grid has {grid[0]} frames), got "
            f"{options.frames}"
        )
    if options.tau is not None and not (options.tau > 0 and math.isfinite(options.tau)):
        refuse(f"--tau must be a positive number, got {options.tau}")
    if not 0 <= options.timestep < 1000:
        refuse(f"--timestep must be in [0, 1000), got {options.timestep}")
    output = options.output or options.run_dir / "viz" / f"{options.video.stem}.png"
    if output.suffix.lower() != ".png":
        refuse(f"--output must be a .png path, got {output}")
    try:
        refuse_existing_files([output, output.with_suffix(".gif") if options.gif else None], options.overwrite)
    except ValueError as error:
        refuse(str(error))

    prompt = caption_for(options.video, trained) if options.prompt is None else options.prompt
    drawing = draw_run(
        options.run_dir, pixels, trained=trained, grid=grid, output=output, video_name=options.video.name,
        prompt=prompt, points=options.points, query_frame=options.query_frame, frames=options.frames,
        tau=options.tau, timestep=options.timestep, seed=options.seed, gif=options.gif, with_base=not options.no_base,
        device=options.device, dtype=DTYPES[options.dtype],
    )
    print(drawing.png)
    if drawing.gif is not None:
        print(drawing.gif)
    for line in drawing.lines:
        print(line)


if __name__ == "__main__":
    main()
