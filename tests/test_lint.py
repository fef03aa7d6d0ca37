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
