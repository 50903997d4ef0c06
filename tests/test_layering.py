"""The package's layering, stated as import-linter contracts in pyproject.toml, holds: the runner above the
stages, the stages above the components, no component importing a stage, no stage importing another,
no import cycles."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _lint(cwd: Path) -> subprocess.CompletedProcess:
    exe = shutil.which("lint-imports", path=str(Path(sys.executable).parent))
    return subprocess.run([exe, "--no-cache"], cwd=cwd, capture_output=True, text=True, timeout=300,
                          env={"PYTHONPATH": str(cwd / "lib"), "PATH": str(Path(sys.executable).parent)})


def test_import_contracts_are_kept():
    r = _lint(REPO)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "0 broken" in r.stdout


def test_a_component_importing_a_stage_breaks_a_contract(tmp_path):
    """The contracts can fail: a copy of the package where a component imports a stage is rejected."""
    shutil.copytree(REPO / "lib", tmp_path / "lib", ignore=shutil.ignore_patterns("*.egg-info", "__pycache__"))
    shutil.copy(REPO / "pyproject.toml", tmp_path)
    bad = tmp_path / "lib" / "lnkit" / "eval.py"
    bad.write_text(bad.read_text() + "\nfrom lnkit.stages import parent  # noqa\n")
    r = _lint(tmp_path)
    assert r.returncode != 0 and "Components never import a stage or the runner BROKEN" in r.stdout
