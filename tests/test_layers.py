"""The layer rule, checked by import-linter's contracts in pyproject.toml ([tool.importlinter]): the command-line
edge > report > study > evals (metrics) > runtime > core, the installed packages never import tools/, and no import
cycle between the modules of a package. Every import counts, module level or inside a function."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
CHECK = "import sys; from importlinter.cli import lint_imports_command; sys.exit(lint_imports_command())"


def lint_imports(root: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(root)}  # this checkout's packages, not an installed copy
    return subprocess.run([sys.executable, "-c", CHECK, "--no-cache"], cwd=root, env=env, capture_output=True,
                          text=True, timeout=300)


def test_the_layer_contracts_hold():
    result = lint_imports(REPO)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    assert "0 broken" in result.stdout


@pytest.mark.parametrize("module, line", [
    ("replicate/core/schedules.py", "from replicate.runtime import trainer"),  # core must not use runtime
    ("evals/knn.py", "from replicate.study import runner"),  # metrics must not use the study layer
    ("replicate/study/results.py", "import tools.calibrate"),  # the package never imports tools
    ("replicate/core/model.py", "from replicate.core import moco"),  # a cycle inside a layer
])
def test_the_contracts_catch_a_forbidden_import(tmp_path, module, line):
    """A copy of the code with one forbidden import added (inside a function) breaks a contract: the check can fail."""
    for name in ("replicate", "evals", "tools"):
        shutil.copytree(REPO / name, tmp_path / name, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(REPO / "pyproject.toml", tmp_path / "pyproject.toml")
    path = tmp_path / module
    path.write_text(path.read_text() + f"\n\ndef _probe():\n    {line}\n")
    result = lint_imports(tmp_path)
    assert result.returncode != 0 and "BROKEN" in result.stdout, result.stdout[-2000:]
