"""Drawing correspondence maps: one figure per clip (`plot_correspondences`), one target frame
(`plot_target_frame`) and an animated GIF over the target frames (`save_correspondence_gif`)."""

from __future__ import annotations

import textwrap
from pathlib import Path

import numpy as np
import torch

from tsa.viz.maps import ClipAlignment, CorrespondenceMaps


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
