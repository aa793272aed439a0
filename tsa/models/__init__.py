"""Model families: one module per family of diffusers video DiTs (see tsa.models.base.ModelFamily).

    family = detect_family(model_path)          # from model_index.json's _class_name
    family = get_family("wan", timestep_sampling="uniform")
    family = family_of(transformer)             # from the transformer's class (through peft / DDP wrappers)

To add a family: one module here with a ModelFamily subclass (the contract is ModelFamily's docstring, its
tiny builder included) and one entry in FAMILIES; the conformance suite (tests/families/) then runs on it.
FAMILIES is the one list of families: the command line's --model-family choices, the presets and the tests
all come from it.
"""

from __future__ import annotations

import importlib

from tsa.models.base import TIMESTEP_SAMPLING, ModelFamily, model_index, noise_level_alphas_cumprod, unwrap_module

FAMILIES = {
    "cogvideox": "tsa.models.cogvideox:CogVideoXFamily",
    "wan": "tsa.models.wan:WanFamily",
    "ltx2": "tsa.models.ltx2:LTX2Family",
}
DEFAULT_FAMILY = next(iter(FAMILIES))  # the tiny preset's models when no --model-family is given

__all__ = [
    "DEFAULT_FAMILY",
    "FAMILIES",
    "TIMESTEP_SAMPLING",
    "all_experts",
    "all_objective_options",
    "ModelFamily",
    "detect_family",
    "detect_family_name",
    "family_class",
    "family_for_pipeline",
    "family_of",
    "get_family",
    "model_index",
    "noise_level_alphas_cumprod",
    "pipeline_family_name",
    "unwrap_transformer",
]


def family_class(name: str) -> type[ModelFamily]:
    if name not in FAMILIES:
        raise ValueError(f"model family must be one of {tuple(FAMILIES)}, got {name!r}")
    module, _, attribute = FAMILIES[name].partition(":")
    return getattr(importlib.import_module(module), attribute)


def get_family(name: str, **options) -> ModelFamily:
    """A family instance by name (options: the family's objective options, e.g. timestep_range)."""
    return family_class(name)._with_options(**options)


def _all_classes():
    return [family_class(name) for name in FAMILIES]


def all_experts() -> tuple[str, ...]:
    """Every denoiser component name of every family (tsa-train --expert choices), in registry order."""
    return tuple(dict.fromkeys(expert for cls in _all_classes() for expert in cls.experts))


def all_objective_options() -> dict[str, tuple[str, ...]]:
    """Each family objective option (run-config name) -> the families that take it."""
    users: dict[str, list[str]] = {}
    for cls in _all_classes():
        for option in cls.objective_options:
            users.setdefault(option, []).append(cls.name)
    return {option: tuple(names) for option, names in users.items()}


def pipeline_family_name(pipeline) -> str:
    """The family whose diffusers pipeline class is named `pipeline` (model_index.json's `_class_name`);
    ValueError naming the supported pipelines otherwise."""
    for cls in _all_classes():
        if pipeline in cls.pipeline_class_names:
            return cls.name
    supported = ", ".join(f"{name} ({', '.join(family_class(name).pipeline_class_names)})" for name in FAMILIES)
    raise ValueError(f"unsupported pipeline {pipeline!r}; supported model families: {supported}")


def detect_family_name(model_path) -> str:
    """The family of a diffusers pipeline folder, from model_index.json's `_class_name`."""
    index = model_index(model_path)
    if not index:
        raise FileNotFoundError(f"{model_path} has no model_index.json (a diffusers pipeline folder is expected)")
    try:
        return pipeline_family_name(index.get("_class_name"))
    except ValueError as error:
        raise ValueError(f"{model_path}: {error}") from None


def detect_family(model_path, expert: str = "transformer", **options) -> ModelFamily:
    """The configured family of a pipeline folder (see ModelFamily.from_model_path)."""
    return family_class(detect_family_name(model_path)).from_model_path(model_path, expert, **options)


def _transformer_names():
    return [name for cls in _all_classes() for name in cls.transformer_class_names]


def family_of(model) -> ModelFamily:
    """The (default-configured) family of a transformer module or of its config (`_class_name`)."""
    from torch import nn

    name = None if isinstance(model, nn.Module) else dict(model).get("_class_name")
    for cls in _all_classes():
        if name is not None:
            if name in cls.transformer_class_names:
                return cls()
        elif unwrap_module(model, lambda module, cls=cls: type(module).__name__ in cls.transformer_class_names):
            return cls()
    raise TypeError(
        f"transformer must be a diffusers video transformer of a supported family "
        f"({', '.join(_transformer_names())}), got {name or type(model).__name__}"
    )


def unwrap_transformer(model):
    """The diffusers transformer inside DDP / peft / torch.compile wrappers."""
    return family_of(model).unwrap(model)


def family_for_pipeline(pipe) -> ModelFamily:
    """The family of a diffusers pipeline object (from its class name)."""
    for cls in _all_classes():
        if type(pipe).__name__ in cls.pipeline_class_names:
            return cls()
    supported = [name for cls in _all_classes() for name in cls.pipeline_class_names]
    raise TypeError(f"pipe must be one of the pipelines {supported}, got {type(pipe).__name__}")
