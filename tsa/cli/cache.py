"""tsa-cache: fill the latent cache of a dataset with the tsa-train options (run with `accelerate launch -m
tsa.cli.cache` to shard it over processes)."""

from tsa.cli.common import exit_with_error
from tsa.cli.options import parse_config
from tsa.errors import UsageError
from tsa.training.cache import precompute_cache
from tsa.training.validation import check_training_config


def main(argv=None):
    """Console script tsa-cache (also `python -m tsa.cli.cache`)."""
    config = parse_config(argv, prog="tsa-cache")
    try:
        check_training_config(config, needs_teacher=False)
        precompute_cache(config)
    except UsageError as error:
        exit_with_error("tsa-cache", error)


if __name__ == "__main__":
    main()
