"""tsa-convert-videomae: an official VideoMAEv2 .pth checkpoint -> a transformers VideoMAE folder (the teacher
tsa-train --teacher videomae loads; tsa.teachers.convert_videomae_v2_checkpoint)."""

from pathlib import Path

from tsa.cli.common import OneLineArgumentParser, add_debug_option, positive_int, run_command
from tsa.outputs import refuse_existing_files


def build_parser():
    parser = OneLineArgumentParser(
        prog="tsa-convert-videomae",
        description="Convert an official VideoMAEv2 .pth checkpoint to a transformers VideoMAE folder.",
    )
    parser.add_argument("checkpoint", type=Path, help="The official .pth, e.g. vit_b_k710_dl_from_giant.pth.")
    parser.add_argument("output_dir", type=Path, help="The transformers folder to write (config.json, weights).")
    parser.add_argument("--num-frames", type=positive_int, default=48, help="Teacher input frames.")
    parser.add_argument("--image-size", type=positive_int, nargs=2, default=(160, 240), metavar=("H", "W"),
                        help="Teacher input height and width.")
    parser.add_argument("--source-num-frames", type=positive_int, default=16,
                        help="Frames the checkpoint was trained on (its position table's length).")
    parser.add_argument("--source-image-size", type=positive_int, default=224,
                        help="Image size the checkpoint was trained on.")
    parser.add_argument("--num-attention-heads", type=positive_int, default=None,
                        help="Heads per layer (default: hidden size / 64; ViT-g needs 16).")
    parser.add_argument("--allow-pickle", action="store_true",
                        help="Load a .pth that pickles Python objects (only files you trust).")
    parser.add_argument("--overwrite", action="store_true", help="Replace an existing OUTPUT_DIR/config.json.")
    add_debug_option(parser)
    return parser


def main(argv: list[str] | None = None) -> None:
    """Console script tsa-convert-videomae: exit 0, 2 with one line for a mistake, 1 for a failure."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if not args.checkpoint.is_file():
        parser.error(f"checkpoint {args.checkpoint} does not exist")
    try:
        refuse_existing_files([args.output_dir / "config.json"], args.overwrite)
    except ValueError as error:
        parser.error(str(error))

    def run():
        from tsa.teachers.videomae import convert_videomae_v2_checkpoint

        out = convert_videomae_v2_checkpoint(
            args.checkpoint, args.output_dir, num_frames=args.num_frames, image_size=tuple(args.image_size),
            source_num_frames=args.source_num_frames, source_image_size=args.source_image_size,
            num_attention_heads=args.num_attention_heads, allow_pickle=args.allow_pickle,
        )
        print(f"wrote {out}")

    run_command("tsa-convert-videomae", run, debug=args.debug)


if __name__ == "__main__":
    main()
