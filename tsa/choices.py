"""The option values shared by the library and the command line (kept import-light for `--help`)."""

from tsa.alignment import KERNEL_BACKENDS, TRD_VARIANTS, alignment_losses, training_methods

ALIGNMENT_LOSSES = alignment_losses()  # AlignmentObjective(align=...): "none" + the registry (tsa.alignment)
TRAINING_METHODS = training_methods()  # tsa-train --align: "lamo" is no alignment loss + LaMo
TEACHER_KINDS = ("videomae", "dinov2", "vjepa2")
TEACHER_MODEL_TYPES = {"videomae": ("videomae",), "dinov2": ("dinov2", "dinov2_with_registers"), "vjepa2": ("vjepa2",)}
GRID_MODES = ("teacher-grid", "native")

__all__ = [
    "ALIGNMENT_LOSSES", "EXPERTS", "GRID_MODES", "KERNEL_BACKENDS", "MODEL_FAMILIES", "TEACHER_KINDS",
    "TIMESTEP_SAMPLING", "TRAINING_METHODS", "TRD_VARIANTS",
]
MODEL_FAMILIES = ("cogvideox", "wan")  # tsa.models.FAMILIES
EXPERTS = ("transformer", "transformer_2")  # two-expert pipelines (Wan2.2 A14B): which denoiser a run trains
TIMESTEP_SAMPLING = ("logit-normal", "uniform")  # flow-matching families
