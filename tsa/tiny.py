"""Tiny random instances of the real model classes, for tests and `tsa-train --preset tiny`.

Every builder returns a genuine diffusers / transformers model (random weights, a few thousand
parameters) so the whole pipeline, from_pretrained included, runs on a CPU with no downloads.
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
    """A 2-layer T5 encoder with d_model = TINY_TEXT_DIM."""
    from transformers import T5Config, T5EncoderModel

    torch.manual_seed(seed)
    config = T5Config(
        vocab_size=vocab_size, d_model=TINY_TEXT_DIM, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
        relative_attention_num_buckets=8, dropout_rate=0.0,
    )
    return T5EncoderModel(config).eval()


def tiny_transformer(
    num_layers: int = 2, latent_channels: int = TINY_LATENT_CHANNELS, rotary: bool = False, seed: int = 0
):
    """CogVideoXTransformer3DModel: 2 heads x 16 dims; `rotary=True` mimics the 5B (3D RoPE) layout."""
    from diffusers import CogVideoXTransformer3DModel

    torch.manual_seed(seed)
    return CogVideoXTransformer3DModel(
        num_attention_heads=2, attention_head_dim=16, in_channels=latent_channels, out_channels=latent_channels,
        time_embed_dim=16, text_embed_dim=TINY_TEXT_DIM, num_layers=num_layers, sample_width=8, sample_height=8,
        sample_frames=9, patch_size=2, temporal_compression_ratio=4, max_text_seq_length=TINY_TEXT_LENGTH,
        use_rotary_positional_embeddings=rotary,
    )


def tiny_vae(latent_channels: int = TINY_LATENT_CHANNELS, seed: int = 0):
    """AutoencoderKLCogVideoX with the real 8x spatial / 4x temporal compression and 8-channel blocks."""
    from diffusers import AutoencoderKLCogVideoX

    torch.manual_seed(seed)
    return AutoencoderKLCogVideoX(
        in_channels=3, out_channels=3, down_block_types=("CogVideoXDownBlock3D",) * 4,
        up_block_types=("CogVideoXUpBlock3D",) * 4, block_out_channels=(8, 8, 8, 8),
        latent_channels=latent_channels, layers_per_block=1, norm_num_groups=2, temporal_compression_ratio=4,
        sample_height=64, sample_width=64,
    ).eval()


def tiny_cogvideox_components(num_layers: int = 2, rotary: bool = False, seed: int = 0) -> dict:
    """The five components of a CogVideoXPipeline, tiny and random (the scheduler is CogVideoX's own)."""
    from tsa.diffusion import cogvideox_scheduler

    tokenizer = tiny_tokenizer()
    return {
        "tokenizer": tokenizer,
        "text_encoder": tiny_text_encoder(len(tokenizer), seed=seed),
        "vae": tiny_vae(seed=seed),
        "transformer": tiny_transformer(num_layers=num_layers, rotary=rotary, seed=seed),
        "scheduler": cogvideox_scheduler(),
    }


def save_tiny_pipeline(path: str | Path, num_layers: int = 2, rotary: bool = False, seed: int = 0) -> Path:
    """Save a tiny CogVideoXPipeline folder (loadable with CogVideoXPipeline.from_pretrained)."""
    from diffusers import CogVideoXPipeline

    path = Path(path)
    CogVideoXPipeline(**tiny_cogvideox_components(num_layers, rotary, seed)).save_pretrained(path)
    return path


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
