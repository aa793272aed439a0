"""The LaMo motion predictor f_phi(z_t, prompt) -> dz_hat ~ z_{t+1} - z_t (docs/method.md, LaMo)."""

import torch
import torch.nn.functional as F
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from torch import nn

PROMPT_POOLINGS = ("all", "tokens")


def pool_prompt(prompt_embeds: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Mean of (B, L, D) token embeddings over the non-padding tokens of `attention_mask` (B, L) -> (B, D).

    Without a mask every token is pooled; a row with no valid token pools to zeros.
    """
    if attention_mask is None:
        return prompt_embeds.mean(dim=1)
    weights = attention_mask.to(prompt_embeds.dtype).unsqueeze(-1)
    return (prompt_embeds * weights).sum(dim=1) / weights.sum(dim=1).clamp_min(1.0)


class SqueezeExcitation(nn.Module):
    def __init__(self, channels: int, reduction: int = 4):
        super().__init__()
        self.squeeze = nn.Linear(channels, channels // reduction)
        self.excite = nn.Linear(channels // reduction, channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scale = torch.sigmoid(self.excite(F.gelu(self.squeeze(x.mean(dim=(2, 3))))))
        return x * scale[:, :, None, None]


class FiLMResidualBlock(nn.Module):
    """Conv3x3 - GroupNorm - FiLM (1 + gamma) x + beta - GELU - Conv3x3 - GroupNorm - SE - residual - GELU."""

    def __init__(self, channels: int, cond_dim: int, groups: int = 8):
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1)
        self.norm1 = nn.GroupNorm(groups, channels)
        self.film = nn.Linear(cond_dim, 2 * channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1)
        self.norm2 = nn.GroupNorm(groups, channels)
        self.excitation = SqueezeExcitation(channels)
        nn.init.zeros_(self.film.weight)
        nn.init.zeros_(self.film.bias)

    def forward(self, x: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        gamma, beta = self.film(cond)[:, :, None, None].chunk(2, dim=1)
        h = F.gelu(self.norm1(self.conv1(x)) * (1 + gamma) + beta)
        h = self.excitation(self.norm2(self.conv2(h)))
        return F.gelu(x + h)


class MotionPredictor(ModelMixin, ConfigMixin):
    """Per-frame FiLM residual CNN predicting the latent change to the next frame.

    forward(latents (B, F, C, h, w), prompt_embeds (B, L, text_dim) or None, attention_mask (B, L) or None)
    -> dz_hat (B, F, C, h, w). The output convolution and the FiLM layers start at zero, so a fresh
    predictor predicts no motion. `prompt_embeds=None` (or prompt dropout while training) uses the
    learned null-prompt embedding. `prompt_pooling="all"` (LaMo's released code) mean-pools the prompt over
    all L positions, padding included, and ignores `attention_mask`; `"tokens"` pools over the mask's real
    tokens (the paper's text). The choice is saved in the config, so sampling pools as training did.
    """

    @register_to_config
    def __init__(
        self,
        in_channels: int = 16,
        channels: int = 256,
        num_blocks: int = 8,
        cond_dim: int = 128,
        text_dim: int = 4096,
        groups: int = 8,
        prompt_dropout: float = 0.1,
        prompt_pooling: str = "all",
    ):
        super().__init__()
        if prompt_pooling not in PROMPT_POOLINGS:
            raise ValueError(f"prompt_pooling must be one of {PROMPT_POOLINGS}, got {prompt_pooling!r}")
        if channels % groups:
            raise ValueError(f"channels ({channels}) must be divisible by groups ({groups})")
        if channels < 4:
            raise ValueError(f"channels must be >= 4 for the squeeze-excitation, got {channels}")
        if not 0.0 <= prompt_dropout <= 1.0:
            raise ValueError(f"prompt_dropout must be in [0, 1], got {prompt_dropout}")
        self.stem = nn.Conv2d(in_channels, channels, 3, padding=1)
        self.blocks = nn.ModuleList(FiLMResidualBlock(channels, cond_dim, groups) for _ in range(num_blocks))
        self.head = nn.Conv2d(channels, in_channels, 3, padding=1)
        self.text_proj = nn.Linear(text_dim, cond_dim)
        self.null_cond = nn.Parameter(torch.zeros(cond_dim))
        nn.init.zeros_(self.head.weight)
        nn.init.zeros_(self.head.bias)

    def encode_prompt(
        self, prompt_embeds: torch.Tensor | None, attention_mask: torch.Tensor | None, batch_size: int
    ) -> torch.Tensor:
        """(B, L, text_dim) prompt -> (B, cond_dim) conditioning, null embedding where absent or dropped."""
        null = self.null_cond.expand(batch_size, -1)
        if prompt_embeds is None:
            return null
        if prompt_embeds.ndim != 3 or prompt_embeds.shape[0] != batch_size:
            raise ValueError(
                f"prompt_embeds must be (B={batch_size}, L, {self.config.text_dim}), got {tuple(prompt_embeds.shape)}"
            )
        if prompt_embeds.shape[-1] != self.config.text_dim:
            raise ValueError(
                f"prompt_embeds last dim must be text_dim={self.config.text_dim}, got {prompt_embeds.shape[-1]}"
            )
        if attention_mask is not None and attention_mask.shape != prompt_embeds.shape[:2]:
            raise ValueError(
                f"attention_mask must be (B, L) = {tuple(prompt_embeds.shape[:2])}, got {tuple(attention_mask.shape)}"
            )
        mask = attention_mask if self.config.prompt_pooling == "tokens" else None
        pooled = pool_prompt(prompt_embeds.to(self.null_cond.dtype), mask)
        cond = F.gelu(self.text_proj(pooled))
        if self.training and self.config.prompt_dropout > 0:
            dropped = torch.rand(batch_size, 1, device=cond.device) < self.config.prompt_dropout
            cond = torch.where(dropped, null, cond)
        return cond

    def forward(
        self,
        latents: torch.Tensor,
        prompt_embeds: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        if latents.ndim != 5 or latents.shape[2] != self.config.in_channels:
            raise ValueError(
                f"latents must be (B, F, {self.config.in_channels}, h, w), got {tuple(latents.shape)}"
            )
        batch, frames = latents.shape[:2]
        cond = self.encode_prompt(prompt_embeds, attention_mask, batch).repeat_interleave(frames, dim=0)
        h = F.gelu(self.stem(latents.flatten(0, 1).to(self.null_cond.dtype)))
        for block in self.blocks:
            h = block(h, cond)
        return self.head(h).unflatten(0, (batch, frames))
