"""Trainable projector from DiT block features to the teacher's feature space and token grid (docs/method.md)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from torch import nn

from tsa.choices import GRID_MODES


class AlignmentProjector(ModelMixin, ConfigMixin):
    """MLP Linear(in, hidden) - SiLU - Linear(hidden, hidden) - SiLU - Linear(hidden, out), then a grid resampler.

    Input (B, F, H, W, in_dim) on the DiT token grid. Latent frame 0 (the lone first pixel frame of
    CogVideoX's causal VAE) is dropped in both modes (`drop_first_frame`), then:
    - "teacher-grid" (VideoREPA / TSA): trilinear x`temporal_scale` in time, per-frame
      Conv2d(out, out, k=s, stride=s) with s = `spatial_stride`. 13x30x45 -> 24x10x15 with the defaults.
    - "native": the DiT grid is kept (13x30x45 -> 12x30x45); the teacher features are resampled up
      to it instead (see `teacher_grid` and `tsa.features.resample_features`).
    Output (B, F', H', W', out_dim), F'/H'/W' given by `output_grid`. A diffusers ModelMixin:
    save_pretrained / from_pretrained.
    """

    @register_to_config
    def __init__(
        self,
        in_dim: int,
        out_dim: int = 768,
        hidden_dim: int = 2048,
        grid: str = "teacher-grid",
        *,
        temporal_scale: int = 2,
        spatial_stride: int = 3,
        drop_first_frame: bool = True,
    ):
        super().__init__()
        if grid not in GRID_MODES:
            raise ValueError(f"grid must be one of {GRID_MODES}, got {grid!r}")
        for name, value in (("in_dim", in_dim), ("out_dim", out_dim), ("hidden_dim", hidden_dim),
                            ("temporal_scale", temporal_scale), ("spatial_stride", spatial_stride)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        self.grid = grid
        self.in_dim, self.out_dim = in_dim, out_dim
        self.temporal_scale, self.spatial_stride = temporal_scale, spatial_stride
        self.drop_first_frame = drop_first_frame
        self.mlp = nn.Sequential(
            nn.Linear(in_dim, hidden_dim), nn.SiLU(),
            nn.Linear(hidden_dim, hidden_dim), nn.SiLU(),
            nn.Linear(hidden_dim, out_dim),
        )
        self.downsample = (
            nn.Conv2d(out_dim, out_dim, kernel_size=spatial_stride, stride=spatial_stride)
            if grid == "teacher-grid" else None
        )

    def teacher_grid(self, dit_grid: tuple[int, int, int]) -> tuple[int, int, int]:
        """The grid the teacher is run at for a DiT token grid (F, H, W): ((F-1)*scale, H//stride, W//stride)."""
        frames, height, width = self._kept_grid(dit_grid)
        grid = (frames * self.temporal_scale, height // self.spatial_stride, width // self.spatial_stride)
        if min(grid) < 1:
            raise ValueError(
                f"DiT token grid {tuple(dit_grid)} is too small for spatial_stride={self.spatial_stride}: "
                f"the teacher grid would be {grid}"
            )
        return grid

    def output_grid(self, dit_grid: tuple[int, int, int]) -> tuple[int, int, int]:
        """The grid of this projector's output for a DiT token grid (F, H, W)."""
        return self.teacher_grid(dit_grid) if self.grid == "teacher-grid" else self._kept_grid(dit_grid)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """(B, F, H, W, in_dim) -> (B, F', H', W', out_dim)."""
        if features.dim() != 5 or features.shape[-1] != self.in_dim:
            raise ValueError(
                f"features must be (B, F, H, W, {self.in_dim}), got shape {tuple(features.shape)}"
            )
        self.output_grid(tuple(features.shape[1:4]))  # raises for a grid too small for this projector
        if self.drop_first_frame:
            features = features[:, 1:]
        return self.resample(self.project(features))

    def project(self, tokens: torch.Tensor) -> torch.Tensor:
        """The token-wise MLP: (..., in_dim) -> (..., out_dim); runs on a context-parallel token slice as is."""
        return self.mlp(tokens.to(self.mlp[0].weight.dtype))

    def resample(self, projected: torch.Tensor) -> torch.Tensor:
        """The grid resampler on projected features (B, F, H, W, out_dim) whose latent frame 0 is already dropped:
        identity in "native" mode, trilinear in time and the strided Conv2d per frame in "teacher-grid" mode."""
        if self.downsample is None:
            return projected
        batch, frames, height, width, channels = projected.shape
        volume = F.interpolate(
            projected.permute(0, 4, 1, 2, 3), scale_factor=(self.temporal_scale, 1, 1), mode="trilinear",
            align_corners=False,
        )
        frames = volume.shape[2]
        planes = volume.transpose(1, 2).reshape(batch * frames, channels, height, width)
        planes = self.downsample(planes)
        return planes.view(batch, frames, channels, *planes.shape[-2:]).permute(0, 1, 3, 4, 2)

    def _kept_grid(self, dit_grid: tuple[int, int, int]) -> tuple[int, int, int]:
        frames, height, width = (int(size) for size in dit_grid)
        kept = frames - int(self.drop_first_frame)
        if kept < 1:
            raise ValueError(
                f"DiT token grid {tuple(dit_grid)} has {frames} frame(s): at least {1 + int(self.drop_first_frame)} "
                "needed (latent frame 0 is dropped)"
            )
        return kept, height, width
