"""The op registry and specs (stss_kernels.ops, stss_kernels/ops/<op>/spec.py), and that nothing outside the op
folders branches on an op's name: bench, warmup and the compile report read every op from its spec."""

from __future__ import annotations

import ast
import inspect
from pathlib import Path

import pytest
import torch
from helpers import features, relation_distance_truth, tempered_kl_truth

from stss_kernels._core.spec import OpSpec
from stss_kernels.ops import OP_NAMES, op_spec, op_specs

PROJECT_ROOT = Path(__file__).resolve().parent.parent
OPS_FOLDER = PROJECT_ROOT / "stss_kernels" / "ops"

# Each op's float64 truth (tests/helpers.py), called as truth(student, teacher, frames, option values, ...).
TRUTHS = {
    "tempered_kl": lambda s, t, frames, o, **kw: tempered_kl_truth(s, t, frames, o["tau"], o["tau"], **kw),
    "relation_distance": lambda s, t, frames, o, **kw: relation_distance_truth(
        s, t, frames, o["margin"], o["variant"], **kw
    ),
}


def test_every_op_folder_is_registered_and_every_registered_op_has_a_spec():
    folders = {path.name for path in OPS_FOLDER.iterdir() if (path / "__init__.py").exists()}
    assert folders == set(OP_NAMES)
    for name, spec in op_specs().items():
        assert isinstance(spec, OpSpec) and spec.name == name and spec.package == f"stss_kernels.ops.{name}"
        assert set(spec.naive_live_matrices) == {"fwd", "fwd+bwd"}
    with pytest.raises(ValueError, match="op must be one of"):
        op_spec("nope")


def test_every_op_has_a_float64_truth_in_the_test_helpers():
    assert set(TRUTHS) == set(OP_NAMES)


def test_option_defaults_are_the_op_functions_defaults():
    """bench measures an op at the defaults a user gets from calling it."""
    for spec in op_specs().values():
        defaults = {name: p.default for name, p in inspect.signature(spec.function).parameters.items()}
        for keyword, value in spec.keyword_arguments().items():
            assert defaults[keyword] == value, (spec.name, keyword)


@pytest.mark.parametrize("name", OP_NAMES)
@pytest.mark.parametrize("normalize", [True, False], ids=["cosine", "dot"])
def test_naive_loss_is_the_masked_mean_of_the_truth(name, normalize):
    spec = op_spec(name)
    student, teacher = features(2, 3, 5, 6, 4, dtype=torch.float64, shared_rank=3)
    mask = torch.rand(2, 15, generator=torch.Generator().manual_seed(3)) < 0.5
    options = spec.option_values()
    loss = spec.naive_loss(student, teacher, frames=3, query_mask=mask, normalize=normalize,
                           **spec.keyword_arguments())  # fmt: skip
    truth = TRUTHS[name](student, teacher, 3, options, weight=mask, normalize=normalize, reduction="mean")
    torch.testing.assert_close(loss, truth, rtol=1e-12, atol=1e-14)


def test_option_values_and_file_names():
    for spec in op_specs().values():
        assert spec.option_values() == {option.name: option.default for option in spec.options}
        assert spec.file_name_part() == ""
        with pytest.raises(ValueError, match="has no option"):
            spec.option_values({"no_such_option": 1})
    relation = op_spec("relation_distance")
    assert relation.keyword_arguments({"variant": "temporal"}) == {"margin": 0.1, "variant": "temporal"}
    assert relation.file_name_part({"variant": "temporal", "margin": 0.3}) == "temporal"
    assert op_spec("tempered_kl").keyword_arguments({"tau": 0.2}) == {"tau_student": 0.2, "tau_teacher": 0.2}


def _compared_strings(path: Path) -> list[tuple[int, str]]:
    """(line, string) of every string literal compared (==, !=, in, not in) in a Python file, or used as a
    dict key or match case: where code would branch on an op's name."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        operands = []
        if isinstance(node, ast.Compare):
            operands = [node.left, *node.comparators]
            operands += [element for operand in operands if isinstance(operand, (ast.Tuple, ast.List, ast.Set))
                         for element in operand.elts]  # fmt: skip
        elif isinstance(node, ast.Dict):
            operands = [key for key in node.keys if key is not None]
        elif isinstance(node, ast.MatchValue):
            operands = [node.value]
        found += [(operand.lineno, operand.value) for operand in operands
                  if isinstance(operand, ast.Constant) and isinstance(operand.value, str)]  # fmt: skip
    return found


def test_no_op_name_is_compared_outside_the_op_folders():
    files = sorted((PROJECT_ROOT / "bench").glob("*.py")) + [PROJECT_ROOT / "stss_kernels" / "_warmup.py"]
    branches = [f"{path.relative_to(PROJECT_ROOT)}:{line}: {value!r}" for path in files
                for line, value in _compared_strings(path) if value in OP_NAMES]  # fmt: skip
    assert not branches, "branch on an op name (read it from the op's spec instead): " + "; ".join(branches)


def test_the_name_check_finds_a_branch(tmp_path):
    source = tmp_path / "branchy.py"
    source.write_text('def f(op):\n    if op == "tempered_kl":\n        return {"relation_distance": 1}\n')
    assert [value for _, value in _compared_strings(source)] == ["tempered_kl", "relation_distance"]
