"""The house rules, checked: the import-linter layering contracts (pyproject.toml) hold and
each one bites when broken, no function in src/ runs over 60 lines, and the package has no
import cycle."""

from __future__ import annotations

import ast
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src"
LINT = Path(sys.executable).with_name("lint-imports")
MAX_FUNCTION_LINES = 60


def _lint(src: Path, config: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(src)}
    return subprocess.run([str(LINT), "--no-cache", "--config", str(config)], cwd=src.parent,
                          env=env, capture_output=True, text=True, timeout=120)


def test_layering_contracts_are_kept():
    run = _lint(SRC, ROOT / "pyproject.toml")
    assert run.returncode == 0, run.stdout + run.stderr
    assert "3 kept, 0 broken" in run.stdout


BREAKS = {
    # contract name fragment -> (file, line added)
    "never imports torch": ("contract.py", "import torch  # noqa"),
    "downstream of the bundle": ("report.py", "from .training import config  # noqa"),
    "No import cycles": ("fitting.py", "from . import contract  # noqa"),  # contract->fitting
}


@pytest.mark.parametrize("contract", list(BREAKS))
def test_each_contract_fails_when_broken(tmp_path, contract):
    """A copy of the package with one forbidden import added: that contract, and only that
    one, reports BROKEN (the contracts are not vacuous)."""
    src = tmp_path / "src"
    shutil.copytree(SRC / "imgrec", src / "imgrec",
                    ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    file, line = BREAKS[contract]
    target = src / "imgrec" / file
    target.write_text(target.read_text() + f"\n{line}\n")
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    run = _lint(src, tmp_path / "pyproject.toml")
    assert run.returncode != 0
    assert "2 kept, 1 broken" in run.stdout, run.stdout
    section = " ".join(run.stdout.split("Broken contracts", 1)[1].split())
    header = re.search(r"-{10,} (.*?) -{10,}", section).group(1)  # the broken one's name
    assert contract in header, header


def _long_functions(root: Path) -> list[str]:
    out = []
    for path in sorted(root.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                lines = node.end_lineno - node.lineno + 1
                if lines > MAX_FUNCTION_LINES:
                    out.append(f"{path.relative_to(root)}:{node.lineno} {node.name} ({lines})")
    return out


def test_no_function_over_60_lines():
    assert _long_functions(SRC) == []


def test_the_length_check_sees_a_long_function(tmp_path):
    body = "\n".join(f"    x{i} = {i}" for i in range(61))
    (tmp_path / "m.py").write_text(f"def long():\n{body}\n")
    assert _long_functions(tmp_path) == ["m.py:1 long (62)"]


def test_every_runtime_file_is_packaged():
    """Every file beside the modules (web pages, templates, samples) is in pyproject's
    package-data, so a wheel has it: the studio's static folder was left out, and `imgrec
    studio` crashed on every install but the editable one."""
    import fnmatch
    import tomllib

    root = Path(__file__).resolve().parents[1]
    patterns = tomllib.loads((root / "pyproject.toml").read_text())["tool"]["setuptools"][
        "package-data"]["imgrec"]
    package = root / "src" / "imgrec"
    data = [p.relative_to(package).as_posix() for p in package.rglob("*")
            if p.is_file() and p.suffix not in (".py", ".pyc") and "__pycache__" not in p.parts]
    missing = [f for f in data if not any(fnmatch.fnmatchcase(f, pat) for pat in patterns)]
    assert data and not missing, f"not in [tool.setuptools.package-data]: {missing}"
