"""tsa-cache: fill the latent cache of a dataset with the tsa-train options (run with `accelerate launch -m
tsa.cli.cache` to shard it over processes)."""

from tsa.cli.common import run_command
from tsa.cli.options import parse_command
from tsa.training.cache import precompute_cache
from tsa.training.validation import check_training_config


def main(argv=None):
    """Console script tsa-cache (also `python -m tsa.cli.cache`): exit status 0, 2 for a mistake, 1 for a
    failure (e.g. no video of --data decodes), each failure in one line."""
    config, debug = parse_command(argv, prog="tsa-cache")

    def run():
        check_training_config(config, needs_teacher=False, run_outputs=False)
        precompute_cache(config)

    run_command("tsa-cache", run, debug=debug)


if __name__ == "__main__":
    main()
