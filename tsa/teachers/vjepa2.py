"""V-JEPA 2 teacher (transformers VJEPA2Model, encoder only)."""

from __future__ import annotations

import torch

from tsa.choices import TEACHER_MODEL_TYPES
from tsa.teachers.base import Teacher, load_pretrained_model


class VJEPA2Teacher(Teacher):
    """V-JEPA 2 encoder output (after its final LayerNorm; the predictor is skipped).

    Its 3D RoPE assumes square frames of config.crop_size, so the video is resampled to
    (F * tubelet, crop, crop) and the (F, crop/p, crop/p) features are resampled to the grid asked for.
    Resizing follows VJEPA2VideoProcessor (bilinear, antialiased, clamped, ImageNet mean/std), but the whole
    frame is squeezed to the square instead of centre-cropped, so every teacher token has a student token.
    """

    kind = "vjepa2"
    resize_mode = "bilinear"  # VJEPA2VideoProcessor: bilinear, antialiased, on uint8 frames

    def __init__(self, model, drop_first_frame: bool = True):
        config = model.config
        super().__init__(model, config.hidden_size, (config.tubelet_size, config.patch_size, config.patch_size),
                         drop_first_frame)
        self.crop_size = config.crop_size

    @classmethod
    def from_pretrained(cls, path, drop_first_frame: bool = True) -> VJEPA2Teacher:
        return cls(load_pretrained_model("vjepa2", path, TEACHER_MODEL_TYPES["vjepa2"]), drop_first_frame)

    def default_grid(self, frames: int, height: int, width: int) -> tuple[int, int, int]:
        side = self.crop_size // self.patch_size[1]
        return max(1, frames // self.patch_size[0]), side, side

    def input_size(self, grid: tuple[int, int, int]) -> tuple[int, int, int]:
        return grid[0] * self.patch_size[0], self.crop_size, self.crop_size

    def encode(self, video: torch.Tensor) -> torch.Tensor:
        side = self.crop_size // self.patch_size[1]
        hidden = self.model(pixel_values_videos=video, skip_predictor=True).last_hidden_state
        return hidden.reshape(video.shape[0], video.shape[1] // self.patch_size[0], side, side, self.hidden_size)
