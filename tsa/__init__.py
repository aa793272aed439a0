"""TSA / M-TSA / TRD / REPA / LaMo alignment layer over diffusers video DiTs (CogVideoX, Wan2.1 / Wan2.2).

    import tsa
    config = tsa.TrainConfig.from_preset("tiny", output_dir="runs/tiny", max_steps=20)
    history = tsa.train(config)                       # the loop tsa-train runs
    tsa.sample("runs/tiny", ["a red ball falls and bounces on the floor"], num_inference_steps=5)

`import tsa` loads torch and stss_kernels only; the names backed by diffusers / transformers
(projector, teachers, diffusion objective, training, sampling) are imported on first access.
Layout: tsa.models (families), tsa.teachers, tsa.lamo, the alignment library (losses, masks, projector, features,
objective), tsa.training (config, loop, checkpoints, cache, data), tsa.sampling, tsa.viz and tsa.cli (the commands).
"""

from tsa.features import BlockFeatureCapture, resample_features
from tsa.losses import REPALoss, TRDLoss, TSALoss
from tsa.masks import motion_query_mask, motion_saliency

_LAZY = {
    "AlignmentProjector": "tsa.projector",
    "AlignmentObjective": "tsa.objective",
    "Teacher": "tsa.teachers",
    "load_teacher": "tsa.teachers",
    "convert_videomae_v2_checkpoint": "tsa.teachers",
    "cogvideox_scheduler": "tsa.models.cogvideox",
    "denoise_and_loss": "tsa.diffusion",
    "diffusion_loss": "tsa.models.cogvideox",
    "rotary_embeddings": "tsa.models.cogvideox",
    "detect_family": "tsa.models",
    "family_of": "tsa.models",
    "get_family": "tsa.models",
    "TrainConfig": "tsa.training.config",
    "train": "tsa.training.loop",
    "precompute_cache": "tsa.training.cache",
    "sample": "tsa.sampling",
}

__all__ = [
    "BlockFeatureCapture", "REPALoss", "TRDLoss", "TSALoss", "motion_query_mask", "motion_saliency",
    "resample_features", *_LAZY,
]


def __getattr__(name):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
