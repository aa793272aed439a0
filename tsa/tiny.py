"""Tiny random instances of the real model classes, for tests and `tsa-train --preset tiny`.

Every builder returns a genuine diffusers / transformers model (random weights, a few thousand
parameters) so the whole pipeline, from_pretrained included, runs on a CPU with no downloads. The video
models' builders live with their family (tsa.models); the teachers' and the shared tokenizer are here.
"""

from __future__ import annotations

from pathlib import Path

import torch

TINY_WORDS = (
    "a the red blue green yellow white black ball cube sphere box block ring toy car bottle cup "
    "falls drops bounces rolls slides spins moves swings flies floats sinks collides hits stops "
    "left right up down across over under onto into off floor table ramp wall water air slowly "
    "quickly and on in of with from to"
).split()

TINY_TEXT_DIM = 32
TINY_LATENT_CHANNELS = 4
TINY_TEXT_LENGTH = 226  # CogVideoX's max_text_seq_length: the 2B sincos table assumes exactly this many text tokens


def tiny_tokenizer():
    """A T5 tokenizer (unigram over a small word list plus single letters, so any caption tokenises)."""
    from transformers import T5Tokenizer

    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)]
    vocab += [("\u2581" + word, -float(rank + 1)) for rank, word in enumerate(TINY_WORDS)]
    vocab += [("\u2581", -60.0)] + [(letter, -80.0) for letter in "abcdefghijklmnopqrstuvwxyz0123456789"]
    return T5Tokenizer(vocab=vocab, extra_ids=0)


def tiny_text_encoder(vocab_size: int, seed: int = 0):
    """A 2-layer T5 encoder with d_model = TINY_TEXT_DIM (CogVideoX's text encoder class)."""
    from tsa.models.cogvideox import tiny_t5

    return tiny_t5(vocab_size, seed)


def tiny_transformer(
    num_layers: int = 2, latent_channels: int = TINY_LATENT_CHANNELS, rotary: bool = False, seed: int = 0
):
    """A tiny CogVideoX transformer (2 heads x 16 dims); `rotary=True` mimics the 5B (3D RoPE) layout."""
    from tsa.models.cogvideox import tiny_transformer as build

    return build(num_layers, latent_channels, rotary, seed)


def tiny_vae(latent_channels: int = TINY_LATENT_CHANNELS, seed: int = 0):
    """A tiny CogVideoX VAE with the real 8x spatial / 4x temporal compression."""
    from tsa.models.cogvideox import tiny_vae as build

    return build(latent_channels, seed)


def tiny_cogvideox_components(num_layers: int = 2, rotary: bool = False, seed: int = 0) -> dict:
    """The five components of a tiny random CogVideoX pipeline (the scheduler is CogVideoX-2B's)."""
    from tsa.models import get_family

    return get_family("cogvideox").tiny_components(num_layers, rotary, seed)


def save_tiny_pipeline(path: str | Path, num_layers: int = 2, rotary: bool = False, seed: int = 0,
                       family: str = "cogvideox", **options) -> Path:
    """Save a tiny random pipeline folder of `family` (loadable with its pipeline's from_pretrained); options
    go to the family's builder (Wan: two_experts, ti2v)."""
    from tsa.models import get_family

    if family == "cogvideox":
        options["rotary"] = rotary
    return get_family(family).save_tiny_pipeline(path, num_layers=num_layers, seed=seed, **options)


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
