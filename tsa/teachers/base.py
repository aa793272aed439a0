"""Frozen teacher base class: pixel video in [-1, 1] -> features on a token grid."""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from tsa.features import resample_features

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def check_pixels(pixels: torch.Tensor, name: str = "pixels") -> torch.Tensor:
    """Validate a (B, T, 3, H, W) floating pixel video."""
    if not isinstance(pixels, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(pixels).__name__}")
    if pixels.dim() != 5 or pixels.shape[2] != 3:
        raise ValueError(f"{name} must be (B, T, 3, H, W) in [-1, 1], got shape {tuple(pixels.shape)}")
    if not pixels.is_floating_point():
        raise TypeError(f"{name} must be a floating tensor in [-1, 1], got {pixels.dtype}")
    return pixels


def check_grid(grid, name: str = "grid") -> tuple[int, int, int]:
    """Validate a token grid (F, H, W) of positive ints."""
    grid = tuple(grid)
    if len(grid) != 3 or any(isinstance(s, bool) or not isinstance(s, int) or s < 1 for s in grid):
        raise ValueError(f"{name} must be three positive ints (F, H, W), got {grid}")
    return grid


def resize_video(pixels: torch.Tensor, frames: int, height: int, width: int) -> torch.Tensor:
    """Resample a pixel video (B, T, 3, H, W) in [-1, 1] to (B, frames, 3, height, width).

    Time: the frame nearest to each output frame's centre (identity when the count matches).
    Space: bicubic with antialiasing, clamped back to [-1, 1].
    """
    num_frames = pixels.shape[1]
    if frames != num_frames:
        centres = (torch.arange(frames, device=pixels.device) * 2 + 1) * num_frames // (2 * frames)
        pixels = pixels[:, centres]
    if tuple(pixels.shape[-2:]) == (height, width):
        return pixels
    batch, frames = pixels.shape[:2]
    planes = F.interpolate(
        pixels.flatten(0, 1).float(), size=(height, width), mode="bicubic", align_corners=False, antialias=True
    )
    return planes.clamp_(-1.0, 1.0).to(pixels.dtype).view(batch, frames, 3, height, width)


def load_pretrained_model(kind: str, path, model_types: tuple[str, ...]) -> nn.Module:
    """AutoModel.from_pretrained(path) after checking the folder exists and holds one of `model_types`."""
    from transformers import AutoConfig, AutoModel

    folder = Path(path)
    if not folder.is_dir():
        raise FileNotFoundError(f"{kind} teacher path {str(path)!r} does not exist or is not a directory")
    if not (folder / "config.json").is_file():
        raise ValueError(f"{kind} teacher path {str(path)!r} has no config.json: not a transformers model folder")
    model_type = AutoConfig.from_pretrained(folder).model_type
    if model_type not in model_types:
        raise ValueError(
            f"{kind} teacher path {str(path)!r} holds a {model_type!r} model, expected model_type in {model_types}"
        )
    return AutoModel.from_pretrained(folder)


class Teacher(nn.Module):
    """A frozen video foundation model: pixels (B, T, 3, H, W) in [-1, 1] -> features (B, F, H', W', C).

    Always in eval mode, parameters with requires_grad=False, forward under no_grad. Preprocessing:
    drop pixel frame 0 (`drop_first_frame`, matching the projector dropping latent frame 0), resample
    the video to `input_size(grid)` (frame selection + bicubic), map to [0, 1], ImageNet mean/std.
    `grid` defaults to `default_grid(...)`; the output is resampled to `grid` when the model cannot
    produce it directly (V-JEPA 2's square crops).
    Subclasses set `patch_size` (frames, height, width) of one token and implement
    `default_grid`, `input_size` and `encode`.
    """

    kind = "teacher"

    def __init__(self, model: nn.Module, hidden_size: int, patch_size: tuple[int, int, int],
                 drop_first_frame: bool = True):
        super().__init__()
        self.model = model.eval().requires_grad_(False)
        self.hidden_size = int(hidden_size)
        self.patch_size = tuple(int(p) for p in patch_size)
        self.drop_first_frame = drop_first_frame
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 1, 3, 1, 1), persistent=False)

    def train(self, mode: bool = True) -> Teacher:
        return super().train(False)

    def default_grid(self, frames: int, height: int, width: int) -> tuple[int, int, int]:
        """Grid produced for a (frames, height, width) video (after frame dropping) when none is asked for."""
        raise NotImplementedError

    def input_size(self, grid: tuple[int, int, int]) -> tuple[int, int, int]:
        """(frames, height, width) of the model input that produces `grid` (or the model's nearest)."""
        raise NotImplementedError

    def encode(self, video: torch.Tensor) -> torch.Tensor:
        """Normalised model input (B, T, 3, H, W) -> (B, F, H', W', C)."""
        raise NotImplementedError

    def resolve_grid(self, pixels: torch.Tensor, grid: tuple[int, int, int] | None = None) -> tuple[int, int, int]:
        """The grid a call with `grid` produces for `pixels`: `grid` itself, or `default_grid`."""
        if grid is not None:
            return check_grid(grid)
        frames = check_pixels(pixels).shape[1] - int(self.drop_first_frame)
        return self.default_grid(frames, *pixels.shape[-2:])

    def prepare(self, pixels: torch.Tensor, grid: tuple[int, int, int]) -> torch.Tensor:
        """The pixel video (in [-1, 1]) this teacher encodes for `grid`: frame 0 dropped, resampled."""
        pixels = check_pixels(pixels)
        if self.drop_first_frame:
            if pixels.shape[1] < 2:
                raise ValueError(f"pixels need at least 2 frames (frame 0 is dropped), got {pixels.shape[1]}")
            pixels = pixels[:, 1:]
        return resize_video(pixels, *self.input_size(check_grid(grid)))

    @torch.no_grad()
    def forward(self, pixels: torch.Tensor, grid: tuple[int, int, int] | None = None) -> torch.Tensor:
        """pixels (B, T, 3, H, W) in [-1, 1] -> features (B, *grid, hidden_size), detached."""
        grid = self.resolve_grid(pixels, grid)
        video = self.prepare(pixels, grid)
        parameter = next(self.model.parameters())
        video = ((video.to(self.mean.device) + 1) / 2 - self.mean) / self.std
        return resample_features(self.encode(video.to(device=parameter.device, dtype=parameter.dtype)), grid)
