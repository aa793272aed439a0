"""Correspondence maps of TSA: the distributions (maps.py), their drawings (plots.py), the training-time probe
(training.py, tsa-train --viz-steps) and finished runs (runs.py, tsa-viz)."""

from tsa.viz.maps import (
    DEFAULT_TIMESTEP,
    MAX_COLUMNS,
    ClipAlignment,
    CorrespondenceMaps,
    alignment_statistics,
    clip_alignment,
    correspondence_maps,
    default_columns,
    pixel_to_grid,
    select_queries,
    viz_methods,
)
from tsa.viz.plots import figure_to_array, plot_correspondences, plot_target_frame, save_correspondence_gif
from tsa.viz.runs import LoadedRun, alignment_grid, draw_run, load_run, read_training_args, run_family
from tsa.viz.training import TrainingViz, batch_to, probe_batch, temperatures

__all__ = [
    "DEFAULT_TIMESTEP", "MAX_COLUMNS", "ClipAlignment", "CorrespondenceMaps", "LoadedRun", "TrainingViz",
    "alignment_grid", "alignment_statistics", "batch_to", "clip_alignment", "correspondence_maps", "default_columns",
    "draw_run", "figure_to_array", "load_run", "pixel_to_grid", "plot_correspondences", "plot_target_frame",
    "probe_batch", "read_training_args", "run_family", "save_correspondence_gif", "select_queries", "temperatures",
    "viz_methods",
]
