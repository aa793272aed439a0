"""tsa-viz: the correspondence distributions TSA aligns, teacher against student, drawn over the clip.

For a query token i of frame K and a target frame f, TSA compares the teacher's tempered correspondence
distribution P_t[i, f] = softmax(T[i, f-block] / tau_t) over frame f's positions (T the cosine
self-similarity of the teacher's tokens) with the student's P_s[i, f]. This module computes those
maps and their per-frame KL from features on the alignment grid (`correspondence_maps`), gets the
features of a clip through the training objective itself (`clip_alignment`: a forward pre-hook on the
objective's alignment loss records exactly the student / teacher features and the M-TSA video the loss
receives), picks queries (`select_queries`), draws them (`plot_correspondences`, `save_correspondence_gif`)
and logs them during training (`TrainingViz`, `tsa-train --viz-steps N`).

    tsa-viz tsa-output --video tsa-output/tiny/data/videos/clip_000.mp4 --output maps.png
    tsa-viz runs/mtsa --video clip.mp4 --points 360,240 120,300 --query-frame 12 --tau 0.1 --gif
"""

from __future__ import annotations

import contextlib

import argparse
import json
import math
import textwrap
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from tsa.losses import check_feature_pair, tubelet_for_grid
from tsa.masks import motion_query_mask, motion_saliency

DEFAULT_TIMESTEP = 500
MAX_COLUMNS = 8
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass
class CorrespondenceMaps:
    """P_t and P_s of a few queries on a few target frames (numpy, float64).

    queries (Q, 3) int: (frame, row, col) on the alignment grid; frames (Fs,) int: the target frames;
    teacher, student (B, Q, Fs, H, W): each map sums to 1 over its frame's H*W positions;
    kl (B, Q, Fs): KL(P_t || P_s) per target frame.
    """

    queries: np.ndarray
    frames: np.ndarray
    teacher: np.ndarray
    student: np.ndarray
    kl: np.ndarray
    tau_student: float
    tau_teacher: float

    def entropy(self, which: str = "teacher") -> np.ndarray:
        """(B, Q, Fs) entropy (nats) of the teacher's or the student's maps."""
        maps = {"teacher": self.teacher, "student": self.student}[which]
        flat = maps.reshape(*maps.shape[:3], -1)
        return -(flat * np.log(np.where(flat > 0, flat, 1.0))).sum(-1)


def viz_methods() -> tuple[str, ...]:
    """The --align values whose runs have a projector and a teacher to show: every registered alignment method."""
    from tsa.alignment import ALIGNMENT_METHODS

    return tuple(ALIGNMENT_METHODS)


def _check_tau(name, value) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0 or not math.isfinite(value):
        raise ValueError(f"{name} must be a positive number, got {value!r}")
    return float(value)


def _check_queries(queries, grid) -> np.ndarray:
    rows = [tuple(row) if isinstance(row, (tuple, list, np.ndarray)) else (row,) for row in queries]
    for row in rows:
        valid = len(row) == 3 and all(not isinstance(v, bool) and isinstance(v, (int, np.integer)) for v in row)
        if not valid or not all(0 <= int(v) < size for v, size in zip(row, grid)):
            raise ValueError(
                f"queries must be (frame, row, col) positions of the {'x'.join(map(str, grid))} alignment grid, "
                f"got {row!r}"
            )
    if not rows:
        raise ValueError("queries must hold at least one (frame, row, col) position, got none")
    return np.asarray(rows, dtype=np.int64).reshape(-1, 3)


def _check_frames(frames, num_frames: int) -> np.ndarray:
    if frames is None:
        return np.arange(num_frames)
    frames = list(frames)
    if not frames or any(
        isinstance(f, bool) or not isinstance(f, (int, np.integer)) or not 0 <= f < num_frames for f in frames
    ):
        raise ValueError(f"frames must be target frame indices in [0, {num_frames}), got {frames!r}")
    return np.asarray(frames, dtype=np.int64)


def _log_correspondences(features, query_index, frames, tau, normalize, dtype):
    """log P (B, Q, Fs, HW): softmax over each target frame of the (cosine) similarities of the queries."""
    batch, num_frames, height, width, channels = features.shape
    features = features.to(dtype)
    if normalize:
        features = F.normalize(features, dim=-1)
    queries = features.reshape(batch, -1, channels)[:, query_index]  # (B, Q, C)
    keys = features[:, frames].reshape(batch, len(frames), height * width, channels)  # (B, Fs, HW, C)
    logits = torch.einsum("bqc,bfkc->bqfk", queries, keys) / tau
    return torch.log_softmax(logits, dim=-1)


def correspondence_maps(
    student_features: torch.Tensor,
    teacher_features: torch.Tensor,
    queries,
    *,
    frames=None,
    tau_student: float = 0.1,
    tau_teacher: float | None = None,
    normalize: bool = True,
) -> CorrespondenceMaps:
    """P_t and P_s of `queries` on the target `frames`, from features on the alignment grid.

    student_features (B, F, H, W, Cs) and teacher_features (B, F, H, W, Ct) on the same grid (what the
    alignment loss receives); queries: (frame, row, col) grid positions; frames: target frame indices
    (None: all F). Same math as `stss_kernels.tempered_kl` (cosine similarities with `normalize`, one
    softmax per target frame, forward KL with the teacher as the target), in float64.
    """
    check_feature_pair(student_features, teacher_features)
    grid = tuple(student_features.shape[1:4])
    query_rows = _check_queries(queries, grid)
    target_frames = _check_frames(frames, grid[0])
    tau_student = _check_tau("tau_student", tau_student)
    tau_teacher = tau_student if tau_teacher is None else _check_tau("tau_teacher", tau_teacher)
    index = torch.as_tensor(np.ravel_multi_index(tuple(query_rows.T), grid), device=student_features.device)
    selected = torch.as_tensor(target_frames, device=student_features.device)
    with torch.no_grad():
        log_t = _log_correspondences(teacher_features, index, selected, tau_teacher, normalize, torch.float64)
        log_s = _log_correspondences(student_features, index, selected, tau_student, normalize, torch.float64)
        kl = (log_t.exp() * (log_t - log_s)).sum(-1)
    shape = (*log_t.shape[:3], *grid[1:])
    return CorrespondenceMaps(
        queries=query_rows,
        frames=target_frames,
        teacher=log_t.exp().reshape(shape).cpu().numpy(),
        student=log_s.exp().reshape(shape).cpu().numpy(),
        kl=kl.cpu().numpy(),
        tau_student=tau_student,
        tau_teacher=tau_teacher,
    )


def alignment_statistics(
    student_features: torch.Tensor,
    teacher_features: torch.Tensor,
    *,
    tau_student: float = 0.1,
    tau_teacher: float | None = None,
    query_mask: torch.Tensor | None = None,
    normalize: bool = True,
    chunk_size: int = 256,
) -> dict:
    """Over every query (or those of `query_mask` (B, N) bool): mean entropy of P_t and P_s, the per-frame KL
    profile (F,) and its mean (the TSA / M-TSA loss value for these features). float32, chunked over queries."""
    check_feature_pair(student_features, teacher_features)
    tau_student = _check_tau("tau_student", tau_student)
    tau_teacher = tau_student if tau_teacher is None else _check_tau("tau_teacher", tau_teacher)
    batch, num_frames = student_features.shape[:2]
    num_tokens = math.prod(student_features.shape[1:4])
    device = student_features.device
    weight = torch.ones(batch, num_tokens, device=device) if query_mask is None else query_mask.to(device).float()
    frames = torch.arange(num_frames, device=device)
    totals = {"entropy_teacher": 0.0, "entropy_student": 0.0}
    kl_profile = torch.zeros(num_frames, dtype=torch.float64, device=device)
    with torch.no_grad():
        for start in range(0, num_tokens, chunk_size):
            index = torch.arange(start, min(start + chunk_size, num_tokens), device=device)
            w = weight[:, index, None]  # (B, Q, 1)
            log_t = _log_correspondences(teacher_features, index, frames, tau_teacher, normalize, torch.float32)
            log_s = _log_correspondences(student_features, index, frames, tau_student, normalize, torch.float32)
            p_t, p_s = log_t.exp(), log_s.exp()
            totals["entropy_teacher"] += float((-(p_t * log_t).sum(-1) * w).sum())
            totals["entropy_student"] += float((-(p_s * log_s).sum(-1) * w).sum())
            kl_profile += ((p_t * (log_t - log_s)).sum(-1) * w).sum((0, 1)).double()
    count = float(weight.sum())
    if count == 0:
        return {"entropy_teacher": 0.0, "entropy_student": 0.0, "kl_per_frame": np.zeros(num_frames), "kl": 0.0}
    profile = (kl_profile / count).cpu().numpy()
    return {
        "entropy_teacher": totals["entropy_teacher"] / (count * num_frames),
        "entropy_student": totals["entropy_student"] / (count * num_frames),
        "kl_per_frame": profile,
        "kl": float(profile.mean()),
    }


@dataclass
class ClipAlignment:
    """What the alignment loss sees for one clip, on the alignment grid (F, H, W).

    student (B, F, H, W, Cs) projected transformer features; teacher (B, F, H, W, Ct); saliency
    (B, F, H, W) M-TSA motion saliency; mask (B, F, H, W) bool M-TSA query mask (top_k per frame);
    images (B, F, 3, Hp, Wp) in [-1, 1]: the pixel frame under each grid frame (pixel frame 0 dropped
    when the teacher drops it); top_k the mask's fraction; timestep the diffusion timestep used.
    """

    student: torch.Tensor
    teacher: torch.Tensor
    saliency: torch.Tensor
    mask: torch.Tensor
    images: torch.Tensor
    top_k: float
    timestep: int

    @property
    def grid(self) -> tuple[int, int, int]:
        return tuple(self.student.shape[1:4])


def _motion_video(teacher, pixels, grid):
    """The pixel video M-TSA reads its mask from when the loss did not receive one (TSA, TRD, REPA runs):
    as in AlignmentObjective, pixel frame 0 dropped with the teacher's, resized to grid x the teacher's patch."""
    from tsa.teachers.base import resize_video

    size = [cells * patch for cells, patch in zip(grid, teacher.patch_size)]
    return resize_video(pixels[:, int(teacher.drop_first_frame) :], *size)


def clip_alignment(
    objective,
    latents: torch.Tensor,
    prompt_embeds: torch.Tensor,
    pixels: torch.Tensor,
    *,
    timestep: int = DEFAULT_TIMESTEP,
    seed: int = 0,
    top_k: float | None = None,
) -> ClipAlignment:
    """Run the objective on one batch (no grad, fixed timestep and noise) and keep what its alignment loss gets.

    objective: an `AlignmentObjective` with a teacher (align tsa / mtsa / trd / repa), unwrapped from DDP;
    latents (B, F, C, h, w) clean latents normalised as the model family does, prompt_embeds (B, L, D),
    pixels (B, T, 3, H, W) in [-1, 1].
    top_k defaults to the objective's M-TSA fraction (0.2 for the other methods).
    """
    loss = getattr(objective, "alignment_loss", None)
    if loss is None:
        raise ValueError(
            f"the objective (align={getattr(objective, 'align', None)!r}) has no teacher alignment "
            f"to show; runs with align in {viz_methods()} have one"
        )
    top_k = getattr(loss, "top_k", 0.2) if top_k is None else top_k
    captured = {}

    def record(module, args, kwargs):
        captured.update(student=args[0], teacher=args[1], video=kwargs.get("video", args[2] if len(args) > 2 else None))

    generator = torch.Generator(device=latents.device).manual_seed(seed)
    noise = torch.randn(latents.shape, generator=generator, device=latents.device, dtype=latents.dtype)
    timesteps = torch.full((latents.shape[0],), int(timestep), device=latents.device)  # the family casts it
    handle = loss.register_forward_pre_hook(record, with_kwargs=True)
    try:
        with torch.no_grad():
            objective(latents, prompt_embeds, pixels, timesteps=timesteps, noise=noise)
    finally:
        handle.remove()
    if not captured:
        raise RuntimeError("the objective's forward did not call its alignment loss: nothing to show")
    student, teacher = captured["student"].detach(), captured["teacher"].detach()
    grid = tuple(student.shape[1:4])
    video = captured["video"]
    if video is None:
        video = _motion_video(objective.teacher, pixels.to(student.device), grid)
    tubelet = tubelet_for_grid(video, grid)
    saliency = motion_saliency(video, tubelet)
    mask = motion_query_mask(video, tubelet, top_k).view(saliency.shape)
    images = _frames_under_grid(pixels, grid[0], int(objective.teacher.drop_first_frame))
    return ClipAlignment(student, teacher, saliency, mask, images, float(top_k), int(timestep))


def _frames_under_grid(pixels, num_frames, drop_first):
    """The pixel frame nearest to the middle of each grid frame's time span: (B, F, 3, H, W)."""
    from tsa.teachers.base import resize_video

    pixels = pixels[:, drop_first:] if pixels.shape[1] > drop_first else pixels
    return resize_video(pixels, num_frames, *pixels.shape[-2:]).detach().float().cpu()


def select_queries(saliency: torch.Tensor, *, query_frame: int | None = None, count: int = 2) -> list:
    """Default queries: the `count` most dynamic tokens (M-TSA saliency (F, H, W)) of the query frame (default: the
    middle one), then its centre token. Returns [(frame, row, col), ...] without repeats."""
    num_frames, height, width = saliency.shape
    frame = num_frames // 2 if query_frame is None else query_frame
    if isinstance(frame, bool) or not isinstance(frame, int) or not 0 <= frame < num_frames:
        raise ValueError(f"query_frame must be in [0, {num_frames}), got {query_frame!r}")
    order = torch.argsort(saliency[frame].flatten().float(), descending=True, stable=True)[:count].tolist()
    queries = [(frame, index // width, index % width) for index in order]
    centre = (frame, height // 2, width // 2)
    return queries + ([centre] if centre not in queries else [])


def pixel_to_grid(points, image_size, grid) -> list:
    """(x, y) pixel positions in a (height, width) frame -> (row, col) cells of a (H, W) grid over that frame."""
    (height, width), (rows, cols) = image_size, grid
    return [(min(int(y * rows / height), rows - 1), min(int(x * cols / width), cols - 1)) for x, y in points]


def default_columns(num_frames: int, query_frame: int, max_columns: int = MAX_COLUMNS) -> list:
    """All target frames, or `max_columns` of them evenly spaced, the query frame always included."""
    if num_frames <= max_columns:
        return list(range(num_frames))
    picked = set(np.linspace(0, num_frames - 1, max_columns - 1).round().astype(int).tolist()) | {query_frame}
    return sorted(picked)


def _to_image(frame: torch.Tensor) -> np.ndarray:
    """(3, H, W) in [-1, 1] -> (H, W, 3) float in [0, 1]."""
    return ((frame.float().clamp(-1, 1) + 1) / 2).permute(1, 2, 0).cpu().numpy()


LEGEND = (
    "heat: probability over the target frame's positions (one scale per query); x: the query token; "
    "o: the same position in the other frames; red: tokens kept by the M-TSA mask"
)


def _map_rows(maps: CorrespondenceMaps, base: CorrespondenceMaps | None) -> list:
    rows = [("teacher P_t", maps.teacher, None), ("student P_s", maps.student, maps.kl)]
    return rows + ([("base P_s", base.student, base.kl)] if base is not None else [])


def _new_figure(rows: int, columns: int, image_size, extra_height: float = 1.0):
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    height, width = image_size
    panel = 2.2
    figure = Figure(figsize=(panel * columns + 0.6, panel * height / width * rows + extra_height), layout="constrained")
    return figure, figure.subplots(rows, columns, squeeze=False)


def _draw_map(axis, image, values, *, vmax, point, query_here):
    """One heatmap (H, W) over a frame image (Hp, Wp, 3), the query position marked (x on its own frame)."""
    height, width = image.shape[:2]
    extent = (0, width, height, 0)
    axis.imshow(image, extent=extent)
    axis.imshow(values, extent=extent, cmap="inferno", alpha=0.6, vmin=0, vmax=vmax, interpolation="nearest")
    marker = dict(marker="x", fillstyle="full") if query_here else dict(marker="o", fillstyle="none")
    axis.plot(*point, markersize=8, mew=2, color="cyan", **marker)
    axis.set_xticks([]), axis.set_yticks([])


def _draw_mask(axis, image, clip: ClipAlignment, batch_index: int, target: int):
    """The M-TSA mask of grid frame `target` over its image, the share of the frame's motion inside it in the title."""
    height, width = image.shape[:2]
    mask = clip.mask[batch_index, target].float().cpu().numpy()
    saliency = clip.saliency[batch_index, target].float().cpu().numpy()
    axis.imshow(image, extent=(0, width, height, 0))
    overlay = np.zeros((*mask.shape, 4))
    overlay[..., 0], overlay[..., 3] = 1.0, 0.5 * mask
    axis.imshow(overlay, extent=(0, width, height, 0), interpolation="nearest")
    total = saliency.sum()
    share = saliency[mask > 0].sum() / max(total, 1e-12)
    axis.set_title(f"motion in mask {share:.0%}" if total > 0 else "no motion (mask arbitrary)", fontsize=9)
    axis.set_xticks([]), axis.set_yticks([])


def _query_points(maps: CorrespondenceMaps, clip: ClipAlignment, image_size) -> list:
    """The pixel centre (x, y) of each query's grid cell."""
    (height, width), (_, rows, cols) = image_size, clip.grid
    return [((col + 0.5) * width / cols, (row + 0.5) * height / rows) for _, row, col in maps.queries]


def _default_title(maps: CorrespondenceMaps, clip: ClipAlignment, batch_index: int) -> str:
    return (
        f"correspondences: tau_s={maps.tau_student:g}, tau_t={maps.tau_teacher:g}, t={clip.timestep}; "
        f"mean KL {maps.kl[batch_index].mean():.3g}"
    )


def plot_correspondences(
    maps: CorrespondenceMaps,
    clip: ClipAlignment,
    *,
    base: CorrespondenceMaps | None = None,
    batch_index: int = 0,
    title: str | None = None,
):
    """A matplotlib Figure: one column per target frame; per query the rows teacher P_t, trained student P_s and
    (if given) the base model's P_s, each heatmap over that frame's pixels with the query marked and the
    per-frame KL in the titles; a last row with the M-TSA mask over the clip. Colours are shared within a query."""
    rows = _map_rows(maps, base)
    images = [_to_image(image) for image in clip.images[batch_index]]
    columns = len(maps.frames)
    figure, axes = _new_figure(len(maps.queries) * len(rows) + 1, columns, images[0].shape[:2])
    points = _query_points(maps, clip, images[0].shape[:2])
    for q, (frame, point) in enumerate(zip(maps.queries[:, 0], points)):
        vmax = max(float(values[batch_index, q].max()) for _, values, _ in rows)
        for r, (label, values, kl) in enumerate(rows):
            for c, target in enumerate(maps.frames):
                axis = axes[q * len(rows) + r, c]
                _draw_map(
                    axis, images[target], values[batch_index, q, c], vmax=vmax, point=point, query_here=target == frame
                )
                if r == 0:
                    axis.set_title(f"frame {target}" + (" (query)" if target == frame else ""), fontsize=9)
                else:
                    axis.set_title(f"KL {kl[batch_index, q, c]:.3g}", fontsize=9)
                if c == 0:
                    axis.set_ylabel(f"q{q + 1} ({point[0]:.0f},{point[1]:.0f})\n{label}", fontsize=9)
    for c, target in enumerate(maps.frames):
        _draw_mask(axes[-1, c], images[target], clip, batch_index, target)
    axes[-1, 0].set_ylabel(f"M-TSA mask\ntop {clip.top_k:g}", fontsize=9)
    figure.suptitle(title or _default_title(maps, clip, batch_index), fontsize=10)
    figure.supxlabel(textwrap.fill(LEGEND, width=max(40, 32 * columns)), fontsize=8)
    return figure


def plot_target_frame(
    maps: CorrespondenceMaps,
    clip: ClipAlignment,
    column: int,
    *,
    base: CorrespondenceMaps | None = None,
    batch_index: int = 0,
    title: str | None = None,
):
    """One target frame (`maps.frames[column]`) of every query: a column per query, rows teacher P_t, student P_s
    (and base P_s), then the M-TSA mask of that frame. Colours per query are those of `plot_correspondences`
    (shared over all target frames), so the frames of an animation compare."""
    rows = _map_rows(maps, base)
    images = [_to_image(image) for image in clip.images[batch_index]]
    target = int(maps.frames[column])
    columns = max(2, len(maps.queries))
    figure, axes = _new_figure(len(rows) + 1, columns, images[0].shape[:2], extra_height=1.2)
    points = _query_points(maps, clip, images[0].shape[:2])
    for q, (frame, point) in enumerate(zip(maps.queries[:, 0], points)):
        vmax = max(float(values[batch_index, q].max()) for _, values, _ in rows)
        for r, (label, values, kl) in enumerate(rows):
            axis = axes[r, q]
            _draw_map(
                axis, images[target], values[batch_index, q, column], vmax=vmax, point=point, query_here=target == frame
            )
            name = f"q{q + 1} ({point[0]:.0f},{point[1]:.0f}) of frame {frame}"
            axis.set_title(name if kl is None else f"KL {kl[batch_index, q, column]:.3g}", fontsize=9)
            if q == 0:
                axis.set_ylabel(label, fontsize=9)
    for q in range(len(maps.queries), columns):
        for r in range(len(rows)):
            axes[r, q].set_axis_off()
    _draw_mask(axes[-1, 0], images[target], clip, batch_index, target)
    axes[-1, 0].set_ylabel(f"M-TSA mask\ntop {clip.top_k:g}", fontsize=9)
    for axis in axes[-1, 1:]:
        axis.set_axis_off()
    figure.suptitle(f"target frame {target}\n" + (title or _default_title(maps, clip, batch_index)), fontsize=10)
    figure.supxlabel(textwrap.fill(LEGEND, width=max(40, 32 * columns)), fontsize=8)
    return figure


def figure_to_array(figure, dpi: int = 100) -> np.ndarray:
    """(H, W, 3) uint8 RGB rendering of a matplotlib Figure."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    canvas = FigureCanvasAgg(figure)
    figure.set_dpi(dpi)
    canvas.draw()
    return np.asarray(canvas.buffer_rgba())[..., :3].copy()


def save_correspondence_gif(
    maps: CorrespondenceMaps,
    clip: ClipAlignment,
    path,
    *,
    base: CorrespondenceMaps | None = None,
    batch_index: int = 0,
    title: str | None = None,
    duration_ms: int = 700,
) -> Path:
    """An animated GIF through the target frames, one `plot_target_frame` per GIF frame."""
    from PIL import Image

    frames = [
        Image.fromarray(
            figure_to_array(plot_target_frame(maps, clip, c, base=base, batch_index=batch_index, title=title))
        )
        for c in range(len(maps.frames))
    ]
    size = frames[0].size
    frames = [frame if frame.size == size else frame.resize(size) for frame in frames]
    frames[0].save(path, save_all=True, append_images=frames[1:], duration=duration_ms, loop=0)
    return Path(path)


def probe_batch(entry: dict, family, vae_config: dict) -> dict:
    """A one-clip batch from a latent-cache entry (latent_dist (2C, F, h, w), prompt_embeds (L, D), pixels
    (T, 3, H, W)): the latent distribution's mode, normalised by the model family as in training, as
    (1, F, C, h, w); no randomness."""
    return {
        "latents": family.latents_from_distribution(entry["latent_dist"][None], vae_config, sample=False),
        "prompt_embeds": entry["prompt_embeds"][None],
        "pixels": entry["pixels"][None].float(),
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
        # Under context parallelism the transformer's forward is collective: every rank runs the probe (the
        # probe is broadcast from the main process) and the main process draws.
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
                clip = clip_alignment(
                    module, batch["latents"], batch["prompt_embeds"], batch["pixels"], timestep=self.timestep
                )
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


# --- tsa-viz: a saved run -------------------------------------------------------------------------------------


def read_training_args(run_dir) -> dict:
    """The options a run was trained with (RUN_DIR/training_args.json), checked to be one tsa-viz can show."""
    run_dir = Path(run_dir)
    path = run_dir / "training_args.json"
    if not path.is_file():
        raise FileNotFoundError(f"{run_dir} is not a tsa-train output folder (no training_args.json)")
    args = json.loads(path.read_text())
    if args.get("align") not in viz_methods():
        raise ValueError(
            f"{run_dir} was trained with --align {args.get('align')}: it has no projector and teacher to "
            f"compare (tsa-viz shows runs trained with --align {', '.join(viz_methods())})"
        )
    for name, needed in (
        ("projector", run_dir / "projector" / "config.json"),
        ("base model", Path(args["model_path"]) / "model_index.json"),
        ("teacher", Path(args["teacher_path"]) / "config.json"),
    ):
        if not needed.is_file():
            raise FileNotFoundError(f"{run_dir}: the {name} is missing ({needed} not found)")
    expert = args.get("expert") or "transformer"
    if not ((run_dir / expert).is_dir() or (run_dir / "pytorch_lora_weights.safetensors").is_file()):
        raise FileNotFoundError(
            f"{run_dir} holds neither {expert}/ nor pytorch_lora_weights.safetensors (the final "
            "weights of a finished tsa-train run)"
        )
    return args


def run_family(args: dict):
    """The model family of a run's base model, configured as training configured it (expert, timestep options)."""
    from tsa.models import detect_family

    options = dict(
        timestep_sampling=args.get("timestep_sampling"),
        logit_mean=args.get("logit_mean"),
        logit_std=args.get("logit_std"),
        shift=args.get("flow_shift"),
    )
    return detect_family(args["model_path"], args.get("expert") or "transformer", **options)


def alignment_grid(run_dir, args: dict) -> tuple[int, int, int]:
    """The alignment grid (F, H, W) of a run's clips, from the configs alone (no weights are loaded)."""
    from types import SimpleNamespace

    from accelerate import init_empty_weights

    from tsa.projector import AlignmentProjector

    family, expert = run_family(args), args.get("expert") or "transformer"
    model_path = Path(args["model_path"])
    config = json.loads((model_path / expert / "config.json").read_text())
    latent_shape = family.latent_shape(model_path, args["num_frames"], args["height"], args["width"], expert)
    dit_grid = family.token_grid(SimpleNamespace(**config), latent_shape)
    with init_empty_weights():
        projector = AlignmentProjector.from_config(AlignmentProjector.load_config(Path(run_dir) / "projector"))
    return projector.output_grid(dit_grid)


@dataclass
class LoadedRun:
    """A finished run ready for tsa-viz: the trained objective, the base one (None when the base weights are
    not at hand; for LoRA the same objective with the adapters disabled), the model family with its VAE config
    and the family's VAE / text encoder (`tsa.cache.LatentEncoder`, as the latent cache)."""

    args: dict
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
    from tsa.cache import LatentEncoder, precision_dtype
    from tsa.objective import AlignmentObjective
    from tsa.projector import AlignmentProjector
    from tsa.teachers import load_teacher

    run_dir, device = Path(run_dir), torch.device(device)
    args = read_training_args(run_dir)
    model_path, expert = Path(args["model_path"]), args.get("expert") or "transformer"
    family = run_family(args)
    lora = not (run_dir / expert).is_dir()
    transformer = family.load_trained_transformer(run_dir, model_path, expert, dtype)
    teacher_dtype = precision_dtype(args.get("teacher_precision", "fp32"))
    teacher = load_teacher(args["teacher"], args["teacher_path"], dtype=teacher_dtype, device=device)
    scheduler = family.load_scheduler(model_path)
    options = dict(
        align=args["align"],
        weight=args["align_weight"],
        block_index=args["align_layer"],
        projector=AlignmentProjector.from_pretrained(run_dir / "projector", torch_dtype=dtype),
        family=family,
        **{name: args.get(name, option.default) for name, option in alignment_options().items()},
    )
    objective = AlignmentObjective(transformer, scheduler, teacher, **options).to(device).eval()
    base = None
    if with_base and lora:
        base = objective
    elif with_base and (model_path / expert / "config.json").is_file():
        base_transformer = family.load_transformer(model_path, expert, dtype)
        base = AlignmentObjective(base_transformer, scheduler, teacher, **options).to(device).eval()
    encoder = LatentEncoder(model_path, device, dtype, tiling=args.get("vae_tiling", False), family=family)
    vae_config = json.loads((model_path / "vae" / "config.json").read_text())
    return LoadedRun(args, objective, base, lora, encoder, family, vae_config, device, dtype)


def _parse_point(text: str) -> tuple[float, float]:
    try:
        x, y = (float(value) for value in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a pixel position x,y (e.g. 72,40), got {text!r}") from None
    return x, y


def _parse_frames(text: str) -> list:
    try:
        return [int(value) for value in text.split(",") if value.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated frame indices (e.g. 0,4,8), got {text!r}") from None


def build_parser():
    parser = argparse.ArgumentParser(
        prog="tsa-viz",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        description="Draw the correspondence distributions of a tsa-train run: for query tokens of one frame, "
        "the teacher's P_t and the student's P_s over every target frame, their KL, and the M-TSA mask.",
    )
    parser.add_argument("run_dir", type=Path, help="A finished tsa-train --output-dir (align tsa, mtsa, trd or repa).")
    parser.add_argument("--video", type=Path, required=True, help="The clip (read at the run's resolution and length).")
    parser.add_argument(
        "--points",
        type=_parse_point,
        nargs="+",
        default=None,
        metavar="X,Y",
        help="Query pixels in the clip at the run's resolution (default: the most dynamic tokens by "
        "the M-TSA saliency, and the centre).",
    )
    parser.add_argument(
        "--query-frame", type=int, default=None, help="Alignment-grid frame of the queries (default: the middle one)."
    )
    parser.add_argument(
        "--frames",
        type=_parse_frames,
        default=None,
        metavar="I,J,...",
        help=f"Target frames shown (default: all, or {MAX_COLUMNS} evenly spaced).",
    )
    parser.add_argument("--tau", type=float, default=None, help="Temperature of both softmaxes (default: the run's).")
    parser.add_argument(
        "--timestep",
        type=int,
        default=DEFAULT_TIMESTEP,
        help="Diffusion timestep at which the student's features are taken.",
    )
    parser.add_argument(
        "--prompt",
        default=None,
        help="Caption for the student (default: the clip's caption in the run's dataset, else empty).",
    )
    parser.add_argument("--output", type=Path, default=None, help="PNG path (default: RUN_DIR/viz/<clip>.png).")
    parser.add_argument("--gif", action="store_true", help="Also write an animated GIF (same path, .gif).")
    parser.add_argument("--no-base", action="store_true", help="Leave out the base model's row.")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="fp32", help="Weights and activations.")
    parser.add_argument("--seed", type=int, default=0, help="Seed of the diffusion noise.")
    return parser


def _caption_for(video: Path, args: dict) -> str:
    from tsa.data import load_video_captions

    try:
        samples = load_video_captions(
            args["data"], args.get("video_column", "video"), args.get("caption_column", "caption")
        )
    except (OSError, ValueError, KeyError, TypeError):
        return ""
    return next((sample.caption for sample in samples if sample.video.resolve() == video.resolve()), "")


def main(argv=None):
    """Console script tsa-viz."""
    from tsa.data import VideoDecodeError, read_video

    parser = build_parser()
    options = parser.parse_args(argv)

    def refuse(message):
        parser.exit(2, f"{parser.prog}: error: {message}\n")

    try:
        args = read_training_args(options.run_dir)
        grid = alignment_grid(options.run_dir, args)
    except (FileNotFoundError, ValueError) as error:
        refuse(str(error))
    except KeyError as error:
        refuse(f"{options.run_dir / 'training_args.json'} lacks the option {error}: not written by this tsa-train")
    if not options.video.is_file():
        refuse(f"--video: no such file: {options.video}")
    try:
        pixels = read_video(options.video, args["num_frames"], args["height"], args["width"])
    except VideoDecodeError as error:
        refuse(f"--video: cannot decode {error}")
    height, width = args["height"], args["width"]
    for x, y in options.points or ():
        if not (0 <= x < width and 0 <= y < height):
            refuse(f"--points {x:g},{y:g} is outside the {width}x{height} clip (x in [0, {width}), y in [0, {height}))")
    if options.query_frame is not None and not 0 <= options.query_frame < grid[0]:
        refuse(
            f"--query-frame must be in [0, {grid[0]}) (the alignment grid has {grid[0]} frames), "
            f"got {options.query_frame}"
        )
    bad = [frame for frame in options.frames or () if not 0 <= frame < grid[0]]
    if bad or options.frames == []:
        refuse(
            f"--frames must be frame indices in [0, {grid[0]}) (the alignment grid has {grid[0]} frames), got "
            f"{options.frames}"
        )
    if options.tau is not None and not (options.tau > 0 and math.isfinite(options.tau)):
        refuse(f"--tau must be a positive number, got {options.tau}")
    if not 0 <= options.timestep < 1000:
        refuse(f"--timestep must be in [0, 1000), got {options.timestep}")
    output = options.output or options.run_dir / "viz" / f"{options.video.stem}.png"
    if output.suffix.lower() != ".png":
        refuse(f"--output must be a .png path, got {output}")

    run = load_run(options.run_dir, device=options.device, dtype=DTYPES[options.dtype], with_base=not options.no_base)
    prompt = _caption_for(options.video, args) if options.prompt is None else options.prompt
    batch = run.encode(pixels, prompt)
    settings = dict(timestep=options.timestep, seed=options.seed)
    clip = clip_alignment(run.objective, batch["latents"], batch["prompt_embeds"], batch["pixels"], **settings)
    query_frame = grid[0] // 2 if options.query_frame is None else options.query_frame
    if options.points:
        queries = [(query_frame, *cell) for cell in pixel_to_grid(options.points, (height, width), grid[1:])]
        queries = list(dict.fromkeys(queries))
    else:
        queries = select_queries(clip.saliency[0], query_frame=query_frame)
    columns = options.frames or default_columns(grid[0], query_frame)
    tau_student, tau_teacher = temperatures(run.objective, options.tau)
    maps_options = dict(frames=columns, tau_student=tau_student, tau_teacher=tau_teacher)
    maps = correspondence_maps(clip.student, clip.teacher, queries, **maps_options)
    base_clip = run.base_alignment(batch, **settings)
    base = None if base_clip is None else correspondence_maps(base_clip.student, clip.teacher, queries, **maps_options)
    title = (
        f"{options.run_dir.name} ({args['align']}), {options.video.name}: tau_s={tau_student:g}, "
        f"tau_t={tau_teacher:g}, t={options.timestep}"
    )
    output.parent.mkdir(parents=True, exist_ok=True)
    plot_correspondences(maps, clip, base=base, title=title).savefig(output, dpi=100)
    print(output)
    if options.gif:
        print(save_correspondence_gif(maps, clip, output.with_suffix(".gif"), base=base, title=title))
    for index, (frame, row, col) in enumerate(maps.queries):
        profile = " ".join(f"{value:.3g}" for value in maps.kl[0, index])
        line = f"q{index + 1} frame {frame} cell ({row},{col}): KL per frame {profile}"
        if base is not None:
            line += f" | base {' '.join(f'{value:.3g}' for value in base.kl[0, index])}"
        print(line)
    return output


if __name__ == "__main__":
    main()
