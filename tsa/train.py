"""tsa-train: fine-tune a video DiT (CogVideoX, Wan2.1 / Wan2.2) with a TSA / M-TSA / TRD / REPA alignment
loss and / or LaMo's drift loss.

    tsa-train --preset tiny                                    # tiny random models + synthetic clips, CPU
    tsa-train --preset tiny --model-family wan --finetune lora # the same with tiny Wan models
    accelerate launch --config_file configs/ddp.yaml -m tsa.train --preset cogvideox-2b-mtsa \
        --model-path CogVideoX-2b --teacher-path videomae-v2-base --data my_videos/ --output-dir runs/mtsa

Outputs in --output-dir: checkpoints/checkpoint-STEP (accelerate state), logs/ (TensorBoard), losses.json,
loss_curve.png, viz/ (with --viz-steps), the final weights (transformer/ -- or transformer_2/ for a two-expert
model's second expert -- in diffusers format, or pytorch_lora_weights.safetensors in the pipeline's LoRA format),
projector/ and, with LaMo, motion_predictor/.
"""

import contextlib
import itertools
import json
import math
import shutil
from pathlib import Path

import torch
from tqdm.auto import tqdm

from tsa.cache import build_cache, collate_entries, precision_dtype
from tsa.config import parse_args
from tsa.validation import (
    CheckpointError,
    NonFiniteError,
    UsageError,
    check_finite_parameters,
    check_training_args,
    exit_with_error,
    verify_checkpoint,
)

LOSS_NAMES = ("loss", "diffusion", "align", "drift", "predictor")
TRAINING_ARGS_NAME = "training_args.json"


def build_family(args):
    """The model family of --model-path (or --model-family), configured for --expert and the timestep options."""
    from tsa.models import detect_family, family_class

    options = dict(timestep_sampling=args.timestep_sampling, logit_mean=args.logit_mean, logit_std=args.logit_std,
                   shift=args.flow_shift)
    if args.model_family is not None:
        return family_class(args.model_family).from_model_path(args.model_path, args.expert, **options)
    return detect_family(args.model_path, args.expert, **options)


def load_transformer(args, weight_dtype, family):
    """The family's transformer (--expert), with LoRA adapters (only they train, in float32, over a frozen base in
    `weight_dtype`) or fully trainable in float32."""
    lora = args.finetune == "lora"
    transformer = family.load_transformer(args.model_path, args.expert, weight_dtype if lora else torch.float32)
    if lora:
        from diffusers.training_utils import cast_training_params
        from peft import LoraConfig

        transformer.requires_grad_(False)
        transformer.add_adapter(LoraConfig(r=args.lora_rank, lora_alpha=args.lora_alpha, init_lora_weights=True,
                                           target_modules=args.lora_target_modules))
        cast_training_params(transformer, torch.float32)
    else:
        transformer.requires_grad_(True)
    if args.gradient_checkpointing:
        transformer.enable_gradient_checkpointing()
    return transformer


def build_objective(args, transformer, weight_dtype, family):
    """AlignmentObjective around the transformer (the pipeline's own scheduler), with the frozen teacher
    when the method needs one."""
    from tsa.alignment import alignment_options
    from tsa.objective import AlignmentObjective
    from tsa.teachers import load_teacher

    method = "none" if args.align == "lamo" else args.align
    teacher_dtype = precision_dtype(getattr(args, "teacher_precision", "fp32"))
    teacher = None if method == "none" else load_teacher(args.teacher, args.teacher_path, dtype=teacher_dtype)
    return AlignmentObjective(
        transformer, family.load_scheduler(args.model_path), teacher,
        align=method, weight=args.align_weight, block_index=args.align_layer, grid=args.grid,
        projector_hidden_dim=args.projector_hidden_dim, family=family,
        **{name: getattr(args, name) for name in alignment_options()},  # tau, top_k, trd_margin, backend, ...
    )


def build_lamo(args, objective, accelerator):
    """LaMoTrainer for --align lamo or --motion-drift-weight > 0 (noise augmentation through the objective's
    own scheduler), else None."""
    if args.align != "lamo" and args.motion_drift_weight == 0:
        return None
    from tsa.lamo import LaMoTrainer, MotionPredictor
    from tsa.models import family_of

    family = getattr(objective, "family", None) or family_of(objective.transformer)
    config = family.unwrap(objective.transformer).config
    predictor = MotionPredictor(
        in_channels=family.latent_channels(config), text_dim=family.text_dim(config),
        channels=args.predictor_channels, num_blocks=args.predictor_blocks,
        prompt_pooling=args.predictor_prompt_pooling,
    )
    trainer = LaMoTrainer(predictor, lr=args.predictor_learning_rate,
                          total_steps=args.max_steps * args.gradient_accumulation_steps,
                          noise_scheduler=objective.scheduler, drift_eps=args.motion_drift_eps)
    return trainer.prepare(accelerator)


def _keep_trainable_state(models, weights, output_dir):
    """save_state hook: checkpoint only trainable tensors (not the frozen base model or teacher), and never
    non-finite ones (NonFiniteError)."""
    for index, model in enumerate(models[: len(weights)]):
        trainable = {name for name, parameter in model.named_parameters() if parameter.requires_grad}
        weights[index] = {name: tensor for name, tensor in weights[index].items() if name in trainable}
        for name, tensor in weights[index].items():
            if tensor.is_floating_point() and not torch.isfinite(tensor).all():
                raise NonFiniteError(f"parameter {name} holds non-finite values; nothing was saved")


def checkpoint_dir(output_dir, step):
    return Path(output_dir) / "checkpoints" / f"checkpoint-{step}"


def _checkpoint_step(path):
    return int(Path(path).name.rsplit("-", 1)[-1])


def _existing_checkpoints(output_dir):
    found = (Path(output_dir) / "checkpoints").glob("checkpoint-*")
    return sorted((path for path in found if path.name.rsplit("-", 1)[-1].isdigit()), key=_checkpoint_step)


def resolve_resume(args):
    """The checkpoint folder --resume names (None to start fresh)."""
    if args.resume is None:
        return None
    if args.resume == "latest":
        found = _existing_checkpoints(args.output_dir)
        if not found:
            print(f"--resume latest: no checkpoint in {args.output_dir / 'checkpoints'}, starting from step 0")
        return found[-1] if found else None
    path = Path(args.resume)
    if not (path.is_dir() and path.name.rsplit("-", 1)[-1].isdigit()):
        raise FileNotFoundError(f"--resume: {path} is not a checkpoint-STEP folder written by tsa-train")
    return path


def load_trainable_weights(accelerator, model, checkpoint):
    """Checkpoints hold only the trainable tensors (see _keep_trainable_state), so load_state runs non-strict
    and would silently skip tensors whose names differ: load the model file again, with any DDP `module.`
    prefix removed, and raise if it lacks a trainable parameter (e.g. other --finetune / --align options)."""
    from safetensors.torch import load_file

    path = Path(checkpoint) / "model.safetensors"
    if not path.is_file():
        raise FileNotFoundError(f"--resume: {checkpoint} has no model.safetensors")
    state = {name.removeprefix("module."): tensor for name, tensor in load_file(path).items()}
    module = accelerator.unwrap_model(model)
    trainable = [name for name, parameter in module.named_parameters() if parameter.requires_grad]
    missing = [name for name in trainable if name not in state]
    if missing:
        raise ValueError(f"--resume: {checkpoint} lacks {len(missing)} of the {len(trainable)} trainable tensors, "
                         f"e.g. {', '.join(missing[:3])}; was it written with other --finetune / --align / LoRA "
                         "options?")
    module.load_state_dict({name: state[name] for name in trainable}, strict=False)


def check_finite_gradients(accelerator, model, max_grad_norm, step, losses=None):
    """Clip (max_grad_norm > 0) and raise NonFiniteError naming `step` when the gradient norm is NaN or inf,
    before the optimizer step. Skipped under fp16 loss scaling, whose scaler skips such steps by design."""
    from tsa.parallel import gradient_norm, is_sharded

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


def save_checkpoint(accelerator, args, step, history, lamo, sharded=None):
    """accelerate state (+ LaMo predictor, loss history) in checkpoints/checkpoint-STEP, written under a
    temporary name first so a run killed while saving never leaves a partial checkpoint; prunes old ones.
    `sharded` = (objective, optimizer) under --fsdp: their shards go to a torch.distributed.checkpoint folder."""
    from tsa.parallel import any_non_finite, save_sharded_state

    path = checkpoint_dir(args.output_dir, step)
    partial = path.with_name(path.name + ".partial")
    if lamo is not None:
        check_finite_parameters(lamo.predictor, f"checkpoint at step {step} (motion predictor)")
    if sharded is not None:
        bad = any_non_finite(sharded[0])
        if bad is not None:
            raise NonFiniteError(f"checkpoint at step {step}: parameter {bad} holds non-finite values; nothing was "
                                 "saved")
    try:
        accelerator.save_state(partial)  # _keep_trainable_state refuses non-finite weights
    except NonFiniteError as error:
        shutil.rmtree(partial, ignore_errors=True)
        raise NonFiniteError(f"checkpoint at step {step}: {error}") from None
    if sharded is not None:
        save_sharded_state(*sharded, partial)
    accelerator.wait_for_everyone()  # every process writes its random_states_{i}.pkl into `partial`
    if accelerator.is_main_process:
        (partial / "losses.json").write_text(json.dumps(history))
        if lamo is not None:
            lamo.predictor.save_pretrained(partial / "motion_predictor")
        if path.exists():
            shutil.rmtree(path)
        partial.rename(path)
        if args.checkpoints_total_limit:
            for old in _existing_checkpoints(args.output_dir)[: -args.checkpoints_total_limit]:
                shutil.rmtree(old)
    accelerator.wait_for_everyone()


def _materialise(model, state):
    """A fresh copy of a diffusers model, built from its config, holding `state` (e.g. gathered from shards)."""
    from accelerate import init_empty_weights

    # The private keys (e.g. _use_default_values) are dropped, as save_pretrained does for config.json.
    config = {key: value for key, value in model.config.items() if not key.startswith("_")}
    with init_empty_weights():
        copy = type(model).from_config(config)
    copy.load_state_dict(state, assign=True)
    return copy


def save_final_weights(accelerator, args, objective, lamo):
    """Diffusers-format weights: transformer/ (full; transformer_2/ for that expert) or the pipeline's LoRA file,
    plus projector/ and motion_predictor/. Call on every process (FSDP gathers the full state dict)."""
    from tsa.parallel import any_non_finite, full_state_dict, is_sharded

    if is_sharded(objective):
        bad = any_non_finite(objective)
        if bad is not None:
            raise NonFiniteError(f"final weights: parameter {bad} holds non-finite values; nothing was saved")
    else:
        check_finite_parameters(objective, "final weights")
    if lamo is not None:
        check_finite_parameters(lamo.predictor, "final weights (motion predictor)")
    state = full_state_dict(objective) if is_sharded(objective) else accelerator.get_state_dict(objective)
    if not accelerator.is_main_process:
        return
    module = accelerator.unwrap_model(objective)
    parts = {"transformer": {}, "projector": {}}
    for name, tensor in state.items():
        prefix, _, key = name.partition(".")
        parts.get(prefix, {})[key] = tensor
    if args.finetune == "lora":
        from peft.utils import get_peft_model_state_dict

        module.family.save_lora_weights(
            args.output_dir, get_peft_model_state_dict(module.transformer, state_dict=parts["transformer"]),
            module.transformer.peft_config["default"].to_dict(), expert=args.expert,
        )
    else:
        _materialise(module.transformer, parts["transformer"]).save_pretrained(args.output_dir / args.expert)
    if module.projector is not None:
        _materialise(module.projector, parts["projector"]).save_pretrained(args.output_dir / "projector")
    if lamo is not None:
        lamo.predictor.save_pretrained(args.output_dir / "motion_predictor")


def plot_losses(history, path, smoothing=0.9):
    """Each loss component against the optimizer step (raw and exponentially smoothed) as a PNG: log scale, or
    symlog when a value is <= 0 (e.g. REPA's negative cosine loss); components that are 0 throughout (off)
    are named in the legend's title."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(7, 4))
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
    axis.set(xlabel="optimizer step", ylabel="loss (smoothed; raw faint)",
             title=f"tsa-train losses ({path.parent.name})")
    axis.grid(alpha=0.3)
    axis.legend(title=f"0 throughout: {', '.join(off)}" if off else None)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def _step_seed(seed, step, micro_step, process_index):
    """Seed of one micro-batch: noise, timesteps and latent samples depend only on where it is in the run."""
    return (((seed * 1_000_003 + step) * 1_009 + micro_step) * 1_013 + process_index) % (2**63)


def sample_latents(batch, family, vae_config, dtype):
    """Draw from the cached latent distributions (B, 2C, F, h, w) -> normalised latents (B, F, C, h, w)."""
    return family.latents_from_distribution(batch["latent_dist"], vae_config).to(dtype)


def compute_losses(objective, lamo, drift_weight, batch, latents, dtype):
    """Total loss of one micro-batch and its components: diffusion + weight * align (+ LaMo drift)."""
    pixels = batch.get("pixels")
    out = objective(latents, batch["prompt_embeds"].to(dtype), pixels)  # pixels stay float32 for the teacher
    loss, drift = out["loss"], torch.zeros((), device=latents.device)
    if lamo is not None:
        drift = lamo.drift_loss(out["x0_pred"].float(), out["x0"].float(), out["timesteps"])
        loss = loss + drift_weight * drift
    return loss, {"loss": loss.item(), "diffusion": out["diffusion"].item(), "align": out["align"].item(),
                  "drift": drift.item()}


def check_context_parallel_shapes(args):
    """UsageError when the transformer's token grid or heads do not split over --context-parallel ranks (from
    the configs, before any model loads)."""
    from types import SimpleNamespace

    from tsa.parallel import check_context_parallel

    family = build_family(args)
    config = json.loads((args.model_path / args.expert / "config.json").read_text())
    shape = family.latent_shape(args.model_path, args.num_frames, args.height, args.width, args.expert)
    message = check_context_parallel(family, config, family.token_grid(SimpleNamespace(**config), shape),
                                     args.context_parallel)
    if message:
        raise UsageError(message)


def prepare_training(args, accelerator, layout):
    """Models, optimizer, schedule and data loader, prepared by accelerate (under --fsdp the objective is sharded
    with FSDP2 instead of wrapped in DDP); LaMo trainer or None."""
    from accelerate.utils import set_seed
    from diffusers.optimization import get_scheduler

    from tsa.parallel import apply_fsdp, enable_context_parallel

    dataset = build_cache(args, accelerator)
    set_seed(args.seed)
    weight_dtype = precision_dtype(accelerator.mixed_precision)
    family = build_family(args)
    transformer = load_transformer(args, weight_dtype, family)
    if layout.context_parallel > 1:
        enable_context_parallel(transformer, layout, family)
    objective = build_objective(args, transformer, weight_dtype, family)
    if layout.context_parallel > 1:
        objective.shard_tokens(layout.cp_group)
    lamo = build_lamo(args, objective, accelerator)
    if layout.fsdp:
        objective.to(accelerator.device)
        apply_fsdp(objective, family)
    optimizer = torch.optim.AdamW([parameter for parameter in objective.parameters() if parameter.requires_grad],
                                  lr=args.learning_rate, betas=(args.adam_beta1, args.adam_beta2),
                                  weight_decay=args.adam_weight_decay, eps=args.adam_epsilon)
    lr_scheduler = get_scheduler(args.lr_scheduler, optimizer,
                                 num_warmup_steps=args.lr_warmup_steps * accelerator.num_processes,
                                 num_training_steps=args.max_steps * accelerator.num_processes)
    dataloader = torch.utils.data.DataLoader(dataset, batch_size=args.train_batch_size, shuffle=True,
                                             collate_fn=collate_entries, num_workers=args.dataloader_num_workers)
    if layout.context_parallel > 1:  # the ranks of a context-parallel group read the same clips
        from accelerate.data_loader import prepare_data_loader

        dataloader = prepare_data_loader(
            dataloader, accelerator.device, num_processes=layout.data_parallel, process_index=layout.dp_rank,
            put_on_device=True, rng_types=accelerator.rng_types.copy(), even_batches=accelerator.even_batches,
            use_seedable_sampler=True, data_seed=args.seed,
        )
    else:
        dataloader = accelerator.prepare(dataloader)
    if layout.fsdp:
        # Not accelerator.prepare: that wraps the model in DDP and saves the optimizer from the main process only;
        # the sharded state goes to torch.distributed.checkpoint instead (save_checkpoint).
        from accelerate.optimizer import AcceleratedOptimizer
        from accelerate.scheduler import AcceleratedScheduler

        optimizer = AcceleratedOptimizer(optimizer, device_placement=False)
        lr_scheduler = AcceleratedScheduler(lr_scheduler, optimizer, step_with_optimizer=True, split_batches=False)
        accelerator.register_for_checkpointing(lr_scheduler)
    else:
        objective, optimizer, lr_scheduler = accelerator.prepare(objective, optimizer, lr_scheduler)
    accelerator.register_save_state_pre_hook(_keep_trainable_state)
    if lamo is not None:
        accelerator.register_for_checkpointing(lamo)
    return objective, optimizer, dataloader, lr_scheduler, lamo


def train(args):
    """Run tsa-train with parsed options; returns the per-step loss history (None with --precompute)."""
    from accelerate import Accelerator
    from accelerate.utils import DataLoaderConfiguration, DistributedType, ProjectConfiguration

    from tsa.data import prepare_tiny_assets
    from tsa.parallel import build_layout, load_sharded_state

    accelerator = Accelerator(
        gradient_accumulation_steps=args.gradient_accumulation_steps, mixed_precision=args.mixed_precision,
        log_with="tensorboard",
        project_config=ProjectConfiguration(project_dir=str(args.output_dir),
                                            logging_dir=str(args.output_dir / "logs")),
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True, data_seed=args.seed),
    )
    if args.preset == "tiny":
        with accelerator.main_process_first():
            prepare_tiny_assets(args)
    if args.precompute:
        build_cache(args, accelerator)
        return None
    layout = build_layout(accelerator, args.context_parallel, args.fsdp)
    if args.context_parallel > 1:
        check_context_parallel_shapes(args)
    resume_from = resolve_resume(args)
    if resume_from is not None:
        verify_checkpoint(resume_from)  # before any model is built: every tensor loads and is finite
    objective, optimizer, dataloader, lr_scheduler, lamo = prepare_training(args, accelerator, layout)
    weight_dtype = precision_dtype(accelerator.mixed_precision)
    vae_config = json.loads((args.model_path / "vae" / "config.json").read_text())
    family = accelerator.unwrap_model(objective).family

    viz = None
    if args.viz_steps:
        from tsa.viz import TrainingViz

        viz = TrainingViz(accelerator, dataloader.dataset, args.output_dir, family, vae_config, weight_dtype)
    step, history = 0, []
    if resume_from is not None:
        if layout.fsdp:
            accelerator.load_state(str(resume_from))  # schedule, random states, LaMo
            load_sharded_state(objective, optimizer, resume_from)
        elif accelerator.distributed_type not in (DistributedType.DEEPSPEED, DistributedType.FSDP):  # own formats
            load_trainable_weights(accelerator, objective, resume_from)
        if not layout.fsdp:
            # Checkpoints hold only the trainable tensors (see _keep_trainable_state); DeepSpeed has no `strict`.
            strict = {} if accelerator.distributed_type == DistributedType.DEEPSPEED else {"strict": False}
            accelerator.load_state(str(resume_from), **strict)
        step = _checkpoint_step(resume_from)
        history = [row for row in json.loads((resume_from / "losses.json").read_text()) if row["step"] <= step]
    if accelerator.is_main_process:
        args.output_dir.mkdir(parents=True, exist_ok=True)
        # Absolute paths, so tsa-sample finds the base model from any working directory.
        resolved = {key: value.resolve() if isinstance(value, Path) else value for key, value in vars(args).items()}
        (args.output_dir / TRAINING_ARGS_NAME).write_text(json.dumps(resolved, default=str, indent=2))
        accelerator.init_trackers("tsa-train", config={key: value if isinstance(value, (int, float, str, bool))
                                                       else str(value) for key, value in vars(args).items()})

    updates_per_epoch = math.ceil(len(dataloader) / args.gradient_accumulation_steps)
    first_epoch, skip_batches = divmod(step, updates_per_epoch)
    progress = tqdm(total=args.max_steps, initial=step, desc="tsa-train",
                    disable=args.no_progress or not accelerator.is_local_main_process)
    window, micro_step = [], 0
    objective.train()
    for epoch in itertools.count(first_epoch):
        if step >= args.max_steps:
            break
        # Same data order on resume: the sampler is seeded by (seed, epoch), finished batches are skipped.
        dataloader.set_epoch(epoch)
        batches = dataloader
        if epoch == first_epoch and skip_batches:
            batches = accelerator.skip_first_batches(dataloader, skip_batches * args.gradient_accumulation_steps)
        for batch in batches:
            # The ranks of a context-parallel group draw the same noise and timesteps (their data-parallel rank).
            torch.manual_seed(_step_seed(args.seed, step, micro_step, layout.dp_rank))
            with accelerator.accumulate(objective):
                latents = sample_latents(batch, family, vae_config, weight_dtype)
                with accelerator.autocast() if layout.fsdp else contextlib.nullcontext():
                    loss, losses = compute_losses(objective, lamo, args.motion_drift_weight, batch, latents,
                                                  weight_dtype)
                accelerator.backward(loss * layout.gradient_scale)
                if accelerator.sync_gradients:
                    check_finite_gradients(accelerator, objective, args.max_grad_norm, step + 1, losses)
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
            if step % args.checkpointing_steps == 0 or step == args.max_steps:
                save_checkpoint(accelerator, args, step, history, lamo,
                                sharded=(objective, optimizer) if layout.fsdp else None)
            if viz is not None and step % args.viz_steps == 0:
                viz(objective, step)
            if step >= args.max_steps:
                break
    progress.close()

    accelerator.wait_for_everyone()
    save_final_weights(accelerator, args, objective, lamo)
    if accelerator.is_main_process:
        (args.output_dir / "losses.json").write_text(json.dumps(history))
        plot_losses(history, args.output_dir / "loss_curve.png")
        print(f"tsa-train: {step} steps, final weights and loss_curve.png in {args.output_dir}; try\n"
              f"  tsa-sample {args.output_dir} --prompt \"a red ball falls and bounces on the floor\"")
    accelerator.end_training()
    return history


def main(argv=None):
    """Console script tsa-train (also `python -m tsa.train`): options and paths are checked before anything is
    built; a mistake, a bad checkpoint or a non-finite loss ends it with one line (exit 2, 1, 1)."""
    args = parse_args(argv)
    try:
        check_training_args(args)
        train(args)
    except (UsageError, CheckpointError, NonFiniteError) as error:
        exit_with_error("tsa-train", error)


if __name__ == "__main__":
    main()
