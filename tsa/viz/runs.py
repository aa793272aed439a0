"""A finished training run for tsa-viz: its options (training_args.json), alignment grid and rebuilt objective."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from tsa.viz.maps import (
    DEFAULT_TIMESTEP,
    ClipAlignment,
    clip_alignment,
    correspondence_maps,
    default_columns,
    pixel_to_grid,
    select_queries,
    viz_methods,
)
from tsa.viz.plots import plot_correspondences, save_correspondence_gif
from tsa.viz.training import batch_to, probe_batch, temperatures


def read_training_args(run_dir) -> dict:
    """The options a run was trained with (RUN_DIR/training_args.json), checked to be one tsa-viz can show."""
    run_dir = Path(run_dir)
    path = run_dir / "training_args.json"
    if not path.is_file():
        raise FileNotFoundError(f"{run_dir} is not a tsa-train output folder (no training_args.json)")
    trained = json.loads(path.read_text())
    if trained.get("align") not in viz_methods():
        raise ValueError(
            f"{run_dir} was trained with --align {trained.get('align')}: it has no projector and teacher to "
            f"compare (tsa-viz shows runs trained with --align {', '.join(viz_methods())})"
        )
    for name, needed in (
        ("projector", run_dir / "projector" / "config.json"),
        ("base model", Path(trained["model_path"]) / "model_index.json"),
        ("teacher", Path(trained["teacher_path"]) / "config.json"),
    ):
        if not needed.is_file():
            raise FileNotFoundError(f"{run_dir}: the {name} is missing ({needed} not found)")
    expert = trained.get("expert") or "transformer"
    if not ((run_dir / expert).is_dir() or (run_dir / "pytorch_lora_weights.safetensors").is_file()):
        raise FileNotFoundError(
            f"{run_dir} holds neither {expert}/ nor pytorch_lora_weights.safetensors (the final "
            "weights of a finished tsa-train run)"
        )
    return trained


def run_family(trained: dict):
    """The model family of a run's base model, configured as training configured it (expert, timestep options)."""
    from tsa.models import detect_family_name, family_class

    cls = family_class(detect_family_name(trained["model_path"]))
    expert = trained.get("expert") or "transformer"
    return cls.from_model_path(trained["model_path"], expert, **cls.options_from(trained))


def alignment_grid(run_dir, trained: dict) -> tuple[int, int, int]:
    """The alignment grid (F, H, W) of a run's clips, from the configs alone (no weights are loaded)."""
    from types import SimpleNamespace

    from accelerate import init_empty_weights

    from tsa.projector import AlignmentProjector

    family, expert = run_family(trained), trained.get("expert") or "transformer"
    model_path = Path(trained["model_path"])
    config = json.loads((model_path / expert / "config.json").read_text())
    latent_shape = family.latent_shape(model_path, trained["num_frames"], trained["height"], trained["width"], expert)
    dit_grid = family.token_grid(SimpleNamespace(**config), latent_shape)
    with init_empty_weights():
        projector = AlignmentProjector.from_config(AlignmentProjector.load_config(Path(run_dir) / "projector"))
    return projector.output_grid(dit_grid)


@dataclass
class LoadedRun:
    """A finished run ready for tsa-viz: the trained objective, the base one (None when the base weights are
    not at hand; for LoRA the same objective with the adapters disabled), the model family with its VAE config
    and the family's VAE / text encoder (`tsa.training.cache.LatentEncoder`, as the latent cache)."""

    trained: dict
    objective: object
    base: object | None
    lora: bool
    encoder: object
    family: object
    vae_config: dict
    device: torch.device
    dtype: torch.dtype

    def encode(self, pixels: torch.Tensor, prompt: str) -> dict:
        """pixels (T, 3, H, W) in [-1, 1] and a prompt -> a one-clip batch for `clip_alignment`."""
        entry = self.encoder(pixels, prompt)
        batch = probe_batch({**entry, "pixels": pixels}, self.family, self.vae_config)
        return batch_to(batch, self.device, self.dtype)

    def base_alignment(self, batch: dict, **options) -> ClipAlignment | None:
        """`clip_alignment` through the base model (before training), or None when it is not at hand."""
        if self.base is None:
            return None
        if not self.lora:
            return clip_alignment(self.base, batch["latents"], batch["prompt_embeds"], batch["pixels"], **options)
        self.objective.transformer.disable_adapters()
        try:
            return clip_alignment(self.objective, batch["latents"], batch["prompt_embeds"], batch["pixels"], **options)
        finally:
            self.objective.transformer.enable_adapters()


def load_run(run_dir, *, device="cpu", dtype=torch.float32, with_base: bool = True) -> LoadedRun:
    """Rebuild a finished run's AlignmentObjective through its model family, as tsa-train built it (trained
    transformer or LoRA of the run's expert, the pipeline's scheduler, projector, teacher in the run's
    --teacher-precision, the alignment options) and, when its weights are at hand, the base model's, plus the
    family's VAE / text encoder."""
    from tsa.alignment import alignment_options
    from tsa.objective import AlignmentObjective
    from tsa.projector import AlignmentProjector
    from tsa.teachers import load_teacher
    from tsa.training.cache import LatentEncoder, precision_dtype

    run_dir, device = Path(run_dir), torch.device(device)
    trained = read_training_args(run_dir)
    model_path, expert = Path(trained["model_path"]), trained.get("expert") or "transformer"
    family = run_family(trained)
    lora = not (run_dir / expert).is_dir()
    transformer = family.load_trained_transformer(run_dir, model_path, expert, dtype)
    teacher_dtype = precision_dtype(trained.get("teacher_precision", "fp32"))
    teacher = load_teacher(trained["teacher"], trained["teacher_path"], dtype=teacher_dtype, device=device)
    scheduler = family.load_scheduler(model_path)
    options = dict(
        align=trained["align"],
        weight=trained["align_weight"],
        block_index=trained["align_layer"],
        projector=AlignmentProjector.from_pretrained(run_dir / "projector", torch_dtype=dtype),
        family=family,
        **{name: trained.get(name, option.default) for name, option in alignment_options().items()},
    )
    objective = AlignmentObjective(transformer, scheduler, teacher, **options).to(device).eval()
    base = None
    if with_base and lora:
        base = objective
    elif with_base and (model_path / expert / "config.json").is_file():
        base_transformer = family.load_transformer(model_path, expert, dtype)
        base = AlignmentObjective(base_transformer, scheduler, teacher, **options).to(device).eval()
    encoder = LatentEncoder(model_path, device, dtype, tiling=trained.get("vae_tiling", False), family=family)
    vae_config = json.loads((model_path / "vae" / "config.json").read_text())
    return LoadedRun(trained, objective, base, lora, encoder, family, vae_config, device, dtype)


def caption_for(video: Path, trained: dict) -> str:
    from tsa.training.data import load_video_captions

    try:
        samples = load_video_captions(
            trained["data"], trained.get("video_column", "video"), trained.get("caption_column", "caption")
        )
    except (OSError, ValueError, KeyError, TypeError):
        return ""
    return next((sample.caption for sample in samples if sample.video.resolve() == video.resolve()), "")


@dataclass
class RunDrawing:
    """What `draw_run` wrote: the PNG (and GIF) paths and, per query, its KL profile over the target frames
    (and the base model's)."""

    png: Path
    gif: Path | None
    lines: list[str]


def draw_run(run_dir, pixels: torch.Tensor, *, trained: dict, grid, output, video_name: str = "", prompt=None,
             points=None, query_frame=None, frames=None, tau=None, timestep: int = DEFAULT_TIMESTEP, seed: int = 0,
             gif: bool = False, with_base: bool = True, device="cpu", dtype=torch.float32) -> RunDrawing:
    """tsa-viz's drawing: the correspondence maps of one clip (pixels (T, 3, H, W) at the run's size) through a
    finished run (`load_run`), queries at `points` (x, y pixels) or the most dynamic tokens, as a PNG at
    `output` (and a GIF beside it)."""
    run_dir, output = Path(run_dir), Path(output)
    height, width = trained["height"], trained["width"]
    run = load_run(run_dir, device=device, dtype=dtype, with_base=with_base)
    batch = run.encode(pixels, prompt if prompt is not None else "")
    settings = dict(timestep=timestep, seed=seed)
    clip = clip_alignment(run.objective, batch["latents"], batch["prompt_embeds"], batch["pixels"], **settings)
    query_frame = grid[0] // 2 if query_frame is None else query_frame
    if points:
        queries = [(query_frame, *cell) for cell in pixel_to_grid(points, (height, width), grid[1:])]
        queries = list(dict.fromkeys(queries))
    else:
        queries = select_queries(clip.saliency[0], query_frame=query_frame)
    columns = frames or default_columns(grid[0], query_frame)
    tau_student, tau_teacher = temperatures(run.objective, tau)
    maps_options = dict(frames=columns, tau_student=tau_student, tau_teacher=tau_teacher)
    maps = correspondence_maps(clip.student, clip.teacher, queries, **maps_options)
    base_clip = run.base_alignment(batch, **settings)
    base = None if base_clip is None else correspondence_maps(base_clip.student, clip.teacher, queries, **maps_options)
    title = (
        f"{run_dir.name} ({trained['align']}), {video_name}: tau_s={tau_student:g}, "
        f"tau_t={tau_teacher:g}, t={timestep}"
    )
    output.parent.mkdir(parents=True, exist_ok=True)
    plot_correspondences(maps, clip, base=base, title=title).savefig(output, dpi=100)
    gif_path = save_correspondence_gif(maps, clip, output.with_suffix(".gif"), base=base, title=title) if gif else None
    lines = []
    for index, (frame, row, col) in enumerate(maps.queries):
        profile = " ".join(f"{value:.3g}" for value in maps.kl[0, index])
        line = f"q{index + 1} frame {frame} cell ({row},{col}): KL per frame {profile}"
        if base is not None:
            line += f" | base {' '.join(f'{value:.3g}' for value in base.kl[0, index])}"
        lines.append(line)
    return RunDrawing(output, gif_path, lines)
