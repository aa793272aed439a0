"""Workload presets (docs/method.md: feature grid, CogVideoX, cost model) and the FLOP model for TFLOP/s."""

from __future__ import annotations

import dataclasses

# N = frames * HW swept from 1k to 64k tokens at 16 frames (HW = 64 ... 4096 tokens per frame).
SWEEP_FRAMES = 16
SWEEP_TOKENS = (1024, 2048, 4096, 8192, 16384, 32768, 65536)


@dataclasses.dataclass(frozen=True)
class Workload:
    """One problem: student (batch, frames * hw, cs), teacher (batch, frames * hw, ct)."""

    name: str
    batch: int
    frames: int
    hw: int
    cs: int = 768
    ct: int = 768

    @property
    def tokens(self) -> int:
        return self.frames * self.hw

    def replace(self, **changes) -> Workload:
        return dataclasses.replace(self, **{k: v for k, v in changes.items() if v is not None})


PRESETS: dict[str, tuple[Workload, ...]] = {
    # TSA / VideoREPA alignment grid: 24 x 10 x 15 tokens.
    "tsa-grid": (Workload("tsa-grid", batch=4, frames=24, hw=150),),
    # CogVideoX-2B/5B native DiT grid: 13 x 30 x 45 = 17,550 tokens.
    "cogvideox-native": (Workload("cogvideox-native", batch=1, frames=13, hw=1350),),
    # CogVideoX1.5: 21 x 48 x 85 = 85,680 tokens.
    "cogvideox15": (Workload("cogvideox15", batch=1, frames=21, hw=4080),),
    "sweep": tuple(
        Workload(f"sweep-{n // 1024}k", batch=1, frames=SWEEP_FRAMES, hw=n // SWEEP_FRAMES) for n in SWEEP_TOKENS
    ),
}


def build_workloads(
    preset: str,
    *,
    batch: int | None = None,
    frames: int | None = None,
    hw: int | None = None,
    cs: int | None = None,
    ct: int | None = None,
    max_tokens: int | None = None,
) -> list[Workload]:
    """The preset's workloads with the given fields overridden.

    In the sweep, N is the varied quantity: overriding `frames` keeps each N and sets hw = N / frames,
    and `hw` cannot be overridden. `max_tokens` drops workloads with more tokens.
    """
    if preset not in PRESETS:
        raise ValueError(f"preset must be one of {sorted(PRESETS)}, got {preset!r}")
    workloads = []
    for workload in PRESETS[preset]:
        if preset == "sweep":
            if hw is not None:
                raise ValueError("hw: the sweep varies N at a fixed frame count; set --frames, not --hw")
            sweep_frames = frames or workload.frames
            workload = workload.replace(batch=batch, frames=sweep_frames, hw=workload.tokens // sweep_frames)
            workload = workload.replace(cs=cs, ct=ct)
        else:
            workload = workload.replace(batch=batch, frames=frames, hw=hw, cs=cs, ct=ct)
        for field in ("batch", "frames", "hw", "cs", "ct"):
            if getattr(workload, field) < 1:
                raise ValueError(f"{field} must be >= 1, got {getattr(workload, field)}")
        if max_tokens is None or workload.tokens <= max_tokens:
            workloads.append(workload)
    if not workloads:
        raise ValueError(f"max_tokens={max_tokens} leaves no workload of preset {preset!r}")
    return workloads


def flop_count(
    workload: Workload,
    mode: str,
    *,
    kept_fraction: float = 1.0,
    teacher_grad: bool = False,
    symmetric_grad: bool = False,
) -> float:
    """Model FLOPs of one call (the same count for every provider, so TFLOP/s ranks like 1 / time).

    forward:  2 * B * q*N * N * (Cs + Ct)   (the two Gram matrices; q = kept query fraction)
    backward: the forward again (recompute), plus 2 * 2 * B * q*N * N * C for each input needing a
              gradient (dS @ s and dS^T @ s for the student, the same for the teacher); half that when
              dS is symmetric (an op spec's symmetric_gradient, without a mask: (dS + dS^T) s = 2 dS s).
    """
    rows = kept_fraction * workload.batch * workload.tokens * workload.tokens
    forward = 2 * rows * (workload.cs + workload.ct)
    if mode == "fwd":
        return forward
    grad_channels = workload.cs + (workload.ct if teacher_grad else 0)
    return 2 * forward + (2 if symmetric_grad else 4) * rows * grad_channels
