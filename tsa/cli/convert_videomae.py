"""tsa-convert-videomae: an official VideoMAEv2 .pth checkpoint -> a transformers VideoMAE folder (the teacher
tsa-train --teacher videomae loads; tsa.teachers.convert_videomae_v2_checkpoint)."""

import argparse

from tsa.teachers.videomae import convert_videomae_v2_checkpoint


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="tsa-convert-videomae",
        description="Convert an official VideoMAEv2 .pth checkpoint to a transformers VideoMAE folder.",
    )
    parser.add_argument("checkpoint", help="official .pth, e.g. vit_b_k710_dl_from_giant.pth")
    parser.add_argument("output_dir")
    parser.add_argument("--num-frames", type=int, default=48, help="teacher input frames (default 48)")
    parser.add_argument("--image-size", type=int, nargs=2, default=(160, 240), metavar=("H", "W"))
    parser.add_argument("--source-num-frames", type=int, default=16)
    parser.add_argument("--source-image-size", type=int, default=224)
    parser.add_argument("--num-attention-heads", type=int, default=None)
    parser.add_argument("--allow-pickle", action="store_true", help="load a .pth that pickles Python objects")
    args = parser.parse_args(argv)
    out = convert_videomae_v2_checkpoint(
        args.checkpoint, args.output_dir, num_frames=args.num_frames, image_size=tuple(args.image_size),
        source_num_frames=args.source_num_frames, source_image_size=args.source_image_size,
        num_attention_heads=args.num_attention_heads, allow_pickle=args.allow_pickle,
    )
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
