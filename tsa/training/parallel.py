"""Training past one GPU: context parallelism (tokens split over ranks) and FSDP2 (parameters split over ranks).

Ranks are laid out as a (data parallel, context parallel) grid, rank = dp_rank * cp + cp_rank: the cp ranks of one
group share the clips, noise and timesteps of one data-parallel replica and each holds a contiguous token slice
(diffusers' context parallelism with the family's `_cp_plan`). Parameter gradients of one group must be SUMMED
over its ranks (each rank's gradient comes from its own tokens), while DDP and FSDP average over every rank: the
loss is multiplied by cp before backward, so the average over dp * cp ranks becomes the mean over replicas of the
per-group sums.

FSDP2 (`torch.distributed.fsdp.fully_shard`) shards each transformer block and the rest of the objective (the
projector included) over all ranks; it runs on CPU with gloo. Checkpoints are torch.distributed.checkpoint folders
(each rank writes its shards) of the trainable tensors and the optimizer state; the final weights are gathered
into full state dicts.
"""

from __future__ import annotations

import time
import unittest.mock
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

SHARDED_STATE_DIR = "fsdp"  # inside checkpoint-STEP: the torch.distributed.checkpoint folder of model + optimizer


@dataclass
class ParallelLayout:
    """The process grid of a run: `context_parallel` ranks per group, `fsdp` for sharded parameters."""

    world_size: int
    rank: int
    context_parallel: int = 1
    fsdp: bool = False
    mesh: object = None  # DeviceMesh ("dp", "ring", "ulysses") under context parallelism

    @property
    def data_parallel(self) -> int:
        return self.world_size // self.context_parallel

    @property
    def dp_rank(self) -> int:
        return self.rank // self.context_parallel

    @property
    def cp_group(self):
        return self.mesh["ulysses"].get_group() if self.mesh is not None else None

    @property
    def gradient_scale(self) -> int:
        """The loss factor that turns the average over all ranks into per-group sums (see the module docstring)."""
        return self.context_parallel


def build_layout(accelerator, context_parallel: int = 1, fsdp: bool = False) -> ParallelLayout:
    """The run's process grid; UsageError (on every rank) when --context-parallel does not divide the ranks."""
    from tsa.errors import UsageError

    world, rank = accelerator.num_processes, accelerator.process_index
    if world % context_parallel:
        raise UsageError(f"--context-parallel {context_parallel} must divide the number of processes ({world})")
    own = accelerator.distributed_type.value not in ("NO", "MULTI_CPU", "MULTI_GPU")  # DeepSpeed, accelerate FSDP
    if own and (fsdp or context_parallel > 1):
        flag = "--fsdp applies PyTorch's FSDP2 itself" if fsdp else "--context-parallel runs under DDP or --fsdp"
        raise UsageError(f"{flag}: launch without an accelerate {accelerator.distributed_type.value} config (e.g. "
                         "configs/ddp.yaml)")
    if fsdp and world < 2:
        raise UsageError("--fsdp shards over several processes: launch at least 2 (accelerate launch --num_processes)")
    if fsdp and accelerator.mixed_precision == "fp16":
        raise UsageError("--fsdp trains in fp32 or bf16 (--mixed-precision bf16): fp16 needs a loss scaler that "
                         "knows the shards")
    layout = ParallelLayout(world, rank, context_parallel, fsdp)
    if context_parallel > 1 or (fsdp and world > 1):
        if not dist.is_initialized():
            raise UsageError("--context-parallel and --fsdp need a distributed launch (accelerate launch / torchrun)")
    if context_parallel > 1:
        from torch.distributed.device_mesh import init_device_mesh

        layout.mesh = init_device_mesh(accelerator.device.type, (world // context_parallel, 1, context_parallel),
                                       mesh_dim_names=("dp", "ring", "ulysses"))
    return layout


def end_training(accelerator) -> None:
    """`accelerator.end_training()` (trackers finished, process group destroyed), then, on a gloo group, a moment
    with the GIL released.

    gloo's worker threads drop the tensors of their last finished collectives after the caller's wait returns, and
    dropping a tensor that Python has seen takes the GIL: a thread that asks for it while the interpreter finalises
    aborts the process ("terminate called without an active exception", pytorch/pytorch#38228) after a run that
    succeeded. The sleep lets them finish first.
    """
    gloo = dist.is_available() and dist.is_initialized() and dist.get_backend() == "gloo"
    accelerator.end_training()
    if gloo:
        time.sleep(0.2)


def enable_context_parallel(transformer, layout: ParallelLayout, family) -> None:
    """diffusers' Ulysses context parallelism over the layout's cp groups, with the family's plan.

    Ulysses (all-to-all over heads) runs with the native attention backend; ring attention needs a backend that
    returns log-sum-exp. diffusers derives a device index as `rank % torch.accelerator.device_count()`, which is
    zero on a CPU-only machine: there one device stands in for the count (the index is unused on CPU).
    """
    from diffusers import ContextParallelConfig

    module = family.unwrap(transformer)
    config = ContextParallelConfig(ulysses_degree=layout.context_parallel, mesh=layout.mesh)
    if torch.accelerator.device_count() == 0:
        with unittest.mock.patch.object(torch.accelerator, "device_count", return_value=1):
            family.enable_context_parallel(module, config)
    else:
        family.enable_context_parallel(module, config)


def check_context_parallel(family, transformer_config: dict, token_grid, context_parallel: int) -> str | None:
    """Why the transformer cannot run with `context_parallel` ranks (None when it can): the family's plan, the
    token count and the heads (Ulysses splits the heads) must allow the split (checked when given)."""
    if family.context_parallel_plan() is None:
        with_plan = [name for name, other in _families() if other.context_parallel_plan() is not None]
        return (f"--context-parallel: the {family.name} family's transformer has no context-parallel plan "
                f"(diffusers' _cp_plan); families with one: {', '.join(with_plan) or 'none'}")
    if not token_grid:
        return None
    tokens = 1
    for size in token_grid:
        tokens *= int(size)
    if tokens % context_parallel:
        return (f"--context-parallel {context_parallel}: the {'x'.join(map(str, token_grid))} = {tokens} video tokens "
                "do not split evenly (choose --height / --width / --num-frames whose token count divides)")
    heads = transformer_config.get("num_attention_heads")
    if heads is not None and heads % context_parallel:
        return f"--context-parallel {context_parallel} must divide the transformer's {heads} attention heads (Ulysses)"
    return None


def _families():
    from tsa.models import FAMILIES, get_family

    return [(name, get_family(name)) for name in FAMILIES]


# ------------------------------------------------------------------------------------------------ FSDP2
def apply_fsdp(objective, family) -> None:
    """fully_shard each transformer block, then the objective: its root group holds the remaining transformer
    parameters and the projector (small beside the blocks), all sharded over every rank."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh(_device_type(objective), (dist.get_world_size(),))
    for block in family.blocks(objective.transformer):
        fully_shard(block, mesh=mesh)
    fully_shard(objective, mesh=mesh)


def _device_type(module) -> str:
    return next(module.parameters()).device.type


def is_sharded(module) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(module, FSDPModule)


def any_non_finite(module) -> str | None:
    """The name of a trainable parameter holding NaN / inf on any rank (checked on each rank's shards), else None;
    a collective: call on every rank."""
    from torch.distributed.tensor import DTensor

    bad = None
    for name, parameter in module.named_parameters():
        if not parameter.requires_grad:
            continue
        local = parameter.to_local() if isinstance(parameter, DTensor) else parameter
        if not torch.isfinite(local.detach()).all():
            bad = name
            break
    flag = torch.tensor([0 if bad is None else 1], device=next(module.parameters()).device)
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    if not flag.item():
        return None
    return bad or "(a shard on another rank)"


def _trainable_state(objective, optimizer):
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model_state, optimizer_state = get_state_dict(objective, optimizer)
    trainable = {name for name, parameter in objective.named_parameters() if parameter.requires_grad}
    return {"model": {name: value for name, value in model_state.items() if name in trainable},
            "optimizer": optimizer_state}


def save_sharded_state(objective, optimizer, folder: Path) -> None:
    """Each rank writes its shards of the trainable tensors and the optimizer state (a collective)."""
    import torch.distributed.checkpoint as dcp

    dcp.save(_trainable_state(objective, optimizer), checkpoint_id=str(Path(folder) / SHARDED_STATE_DIR))


def load_sharded_state(objective, optimizer, folder: Path) -> None:
    """Load what save_sharded_state wrote into the sharded objective and optimizer (a collective)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

    from tsa.errors import CheckpointError

    path = Path(folder) / SHARDED_STATE_DIR
    if not (path / ".metadata").is_file():
        raise CheckpointError(f"--resume: {folder} has no {SHARDED_STATE_DIR}/ (it was written without --fsdp)")
    state = _trainable_state(objective, optimizer)
    try:
        dcp.load(state, checkpoint_id=str(path))
    except Exception as error:  # noqa: BLE001 - any failure to read is the checkpoint's fault
        raise CheckpointError(f"--resume: {path} does not load: {type(error).__name__}: {error}") from None
    set_state_dict(objective, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"],
                   options=StateDictOptions(strict=False))


def full_state_dict(objective) -> dict:
    """The whole objective's state dict, gathered from the shards onto rank 0 (CPU); {} on the other ranks."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(objective, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def gradient_norm(parameters, max_norm: float):
    """Clip gradients (max_norm > 0) and return the total norm as a plain tensor, for DTensor (FSDP2) and regular
    parameters alike."""
    from torch.distributed.tensor import DTensor

    parameters = [parameter for parameter in parameters if parameter.grad is not None]
    if not parameters:
        return None
    if max_norm > 0:
        norm = torch.nn.utils.clip_grad_norm_(parameters, max_norm)
    else:
        norm = torch.nn.utils.get_total_norm([parameter.grad for parameter in parameters])
    return norm.full_tensor() if isinstance(norm, DTensor) else norm
