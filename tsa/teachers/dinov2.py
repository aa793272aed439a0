"""DINOv2 teacher (transformers Dinov2Model / Dinov2WithRegistersModel), applied frame by frame."""

from __future__ import annotations

import torch

from tsa.choices import TEACHER_MODEL_TYPES
from tsa.teachers.base import Teacher, load_pretrained_model


class Dinov2Teacher(Teacher):
    """DINOv2 patch tokens per frame (CLS and register tokens dropped): (B, T, H/p, W/p, C).

    last_hidden_state is the model's output after its final LayerNorm (the features DINOv2 and REPA
    use). One token per frame: for a grid (F, H, W) the video is resampled to F frames of
    (H*p, W*p) pixels; DINOv2 interpolates its position embeddings to any size. Resizing follows its image
    processor (bicubic, antialiased, clamped, ImageNet mean/std), without the centre crop.
    """

    kind = "dinov2"

    def __init__(self, model, drop_first_frame: bool = True):
        config = model.config
        super().__init__(model, config.hidden_size, (1, config.patch_size, config.patch_size), drop_first_frame)
        self.num_prefix_tokens = 1 + getattr(config, "num_register_tokens", 0)

    @classmethod
    def from_pretrained(cls, path, drop_first_frame: bool = True) -> Dinov2Teacher:
        return cls(load_pretrained_model("dinov2", path, TEACHER_MODEL_TYPES["dinov2"]), drop_first_frame)

    def default_grid(self, frames: int, height: int, width: int) -> tuple[int, int, int]:
        patch = self.patch_size[1]
        return frames, max(1, height // patch), max(1, width // patch)

    def input_size(self, grid: tuple[int, int, int]) -> tuple[int, int, int]:
        return grid[0], grid[1] * self.patch_size[1], grid[2] * self.patch_size[2]

    def encode(self, video: torch.Tensor) -> torch.Tensor:
        batch, frames, _, height, width = video.shape
        tokens = self.model(pixel_values=video.flatten(0, 1)).last_hidden_state[:, self.num_prefix_tokens:]
        grid = (height // self.patch_size[1], width // self.patch_size[2])
        return tokens.reshape(batch, frames, *grid, self.hidden_size)
