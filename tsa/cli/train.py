"""tsa-train: fine-tune a video DiT (any registered family: CogVideoX, Wan2.1 / Wan2.2) with a TSA / M-TSA / TRD /
REPA alignment loss and / or LaMo's drift loss.

    tsa-train --preset tiny                                    # tiny random models + synthetic clips, CPU
    tsa-train --preset tiny --model-family wan --finetune lora # the same with tiny Wan models
    accelerate launch --config_file configs/ddp.yaml -m tsa.cli.train --preset cogvideox-2b-mtsa \\
        --model-path CogVideoX-2b --teacher-path videomae-v2-base --data my_videos/ --output-dir runs/mtsa

The options become a tsa.training.TrainConfig (tsa/cli/options.py); the run is tsa.training.train(config), whose
docstring lists the outputs.
"""

from tsa.cli.common import run_command
from tsa.cli.options import parse_command
from tsa.training.loop import train
from tsa.training.validation import check_training_config


def main(argv=None):
    """Console script tsa-train (also `python -m tsa.cli.train`): options and paths are checked before anything
    is built. Exit status 0 when the run finishes; 2 and one line for a mistake; 1 and one line for a failure (a
    bad checkpoint, a non-finite loss, data that does not decode; --debug adds the traceback); 130 / 143 after
    Ctrl-C / SIGTERM, with a checkpoint saved at the step the run stopped."""
    config, debug = parse_command(argv)

    def run():
        check_training_config(config)
        train(config)

    run_command("tsa-train", run, debug=debug)


if __name__ == "__main__":
    main()
