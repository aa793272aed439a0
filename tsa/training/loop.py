"""The training loop: `train(config)` fine-tunes a video DiT (any registered family) with a TSA / M-TSA / TRD /
REPA alignment loss and / or LaMo's drift loss, under accelerate (one process or `accelerate launch`).

Outputs in config.output_dir: checkpoints/checkpoint-STEP (accelerate state), logs/ (TensorBoard), losses.json,
loss_curve.png, training_args.json, viz/ (with viz_steps), the final weights (EXPERT/ in diffusers format, or
pytorch_lora_weights.safetensors in the pipeline's LoRA format), projector/ and, with LaMo, motion_predictor/.
"""

import contextlib
import itertools
import json
import math
from pathlib import Path

import torch
from tqdm.auto import tqdm

from tsa.errors import NonFiniteError, TrainingInterrupted, UsageError
from tsa.training.cache import build_cache, collate_entries, precision_dtype
from tsa.training.checkpoints import (
    TRAINING_ARGS_NAME,
    checkpoint_dir,
    checkpoint_step,
    keep_trainable_state,
    load_trainable_weights,
    resolve_resume,
    save_checkpoint,
    save_final_weights,
    verify_checkpoint,
)
from tsa.training.config import TrainConfig, resolve_config
from tsa.training.interrupts import StopSignals, signal_name
from tsa.training.parallel import (
    ParallelLayout,
    build_layout,
    end_training,
    gradient_norm,
    is_sharded,
    load_sharded_state,
)
from tsa.training.validation import check_training_config

LOSS_NAMES = ("loss", "diffusion", "align", "drift", "predictor")


def build_family(config):
    """The model family of config.model_path (or config.model_family), configured for the expert and the
    family's objective options."""
    from tsa.models import detect_family_name, family_class

    cls = family_class(config.model_family or detect_family_name(config.model_path))
    family = cls.from_model_path(config.model_path, config.expert, **cls.options_from(config))
    family.image_to_video = config.task == "i2v"  # a model doing both (TI2V-5B) trains the run's task
    return family


def load_transformer(config, weight_dtype, family):
    """The family's transformer (--expert), with LoRA adapters (only they train, in float32, over a frozen base in
    `weight_dtype`) or fully trainable in float32."""
    lora = config.finetune == "lora"
    transformer = family.load_transformer(config.model_path, config.expert, weight_dtype if lora else torch.float32)
    if lora:
        from diffusers.training_utils import cast_training_params
        from peft import LoraConfig

        transformer.requires_grad_(False)
        transformer.add_adapter(LoraConfig(r=config.lora_rank, lora_alpha=config.lora_alpha, init_lora_weights=True,
                                           target_modules=config.lora_target_modules))
        cast_training_params(transformer, torch.float32)
    else:
        transformer.requires_grad_(True)
    if config.gradient_checkpointing:
        transformer.enable_gradient_checkpointing()
    return transformer


def build_objective(config, transformer, weight_dtype, family):
    """AlignmentObjective around the transformer (the pipeline's own scheduler), with the frozen teacher
    when the method needs one."""
    from tsa.objective import AlignmentObjective
    from tsa.teachers import load_teacher

    method = "none" if config.align == "lamo" else config.align
    teacher_dtype = precision_dtype(config.teacher_precision)
    teacher = None if method == "none" else load_teacher(config.teacher, config.teacher_path, dtype=teacher_dtype)
    return AlignmentObjective(
        transformer, family.load_scheduler(config.model_path), teacher,
        align=method, weight=config.align_weight, block_index=config.align_layer, grid=config.grid,
        projector_hidden_dim=config.projector_hidden_dim, family=family,
        **config.method_options(),  # tau, top_k, trd_margin, backend, ...
    )


def build_lamo(config, objective, accelerator):
    """LaMoTrainer for --align lamo or --motion-drift-weight > 0 (noise augmentation through the objective's
    own scheduler), else None."""
    if config.align != "lamo" and config.motion_drift_weight == 0:
        return None
    from tsa.lamo import LaMoTrainer, MotionPredictor
    from tsa.models import family_of

    family = getattr(objective, "family", None) or family_of(objective.transformer)
    model_config = family.unwrap(objective.transformer).config
    predictor = MotionPredictor(
        in_channels=family.latent_channels(model_config), text_dim=family.text_dim(model_config),
        channels=config.predictor_channels, num_blocks=config.predictor_blocks,
        prompt_pooling=config.predictor_prompt_pooling,
    )
    trainer = LaMoTrainer(predictor, lr=config.predictor_learning_rate,
                          total_steps=config.max_steps * config.gradient_accumulation_steps,
                          noise_scheduler=objective.scheduler, drift_eps=config.motion_drift_eps)
    return trainer.prepare(accelerator)


def check_finite_gradients(accelerator, model, max_grad_norm, step, losses=None):
    """Clip (max_grad_norm > 0) and raise NonFiniteError naming `step` when the gradient norm is NaN or inf,
    before the optimizer step. Skipped under fp16 loss scaling, whose scaler skips such steps by design."""
    if is_sharded(model):  # FSDP2: DTensor gradients, the norm over all shards
        norm = gradient_norm(model.parameters(), max_grad_norm)
    elif max_grad_norm > 0:
        norm = accelerator.clip_grad_norm_(model.parameters(), max_grad_norm)
    else:
        grads = [p.grad.detach().float().norm() for p in model.parameters() if p.grad is not None]
        norm = torch.stack(grads).norm() if grads else None
    if accelerator.scaler is not None or norm is None:
        return
    if not torch.isfinite(torch.as_tensor(norm)).all():
        terms = ", ".join(f"{name}={value:.4g}" for name, value in (losses or {}).items())
        raise NonFiniteError(f"step {step}: the gradient norm is {float(norm)}" + (f" ({terms})" if terms else "")
                             + "; stopped before the optimizer step, nothing of this step was saved (lower "
                             "--learning-rate, or check the data and --resume checkpoint)")


def check_finite_losses(losses, step):
    """NonFiniteError naming `step` and the loss terms that are NaN or inf (mean over micro-batches and
    processes, so every process stops together)."""
    bad = {name: value for name, value in losses.items() if not math.isfinite(value)}
    if bad:
        terms = ", ".join(f"{name}={value}" for name, value in bad.items())
        raise NonFiniteError(f"step {step}: non-finite loss ({terms}); stopped, no weights of this step were saved "
                             "(lower --learning-rate, or check the data and --resume checkpoint)")


def plot_losses(history, path, smoothing=0.9):
    """Each loss component against the optimizer step (raw faint, exponentially smoothed bold) as a PNG: log
    scale, or symlog when a value is <= 0 (e.g. REPA's negative cosine loss). The legend sits right of the axes,
    off the curves; components that are 0 throughout (switched off) are listed under it, not drawn."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(8.5, 4))
    steps = [row["step"] for row in history]
    series = {name: [row[name] for row in history] for name in LOSS_NAMES}
    off = [name for name, values in series.items() if not any(values)]
    plotted = [value for name, values in series.items() if name not in off for value in values]
    for name, values in series.items():
        if name in off:
            continue
        smoothed, average = [], values[0]
        for value in values:
            average = smoothing * average + (1 - smoothing) * value
            smoothed.append(average)
        line, = axis.plot(steps, values, alpha=0.3, linewidth=0.8)
        axis.plot(steps, smoothed, color=line.get_color(), linewidth=1.6, label=name)
    if plotted and min(plotted) <= 0:
        axis.set_yscale("symlog", linthresh=min(abs(value) for value in plotted if value))
    else:
        axis.set_yscale("log")
    axis.set(xlabel="optimizer step", ylabel="loss (bold: smoothed, faint: raw)",
             title=f"Training loss components per optimizer step ({path.parent.name})")
    axis.grid(alpha=0.3)
    axis.legend(title="loss term", loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0.0)
    if off:
        axis.annotate("not drawn (0 throughout):\n" + ", ".join(off), xy=(1.02, 0.0), xycoords="axes fraction",
                      fontsize="small", va="bottom")
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def _step_seed(seed, step, micro_step, process_index):
    """Seed of one micro-batch: noise, timesteps and latent samples depend only on where it is in the run."""
    return (((seed * 1_000_003 + step) * 1_009 + micro_step) * 1_013 + process_index) % (2**63)


def sample_latents(batch, family, vae_config, dtype, latents="sample"):
    """The cached latent distributions (B, 2C, F, h, w) -> normalised latents (B, F, C, h, w): a fresh draw
    (`latents="sample"`) or the posterior mean ("mean", deterministic)."""
    return family.latents_from_distribution(batch["latent_dist"], vae_config, sample=latents == "sample").to(dtype)


def compute_losses(objective, lamo, drift_weight, batch, latents, dtype, condition=None):
    """Total loss of one micro-batch and its components: diffusion + weight * align (+ LaMo drift);
    `condition`: an image-to-video model's first-frame condition."""
    pixels = batch.get("pixels")
    out = objective(latents, batch["prompt_embeds"].to(dtype), pixels,  # pixels stay float32 for the teacher
                    condition=condition)
    loss, drift = out["loss"], torch.zeros((), device=latents.device)
    if lamo is not None:
        drift = lamo.drift_loss(out["x0_pred"].float(), out["x0"].float(), out["timesteps"])
        loss = loss + drift_weight * drift
    return loss, {"loss": loss.item(), "diffusion": out["diffusion"].item(), "align": out["align"].item(),
                  "drift": drift.item()}


def check_context_parallel_shapes(config):
    """UsageError when the transformer's token grid or heads do not split over --context-parallel ranks (from
    the configs, before any model loads)."""
    from types import SimpleNamespace

    from tsa.training.parallel import check_context_parallel

    family = build_family(config)
    model_config = json.loads((config.model_path / config.expert / "config.json").read_text())
    shape = family.latent_shape(config.model_path, config.num_frames, config.height, config.width, config.expert)
    grid = family.token_grid(SimpleNamespace(**model_config), shape)
    message = check_context_parallel(family, model_config, grid, config.context_parallel)
    if message:
        raise UsageError(message)


def prepare_training(config, accelerator, layout=None):
    """Models, optimizer, schedule and data loader, prepared by accelerate (under --fsdp the objective is sharded
    with FSDP2 instead of wrapped in DDP; under --context-parallel the transformer runs on token slices and the
    data loader is sharded over the data-parallel replicas only); LaMo trainer or None."""
    from accelerate.utils import set_seed
    from diffusers.optimization import get_scheduler

    from tsa.training.parallel import apply_fsdp, enable_context_parallel

    layout = layout or ParallelLayout(accelerator.num_processes, accelerator.process_index)
    dataset = build_cache(config, accelerator)
    set_seed(config.seed)
    weight_dtype = precision_dtype(accelerator.mixed_precision)
    family = build_family(config)
    transformer = load_transformer(config, weight_dtype, family)
    if layout.context_parallel > 1:
        enable_context_parallel(transformer, layout, family)
    objective = build_objective(config, transformer, weight_dtype, family)
    if layout.context_parallel > 1:
        objective.shard_tokens(layout.cp_group)
    lamo = build_lamo(config, objective, accelerator)
    if layout.fsdp:
        objective.to(accelerator.device)
        apply_fsdp(objective, family)
    optimizer = torch.optim.AdamW([parameter for parameter in objective.parameters() if parameter.requires_grad],
                                  lr=config.learning_rate, betas=(config.adam_beta1, config.adam_beta2),
                                  weight_decay=config.adam_weight_decay, eps=config.adam_epsilon)
    lr_scheduler = get_scheduler(config.lr_scheduler, optimizer,
                                 num_warmup_steps=config.lr_warmup_steps * accelerator.num_processes,
                                 num_training_steps=config.max_steps * accelerator.num_processes)
    dataloader = torch.utils.data.DataLoader(dataset, batch_size=config.train_batch_size, shuffle=True,
                                             collate_fn=collate_entries, num_workers=config.dataloader_num_workers)
    if layout.context_parallel > 1:  # the ranks of a context-parallel group read the same clips
        from accelerate.data_loader import prepare_data_loader

        dataloader = prepare_data_loader(
            dataloader, accelerator.device, num_processes=layout.data_parallel, process_index=layout.dp_rank,
            put_on_device=True, rng_types=accelerator.rng_types.copy(), even_batches=accelerator.even_batches,
            use_seedable_sampler=True, data_seed=config.seed,
        )
    if layout.fsdp:
        # Not accelerator.prepare: that wraps the model in DDP and saves the optimizer from the main process only;
        # the sharded state goes to torch.distributed.checkpoint instead (save_checkpoint).
        from accelerate.optimizer import AcceleratedOptimizer
        from accelerate.scheduler import AcceleratedScheduler

        optimizer = AcceleratedOptimizer(optimizer, device_placement=False)
        lr_scheduler = AcceleratedScheduler(lr_scheduler, optimizer, step_with_optimizer=True, split_batches=False)
        accelerator.register_for_checkpointing(lr_scheduler)
        if layout.context_parallel == 1:
            dataloader = accelerator.prepare(dataloader)
    elif layout.context_parallel > 1:
        objective, optimizer, lr_scheduler = accelerator.prepare(objective, optimizer, lr_scheduler)
    else:  # one call: DeepSpeed reads its micro-batch size from the data loader
        objective, optimizer, dataloader, lr_scheduler = accelerator.prepare(objective, optimizer, dataloader,
                                                                             lr_scheduler)
    accelerator.register_save_state_pre_hook(keep_trainable_state)
    if lamo is not None:
        accelerator.register_for_checkpointing(lamo)
    return objective, optimizer, dataloader, lr_scheduler, lamo


def train(config: TrainConfig):
    """Train with `config` (resolved and checked first: UsageError for a mistake, before anything is built);
    returns the per-step loss history (None with config.precompute). Run under `accelerate launch` for several
    processes; CheckpointError for a bad --resume checkpoint, NonFiniteError for a NaN / inf loss or weight,
    DataError when no video of the dataset decodes. SIGINT / SIGTERM stop the run after the current optimizer step
    with a checkpoint at that step (TrainingInterrupted, see tsa.training.interrupts); `config.output_dir` must not
    hold another run unless config.resume or config.overwrite (tsa.outputs)."""
    from accelerate import Accelerator
    from accelerate.utils import DataLoaderConfiguration, DistributedType, ProjectConfiguration

    from tsa.training.data import prepare_tiny_assets

    config = resolve_config(config)
    check_training_config(config)

    accelerator = Accelerator(
        gradient_accumulation_steps=config.gradient_accumulation_steps, mixed_precision=config.mixed_precision,
        log_with="tensorboard",
        project_config=ProjectConfiguration(project_dir=str(config.output_dir),
                                            logging_dir=str(config.output_dir / "logs")),
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True, data_seed=config.seed),
    )
    if config.preset == "tiny":
        with accelerator.main_process_first():
            prepare_tiny_assets(config)
    if config.precompute:
        build_cache(config, accelerator)
        return None
    if config.overwrite and config.resume is None and accelerator.is_main_process:
        from tsa.outputs import clear_run

        clear_run(config.output_dir)
    accelerator.wait_for_everyone()
    layout = build_layout(accelerator, config.context_parallel, config.fsdp)
    if config.context_parallel > 1:
        check_context_parallel_shapes(config)
    resume_from = resolve_resume(config)
    if resume_from is not None:
        verify_checkpoint(resume_from)  # before any model is built: every tensor loads and is finite
    objective, optimizer, dataloader, lr_scheduler, lamo = prepare_training(config, accelerator, layout)
    weight_dtype = precision_dtype(accelerator.mixed_precision)
    vae_config = json.loads((config.model_path / "vae" / "config.json").read_text())
    family = accelerator.unwrap_model(objective).family

    viz = None
    if config.viz_steps:
        from tsa.viz.training import TrainingViz

        viz = TrainingViz(accelerator, dataloader.dataset, config.output_dir, family, vae_config, weight_dtype)
    step, history = 0, []
    if resume_from is not None:
        if layout.fsdp:
            accelerator.load_state(str(resume_from))  # schedule, random states, LaMo
            load_sharded_state(objective, optimizer, resume_from)
        else:
            if accelerator.distributed_type not in (DistributedType.DEEPSPEED, DistributedType.FSDP):  # own formats
                load_trainable_weights(accelerator, objective, resume_from)
            # Checkpoints hold only the trainable tensors (see keep_trainable_state); DeepSpeed has no `strict`.
            strict = {} if accelerator.distributed_type == DistributedType.DEEPSPEED else {"strict": False}
            accelerator.load_state(str(resume_from), **strict)
        step = checkpoint_step(resume_from)
        history = [row for row in json.loads((resume_from / "losses.json").read_text()) if row["step"] <= step]
        if accelerator.is_main_process:
            print(f"tsa-train: resuming from {resume_from} at step {step} of {config.max_steps}", flush=True)
    if accelerator.is_main_process:
        config.output_dir.mkdir(parents=True, exist_ok=True)
        # Absolute paths, so tsa-sample finds the base model from any working directory.
        values = config.to_dict()
        resolved = {key: value.resolve() if isinstance(value, Path) else value for key, value in values.items()}
        (config.output_dir / TRAINING_ARGS_NAME).write_text(json.dumps(resolved, default=str, indent=2))
        accelerator.init_trackers("tsa-train", config={key: value if isinstance(value, (int, float, str, bool))
                                                       else str(value) for key, value in values.items()})

    updates_per_epoch = math.ceil(len(dataloader) / config.gradient_accumulation_steps)
    first_epoch, skip_batches = divmod(step, updates_per_epoch)
    progress = tqdm(total=config.max_steps, initial=step, desc="tsa-train",
                    disable=config.no_progress or not accelerator.is_local_main_process)
    window, micro_step = [], 0
    objective.train()
    sharded = (objective, optimizer) if layout.fsdp else None  # --fsdp: each rank saves its shards
    with StopSignals(announce=accelerator.is_local_main_process) as stop_signals:
        for epoch in itertools.count(first_epoch):
            if step >= config.max_steps:
                break
            # Same data order on resume: the sampler is seeded by (seed, epoch), finished batches are skipped; the
            # epoch also picks each clip's cached window (--clip-windows).
            dataloader.set_epoch(epoch)
            dataloader.dataset.set_epoch(epoch)
            batches = dataloader
            if epoch == first_epoch and skip_batches:
                batches = accelerator.skip_first_batches(dataloader,
                                                         skip_batches * config.gradient_accumulation_steps)
            for batch in batches:
                # The ranks of a context-parallel group draw the same noise and timesteps (their data-parallel rank).
                torch.manual_seed(_step_seed(config.seed, step, micro_step, layout.dp_rank))
                with accelerator.accumulate(objective):
                    latents = sample_latents(batch, family, vae_config, weight_dtype, config.latents)
                    condition = family.image_condition(batch, vae_config, latents)
                    # accelerate's autocast wraps prepared models only; the FSDP2 objective is not prepared.
                    with accelerator.autocast() if layout.fsdp else contextlib.nullcontext():
                        loss, losses = compute_losses(objective, lamo, config.motion_drift_weight, batch, latents,
                                                      weight_dtype, condition)
                    # x context-parallel degree: DDP / FSDP average over all ranks, a group's gradients add up.
                    accelerator.backward(loss * layout.gradient_scale)
                    if accelerator.sync_gradients:
                        check_finite_gradients(accelerator, objective, config.max_grad_norm, step + 1, losses)
                    optimizer.step()
                    lr_scheduler.step()
                    optimizer.zero_grad(set_to_none=True)
                losses["predictor"] = 0.0
                if lamo is not None:
                    losses["predictor"] = lamo.step(latents, batch["prompt_embeds"], batch["prompt_mask"])
                window.append([losses[name] for name in LOSS_NAMES])
                micro_step += 1
                if not accelerator.sync_gradients:
                    continue
                # The optimizer step's losses: mean over its micro-batches, then over the processes.
                means = accelerator.reduce(torch.tensor(window, device=accelerator.device).mean(0), reduction="mean")
                step += 1
                check_finite_losses(dict(zip(LOSS_NAMES, means.tolist())), step)
                row = {"step": step, **dict(zip(LOSS_NAMES, means.tolist())), "lr": lr_scheduler.get_last_lr()[0]}
                history.append(row)
                window, micro_step = [], 0
                accelerator.log(row, step=step)
                progress.update(1)
                progress.set_postfix({name: f"{row[name]:.4g}" for name in LOSS_NAMES if row[name] or name == "loss"})
                saved = step % config.checkpointing_steps == 0 or step == config.max_steps
                if saved:
                    save_checkpoint(accelerator, config, step, history, lamo, sharded)
                stop = stop_signals.agreed(accelerator)  # every process, every step: they stop at the same one
                if stop is not None:
                    if not saved:
                        save_checkpoint(accelerator, config, step, history, lamo, sharded)
                    progress.close()
                    end_training(accelerator)
                    checkpoint = checkpoint_dir(config.output_dir, step)
                    message = (f"stopped by {signal_name(stop)} after step {step} of {config.max_steps}; checkpoint "
                               f"saved in {checkpoint}; continue with the same command and --resume latest")
                    raise TrainingInterrupted(message if accelerator.is_main_process else "", stop, step, checkpoint)
                if viz is not None and step % config.viz_steps == 0:
                    viz(objective, step)
                if step >= config.max_steps:
                    break
    progress.close()

    accelerator.wait_for_everyone()
    save_final_weights(accelerator, config, objective, lamo)
    if accelerator.is_main_process:
        (config.output_dir / "losses.json").write_text(json.dumps(history))
        plot_losses(history, config.output_dir / "loss_curve.png")
        skipped = dataloader.dataset.skipped_videos
        print(f"tsa-train: {step} steps, final weights and loss_curve.png in {config.output_dir}"
              + (f"; {len(skipped)} of {len(skipped) + len(dataloader.dataset)} clips skipped (undecodable)"
                 if skipped else "") + "; try\n"
              f"  tsa-sample {config.output_dir} --prompt \"a red ball falls and bounces on the floor\"")
    end_training(accelerator)
    return history
