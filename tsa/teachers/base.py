"""Frozen teacher base class: pixel video in [-1, 1] -> features on a token grid."""

from __future__ import annotations

import contextlib
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


def resize_video(pixels: torch.Tensor, frames: int, height: int, width: int, *, mode: str = "bicubic",
                 antialias: bool = True, clamp: bool = True) -> torch.Tensor:
    """Resample a pixel video (B, T, 3, H, W) in [-1, 1] to (B, frames, 3, height, width).

    Time: the frame nearest to each output frame's centre (identity when the count matches).
    Space: `F.interpolate` with `mode` (align_corners=False) and `antialias`; `clamp` clips the result back to
    [-1, 1] (what an image processor resizing uint8 frames does). VideoREPA's teacher input is
    `antialias=False, clamp=False`; the defaults are DINOv2's processor (bicubic, antialiased, uint8).
    """
    num_frames = pixels.shape[1]
    if frames != num_frames:
        centres = (torch.arange(frames, device=pixels.device) * 2 + 1) * num_frames // (2 * frames)
        pixels = pixels[:, centres]
    if tuple(pixels.shape[-2:]) == (height, width):
        return pixels
    batch, frames = pixels.shape[:2]
    planes = F.interpolate(pixels.flatten(0, 1).float(), size=(height, width), mode=mode, align_corners=False,
                           antialias=antialias)
    if clamp:
        planes = planes.clamp_(-1.0, 1.0)
    return planes.to(pixels.dtype).view(batch, frames, 3, height, width)


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

    Always in eval mode, parameters with requires_grad=False, forward under no_grad; a float32 teacher (the
    default of `load_teacher`) also runs with autocast disabled, so mixed-precision training leaves it in fp32.
    Preprocessing (`preprocess`): drop pixel frame 0 (`drop_first_frame`, matching the projector dropping
    latent frame 0), resample the video to `input_size(grid)` (frame selection + `resize_mode`, antialiased and
    clamped when `antialias`, as the model's image processor does), map to [0, 1], ImageNet mean/std.
    `grid` defaults to `default_grid(...)`; the output is resampled to `grid` when the model cannot
    produce it directly (V-JEPA 2's square crops).
    Subclasses set `patch_size` (frames, height, width) of one token and implement
    `default_grid`, `input_size` and `encode`.
    """

    kind = "teacher"
    resize_mode = "bicubic"
    antialias = True

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

    def _drop_first_frame(self, pixels: torch.Tensor) -> torch.Tensor:
        if not self.drop_first_frame:
            return pixels
        if pixels.shape[1] < 2:
            raise ValueError(f"pixels need at least 2 frames (frame 0 is dropped), got {pixels.shape[1]}")
        return pixels[:, 1:]

    def prepare(self, pixels: torch.Tensor, grid: tuple[int, int, int]) -> torch.Tensor:
        """The pixel video (in [-1, 1]) this teacher encodes for `grid`: frame 0 dropped, resampled."""
        pixels = self._drop_first_frame(check_pixels(pixels))
        return resize_video(pixels, *self.input_size(check_grid(grid)), mode=self.resize_mode,
                            antialias=self.antialias, clamp=self.antialias)

    def normalize(self, video: torch.Tensor) -> torch.Tensor:
        """[-1, 1] -> [0, 1] -> ImageNet mean/std, in float32."""
        return ((video.to(self.mean.device, torch.float32) + 1) / 2 - self.mean) / self.std

    def preprocess(self, pixels: torch.Tensor, grid: tuple[int, int, int]) -> torch.Tensor:
        """The normalised float32 model input (B, T', 3, H', W') for `grid`: resized, then normalised (the
        order of an image processor)."""
        return self.normalize(self.prepare(pixels, grid))

    @torch.no_grad()
    def forward(self, pixels: torch.Tensor, grid: tuple[int, int, int] | None = None) -> torch.Tensor:
        """pixels (B, T, 3, H, W) in [-1, 1] -> features (B, *grid, hidden_size), detached."""
        grid = self.resolve_grid(pixels, grid)
        parameter = next(self.model.parameters())
        video = self.preprocess(pixels, grid).to(device=parameter.device, dtype=parameter.dtype)
        full_precision = parameter.dtype == torch.float32
        with torch.autocast(parameter.device.type, enabled=False) if full_precision else contextlib.nullcontext():
            features = self.encode(video)
        return resample_features(features, grid)
