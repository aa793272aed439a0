"""The diffusion training objective of any supported model family (docs/method.md), by the transformer's class.

Each family (tsa.models) owns its objective: CogVideoX is v-prediction through its DDPM scheduler, Wan is
rectified flow. There is no default noise schedule: pass the model's own scheduler.
"""

from __future__ import annotations

import torch

from tsa.models import family_of


def denoise_and_loss(
    transformer,
    scheduler,
    latents: torch.Tensor,
    prompt_embeds: torch.Tensor,
    *,
    timesteps: torch.Tensor | None = None,
    noise: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
    family=None,
) -> dict[str, torch.Tensor]:
    """One training forward on clean normalised latents (B, F, C, h, w) and prompt_embeds (B, L, D).

    Returns {"loss", "x0_pred" (B, F, C, h, w), "timesteps" (B,), "noisy_latents"}; see the family's
    denoise_and_loss for the formulas. `family` defaults to the transformer's (default options).
    """
    family = family_of(transformer) if family is None else family
    family.check_scheduler(scheduler)
    return family.denoise_and_loss(transformer, scheduler, latents, prompt_embeds, timesteps=timesteps, noise=noise,
                                   generator=generator)
