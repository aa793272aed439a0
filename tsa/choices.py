"""The option values shared by the library and the command line (kept import-light for `--help`)."""

ALIGNMENT_LOSSES = ("none", "tsa", "mtsa", "trd", "repa")  # AlignmentObjective(align=...)
TRAINING_METHODS = (*ALIGNMENT_LOSSES, "lamo")  # tsa-train --align: "lamo" is no alignment loss + LaMo
TEACHER_KINDS = ("videomae", "dinov2", "vjepa2")
GRID_MODES = ("teacher-grid", "native")
TRD_VARIANTS = ("full", "spatial", "temporal")
MODEL_FAMILIES = ("cogvideox", "wan")  # tsa.models.FAMILIES
EXPERTS = ("transformer", "transformer_2")  # two-expert pipelines (Wan2.2 A14B): which denoiser a run trains
TIMESTEP_SAMPLING = ("logit-normal", "uniform")  # flow-matching families
