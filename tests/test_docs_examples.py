"""The README and docs/ as a new user reads them: every Python block runs, every command names real options.

Fenced blocks are read by their info string:
- ```python                  runs as written, in a fresh process in an empty folder, on the tiny models;
- ```python needs-weights    needs real model weights: not run;
- ```python needs-gpu        needs a CUDA device: run only where one is present;
- ```python needs-SOMETHING  needs anything else a test machine lacks (e.g. needs-processes): not run;
- ```bash / ```sh            each command of this project (its console scripts, `python -m` of its packages,
                             `accelerate launch ... -m`) is checked against the `--help` of that command:
                             every `--option` it names must exist.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
DOCUMENTS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
PROJECT_PACKAGES = {"tsa", "stss_kernels", "bench"}
EXAMPLE_TIMEOUT_S = 600
FENCE = re.compile(r"^( *)```(\S*)[ \t]*(.*)$")


def _blocks(path: Path) -> list[tuple[str, set[str], int, str]]:
    """(language, flags, first line number, code) of every fenced block of a Markdown file (fences indented
    under a list item included, their indentation removed)."""
    blocks, current = [], None
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        match = FENCE.match(line)
        if current is None and match:
            current = (match.group(2).lower(), set(match.group(3).split()), number + 1, [], len(match.group(1)))
        elif current is not None and line.strip() == "```":
            blocks.append((current[0], current[1], current[2], "\n".join(current[3]) + "\n"))
            current = None
        elif current is not None:
            indent = len(line) - len(line.lstrip(" "))
            current[3].append(line[min(indent, current[4]):])
    assert current is None, f"{path.name}: the block opened at line {current[2] - 1} is never closed"
    return blocks


def _python_examples():
    for path in DOCUMENTS:
        for language, flags, line, code in _blocks(path):
            needs = {flag for flag in flags if flag.startswith("needs-")}
            if language != "python" or needs - {"needs-gpu"}:
                continue
            marks = [pytest.mark.slow] if re.search(r"^\s*(from|import) (tsa|diffusers)\b", code, re.M) else []
            if "needs-gpu" in flags:
                marks.append(pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"))
            yield pytest.param(code, id=f"{path.relative_to(ROOT)}:{line}", marks=marks)


@pytest.mark.parametrize("code", list(_python_examples()))
def test_python_example_runs(code, tmp_path):
    (tmp_path / "example.py").write_text(code)
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    if not torch.cuda.is_available():
        env["TRITON_INTERPRET"] = "1"
    result = subprocess.run([sys.executable, "example.py"], cwd=tmp_path, env=env, capture_output=True, text=True,
                            timeout=EXAMPLE_TIMEOUT_S)
    assert result.returncode == 0, f"the example failed:\n{code}\n--- stderr ---\n{result.stderr[-4000:]}"


# ----------------------------------------------------------------------------------------------- commands
def _console_scripts() -> dict[str, str]:
    """pyproject.toml's [project.scripts] (read without tomllib, which Python 3.10 lacks)."""
    section = (ROOT / "pyproject.toml").read_text().split("[project.scripts]", 1)[1].split("\n[", 1)[0]
    return dict(re.findall(r'^([\w-]+)\s*=\s*"([^"]+)"', section, re.M))


def _commands(code: str) -> list[list[str]]:
    """The commands of a shell block: continuations joined, comments dropped, `&&` chains split."""
    text = re.sub(r"\\\n", " ", code)
    commands = []
    for line in text.splitlines():
        words = shlex.split(line, comments=True)
        while words:
            cut = words.index("&&") if "&&" in words else len(words)
            commands.append(words[:cut])
            words = words[cut + 1:]
    return [words for words in commands if words]


def _project_target(words: list[str], scripts: dict[str, str]) -> tuple[str, list[str]] | None:
    """(target, words after the program) for a command of this project: target is a console script's entry
    point `module:function` or a module run with `-m`; None for any other command."""
    words = [word for word in words if "=" not in word or word.startswith("-")]  # drop VAR=value prefixes
    if not words:
        return None
    if words[0] in scripts:
        return scripts[words[0]], words[1:]
    if words[0] in ("python", "python3", "accelerate") and "-m" in words:
        module = words[words.index("-m") + 1]
        if module.split(".")[0] in PROJECT_PACKAGES:
            return module, words[words.index("-m") + 2:]
    return None


_HELP_DRIVER = """
import contextlib, io, json, runpy, sys, importlib
texts = {}
for target in json.loads(sys.argv[1]):
    buffer = io.StringIO()
    sys.argv = [target, "--help"]
    with contextlib.redirect_stdout(buffer):
        try:
            if ":" in target:
                module, _, function = target.partition(":")
                getattr(importlib.import_module(module), function)()
            else:
                runpy.run_module(target, run_name="__main__", alter_sys=True)
        except SystemExit:
            pass
    texts[target] = buffer.getvalue()
print(json.dumps(texts))
"""


def _shell_commands():
    scripts = _console_scripts()
    for path in DOCUMENTS:
        for language, _, line, code in _blocks(path):
            if language not in ("bash", "sh", "shell", "console"):
                continue
            for words in _commands(code):
                target = _project_target(words, scripts)
                if target is not None:
                    yield f"{path.relative_to(ROOT)}:{line}", " ".join(words), *target


def test_documented_commands_name_existing_options():
    commands = list(_shell_commands())
    assert commands, "no command of this project found in the README and docs"
    targets = sorted({target for *_, target, _ in commands})
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    result = subprocess.run([sys.executable, "-c", _HELP_DRIVER, json.dumps(targets)], cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=EXAMPLE_TIMEOUT_S)
    assert result.returncode == 0, result.stderr[-4000:]
    helps = json.loads(result.stdout.strip().splitlines()[-1])
    unknown = []
    for where, command, target, words in commands:
        known = set(re.findall(r"--[A-Za-z0-9][A-Za-z0-9_-]*", helps[target]))
        assert known, f"{target} --help printed no options"
        for word in words:
            option = word.split("=", 1)[0]
            if option.startswith("--") and option not in known:
                unknown.append(f"{where}: {option} in `{command}`")
    assert not unknown, "options that the command does not have:\n" + "\n".join(unknown)


# ------------------------------------------------------------------------------------------------ README
def test_readme_is_short_and_starts_with_setup_and_tests():
    lines = (ROOT / "README.md").read_text().splitlines()
    assert len(lines) <= 300, f"README.md has {len(lines)} lines; the rest belongs in docs/"
    first_screen = "\n".join(lines[:60])
    ci_test_command = [line for line in (ROOT / ".ci" / "run").read_text().splitlines() if "pytest" in line
                       and not line.lstrip().startswith("#")]
    assert ci_test_command, ".ci/run runs no pytest command"
    for command in ("pip install -e", "tsa-train --preset tiny", "python -m pytest -q"):
        assert command in first_screen, f"{command!r} is not in the README's first 60 lines"
    assert "python3 -m pytest -q" in ci_test_command[0] or "python -m pytest -q" in ci_test_command[0]


def test_shell_command_parsing():
    """The command reader on the forms the docs use (continuations, comments, chains, launchers)."""
    code = ("python -m pip install -e '.[train]' && tsa-train --preset tiny  # a comment --not-an-option\n"
            "accelerate launch --config_file configs/ddp.yaml -m tsa.cli.train --preset x \\\n"
            "    --data d/\n"
            "ACCELERATE_USE_CPU=true accelerate launch --num_processes 2 -m bench --op x\n")
    scripts = {"tsa-train": "tsa.cli.train:main"}
    parsed = [_project_target(words, scripts) for words in _commands(code)]
    assert parsed == [
        None,
        ("tsa.cli.train:main", ["--preset", "tiny"]),
        ("tsa.cli.train", ["--preset", "x", "--data", "d/"]),
        ("bench", ["--op", "x"]),
    ]


def test_block_reader_sees_flags(tmp_path):
    page = tmp_path / "page.md"
    page.write_text("text\n```python needs-weights\nfor x in y:\n    x = 1\n```\n- item\n  ```bash\n  ls\n  ```\n")
    assert _blocks(page) == [("python", {"needs-weights"}, 3, "for x in y:\n    x = 1\n"), ("bash", set(), 8, "ls\n")]
    page.write_text("```python\nopen\n")
    with pytest.raises(AssertionError, match="never closed"):
        _blocks(page)


# ------------------------------------------------------------------------------------------------- links
def _anchor(heading: str) -> str:
    """GitHub's anchor of a Markdown heading."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def test_links_to_headings_exist():
    """A link `page.md#anchor` into a page of this repository names one of that page's headings."""
    broken = []
    for path in DOCUMENTS:
        for target, anchor in re.findall(r"\]\(([^)#\s]*)#([^)\s]+)\)", path.read_text()):
            page = (path.parent / target).resolve() if target else path
            if not page.exists() or page.suffix != ".md":
                continue
            headings = {_anchor(line.lstrip("#")) for line in page.read_text().splitlines() if line.startswith("#")}
            if anchor not in headings:
                broken.append(f"{path.relative_to(ROOT)}: {target}#{anchor}")
    assert not broken, "links to headings that do not exist:\n" + "\n".join(broken)
