"""Static checks: ruff and mypy over the package, when they are installed."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("tool,args", [("ruff", ["check", "vmrt", "tests", "benchmarks"]), ("mypy", ["vmrt"])])
def test_static_checks(tool: str, args: list[str]) -> None:
    exe = Path(sys.executable).parent / tool
    if not exe.exists() and shutil.which(tool) is None:
        pytest.skip(f"{tool} not installed")
    r = subprocess.run([str(exe if exe.exists() else tool), *args], cwd=REPO, capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr


def _lint_imports(cwd: Path) -> subprocess.CompletedProcess[str]:
    exe = Path(sys.executable).parent / "lint-imports"  # import-linter, a test dependency
    return subprocess.run([str(exe), "--config", str(cwd / "pyproject.toml")], cwd=cwd, capture_output=True,
                          text=True, env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(cwd)})


def test_layers_contract_holds() -> None:
    """pyproject.toml's [tool.importlinter] contracts (issue 15): from the top, CLI -> commands ->
    runner/lifecycle/monitor -> drivers -> vm/agent/network/images/pool/snapshot... -> state,
    config, errors, proc...; a module never imports a layer above it; the network never
    imports the agent."""
    r = _lint_imports(REPO)
    assert r.returncode == 0, r.stdout + r.stderr


def test_layers_contract_catches_an_upward_import(tmp_path: Path) -> None:
    """The contract is not vacuous: a copy of the package in which the state module imports
    the CLI breaks it."""
    shutil.copytree(REPO / "vmrt", tmp_path / "vmrt", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(REPO / "pyproject.toml", tmp_path / "pyproject.toml")
    state = tmp_path / "vmrt" / "state.py"
    state.write_text(state.read_text() + "\nfrom . import cli  # noqa\n")
    r = _lint_imports(tmp_path)
    assert r.returncode != 0 and "vmrt.state is not allowed to import vmrt.cli" in r.stdout, r.stdout
