"""The training objective: the model family's diffusion loss + weight * alignment loss (TSA, M-TSA, TRD or REPA)."""

from __future__ import annotations

import contextlib

import torch
from torch import nn

from tsa import alignment, sharding
from tsa.features import BlockFeatureCapture, resample_features
from tsa.losses import tubelet_for_grid
from tsa.masks import motion_query_mask
from tsa.models import family_of
from tsa.projector import AlignmentProjector
from tsa.teachers.base import Teacher, resize_video


class AlignmentObjective(nn.Module):
    """Holds the transformer and the projector (trainable) and a frozen teacher; returns every loss term.

    forward(latents (B, F, C, h, w) clean latents, normalised as the family's pipeline does (CogVideoX: times
    the VAE scaling factor; Wan: (z - latents_mean) / latents_std), prompt_embeds (B, L, D), pixels (B, T, 3, H, W)
    in [-1, 1] or None (only for align="none"), timesteps=None, noise=None, generator=None) -> dict:
    "loss" = "diffusion" + weight * "align" ("align" is a zero tensor for align="none"), "x0_pred"
    (B, F, C, h, w), "x0" (the clean latents), "timesteps" (B,).

    Grids: the block-`block_index` features (B, F, H, W, C) are projected (`AlignmentProjector`, mode
    `grid`); the teacher is asked for `projector.teacher_grid` (24x10x15 for 13x30x45) and resizes its
    input to produce it, then its features are resampled to the projector's output grid (a no-op in
    "teacher-grid" mode, an upsampling in "native" mode). M-TSA's motion mask is computed on the pixel
    video (frame 0 dropped) resized to that grid times the teacher's patch size.

    The model family (tsa.models; found from the transformer's class unless `family` is given) owns the diffusion
    objective (CogVideoX: v-prediction, Wan: rectified flow), the blocks and the token grid. `scheduler` is the
    model's own training schedule and is required (e.g. `family.load_scheduler(model_path)`). `block_index`
    None takes the family's default (CogVideoX: 18, Wan: the block at 60% depth). The alignment method's options
    (tau ... backend, or those of a method added with tsa.alignment.register_alignment, as keywords) go to its
    loss.

    Context parallelism (`shard_tokens(group)`, after the transformer's `enable_parallelism`): the block features
    are this rank's token slice; the projector's MLP runs on it, the teacher features and the motion mask are cut
    the same way, and the loss is the global one on every rank (docs/distributed.md).

    The teacher is kept outside the module tree: `parameters()`, `state_dict()`, DDP and optimizers
    only see the transformer and the projector; it follows the transformer's device on first use.
    """

    def __init__(
        self,
        transformer: nn.Module,
        scheduler=None,
        teacher: Teacher | None = None,
        *,
        align: str = "mtsa",
        weight: float = 0.5,
        block_index: int | None = None,
        grid: str = "teacher-grid",
        projector: AlignmentProjector | None = None,
        projector_hidden_dim: int = 2048,
        tau: float = 0.1,
        tau_teacher: float | None = None,
        top_k: float = 0.2,
        trd_margin: float = 0.1,
        trd_variant: str = "full",
        backend: str = "auto",
        family=None,
        **method_options,
    ):
        super().__init__()
        if align not in alignment.alignment_losses():
            raise ValueError(f"align must be one of {alignment.alignment_losses()}, got {align!r}")
        method = alignment.ALIGNMENT_METHODS.get(align)
        unknown = sorted(set(method_options) - set(alignment.alignment_options()))
        if unknown:
            raise TypeError(f"AlignmentObjective got unknown options {unknown} (no registered alignment method takes "
                            "them)")
        options = dict(tau=tau, tau_teacher=tau_teacher, top_k=top_k, trd_margin=trd_margin, trd_variant=trd_variant,
                       backend=backend, **method_options)
        if method is not None:
            method.check(options)
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) or weight < 0:
            raise ValueError(f"weight must be a non-negative number, got {weight!r}")
        self.family = family_of(transformer) if family is None else family
        module = self.family.unwrap(transformer)
        self.family.check_scheduler(scheduler)
        if block_index is None:
            block_index = self.family.default_align_layer(len(self.family.blocks(module)))
        self.transformer = transformer
        self.scheduler = scheduler
        self.align, self.weight, self.block_index = align, float(weight), block_index
        self.projector = self.alignment_loss = self.method = None
        self.token_shard = None
        self._gather_group = None
        self._teacher = (None,)  # a tuple hides the frozen teacher from the module tree
        if align == "none":
            return
        if not isinstance(teacher, Teacher):
            raise ValueError(f"align={align!r} needs a frozen teacher (tsa.teachers.load_teacher), got {teacher!r}")
        BlockFeatureCapture(transformer, block_index, self.family)  # validates the block index now
        width = self.family.width(module.config)
        if projector is None:
            projector = AlignmentProjector(width, teacher.hidden_size, projector_hidden_dim, grid)
        if projector.in_dim != width:
            raise ValueError(f"projector.in_dim={projector.in_dim} must equal the transformer width {width}")
        if method.teacher_channels and projector.out_dim != teacher.hidden_size:
            raise ValueError(
                f"{align} compares tokens channel by channel: projector.out_dim={projector.out_dim} must equal the "
                f"teacher's hidden size {teacher.hidden_size}"
            )
        self.projector = projector
        self.method = method
        self.alignment_loss = method.build(**{option.name: options.get(option.name, option.default)
                                              for option in method.options})
        self._teacher = (teacher,)

    @property
    def teacher(self) -> Teacher | None:
        return self._teacher[0]

    def shard_tokens(self, process_group) -> None:
        """Compute the alignment on this rank's token slice of a context-parallel group (the transformer runs
        under diffusers' context parallelism over the same group)."""
        if self.method is not None and not self.method.token_sharding:
            raise ValueError(f"align={self.align!r} has no context-parallel (token-sharded) form")
        self.token_shard = sharding.TokenShard.of(process_group)

    @contextlib.contextmanager
    def gathered_tokens(self):
        """Within: the block features are gathered whole on every rank of the context-parallel group and the
        alignment runs as on one process (for inspection, e.g. --viz-steps; call the objective on every rank)."""
        shard, self.token_shard = self.token_shard, None
        self._gather_group = None if shard is None else shard.group
        try:
            yield self
        finally:
            self.token_shard, self._gather_group = shard, None

    def save_projector(self, path) -> None:
        """Save the projector with save_pretrained (reload with AlignmentProjector.from_pretrained)."""
        if self.projector is None:
            raise ValueError("align='none' has no projector to save")
        self.projector.save_pretrained(path)

    def forward(
        self,
        latents: torch.Tensor,
        prompt_embeds: torch.Tensor,
        pixels: torch.Tensor | None = None,
        *,
        timesteps: torch.Tensor | None = None,
        noise: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
        condition: dict[str, torch.Tensor] | None = None,
    ) -> dict[str, torch.Tensor]:
        """`condition`: an image-to-video model's first-frame condition (ModelFamily.image_condition)."""
        self._check_inputs(latents, prompt_embeds, pixels)
        step = dict(timesteps=timesteps, noise=noise, generator=generator, **(condition or {}))
        if self.align == "none":
            out = self.family.denoise_and_loss(self.transformer, self.scheduler, latents, prompt_embeds, **step)
            align = out["loss"].new_zeros(())
        else:
            local = self.token_shard is not None
            with BlockFeatureCapture(self.transformer, self.block_index, self.family, local=local,
                                     gather_group=self._gather_group) as capture:
                out = self.family.denoise_and_loss(self.transformer, self.scheduler, latents, prompt_embeds, **step)
            if local:
                align = self._sharded_alignment(capture.features, capture.grid, pixels)
            else:
                align = self._alignment(capture.features, pixels)
        return {
            "loss": out["loss"] + self.weight * align,
            "diffusion": out["loss"],
            "align": align,
            "x0_pred": out["x0_pred"],
            "x0": latents,
            "timesteps": out["timesteps"],
        }

    def _alignment(self, features: torch.Tensor, pixels: torch.Tensor) -> torch.Tensor:
        teacher, pixels = self.teacher, pixels.to(features.device)
        if teacher.mean.device != features.device:
            teacher.to(features.device)
        dit_grid = tuple(features.shape[1:4])
        student = self.projector(features)
        grid = tuple(student.shape[1:4])
        target = resample_features(teacher(pixels, grid=self.projector.teacher_grid(dit_grid)), grid)
        if not self.method.motion_mask:
            return self.alignment_loss(student, target)
        size = [cells * patch for cells, patch in zip(grid, teacher.patch_size)]
        video = resize_video(pixels[:, int(teacher.drop_first_frame):], *size)
        return self.alignment_loss(student, target, video=video)

    def _sharded_alignment(self, tokens: torch.Tensor, dit_grid: tuple[int, int, int], pixels) -> torch.Tensor:
        """The alignment loss from this rank's (B, n, C) slice of the block's tokens (grid `dit_grid` whole)."""
        shard, teacher, projector = self.token_shard, self.teacher, self.projector
        pixels = pixels.to(tokens.device)
        if teacher.mean.device != tokens.device:
            teacher.to(tokens.device)
        start, stop = shard.equal_bounds(sharding.token_count(dit_grid))
        if tokens.shape[1] != stop - start:
            raise RuntimeError(f"block {self.block_index} returned {tokens.shape[1]} tokens on context-parallel rank "
                               f"{shard.rank}, expected {stop - start} of {dit_grid}")
        grid = projector.output_grid(dit_grid)
        frame = dit_grid[1] * dit_grid[2]
        dropped = frame * int(projector.drop_first_frame)
        if projector.downsample is None:
            # Token-wise all the way: the kept tokens of the local slice are the local slice of the output.
            out_start, out_stop = max(start, dropped) - dropped, stop - dropped
            student = projector.project(tokens[:, max(dropped - start, 0):])
        else:
            # The resampler mixes frames: gather the projected tokens, resample, keep this rank's output slice.
            full = sharding.gather_tokens(projector.project(tokens), shard)
            full = full.view(full.shape[0], *dit_grid, full.shape[-1])[:, int(projector.drop_first_frame):]
            out_start, out_stop = shard.split_bounds(sharding.token_count(grid))
            student = projector.resample(full).flatten(1, 3)[:, out_start:out_stop]
        target = resample_features(teacher(pixels, grid=projector.teacher_grid(dit_grid)), grid)
        target = target.flatten(1, 3)[:, out_start:out_stop]
        options = dict(frames=grid[0], process_group=shard.group)
        if self.method.motion_mask:
            size = [cells * patch for cells, patch in zip(grid, teacher.patch_size)]
            video = resize_video(pixels[:, int(teacher.drop_first_frame):], *size)
            mask = motion_query_mask(video, tubelet_for_grid(video, grid), self.alignment_loss.top_k)
            options["query_mask"] = mask[:, out_start:out_stop]
        return self.alignment_loss(student, target, **options)

    def _check_inputs(self, latents, prompt_embeds, pixels) -> None:
        if not isinstance(latents, torch.Tensor) or latents.dim() != 5:
            raise ValueError(f"latents must be (B, F, C, h, w), got {getattr(latents, 'shape', type(latents))}")
        if not isinstance(prompt_embeds, torch.Tensor) or prompt_embeds.dim() != 3 or \
                prompt_embeds.shape[0] != latents.shape[0]:
            raise ValueError(
                f"prompt_embeds must be (B={latents.shape[0]}, L, D), got "
                f"{getattr(prompt_embeds, 'shape', type(prompt_embeds))}"
            )
        self.family.check_latents(self.family.unwrap(self.transformer).config, latents)
        if self.align == "none":
            return
        if pixels is None:
            raise ValueError(f"align={self.align!r} needs the pixel video (B, T, 3, H, W) in [-1, 1] for the teacher")
        if pixels.dim() != 5 or pixels.shape[0] != latents.shape[0]:
            raise ValueError(
                f"pixels must be (B={latents.shape[0]}, T, 3, H, W), got {getattr(pixels, 'shape', type(pixels))}"
            )
