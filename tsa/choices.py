"""Option values shared by the library and the command line (no imports, so every module may use them)."""

TRD_VARIANTS = ("full", "spatial", "temporal")  # tsa.losses.TRDLoss: which relations TRD compares
KERNEL_BACKENDS = ("auto", "triton", "torch", "reference")  # stss_kernels.tempered_kl / relation_distance
TEACHER_KINDS = ("videomae", "dinov2", "vjepa2")
TEACHER_MODEL_TYPES = {"videomae": ("videomae",), "dinov2": ("dinov2", "dinov2_with_registers"), "vjepa2": ("vjepa2",)}
GRID_MODES = ("teacher-grid", "native")

__all__ = ["GRID_MODES", "KERNEL_BACKENDS", "TEACHER_KINDS", "TEACHER_MODEL_TYPES", "TRD_VARIANTS"]
