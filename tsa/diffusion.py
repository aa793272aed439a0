"""CogVideoX's diffusion training objective (docs/method.md): v-prediction through CogVideoXDPMScheduler."""

from __future__ import annotations

from types import SimpleNamespace

import torch

from tsa.features import unwrap_transformer


def cogvideox_scheduler():
    """CogVideoXDPMScheduler with CogVideoX's training configuration (v-prediction, zero terminal SNR)."""
    from diffusers import CogVideoXDPMScheduler

    return CogVideoXDPMScheduler(
        num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
        prediction_type="v_prediction", rescale_betas_zero_snr=True, timestep_spacing="trailing",
        set_alpha_to_one=True, clip_sample=False, snr_shift_scale=3.0,
    )


def rotary_embeddings(transformer, latents: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
    """3D RoPE (cos, sin) for latents (B, F, C, h, w) of any size, or None for sincos models (2B).

    Uses CogVideoXPipeline's own helper (CogVideoX 1.0 crop-region grid and 1.5 "slice" grid), given
    the latent size directly (spatial VAE factor 1).
    """
    from diffusers import CogVideoXPipeline

    config = unwrap_transformer(transformer).config
    if not config.use_rotary_positional_embeddings:
        return None
    _, frames, _, height, width = latents.shape
    helper = SimpleNamespace(transformer=SimpleNamespace(config=config), vae_scale_factor_spatial=1)
    return CogVideoXPipeline._prepare_rotary_positional_embeddings(helper, height, width, frames, latents.device)


def sample_timesteps(scheduler, batch_size: int, device, generator: torch.Generator | None = None) -> torch.Tensor:
    """Uniform integer timesteps in [0, num_train_timesteps), shape (B,)."""
    num_steps = scheduler.config.num_train_timesteps
    gen_device = generator.device if generator is not None else device
    return torch.randint(0, num_steps, (batch_size,), generator=generator, device=gen_device).to(device)


def diffusion_loss(scheduler, x0_pred: torch.Tensor, x0: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
    """mean over the batch of mean((x0_hat - x0)^2) / (1 - alphabar_t): the v-prediction MSE, float32."""
    alphas_cumprod = scheduler.alphas_cumprod.to(device=x0.device, dtype=torch.float32)[timesteps.to(x0.device)]
    squared_error = (x0_pred.float() - x0.float()).pow(2).flatten(1).mean(1)
    return (squared_error / (1 - alphas_cumprod)).mean()


def denoise_and_loss(
    transformer,
    scheduler,
    latents: torch.Tensor,
    prompt_embeds: torch.Tensor,
    *,
    timesteps: torch.Tensor | None = None,
    noise: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
) -> dict[str, torch.Tensor]:
    """One training forward of CogVideoX on clean scaled latents (B, F, C, h, w) and prompt_embeds (B, L, D).

    x_t = scheduler.add_noise(x0, eps, t) with t uniform; v_hat = transformer(x_t, prompt, t);
    x0_hat = scheduler.get_velocity(v_hat, x_t, t) = sqrt(ab) x_t - sqrt(1 - ab) v_hat.
    Returns {"loss", "x0_pred", "timesteps", "noisy_latents"}.
    """
    batch = latents.shape[0]
    if timesteps is None:
        timesteps = sample_timesteps(scheduler, batch, latents.device, generator)
    timesteps = timesteps.to(device=latents.device, dtype=torch.long)
    if noise is None:
        gen_device = generator.device if generator is not None else latents.device
        noise = torch.randn(latents.shape, generator=generator, device=gen_device, dtype=latents.dtype)
    noisy_latents = scheduler.add_noise(latents, noise.to(latents), timesteps)
    velocity = transformer(
        hidden_states=noisy_latents, encoder_hidden_states=prompt_embeds, timestep=timesteps,
        image_rotary_emb=rotary_embeddings(transformer, latents), return_dict=False,
    )[0]
    x0_pred = scheduler.get_velocity(velocity, noisy_latents, timesteps)
    return {
        "loss": diffusion_loss(scheduler, x0_pred, latents, timesteps),
        "x0_pred": x0_pred,
        "timesteps": timesteps,
        "noisy_latents": noisy_latents,
    }
