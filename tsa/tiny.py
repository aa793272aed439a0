"""Tiny random instances of the real model classes, for tests and `tsa-train --preset tiny`.

Every builder returns a genuine diffusers / transformers model (random weights, a few thousand
parameters) so the whole pipeline, from_pretrained included, runs on a CPU with no downloads. The video
models' builders live with their family (ModelFamily.tiny_components, shared pieces in tsa.models.tiny); the
teachers' are here.
"""

from __future__ import annotations

from pathlib import Path

import torch

from tsa.models.tiny import TINY_LATENT_CHANNELS, TINY_TEXT_DIM, TINY_TEXT_LENGTH, tiny_tokenizer

__all__ = [
    "TINY_LATENT_CHANNELS", "TINY_TEXT_DIM", "TINY_TEXT_LENGTH", "save_tiny_pipeline", "tiny_dinov2", "tiny_tokenizer",
    "tiny_videomae", "tiny_vjepa2",
]


def save_tiny_pipeline(path: str | Path, family: str | None = None, num_layers: int = 2, seed: int = 0,
                       **options) -> Path:
    """Save a tiny random pipeline folder of `family` (default: tsa.models.DEFAULT_FAMILY), loadable with its
    pipeline's from_pretrained; options go to the family's builder (e.g. CogVideoX: rotary; Wan: two_experts,
    ti2v)."""
    from tsa.models import DEFAULT_FAMILY, get_family

    return get_family(family or DEFAULT_FAMILY).save_tiny_pipeline(path, num_layers=num_layers, seed=seed, **options)


def tiny_videomae(path: str | Path, image_size: int = 64, num_frames: int = 8, seed: int = 0) -> Path:
    """A 2-layer VideoMAEModel (tubelet 2, patch 16, width 24) saved to `path`."""
    from transformers import VideoMAEConfig, VideoMAEModel

    torch.manual_seed(seed)
    config = VideoMAEConfig(
        image_size=image_size, patch_size=16, num_frames=num_frames, tubelet_size=2, hidden_size=24,
        num_hidden_layers=2, num_attention_heads=2, intermediate_size=48, use_mean_pooling=False,
    )
    VideoMAEModel(config).save_pretrained(path)
    return Path(path)


def tiny_dinov2(path: str | Path, image_size: int = 56, seed: int = 0) -> Path:
    """A 2-layer Dinov2Model (patch 14, width 24) saved to `path`."""
    from transformers import Dinov2Config, Dinov2Model

    torch.manual_seed(seed)
    config = Dinov2Config(
        image_size=image_size, patch_size=14, hidden_size=24, num_hidden_layers=2, num_attention_heads=2,
        mlp_ratio=2,
    )
    Dinov2Model(config).save_pretrained(path)
    return Path(path)


def tiny_vjepa2(path: str | Path, crop_size: int = 64, frames_per_clip: int = 8, seed: int = 0) -> Path:
    """A 2-layer VJEPA2Model (tubelet 2, patch 16, width 24) saved to `path`."""
    from transformers import VJEPA2Config, VJEPA2Model

    torch.manual_seed(seed)
    config = VJEPA2Config(
        patch_size=16, crop_size=crop_size, frames_per_clip=frames_per_clip, tubelet_size=2, hidden_size=24,
        num_attention_heads=2, num_hidden_layers=2, mlp_ratio=2.0, num_pooler_layers=1, pred_hidden_size=24,
        pred_num_attention_heads=2, pred_num_hidden_layers=1, pred_num_mask_tokens=2,
    )
    VJEPA2Model(config).save_pretrained(path)
    return Path(path)
