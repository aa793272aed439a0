"""LaMo objectives: the motion predictor's loss and the Motion Drift Loss on the denoiser's x0 (docs/method.md)."""

import torch
import torch.nn.functional as F
from torch import nn


def _check_latents(name: str, latents: torch.Tensor) -> None:
    if not isinstance(latents, torch.Tensor) or not latents.is_floating_point() or latents.ndim != 5:
        shape = tuple(latents.shape) if isinstance(latents, torch.Tensor) else type(latents).__name__
        raise ValueError(f"{name} must be a floating (B, F, C, h, w) tensor, got {shape}")


def predictor_loss(
    predictor: nn.Module,
    latents: torch.Tensor,
    prompt_embeds: torch.Tensor | None = None,
    attention_mask: torch.Tensor | None = None,
    *,
    alpha: float = 0.3,
    lag: int = 1,
    noise_prob: float = 0.5,
    noise_scale: float = 0.3,
    alphas_cumprod: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """MSE(dz_hat, dz) + alpha * (1 - cos(dz_hat, dz)) with dz = z_{i+lag} - z_i on clean latents (B, F, C, h, w).

    The latents are detached (no gradient reaches the VAE or the denoiser). With probability `noise_prob`
    per clip the predictor's input is noised, z + sigma * eps with sigma = sqrt(1 - alphabar_t) * noise_scale
    for a random t; the target dz stays clean. `alphas_cumprod` (T,) is the model's noise schedule
    (tsa.models.noise_level_alphas_cumprod(scheduler)); it is required when noise_prob > 0.
    The cosine is taken per frame pair over (C, h, w). Returns a float32 scalar.
    """
    _check_latents("latents", latents)
    if lag < 1 or latents.shape[1] <= lag:
        raise ValueError(f"latents need more than lag={lag} frames (lag >= 1), got {latents.shape[1]}")
    z = latents.detach().float()
    if prompt_embeds is not None:
        prompt_embeds = prompt_embeds.detach()
    if alphas_cumprod is None:
        if noise_prob > 0:
            raise ValueError("predictor_loss needs the model's noise schedule for its noise augmentation: pass "
                             "alphas_cumprod=tsa.models.noise_level_alphas_cumprod(scheduler), or noise_prob=0")
        alphas_cumprod = torch.ones(1)
    alphas_cumprod = alphas_cumprod.to(device=z.device, dtype=torch.float32)

    batch = z.shape[0]
    t = torch.randint(0, alphas_cumprod.numel(), (batch,), generator=generator, device=z.device)
    noised = torch.rand(batch, generator=generator, device=z.device) < noise_prob
    sigma = (1 - alphas_cumprod[t]).sqrt() * noise_scale * noised
    noise = torch.randn(z.shape, generator=generator, device=z.device)
    z_in = z + sigma[:, None, None, None, None] * noise

    dz = z[:, lag:] - z[:, :-lag]
    dz_hat = predictor(z_in[:, :-lag], prompt_embeds, attention_mask).float()
    cos = F.cosine_similarity(dz_hat.flatten(2), dz.flatten(2), dim=-1)
    return F.mse_loss(dz_hat, dz) + alpha * (1 - cos).mean()


def spatial_drift(latents: torch.Tensor, lag: int) -> torch.Tensor:
    """mu (B, F - lag, C): per-channel spatial mean over (h, w) of z_{i+lag} - z_i for (B, F, C, h, w) latents."""
    return (latents[:, lag:] - latents[:, :-lag]).mean(dim=(-2, -1))


def drift_timestep_weight(timesteps: torch.Tensor, num_train_timesteps: int = 1000) -> torch.Tensor:
    """w = mean_b max(0, 1 - sigma_b^2) with sigma = t / num_train_timesteps (a float32 scalar)."""
    sigma = timesteps.float() / num_train_timesteps
    return (1 - sigma.square()).clamp_min(0).mean()


class MotionDriftLoss(nn.Module):
    """mean_{b,i} ||mu_hat - mu*||^2 / stopgrad(max(||mu*||^2, eps)) between the denoiser's x0 and the clean x0.

    mu = spatial_drift(z, lag). forward(x0_pred (B, F, C, h, w), x0 (B, F, C, h, w)) -> float32 scalar. Only
    x0_pred receives a gradient; `eps` bounds the normaliser on static clips (mu* = 0): 1e-8 as in LaMo's
    released code (earlier versions of this package used 1e-4). With F <= lag there is no frame pair and the
    loss is 0.
    """

    def __init__(self, lag: int = 2, eps: float = 1e-8):
        super().__init__()
        if lag < 1:
            raise ValueError(f"lag must be >= 1, got {lag}")
        if eps <= 0:
            raise ValueError(f"eps must be > 0, got {eps}")
        self.lag = lag
        self.eps = eps

    def forward(self, x0_pred: torch.Tensor, x0: torch.Tensor) -> torch.Tensor:
        _check_latents("x0_pred", x0_pred)
        _check_latents("x0", x0)
        if x0_pred.shape != x0.shape:
            raise ValueError(f"x0_pred {tuple(x0_pred.shape)} and x0 {tuple(x0.shape)} must have the same shape")
        if x0.shape[1] <= self.lag:
            return x0_pred.float().sum() * 0
        mu_hat = spatial_drift(x0_pred.float(), self.lag)
        mu_target = spatial_drift(x0.detach().float(), self.lag)
        scale = mu_target.square().sum(dim=-1).clamp_min(self.eps)
        return ((mu_hat - mu_target).square().sum(dim=-1) / scale).mean()

    def extra_repr(self) -> str:
        return f"lag={self.lag}, eps={self.eps}"
