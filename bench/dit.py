"""`python -m bench --dit MODEL`: the alignment loss's share of a video-DiT training step.

Times one training step (forward + backward, bf16 weights and activations, gradient checkpointing) of a
randomly initialised diffusers transformer built from the model's real configuration (no download) at its
native latent grid, and, beside it, the alignment loss (forward + student backward) on features of the
same token grid with the projector's width, for each loss provider. share = loss / (step + loss): the
fraction of a training step that adding the loss costs. `--tiny` swaps in a 2-layer model on a small
grid (runs on CPU; figures meaningless, for testing the harness).
"""

from __future__ import annotations

import dataclasses
import gc
from collections.abc import Callable

import torch

from .measure import Case, LossCall, make_inputs, peak_memory_bytes, time_call
from .providers import make_loss, unavailable_reason
from .workloads import Workload

# Width of the projector's output (the student features the loss sees) and of the teacher features.
PROJECTOR_CHANNELS = 768


@dataclasses.dataclass(frozen=True)
class DiTModel:
    """A video DiT as the bench builds it: the diffusers class, its real config, and its native grid.

    latent (frames, height, width) of the VAE latents; tokens per frame after the patch embedding =
    (height / patch) * (width / patch); text_tokens x text_dim of the encoder states.
    """

    name: str
    diffusers_class: str
    config: dict
    latent: tuple[int, int, int]
    patch: int
    latent_channels: int
    text_tokens: int
    text_dim: int
    layout: str  # "BFCHW" (CogVideoX) or "BCFHW" (Wan)
    loss_channels: int = PROJECTOR_CHANNELS

    @property
    def grid(self) -> tuple[int, int]:
        """(frames, tokens per frame) of the alignment loss: the DiT's video token grid."""
        frames, height, width = self.latent
        return frames, (height // self.patch) * (width // self.patch)

    def build(self) -> torch.nn.Module:
        import diffusers

        return getattr(diffusers, self.diffusers_class)(**self.config)

    def inputs(self, batch: int, device, dtype) -> dict:
        frames, height, width = self.latent
        if self.layout == "BFCHW":
            latents = torch.randn(batch, frames, self.latent_channels, height, width, device=device, dtype=dtype)
        else:
            latents = torch.randn(batch, self.latent_channels, frames, height, width, device=device, dtype=dtype)
        text = torch.randn(batch, self.text_tokens, self.text_dim, device=device, dtype=dtype)
        timestep = torch.randint(0, 1000, (batch,), device=device)
        return dict(hidden_states=latents, encoder_hidden_states=text, timestep=timestep)


# CogVideoX-2B: 30 layers, 30 heads x 64, 3D sincos positions; 49 x 480 x 720 -> 13 x 60 x 90 latents.
COGVIDEOX_2B = dict(
    num_attention_heads=30, attention_head_dim=64, in_channels=16, out_channels=16, time_embed_dim=512,
    text_embed_dim=4096, num_layers=30, sample_width=90, sample_height=60, sample_frames=49, patch_size=2,
    temporal_compression_ratio=4, max_text_seq_length=226, use_rotary_positional_embeddings=False,
)  # fmt: skip
# Wan2.1 T2V-1.3B: 30 blocks, 12 heads x 128, FFN 8960; 81 x 480 x 832 -> 21 x 60 x 104 latents, umT5 512 x 4096.
WAN21_1_3B = dict(
    patch_size=(1, 2, 2), num_attention_heads=12, attention_head_dim=128, in_channels=16, out_channels=16,
    text_dim=4096, freq_dim=256, ffn_dim=8960, num_layers=30, cross_attn_norm=True, qk_norm="rms_norm_across_heads",
    eps=1e-6,
)  # fmt: skip

DIT_MODELS: dict[str, DiTModel] = {
    "cogvideox-2b": DiTModel(
        "cogvideox-2b", "CogVideoXTransformer3DModel", COGVIDEOX_2B, latent=(13, 60, 90), patch=2,
        latent_channels=16, text_tokens=226, text_dim=4096, layout="BFCHW",
    ),
    "wan2.1-1.3b": DiTModel(
        "wan2.1-1.3b", "WanTransformer3DModel", WAN21_1_3B, latent=(21, 60, 104), patch=2, latent_channels=16,
        text_tokens=512, text_dim=4096, layout="BCFHW",
    ),
}  # fmt: skip

# Two-layer stand-ins on small grids, for CPU tests of the harness.
TINY_DIT_MODELS: dict[str, DiTModel] = {
    "cogvideox-2b": dataclasses.replace(
        DIT_MODELS["cogvideox-2b"],
        config=dict(COGVIDEOX_2B, num_attention_heads=2, attention_head_dim=16, time_embed_dim=16, text_embed_dim=32,
                    num_layers=2, sample_width=8, sample_height=8, sample_frames=9, max_text_seq_length=8),
        latent=(3, 8, 8), text_tokens=8, text_dim=32, loss_channels=24,
    ),
    "wan2.1-1.3b": dataclasses.replace(
        DIT_MODELS["wan2.1-1.3b"],
        config=dict(WAN21_1_3B, num_attention_heads=2, attention_head_dim=12, text_dim=32, freq_dim=16, ffn_dim=32,
                    num_layers=2),
        latent=(3, 8, 8), text_tokens=8, text_dim=32, loss_channels=24,
    ),
}  # fmt: skip


def dit_model(name: str, tiny: bool = False) -> DiTModel:
    models = TINY_DIT_MODELS if tiny else DIT_MODELS
    if name not in models:
        raise ValueError(f"--dit must be one of {sorted(models)}, got {name!r}")
    return models[name]


def training_step(model: torch.nn.Module, inputs: dict) -> Callable[[], torch.Tensor]:
    """forward + backward of a dummy regression loss on the transformer's output; gradients dropped first."""
    parameters = [p for p in model.parameters() if p.requires_grad]
    target = None

    def step() -> torch.Tensor:
        nonlocal target
        for parameter in parameters:
            parameter.grad = None
        output = model(**inputs, return_dict=False)[0]
        if target is None:
            target = torch.randn_like(output)
        loss = (output.float() - target.float()).square().mean()
        loss.backward()
        return loss.detach()

    return step


def time_dit_step(spec: DiTModel, device: torch.device, dtype: torch.dtype, batch: int, min_runs: int) -> dict:
    """Median time (ms) and peak memory of one training step of the model."""
    torch.manual_seed(0)
    with torch.device(device):  # parameters created and initialised on the GPU (seconds, not a minute on CPU)
        model = spec.build()
    model = model.to(dtype=dtype)
    model.train()
    model.enable_gradient_checkpointing()
    step = training_step(model, spec.inputs(batch, device, dtype))
    result = {
        "parameters": sum(p.numel() for p in model.parameters()),
        "time_ms": time_call(step, device, min_runs=min_runs, min_time_s=0.0),
        "peak_bytes": peak_memory_bytes(step, device),
    }
    del model, step
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return result


def time_loss(spec: DiTModel, provider: str, device, dtype_name: str, batch: int, min_runs: int) -> dict:
    """Median time (ms) of the alignment loss, forward + student backward, at the model's token grid."""
    frames, hw = spec.grid
    workload = Workload(f"{spec.name}-grid", batch=batch, frames=frames, hw=hw, cs=spec.loss_channels,
                        ct=spec.loss_channels)  # fmt: skip
    reason = unavailable_reason(provider, workload, device)
    if reason is not None:
        return {"status": "unavailable", "note": reason}
    case = Case(workload=workload, provider=provider, mode="fwd+bwd", dtype=dtype_name, device=str(device),
                min_runs=min_runs, min_time_s=0.0, check=False)  # fmt: skip
    try:
        student, teacher, mask = make_inputs(workload, case_dtype(dtype_name), device, mask_ratio=1.0, seed=0)
        call = LossCall(make_loss(provider), student, teacher, mask, case)
        return {
            "status": "ok",
            "time_ms": time_call(call, device, min_runs=min_runs, min_time_s=0.0),
            "peak_bytes": peak_memory_bytes(call, device),
        }
    except Exception as error:  # noqa: BLE001 - an OOM or a failing provider is a row of the report
        return {"status": "error", "note": f"{type(error).__name__}: {str(error).splitlines()[0][:160]}"}
    finally:
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()


def case_dtype(name: str) -> torch.dtype:
    from .measure import DTYPES

    return DTYPES[name]


def run_dit(
    name: str, providers: list[str], device: torch.device, dtype_name: str, *, tiny: bool, batch: int = 1,
    min_runs: int = 3,
) -> dict:  # fmt: skip
    """The step, each provider's loss, and the loss's share of step + loss."""
    spec = dit_model(name, tiny)
    step = time_dit_step(spec, device, case_dtype(dtype_name), batch, min_runs)
    frames, hw = spec.grid
    losses = {}
    for provider in providers:
        loss = time_loss(spec, provider, device, dtype_name, batch, min_runs)
        if "time_ms" in loss:
            step_ms, loss_ms = step["time_ms"]["median"], loss["time_ms"]["median"]
            loss["share"] = loss_ms / (step_ms + loss_ms)
        losses[provider] = loss
    return {
        "model": spec.name,
        "tiny": tiny,
        "config": {key: list(value) if isinstance(value, tuple) else value for key, value in spec.config.items()},
        "latent": list(spec.latent),
        "grid": {"frames": frames, "hw": hw, "tokens": frames * hw, "channels": spec.loss_channels},
        "batch": batch,
        "dtype": dtype_name,
        "step": step,
        "losses": losses,
    }


def format_dit(result: dict) -> str:
    """The step and one row per provider: time, peak memory, share of the step."""
    grid = result["grid"]
    step = result["step"]
    lines = [
        f"{result['model']}{' (tiny)' if result['tiny'] else ''}: {step['parameters'] / 1e6:.4g}M parameters, "
        f"latents {'x'.join(map(str, result['latent']))}, {grid['tokens']} video tokens "
        f"({grid['frames']} x {grid['hw']}), batch {result['batch']}, {result['dtype']}",
        f"{'what':<28}{'time ms':>12}{'peak MB':>12}{'share of step':>16}",
        f"{'training step (fwd+bwd, ckpt)':<28}{step['time_ms']['median']:>12.4g}"
        f"{step['peak_bytes'] / 2**20:>12.1f}{'':>16}",
    ]
    for provider, loss in result["losses"].items():
        label = f"loss fwd+bwd: {provider}"
        if "time_ms" not in loss:
            lines.append(f"{label:<28}  {loss['status']}: {loss.get('note', '')}")
            continue
        lines.append(
            f"{label:<28}{loss['time_ms']['median']:>12.4g}{loss['peak_bytes'] / 2**20:>12.1f}"
            f"{100 * loss['share']:>15.2f}%"
        )
    return "\n".join(lines)
