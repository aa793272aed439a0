"""The option values shared by the library and the command line (kept import-light for `--help`)."""

ALIGNMENT_LOSSES = ("none", "tsa", "mtsa", "trd", "repa")  # AlignmentObjective(align=...)
TRAINING_METHODS = (*ALIGNMENT_LOSSES, "lamo")  # tsa-train --align: "lamo" is no alignment loss + LaMo
TEACHER_KINDS = ("videomae", "dinov2", "vjepa2")
TEACHER_MODEL_TYPES = {"videomae": ("videomae",), "dinov2": ("dinov2", "dinov2_with_registers"), "vjepa2": ("vjepa2",)}
GRID_MODES = ("teacher-grid", "native")
TRD_VARIANTS = ("full", "spatial", "temporal")
