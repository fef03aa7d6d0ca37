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


def _import_graph(pkg: Path) -> dict[str, set[str]]:
    """Every vmrt module -> the vmrt modules it imports anywhere (function-local imports too)."""
    import ast
    mods = {".".join(p.relative_to(pkg.parent).with_suffix("").parts).removesuffix(".__init__"): p
            for p in pkg.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in mods.items():
        here = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
        deps: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                base = here
                for _ in range(max(node.level - 1, 0)):
                    base = base.rsplit(".", 1)[0]
                target = (base + ("." + node.module if node.module else "")) if node.level else (node.module or "")
                for a in node.names:
                    deps |= {target + "." + a.name} if target + "." + a.name in mods else {target} & mods.keys()
            elif isinstance(node, ast.Import):
                deps |= {a.name for a in node.names} & mods.keys()
        graph[name] = deps - {name}
    return graph


def test_no_import_circle() -> None:
    """No module of vmrt reaches itself through its imports (issue 15: the six-file circle of
    drivers.vm, lifecycle, monitor, pool, runner and snapshot is gone and stays gone)."""
    graph = _import_graph(REPO / "vmrt")
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(m: str) -> list[str] | None:
        state[m] = 1
        path.append(m)
        for d in sorted(graph.get(m, ())):
            if state.get(d) == 1:
                return path[path.index(d):] + [d]
            if d not in state and (found := visit(d)):
                return found
        state[m] = 2
        path.pop()
        return None

    for m in sorted(graph):
        if m not in state:
            circle = visit(m)
            assert circle is None, " -> ".join(circle)
