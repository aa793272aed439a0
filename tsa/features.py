"""Student features: the video tokens of one transformer block of any supported family, taken with forward hooks."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def unwrap_transformer(model: torch.nn.Module) -> torch.nn.Module:
    """The diffusers video transformer inside DDP / peft / torch.compile wrappers."""
    from tsa.models import unwrap_transformer as unwrap

    return unwrap(model)


def token_grid(config, latent_shape: tuple[int, ...]) -> tuple[int, int, int]:
    """(F, H, W) token grid of a transformer (its config, with `_class_name`) for latents of shape (B, F, C, h, w),
    as its family reads it."""
    from tsa.models import family_of

    return family_of(config).token_grid(config, latent_shape)


class BlockFeatureCapture:
    """Captures the video-token output of block `block_index` (1-based) of a video transformer.

    Use as a context manager around the transformer call; afterwards `.features` is (B, F, H, W, C) on
    the transformer's token grid and still attached to the autograd graph. The model family (tsa.models, found
    from the transformer's class unless given) says which modules are the blocks and how their outputs map to
    the grid. Works with diffusers' gradient checkpointing (the default, non-reentrant one) and with peft LoRA
    adapters: only forward hooks are used, the model's forward is untouched.

        with BlockFeatureCapture(transformer, 18) as capture:
            out = transformer(hidden_states=latents, encoder_hidden_states=prompt_embeds, timestep=t)
        feats = capture.features

    With `local=True` (context parallelism: the block outputs a contiguous slice of the frame-major tokens on
    each rank), `.features` is that slice as it comes, (B, n, C), and `.grid` the whole sequence's (F, H, W);
    with `gather_group` (that group) the slices are gathered into the whole (B, F, H, W, C) on every rank.
    """

    def __init__(self, transformer: torch.nn.Module, block_index: int = 18, family=None, *, local: bool = False,
                 gather_group=None):
        from tsa.models import family_of

        self.family = family_of(transformer) if family is None else family
        self.model = self.family.unwrap(transformer)
        blocks = self.family.blocks(self.model)
        num_blocks = len(blocks)
        if isinstance(block_index, bool) or not isinstance(block_index, int) or not 1 <= block_index <= num_blocks:
            raise ValueError(
                f"block_index must be an int in [1, {num_blocks}] (the transformer has {num_blocks} blocks; "
                f"the index is 1-based), got {block_index!r}"
            )
        self.block_index = block_index
        self._block = blocks[block_index - 1]
        self._handles: list = []
        self._grid: tuple[int, int, int] | None = None
        self._grad_enabled = False
        self._features: torch.Tensor | None = None
        self.local, self.gather_group = local, gather_group
        self.grid: tuple[int, int, int] | None = None

    def __enter__(self) -> BlockFeatureCapture:
        self._features = None
        self._handles = [
            self.model.register_forward_pre_hook(self._on_transformer_call, with_kwargs=True),
            self._block.register_forward_hook(self._on_block_output),
        ]
        return self

    def __exit__(self, *exc) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    @property
    def features(self) -> torch.Tensor:
        """(B, F, H, W, C) video tokens of the hooked block from the last transformer call ((B, n, C) local)."""
        if self._features is None:
            raise RuntimeError(
                "BlockFeatureCapture has no features: call the transformer inside the `with` block first"
            )
        return self._features

    def _on_transformer_call(self, module, args, kwargs) -> None:
        latents = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
        self._grid = self.family.transformer_input_grid(module.config, tuple(latents.shape), kwargs)
        self._grad_enabled = torch.is_grad_enabled()

    def _on_block_output(self, module, args, output) -> None:
        # Armed once per transformer call: the re-run of the block during a checkpointed backward is ignored.
        if self._grid is None:
            return
        if self._grad_enabled and not torch.is_grad_enabled():
            raise RuntimeError(
                "block output computed without autograd: reentrant gradient checkpointing is not supported; use "
                "diffusers' default `transformer.enable_gradient_checkpointing()` (non-reentrant)"
            )
        self.grid = self._grid
        if self.local:
            self._features = output[0] if isinstance(output, tuple) else output
            self._grid = None
            return
        if self.gather_group is not None:
            from tsa.sharding import gather_replicated

            hidden_states = output[0] if isinstance(output, tuple) else output
            output = gather_replicated(hidden_states, self.gather_group)
        try:
            self._features = self.family.video_tokens(output, self._grid)
        except RuntimeError as error:
            raise RuntimeError(f"block {self.block_index}: {error}") from None
        self._grid = None


def resample_features(features: torch.Tensor, grid: tuple[int, int, int]) -> torch.Tensor:
    """Trilinear resampling of (B, F, H, W, C) features to (B, *grid, C); identity when the grid matches."""
    grid = tuple(int(size) for size in grid)
    if len(grid) != 3 or min(grid) < 1:
        raise ValueError(f"grid must be three positive sizes (F, H, W), got {grid}")
    if tuple(features.shape[1:4]) == grid:
        return features
    volume = features.permute(0, 4, 1, 2, 3)
    volume = F.interpolate(volume, size=grid, mode="trilinear", align_corners=False)
    return volume.permute(0, 2, 3, 4, 1)
