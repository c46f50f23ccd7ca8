"""The layer boundary, checked by import-linter with the contracts in pyproject.toml.

``align`` (training) imports no web, database or Ray code and nothing of ``services`` or ``workers``;
``services`` (the control plane) and ``workers`` (the Ray side) do not import each other. Imports inside
functions count too.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
LINT_IMPORTS = Path(sys.executable).with_name("lint-imports")


def lint_imports(root: Path) -> subprocess.CompletedProcess:
    """Run import-linter on the packages under ``root`` with the repository's contracts."""
    return subprocess.run(
        [str(LINT_IMPORTS), "--config", str(REPO / "pyproject.toml"), "--no-cache"],
        cwd=root, env={"PYTHONPATH": str(root), "PATH": str(LINT_IMPORTS.parent)},
        capture_output=True, text=True, timeout=120, check=False,
    )


def test_the_repository_keeps_every_import_contract():
    run = lint_imports(REPO)
    assert run.returncode == 0, run.stdout + run.stderr
    assert "2 kept, 0 broken" in run.stdout


def test_an_import_of_service_code_inside_an_align_function_breaks_the_contract(tmp_path):
    """The contract sees lazy imports: a copy of the tree with one added is refused, naming the import."""
    for package in ("align", "services", "workers"):
        shutil.copytree(REPO / package, tmp_path / package, ignore=shutil.ignore_patterns("__pycache__"))
    (tmp_path / "align" / "leak.py").write_text("def settings():\n    from services.settings import get_settings\n"
                                               "    return get_settings()\n")
    run = lint_imports(tmp_path)
    assert run.returncode == 1, run.stdout + run.stderr
    assert "1 kept, 1 broken" in run.stdout
    assert "align.leak -> services.settings" in run.stdout
