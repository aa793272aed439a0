"""Checkpoints and final weights of a training run.

checkpoints/checkpoint-STEP holds accelerate's state with only the trainable tensors (never non-finite ones),
the loss history and, with LaMo, the motion predictor; it is written under a temporary name first, so a run
killed while saving never leaves a partial checkpoint. Under --fsdp the trainable tensors and the optimizer
state are a torch.distributed.checkpoint folder, checkpoint-STEP/fsdp/, of each rank's shards
(tsa/training/parallel.py). The final weights are diffusers-format: EXPERT/ (full
fine-tune) or the pipeline's LoRA file, projector/ and motion_predictor/.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import torch

from tsa.errors import CheckpointError, NonFiniteError

TRAINING_ARGS_NAME = "training_args.json"  # a run's options, as TrainConfig.to_dict() with absolute paths


def keep_trainable_state(models, weights, output_dir):
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


def checkpoint_step(path):
    return int(Path(path).name.rsplit("-", 1)[-1])


def _existing_checkpoints(output_dir):
    found = (Path(output_dir) / "checkpoints").glob("checkpoint-*")
    return sorted((path for path in found if path.name.rsplit("-", 1)[-1].isdigit()), key=checkpoint_step)


def resolve_resume(config):
    """The checkpoint folder --resume names (None to start fresh)."""
    if config.resume is None:
        return None
    if config.resume == "latest":
        found = _existing_checkpoints(config.output_dir)
        if not found:
            print(f"--resume latest: no checkpoint in {config.output_dir / 'checkpoints'}, starting from step 0")
        return found[-1] if found else None
    path = Path(config.resume)
    if not (path.is_dir() and path.name.rsplit("-", 1)[-1].isdigit()):
        raise FileNotFoundError(f"--resume: {path} is not a checkpoint-STEP folder written by tsa-train")
    return path


def load_trainable_weights(accelerator, model, checkpoint):
    """Checkpoints hold only the trainable tensors (see keep_trainable_state), so load_state runs non-strict
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


def save_checkpoint(accelerator, config, step, history, lamo, sharded=None):
    """accelerate state (+ LaMo predictor, loss history) in checkpoints/checkpoint-STEP, written under a
    temporary name first so a run killed while saving never leaves a partial checkpoint; prunes old ones.
    `sharded` = (objective, optimizer) under --fsdp: their shards go to a torch.distributed.checkpoint folder."""
    from tsa.training.parallel import any_non_finite, save_sharded_state

    path = checkpoint_dir(config.output_dir, step)
    partial = path.with_name(path.name + ".partial")
    if lamo is not None:
        check_finite_parameters(lamo.predictor, f"checkpoint at step {step} (motion predictor)")
    if sharded is not None:
        bad = any_non_finite(sharded[0])
        if bad is not None:
            raise NonFiniteError(f"checkpoint at step {step}: parameter {bad} holds non-finite values; nothing was "
                                 "saved")
    try:
        accelerator.save_state(partial)  # keep_trainable_state refuses non-finite weights
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
        if config.checkpoints_total_limit:
            for old in _existing_checkpoints(config.output_dir)[: -config.checkpoints_total_limit]:
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


def save_final_weights(accelerator, config, objective, lamo):
    """Diffusers-format weights: transformer/ (full; transformer_2/ for that expert) or the pipeline's LoRA file,
    plus projector/ and motion_predictor/. Call on every process (FSDP gathers the full state dict)."""
    from tsa.training.parallel import any_non_finite, full_state_dict, is_sharded

    if is_sharded(objective):  # --fsdp: checked on every rank's shards, gathered whole onto the main process
        bad = any_non_finite(objective)
        if bad is not None:
            raise NonFiniteError(f"final weights: parameter {bad} holds non-finite values; nothing was saved")
        state = full_state_dict(objective)
    else:
        check_finite_parameters(objective, "final weights")
        state = accelerator.get_state_dict(objective)
    if lamo is not None:
        check_finite_parameters(lamo.predictor, "final weights (motion predictor)")
    if not accelerator.is_main_process:
        return
    module = accelerator.unwrap_model(objective)
    parts = {"transformer": {}, "projector": {}}
    for name, tensor in state.items():
        prefix, _, key = name.partition(".")
        parts.get(prefix, {})[key] = tensor
    if config.finetune == "lora":
        from peft.utils import get_peft_model_state_dict

        module.family.save_lora_weights(
            config.output_dir, get_peft_model_state_dict(module.transformer, state_dict=parts["transformer"]),
            module.transformer.peft_config["default"].to_dict(), expert=config.expert,
        )
    else:
        _materialise(module.transformer, parts["transformer"]).save_pretrained(config.output_dir / config.expert)
    if module.projector is not None:
        _materialise(module.projector, parts["projector"]).save_pretrained(config.output_dir / "projector")
    if lamo is not None:
        lamo.predictor.save_pretrained(config.output_dir / "motion_predictor")


def verify_checkpoint(path) -> None:
    """Every tensor file of a tsa-train checkpoint loads and holds only finite floating values.

    Reads *.safetensors one tensor at a time, and *.bin (optimizer, scheduler) and accelerate's
    custom_checkpoint_*.pkl (LaMo) with weights_only; raises CheckpointError naming the file (and the tensor).
    """
    import pickle
    import zipfile

    import torch
    from safetensors import safe_open

    folder = Path(path)
    for file in sorted(folder.rglob("*")):
        custom = file.suffix == ".pkl" and file.name.startswith("custom_checkpoint_")
        if not file.is_file() or not (custom or file.suffix in (".safetensors", ".bin", ".pt")):
            continue
        try:
            if file.suffix == ".safetensors":
                with safe_open(str(file), framework="pt") as handle:
                    for name in handle.keys():
                        _check_finite(handle.get_tensor(name), file, name)
                continue
            try:
                state = torch.load(file, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(file))
            except pickle.UnpicklingError:
                if custom:  # holds Python objects besides tensors: accelerate unpickles it as it is
                    continue
                raise
            _check_finite(state, file, "")
        except CheckpointError:
            raise
        except Exception as error:  # noqa: BLE001 - any failure to read is the file's fault
            raise CheckpointError(f"checkpoint file {file} does not load: {type(error).__name__}: {error}") from None


def _check_finite(value, file, name) -> None:
    import torch

    if isinstance(value, torch.Tensor):
        if value.is_floating_point() and not torch.isfinite(value).all():
            raise CheckpointError(
                f"checkpoint file {file} holds non-finite values (NaN or inf) in "
                f"{name or 'a tensor'}: resume from an earlier checkpoint"
            )
    elif isinstance(value, dict):
        for key, item in value.items():
            _check_finite(item, file, f"{name}.{key}" if name else str(key))
    elif isinstance(value, (list, tuple)):
        for index, item in enumerate(value):
            _check_finite(item, file, f"{name}[{index}]")
    elif isinstance(value, float) and not math.isfinite(value):
        raise CheckpointError(f"checkpoint file {file} holds a non-finite value in {name}")


def check_finite_parameters(module, what: str) -> None:
    """NonFiniteError naming the first trainable parameter of `module` that holds NaN or inf."""
    import torch

    for name, parameter in module.named_parameters():
        if parameter.requires_grad and not torch.isfinite(parameter.detach()).all():
            raise NonFiniteError(f"{what}: parameter {name} holds non-finite values; nothing was saved")
