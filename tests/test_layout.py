"""The package layout: no import cycle in tsa, stss_kernels or bench; the command line stays in tsa/cli/; no
model family is named outside tsa/models/."""

from __future__ import annotations

import ast
import importlib
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("tsa", "stss_kernels", "bench")


def _modules(package: str) -> dict[str, Path]:
    found = {}
    for path in sorted((ROOT / package).rglob("*.py")):
        parts = path.relative_to(ROOT).with_suffix("").parts
        found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


def _imports(name: str, path: Path, known: set[str]) -> set[str]:
    """The project modules `name` imports anywhere in its file (top level or inside functions)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    targets = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            candidates = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, *([base] if base else [])])
            candidates = [base, *(f"{base}.{alias.name}" for alias in node.names)]
        else:
            continue
        for candidate in candidates:
            while candidate and candidate not in known:
                candidate = candidate.rpartition(".")[0]
            if candidate and candidate != name:
                targets.add(candidate)
    return targets


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state, stack = {}, []

    def visit(node):
        state[node] = "open"
        stack.append(node)
        for target in sorted(graph[node]):
            if state.get(target) == "open":
                return stack[stack.index(target):] + [target]
            if target not in state:
                found = visit(target)
                if found:
                    return found
        state[node] = "done"
        stack.pop()
        return None

    for node in sorted(graph):
        if node not in state:
            found = visit(node)
            if found:
                return found
    return None


@pytest.mark.parametrize("package", PACKAGES)
def test_no_import_cycle(package):
    modules = _modules(package)
    graph = {name: _imports(name, path, set(modules)) for name, path in modules.items()}
    # `from tsa import alignment` names the submodule; the package itself is no edge of the importer.
    graph = {name: {target for target in targets if not name.startswith(target + ".")}
             for name, targets in graph.items()}
    assert _cycle(graph) is None, " -> ".join(_cycle(graph))


@pytest.mark.parametrize("package", PACKAGES)
def test_every_module_imports(package):
    for name in _modules(package):
        if name.endswith("__main__"):
            continue
        importlib.import_module(name)


def test_argparse_and_options_namespace_only_in_cli():
    offenders = []
    for name, path in _modules("tsa").items():
        if name.startswith("tsa.cli"):
            continue
        text = path.read_text()
        if re.search(r"^\s*(import argparse|from argparse )", text, re.M) or re.search(r"\bargs\.[a-z_]+", text):
            offenders.append(name)
    assert not offenders, f"argparse or an options namespace outside tsa/cli/: {offenders}"


def test_family_names_only_in_models():
    from tsa.models import FAMILIES

    pattern = re.compile("|".join(rf"[\"']{re.escape(name)}[\"']" for name in FAMILIES))
    offenders = [name for name, path in _modules("tsa").items()
                 if not name.startswith("tsa.models") and pattern.search(path.read_text())]
    assert not offenders, f"a model family named outside tsa/models/: {offenders}"
