"""Training runs: the run configuration (config.py), the loop (loop.py, `train(config)`), checkpoints, the latent
cache and the video datasets. `tsa.training.train` and `precompute_cache` load diffusers on first access."""

from tsa.training.config import PRESETS, TrainConfig, resolve_config

_LAZY = {"train": "tsa.training.loop", "precompute_cache": "tsa.training.cache"}

__all__ = ["PRESETS", "TrainConfig", "resolve_config", *_LAZY]


def __getattr__(name):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
