"""VideoMAE / VideoMAEv2 teacher (transformers VideoMAEModel) and the official VideoMAEv2 checkpoint converter.

Convert the official checkpoint once, e.g. for VideoREPA's input (48 frames at 160 x 240 -> 24 x 10 x 15):

    python -m tsa.teachers.videomae vit_b_k710_dl_from_giant.pth videomaev2-b --num-frames 48 --image-size 160 240
"""

from __future__ import annotations

import math
import pickle
import re
from pathlib import Path

import torch
import torch.nn.functional as F

from tsa.choices import TEACHER_MODEL_TYPES
from tsa.teachers.base import Teacher, check_grid, check_pixels, load_pretrained_model, resize_video

POSITION_TABLE_FILE = "position_table.safetensors"
_IGNORED_KEYS = re.compile(r"^(fc_norm\.|head\.|head_dropout|decoder|encoder_to_decoder|mask_token)")
_BLOCK_KEY = re.compile(r"^blocks\.(\d+)\.(.+)$")
_BLOCK_RENAMES = {
    "norm1": "layernorm_before",
    "norm2": "layernorm_after",
    "attn.proj": "attention.output.dense",
    "mlp.fc1": "intermediate.dense",
    "mlp.fc2": "output.dense",
}
_LAYER_SCALES = {"attn.proj": "gamma_1", "mlp.fc2": "gamma_2"}


def _pair(size) -> tuple[int, int]:
    return (int(size), int(size)) if isinstance(size, int) else tuple(int(s) for s in size)


def config_grid(config) -> tuple[int, int, int]:
    """Token grid (F, H, W) a VideoMAEConfig's position table was built for."""
    height, width = _pair(config.image_size)
    return config.num_frames // config.tubelet_size, height // config.patch_size, width // config.patch_size


def resample_position_table(table: torch.Tensor, source_grid, grid) -> torch.Tensor:
    """Resample a (1, F*H*W, C) position table (frame-major) from `source_grid` to `grid` as VideoREPA does:
    bicubic over (H, W) per temporal slice, then linear over time (both align_corners=False), in float32."""
    if table.shape[1] != math.prod(source_grid):
        raise ValueError(
            f"position table has {table.shape[1]} positions, grid {tuple(source_grid)} needs {math.prod(source_grid)}"
        )
    frames, height, width = source_grid
    channels = table.shape[-1]
    slices = table.float().reshape(frames, height, width, channels).permute(0, 3, 1, 2)  # (F, C, H, W)
    if (height, width) != tuple(grid[1:]):
        slices = F.interpolate(slices, size=tuple(grid[1:]), mode="bicubic", align_corners=False)
    volume = slices.permute(1, 0, 2, 3).unsqueeze(0)  # (1, C, F, H', W')
    if frames != grid[0]:
        volume = F.interpolate(volume, size=tuple(grid), mode="trilinear", align_corners=False)
    return volume[0].permute(1, 2, 3, 0).reshape(1, -1, channels)


def _table_grid(path: Path):
    """The grid recorded in a position_table.safetensors (None for files written before it was recorded)."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as handle:
        grid = (handle.metadata() or {}).get("grid")
    return None if grid is None else tuple(int(size) for size in grid.split(","))


class VideoMAETeacher(Teacher):
    """VideoMAE / VideoMAEv2: the last block's output WITHOUT the final norm, on (T/tubelet, H/p, W/p).

    The features are `model.encoder(model.embeddings(video))`: VideoMAEModel's forward minus the final
    LayerNorm it applies when config.use_mean_pooling is False (pre-training checkpoints).
    Preprocessing is VideoREPA's: (x + 1) / 2, ImageNet mean/std, drop pixel frame 0, plain bicubic resize
    (align_corners=False, no antialiasing, no clamping). The fixed position table is resampled from the grid it
    was built for (`position_grid`, default the config's) to the grid asked for: bicubic in space per temporal
    slice, then linear in time. A converted VideoMAEv2 folder carries its table in `position_table.safetensors`.
    """

    kind = "videomae"
    antialias = False

    def __init__(self, model, position_table: torch.Tensor | None = None, drop_first_frame: bool = True,
                 position_grid: tuple[int, int, int] | None = None):
        config = model.config
        patch = (config.tubelet_size, config.patch_size, config.patch_size)
        super().__init__(model, config.hidden_size, patch, drop_first_frame)
        self.source_grid = config_grid(config)
        self.position_grid = self.source_grid if position_grid is None else tuple(position_grid)
        table = model.embeddings.position_embeddings if position_table is None else position_table
        if tuple(table.shape) != (1, math.prod(self.position_grid), config.hidden_size):
            raise ValueError(
                f"position_table must be (1, {math.prod(self.position_grid)}, {config.hidden_size}) for grid "
                f"{self.position_grid}, got {tuple(table.shape)}"
            )
        self.register_buffer("position_table", table.detach().float().clone(), persistent=False)
        self._installed_grid = None
        self._install(self.source_grid)

    @classmethod
    def from_pretrained(cls, path, drop_first_frame: bool = True) -> VideoMAETeacher:
        from safetensors.torch import load_file

        model = load_pretrained_model("videomae", path, TEACHER_MODEL_TYPES["videomae"])
        table_file = Path(path) / POSITION_TABLE_FILE
        table = grid = None
        if table_file.is_file():
            table, grid = load_file(str(table_file))["position_table"], _table_grid(table_file)
        return cls(model, table, drop_first_frame, grid)

    def default_grid(self, frames: int, height: int, width: int) -> tuple[int, int, int]:
        return self.source_grid

    def input_size(self, grid: tuple[int, int, int]) -> tuple[int, int, int]:
        return tuple(size * patch for size, patch in zip(grid, self.patch_size))

    def preprocess(self, pixels: torch.Tensor, grid: tuple[int, int, int]) -> torch.Tensor:
        # VideoREPA's order: normalise the full clip, drop frame 0, then resize.
        video = self._drop_first_frame(self.normalize(check_pixels(pixels)))
        return resize_video(video, *self.input_size(check_grid(grid)), antialias=False, clamp=False)

    def encode(self, video: torch.Tensor) -> torch.Tensor:
        grid = tuple(size // patch for size, patch in zip((video.shape[1], *video.shape[-2:]), self.patch_size))
        self._install(grid)
        hidden = self.model.encoder(self.model.embeddings(video, None)).last_hidden_state
        return hidden.view(video.shape[0], *grid, self.hidden_size)

    def _install(self, grid: tuple[int, int, int]) -> None:
        # VideoMAEEmbeddings keeps its fixed table and the expected input size as plain attributes.
        if grid == self._installed_grid:
            return
        embeddings = self.model.embeddings
        embeddings.position_embeddings = resample_position_table(self.position_table, self.position_grid, grid)
        embeddings.patch_embeddings.image_size = (grid[1] * self.patch_size[1], grid[2] * self.patch_size[2])
        self._installed_grid = grid


def _official_state_dict(checkpoint, allow_pickle: bool) -> dict[str, torch.Tensor]:
    """The encoder weights of an official checkpoint, with 'model'/'module' nesting and prefixes removed."""
    if isinstance(checkpoint, dict):
        state = checkpoint
    else:
        try:
            state = torch.load(checkpoint, map_location="cpu", weights_only=not allow_pickle)
        except pickle.UnpicklingError as error:
            raise ValueError(
                f"{checkpoint} holds Python objects besides tensors (e.g. training args); if you trust the file, "
                "pass allow_pickle=True (CLI: --allow-pickle)"
            ) from error
    for key in ("model", "module", "state_dict"):
        if key in state and isinstance(state[key], dict):
            state = state[key]
            break
    state = {key.removeprefix("module."): value for key, value in state.items()}
    if any(key.startswith("encoder.") for key in state):  # pre-training checkpoint: encoder + decoder
        state = {key.removeprefix("encoder."): value for key, value in state.items() if key.startswith("encoder.")}
    if "patch_embed.proj.weight" not in state:
        raise ValueError(
            "checkpoint has no 'patch_embed.proj.weight': not an official VideoMAE / VideoMAEv2 ViT checkpoint"
        )
    return state


def _convert_block(layer: int, name: str, value: torch.Tensor, state: dict, out: dict) -> None:
    prefix = f"encoder.layer.{layer}."
    attention = prefix + "attention.attention."
    if name == "attn.qkv.weight":
        query, key, value_w = value.chunk(3)
        out.update({attention + "query.weight": query, attention + "key.weight": key,
                    attention + "value.weight": value_w})
    elif name == "attn.qkv.bias":  # timm-style fused bias; the key bias cancels in the softmax
        query, _, value_b = value.chunk(3)
        out.update({attention + "query.bias": query, attention + "value.bias": value_b})
    elif name in ("attn.q_bias", "attn.v_bias"):
        out[attention + ("query" if name == "attn.q_bias" else "value") + ".bias"] = value
    elif name in ("gamma_1", "gamma_2"):
        return  # layer scale, folded into attn.proj / mlp.fc2 below
    else:
        module, _, param = name.rpartition(".")
        if module not in _BLOCK_RENAMES:
            raise ValueError(f"unsupported key 'blocks.{layer}.{name}' in the VideoMAEv2 checkpoint")
        gamma = state.get(f"blocks.{layer}.{_LAYER_SCALES[module]}") if module in _LAYER_SCALES else None
        if gamma is not None:
            value = value * (gamma[:, None] if param == "weight" else gamma)
        out[prefix + _BLOCK_RENAMES[module] + "." + param] = value


def convert_videomae_v2_checkpoint(
    checkpoint,
    output_dir,
    *,
    num_frames: int = 48,
    image_size: tuple[int, int] = (160, 240),
    source_num_frames: int = 16,
    source_image_size=224,
    num_attention_heads: int | None = None,
    layer_norm_eps: float = 1e-6,
    allow_pickle: bool = False,
) -> Path:
    """Convert an official VideoMAE / VideoMAEv2 ViT checkpoint (.pth, timm-style keys) to a transformers folder.

    checkpoint: path of the .pth (weights possibly under 'model' or 'module'), or its loaded dict.
    The folder holds a VideoMAEModel for `num_frames` frames at `image_size` (H, W) (the teacher's default
    input), and its position table (the checkpoint's `pos_embed`, or the sinusoid table VideoMAEv2 builds for
    `source_num_frames` x `source_image_size`) with that grid recorded, in `position_table.safetensors`; the
    teacher resamples it as VideoREPA does (bicubic in space, then linear in time) to the grid it runs on.
    The checkpoint does not record the head count: it defaults to
    hidden_size / 64 (ViT-S/B/L/H); ViT-g needs num_attention_heads=16. Layer-scale gammas are folded
    into the projections. allow_pickle=True loads a .pth that also pickles Python objects (only for
    files you trust).
    """
    from safetensors.torch import save_file
    from transformers import VideoMAEConfig, VideoMAEModel
    from transformers.models.videomae.modeling_videomae import get_sinusoid_encoding_table

    state = _official_state_dict(checkpoint, allow_pickle)
    patch_weight = state["patch_embed.proj.weight"]
    hidden_size, channels, tubelet, patch, _ = patch_weight.shape
    layers = sorted({int(m.group(1)) for key in state if (m := _BLOCK_KEY.match(key))})
    if layers != list(range(len(layers))) or not layers:
        raise ValueError(f"checkpoint blocks must be numbered 0..L-1, found {layers}")
    weights = {
        "embeddings.patch_embeddings.projection.weight": patch_weight,
        "embeddings.patch_embeddings.projection.bias": state["patch_embed.proj.bias"],
    }
    for key, value in state.items():
        if (match := _BLOCK_KEY.match(key)) is not None:
            _convert_block(int(match.group(1)), match.group(2), value, state, weights)
        elif key in ("norm.weight", "norm.bias"):
            weights["layernorm." + key.split(".")[1]] = value
        elif key not in ("patch_embed.proj.weight", "patch_embed.proj.bias", "pos_embed") and \
                not _IGNORED_KEYS.match(key):
            raise ValueError(f"unsupported key {key!r} in the VideoMAEv2 checkpoint")

    if num_attention_heads is None:
        if hidden_size % 64:
            raise ValueError(
                f"hidden size {hidden_size} is not a multiple of 64: pass num_attention_heads (the checkpoint does "
                "not record it)"
            )
        num_attention_heads = hidden_size // 64
    height, width = _pair(image_size)
    for name, size, step in (("num_frames", num_frames, tubelet), ("image_size[0]", height, patch),
                             ("image_size[1]", width, patch)):
        if size < step or size % step:
            raise ValueError(f"{name}={size} must be a positive multiple of the checkpoint's patch size {step}")
    config = VideoMAEConfig(
        image_size=[height, width], patch_size=patch, num_channels=channels, num_frames=num_frames,
        tubelet_size=tubelet, hidden_size=hidden_size, num_hidden_layers=len(layers),
        num_attention_heads=num_attention_heads,
        intermediate_size=weights["encoder.layer.0.intermediate.dense.weight"].shape[0],
        qv_bias="encoder.layer.0.attention.attention.query.bias" in weights,
        use_mean_pooling="layernorm.weight" not in weights, layer_norm_eps=layer_norm_eps, hidden_act="gelu",
    )
    model = VideoMAEModel(config)
    model.load_state_dict({key: value.float() for key, value in weights.items()}, strict=True)

    source_height, source_width = _pair(source_image_size)
    source_grid = (source_num_frames // tubelet, source_height // patch, source_width // patch)
    table = state.get("pos_embed")
    if table is None:
        table = get_sinusoid_encoding_table(math.prod(source_grid), hidden_size)
    if table.shape[1] != math.prod(source_grid):
        raise ValueError(
            f"position table has {table.shape[1]} positions, grid {source_grid} needs {math.prod(source_grid)}"
        )

    output_dir = Path(output_dir)
    model.save_pretrained(output_dir)
    # The table as built (the teacher resamples it once, to whatever grid it is asked for) and its grid.
    save_file({"position_table": table.float().contiguous()}, str(output_dir / POSITION_TABLE_FILE),
              metadata={"grid": ",".join(str(size) for size in source_grid)})
    return output_dir
