"""The alignment-method registry: choices, command-line options and the objective's loss all come from it."""

import dataclasses

import pytest
import torch

from tsa.alignment import (
    ALIGNMENT_METHODS,
    AlignmentMethod,
    AlignmentOption,
    alignment_losses,
    alignment_options,
    register_alignment,
    training_methods,
)
from tsa.cli.options import build_parser, parse_config
from tsa.losses import REPALoss, TRDLoss, TSALoss


def test_choices_and_flags_are_derived_from_the_registry():
    assert alignment_losses() == ("none", "tsa", "mtsa", "trd", "repa") and training_methods()[-1] == "lamo"
    flags = {option for action in build_parser()._actions for option in action.option_strings}
    assert {"--tau", "--tau-teacher", "--top-k", "--backend", "--trd-margin", "--trd-variant"} <= flags
    assert {option.name for method in ALIGNMENT_METHODS.values() for option in method.options} == set(
        alignment_options()
    )
    assert [name for name, method in ALIGNMENT_METHODS.items() if method.motion_mask] == ["mtsa"]


def test_methods_build_their_losses_with_the_options():
    mtsa = ALIGNMENT_METHODS["mtsa"].build(tau=0.2, tau_teacher=0.05, top_k=0.3, backend="torch")
    assert isinstance(mtsa, TSALoss) and mtsa.masked and (mtsa.tau, mtsa.tau_teacher, mtsa.top_k) == (0.2, 0.05, 0.3)
    assert mtsa.backend == "torch"
    trd = ALIGNMENT_METHODS["trd"].build(trd_margin=0.25, trd_variant="temporal", backend="torch")
    assert isinstance(trd, TRDLoss) and (trd.margin, trd.variant, trd.backend) == (0.25, "temporal", "torch")
    assert isinstance(ALIGNMENT_METHODS["repa"].build(), REPALoss)


def test_command_line_options_reach_the_objective(tmp_path):
    from tsa.models import get_family
    from tsa.models.cogvideox import cogvideox_scheduler, tiny_transformer
    from tsa.tiny import tiny_videomae
    from tsa.training.loop import build_objective

    family = get_family("cogvideox")
    family.load_scheduler = lambda path: cogvideox_scheduler()
    args = parse_config(
        [
            "--align",
            "trd",
            "--trd-margin",
            "0.3",
            "--trd-variant",
            "spatial",
            "--align-layer",
            "1",
            "--teacher-path",
            str(tiny_videomae(tmp_path / "videomae")),
        ]
    )
    objective = build_objective(args, tiny_transformer(), torch.float32, family)
    assert (objective.alignment_loss.margin, objective.alignment_loss.variant) == (0.3, "spatial")
    args = parse_config(
        [
            "--tau",
            "0.2",
            "--tau-teacher",
            "0.07",
            "--backend",
            "reference",
            "--align-layer",
            "1",
            "--teacher-path",
            str(tmp_path / "videomae"),
        ]
    )
    loss = build_objective(args, tiny_transformer(), torch.float32, family).alignment_loss
    assert (loss.tau, loss.tau_teacher, loss.backend, loss.masked) == (0.2, 0.07, "reference", True)


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--tau-teacher", "0"], "--tau-teacher must be a finite number > 0"),
        (["--trd-margin", "-0.1"], "--trd-margin must be a finite number >= 0"),
        (["--backend", "cuda"], "invalid choice"),
        (["--top-k", "1.5"], "--top-k must be a finite number > 0 and <= 1"),
    ],
)
def test_bad_option_values_are_named(argv, message, capsys):
    with pytest.raises(SystemExit):
        parse_config(argv)
    assert message in capsys.readouterr().err


def test_objective_rejects_bad_option_values():
    from tsa.models.cogvideox import cogvideox_scheduler, tiny_transformer
    from tsa.objective import AlignmentObjective

    with pytest.raises(ValueError, match="trd_margin must be >= 0"):
        AlignmentObjective(tiny_transformer(), cogvideox_scheduler(), align="trd", trd_margin=-1)
    with pytest.raises(ValueError, match="backend must be one of"):
        AlignmentObjective(tiny_transformer(), cogvideox_scheduler(), align="tsa", backend="cuda")


def test_a_registered_method_joins_the_command_line_and_the_objective(monkeypatch, tmp_path):
    monkeypatch.setattr("tsa.alignment.ALIGNMENT_METHODS", dict(ALIGNMENT_METHODS))
    import tsa.alignment

    scale = AlignmentOption("cosine_scale", float, 1.0, "Scale of the cosine loss.")
    method = AlignmentMethod("scaled-repa", "REPA times a scale.", (scale,), lambda cosine_scale: REPALoss())
    register_alignment(method)
    assert "scaled-repa" in tsa.alignment.training_methods()
    args = parse_config(["--align", "scaled-repa", "--cosine-scale", "2"])
    assert (args.align, args.cosine_scale) == ("scaled-repa", 2.0)
    with pytest.raises(ValueError, match="exists already"):
        register_alignment(dataclasses.replace(method))

    from tsa.models.cogvideox import cogvideox_scheduler, tiny_transformer
    from tsa.objective import AlignmentObjective
    from tsa.teachers import load_teacher
    from tsa.tiny import tiny_videomae

    built = []
    monkeypatch.setitem(
        tsa.alignment.ALIGNMENT_METHODS,
        "scaled-repa",
        dataclasses.replace(method, build=lambda cosine_scale: built.append(cosine_scale) or REPALoss()),
    )
    teacher = load_teacher("videomae", tiny_videomae(tmp_path / "videomae"))
    AlignmentObjective(
        tiny_transformer(),
        cogvideox_scheduler(),
        teacher,
        align="scaled-repa",
        block_index=1,
        projector_hidden_dim=8,
        projector=None,
        cosine_scale=3.0,
    )
    assert built == [3.0]
    with pytest.raises(TypeError, match="unknown options \\['cosine_scal'\\]"):
        AlignmentObjective(tiny_transformer(), cogvideox_scheduler(), align="none", cosine_scal=3.0)
