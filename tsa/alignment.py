"""The registry of alignment methods: what each one is called, takes and needs.

Every method declares its name, its options (name, type, default, allowed values, help) and whether it needs
the pixel video (for the teacher) and a motion mask. `tsa-train`'s --align choices and option flags, the
objective's validation and the loss module all come from here:

    method = ALIGNMENT_METHODS["mtsa"]
    loss = method.build(tau=0.1, top_k=0.2)          # -> TSALoss(masked=True, ...)

Registering a new method (`register_alignment(AlignmentMethod(...))`) adds it to the command line. Import-light
(no torch): the loss classes are imported when a method is built.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from tsa.choices import KERNEL_BACKENDS, TRD_VARIANTS


def _positive(name):
    def check(value):
        if not value > 0:
            return f"--{name.replace('_', '-')} must be > 0, got {value}"
        return None

    return check


def _fraction(value):
    return None if 0 < value <= 1 else f"--top-k must be in (0, 1], got {value}"


def _non_negative(name):
    def check(value):
        return None if value >= 0 else f"--{name.replace('_', '-')} must be >= 0, got {value}"

    return check


@dataclass(frozen=True)
class AlignmentOption:
    """One keyword of a method (also an AlignmentObjective keyword and the `--name` command-line flag)."""

    name: str
    type: type
    default: Any
    help: str
    choices: tuple | None = None
    check: Callable[[Any], str | None] | None = None  # an error message for a bad value, else None

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")


@dataclass(frozen=True)
class AlignmentMethod:
    """An alignment loss on (B, F, H, W, C) student / teacher features. `build(**options)` returns the loss
    module, called as loss(student, target) or, with `motion_mask`, loss(student, target, video=pixels)."""

    name: str
    description: str
    options: tuple[AlignmentOption, ...]
    build: Callable[..., Any]
    needs_pixels: bool = True  # the frozen teacher reads the pixel video
    motion_mask: bool = False  # the loss also takes the pixel video for its query mask
    teacher_channels: bool = False  # the projector's output width must equal the teacher's (token-wise losses)
    # The loss also takes (B, n, C) token slices with frames= and process_group= (context parallelism).
    token_sharding: bool = False
    option_names: tuple[str, ...] = field(init=False)

    def __post_init__(self):
        object.__setattr__(self, "option_names", tuple(option.name for option in self.options))

    def check(self, options: dict) -> None:
        """Raise ValueError naming the first bad option value."""
        for option in self.options:
            value = options.get(option.name, option.default)
            if option.choices is not None and value not in option.choices:
                raise ValueError(f"{option.name} must be one of {option.choices}, got {value!r}")
            message = option.check(value) if option.check is not None and value is not None else None
            if message:
                raise ValueError(message.replace(option.flag, option.name))


TAU = AlignmentOption(
    "tau",
    float,
    0.1,
    "Temperature of the student's similarity softmax (and the teacher's unless --tau-teacher).",
    check=_positive("tau"),
)
TAU_TEACHER = AlignmentOption(
    "tau_teacher", float, None, "Temperature of the teacher's softmax (default: --tau).", check=_positive("tau_teacher")
)
TOP_K = AlignmentOption(
    "top_k", float, 0.2, "M-TSA: fraction of moving tokens per frame kept as queries.", check=_fraction
)
BACKEND = AlignmentOption(
    "backend",
    str,
    "auto",
    "stss_kernels backend of the loss's op (tempered KL, relation distance; auto: Triton on GPU).",
    choices=KERNEL_BACKENDS,
)
TRD_MARGIN = AlignmentOption(
    "trd_margin", float, 0.1, "TRD: margin delta of relu(|S - T| - delta).", check=_non_negative("trd_margin")
)
TRD_VARIANT = AlignmentOption(
    "trd_variant", str, "full", "TRD: full, spatial-only or temporal-only relations.", choices=TRD_VARIANTS
)


def _tsa(masked):
    def build(tau=0.1, tau_teacher=None, top_k=0.2, backend="auto"):
        from tsa.losses import TSALoss

        return TSALoss(tau, tau_teacher, masked=masked, top_k=top_k, backend=backend)

    return build


def _trd(trd_margin=0.1, trd_variant="full", backend="auto"):
    from tsa.losses import TRDLoss

    return TRDLoss(trd_margin, trd_variant, backend)


def _repa():
    from tsa.losses import REPALoss

    return REPALoss()


ALIGNMENT_METHODS: dict[str, AlignmentMethod] = {}


def register_alignment(method: AlignmentMethod) -> AlignmentMethod:
    """Add a method to the registry (and so to AlignmentObjective and tsa-train --align)."""
    if method.name in ALIGNMENT_METHODS or method.name in ("none", "lamo"):
        raise ValueError(f"an alignment method named {method.name!r} exists already")
    ALIGNMENT_METHODS[method.name] = method
    return method


register_alignment(
    AlignmentMethod("tsa", "Tempered self-similarity KL, all queries.", (TAU, TAU_TEACHER, BACKEND), _tsa(False),
                    token_sharding=True)
)
register_alignment(
    AlignmentMethod(
        "mtsa",
        "TSA on the moving tokens' queries (motion mask from the pixels).",
        (TAU, TAU_TEACHER, TOP_K, BACKEND),
        _tsa(True),
        motion_mask=True,
        token_sharding=True,
    )
)
register_alignment(
    AlignmentMethod("trd", "VideoREPA's token relation distillation.", (TRD_MARGIN, TRD_VARIANT, BACKEND), _trd,
                    token_sharding=True)
)
register_alignment(
    AlignmentMethod("repa", "REPA: negative token-wise cosine similarity.", (), _repa, teacher_channels=True,
                    token_sharding=True)
)


def alignment_losses() -> tuple[str, ...]:
    """AlignmentObjective(align=...) values: "none" and every registered method."""
    return ("none", *ALIGNMENT_METHODS)


def training_methods() -> tuple[str, ...]:
    """tsa-train --align values: the alignment losses and "lamo" (no alignment loss, LaMo's drift loss)."""
    return (*alignment_losses(), "lamo")


def alignment_options() -> dict[str, AlignmentOption]:
    """Every option of every method, by name (methods sharing an option share its declaration)."""
    options = {}
    for method in ALIGNMENT_METHODS.values():
        for option in method.options:
            if options.setdefault(option.name, option) is not option:
                raise ValueError(f"two declarations of the alignment option {option.name!r}")
    return options
