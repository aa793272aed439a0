"""`tsa-train --viz-steps N`: the correspondence maps of a fixed probe clip during training."""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

import torch

from tsa.viz.maps import (
    DEFAULT_TIMESTEP,
    alignment_statistics,
    clip_alignment,
    correspondence_maps,
    default_columns,
    select_queries,
)
from tsa.viz.plots import figure_to_array, plot_correspondences


def probe_batch(entry: dict, family, vae_config: dict) -> dict:
    """A one-clip batch from a latent-cache entry (latent_dist (2C, F, h, w), prompt_embeds (L, D), pixels
    (T, 3, H, W)): the latent distribution's mode, normalised by the model family as in training, as
    (1, F, C, h, w), and an image-to-video model's first-frame condition (ModelFamily.image_condition)."""
    latents = family.latents_from_distribution(entry["latent_dist"][None], vae_config, sample=False)
    condition = family.image_condition({key: value[None] for key, value in entry.items()}, vae_config, latents)
    return {
        "latents": latents,
        "prompt_embeds": entry["prompt_embeds"][None],
        "pixels": entry["pixels"][None].float(),
        **{f"condition.{key}": value for key, value in condition.items()},
    }


def batch_to(batch: dict, device, dtype) -> dict:
    """Latents and prompt in `dtype` on `device`; the pixels stay float32 for the teacher, as in training."""
    return {name: value.to(device, torch.float32 if name == "pixels" else dtype) for name, value in batch.items()}


def temperatures(objective, tau: float | None = None) -> tuple[float, float]:
    """(tau_student, tau_teacher): `tau` for both if given, else the objective's TSA temperatures (0.1 for TRD/REPA)."""
    if tau is not None:
        return tau, tau
    loss = objective.alignment_loss
    return getattr(loss, "tau", 0.1), getattr(loss, "tau_teacher", getattr(loss, "tau", 0.1))


class TrainingViz:
    """`tsa-train --viz-steps N`: every N steps, the correspondence maps of a fixed probe clip (the dataset's
    first) to OUTPUT_DIR/viz/step-XXXXXX.png and TensorBoard, and scalars (mean entropy of P_t and P_s over
    the loss's queries, the per-frame KL profile, M-TSA mask coverage) to the trackers and viz/stats.jsonl.

    Runs on the main process with the unwrapped objective under no_grad (nothing collective), so it needs the
    full weights on that process: refused under FSDP and DeepSpeed ZeRO-3.
    """

    def __init__(
        self,
        accelerator,
        dataset,
        output_dir,
        family,
        vae_config: dict,
        dtype=torch.float32,
        *,
        timestep: int = DEFAULT_TIMESTEP,
    ):
        from accelerate.utils import DistributedType

        sharded = accelerator.distributed_type == DistributedType.FSDP or (
            accelerator.distributed_type == DistributedType.DEEPSPEED
            and accelerator.state.deepspeed_plugin.zero_stage == 3
        )
        if sharded:
            raise ValueError(
                "--viz-steps needs the full weights on the main process: not supported under FSDP or "
                "DeepSpeed ZeRO-3 (run tsa-viz on a saved run instead)"
            )
        self.accelerator, self.dtype, self.timestep = accelerator, dtype, timestep
        self.directory = Path(output_dir) / "viz"
        self.probe = probe_batch(dataset[0], family, vae_config) if accelerator.is_main_process else None

    def __call__(self, objective, step: int) -> dict | None:
        """Draw and log the probe's maps at optimizer step `step` (main process; returns the scalars)."""
        accelerator = self.accelerator
        module = accelerator.unwrap_model(objective)
        # Under context parallelism the transformer's forward is collective: every rank runs the probe (broadcast
        # from the main process) with the block features gathered whole, and the main process draws.
        collective = getattr(module, "token_shard", None) is not None
        if not (collective or accelerator.is_main_process):
            return None
        device = next(module.parameters()).device
        probe = self.probe
        if collective:
            from accelerate.utils import broadcast_object_list

            probe = broadcast_object_list([probe])[0]
        batch = batch_to(probe, device, self.dtype)
        was_training = module.training
        module.eval()
        try:
            with accelerator.autocast(), (module.gathered_tokens() if collective else contextlib.nullcontext()):
                condition = {key.removeprefix("condition."): value for key, value in batch.items()
                             if key.startswith("condition.")}
                clip = clip_alignment(module, batch["latents"], batch["prompt_embeds"], batch["pixels"],
                                      timestep=self.timestep, condition=condition or None)
        finally:
            module.train(was_training)
        if not accelerator.is_main_process:
            return None
        tau_student, tau_teacher = temperatures(module)
        queries = select_queries(clip.saliency[0])
        maps = correspondence_maps(
            clip.student,
            clip.teacher,
            queries,
            tau_student=tau_student,
            tau_teacher=tau_teacher,
            frames=default_columns(clip.grid[0], queries[0][0]),
        )
        query_mask = clip.mask.flatten(1) if module.align == "mtsa" else None
        stats = alignment_statistics(
            clip.student, clip.teacher, tau_student=tau_student, tau_teacher=tau_teacher, query_mask=query_mask
        )
        saliency = clip.saliency.float()
        scalars = {
            "viz/entropy_teacher": stats["entropy_teacher"],
            "viz/entropy_student": stats["entropy_student"],
            "viz/kl": stats["kl"],
            "viz/mask_coverage": float(clip.mask.float().mean()),
            "viz/mask_motion_share": float((saliency * clip.mask).sum() / saliency.sum().clamp_min(1e-12)),
        }
        scalars.update({f"viz/kl_frame_{frame:02d}": float(value) for frame, value in enumerate(stats["kl_per_frame"])})
        figure = plot_correspondences(
            maps,
            clip,
            title=f"step {step}: probe clip, tau_s={tau_student:g}, t={clip.timestep}; mean KL {stats['kl']:.3g}",
        )
        self.directory.mkdir(parents=True, exist_ok=True)
        figure.savefig(self.directory / f"step-{step:06d}.png", dpi=100)
        with (self.directory / "stats.jsonl").open("a") as handle:
            handle.write(json.dumps({"step": step, **scalars}) + "\n")
        accelerator.log(scalars, step=step)
        for tracker in accelerator.trackers:
            if tracker.name == "tensorboard":
                tracker.log_images(
                    {"viz/correspondences": figure_to_array(figure)[None]}, step=step, dataformats="NHWC"
                )
        return scalars
