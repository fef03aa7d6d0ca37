"""Static checks: ruff and mypy over the package, when they are installed."""

from __future__ import annotations

import ast
import io
import os
import shutil
import subprocess
import sys
import tokenize
import tomllib
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("tool,args", [("ruff", ["check", "vmrt", "tests", "benchmarks"]), ("mypy", ["vmrt"])])
def test_static_checks(tool: str, args: list[str], tmp_path: Path) -> None:
    exe = Path(sys.executable).parent / tool
    if not exe.exists() and shutil.which(tool) is None:
        pytest.skip(f"{tool} not installed")
    # a user who may not write the checkout (`pytest -m 'not root'` as nobody): mypy's cache elsewhere, ruff's off
    env = None if os.access(REPO, os.W_OK) else {**os.environ, "MYPY_CACHE_DIR": str(tmp_path / "mypy-cache"),
                                                   "RUFF_NO_CACHE": "true"}
    r = subprocess.run([str(exe if exe.exists() else tool), *args], cwd=REPO, capture_output=True, text=True,
                       env=env)
    assert r.returncode == 0, r.stdout + r.stderr


def _lint_imports(cwd: Path) -> subprocess.CompletedProcess[str]:
    exe = Path(sys.executable).parent / "lint-imports"  # import-linter, a test dependency
    no_cache = [] if os.access(cwd, os.W_OK) else ["--no-cache"]  # a checkout this user may not write
    return subprocess.run([str(exe), "--config", str(cwd / "pyproject.toml"), *no_cache], cwd=cwd,
                          capture_output=True, text=True, env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(cwd)})


def test_layers_contract_holds() -> None:
    """pyproject.toml's [tool.importlinter] contracts (issue 15): from the top, CLI -> commands ->
    runner/lifecycle/monitor -> drivers -> vm/agent/network/images/pool/snapshot... -> state,
    config, errors, proc...; a module never imports a layer above it; the network never
    imports the agent."""
    r = _lint_imports(REPO)
    assert r.returncode == 0, r.stdout + r.stderr


def test_every_module_has_a_layer() -> None:
    """Each of vmrt's modules and packages is named in the layers contract: a new one cannot slip
    past it unplaced (import-linter checks only the modules a layer names)."""
    contract = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["importlinter"]["contracts"][0]
    named = {m.strip() for layer in contract["layers"] for m in layer.replace("|", ":").split(":")}
    tops = {f"vmrt.{p.stem}" for p in (REPO / "vmrt").glob("*.py") if p.name != "__init__.py"}
    tops |= {f"vmrt.{p.parent.name}" for p in (REPO / "vmrt").glob("*/__init__.py")}
    assert tops - named == set(), "modules without a layer in pyproject.toml's contract"
    assert named - tops == set(), "the contract names modules that do not exist"


def test_layers_contract_catches_an_upward_import(tmp_path: Path) -> None:
    """The contract is not vacuous: a copy of the package in which the state module imports
    the CLI breaks it."""
    shutil.copytree(REPO / "vmrt", tmp_path / "vmrt", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(REPO / "pyproject.toml", tmp_path / "pyproject.toml")
    state = tmp_path / "vmrt" / "state.py"
    state.write_text(state.read_text() + "\nfrom . import cli  # noqa\n")
    r = _lint_imports(tmp_path)
    assert r.returncode != 0 and "vmrt.state is not allowed to import vmrt.cli" in r.stdout, r.stdout


def click_importers(pkg: Path) -> list[str]:
    """The modules of ``pkg`` outside its CLI (``cli/``, ``__main__.py``) that import click."""
    found = []
    for path in sorted(pkg.rglob("*.py")):
        rel = path.relative_to(pkg).as_posix()
        if rel.startswith("cli/") or rel == "__main__.py":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) and node.level == 0 else []
            if any(n == "click" or n.startswith("click.") for n in names):
                found.append(f"{rel}:{node.lineno}")
    return found


def test_only_the_cli_imports_click() -> None:
    """The CLI is click only, and only the CLI knows click (issue 15, part 1): the commands
    layer (containercmds, imagecmds, netcmds, systemcmds, bench...) takes a Config and typed
    arguments and returns data, so another front end (an API server) can call it."""
    assert not click_importers(REPO / "vmrt"), click_importers(REPO / "vmrt")


def test_click_check_is_not_vacuous(tmp_path: Path) -> None:
    shutil.copytree(REPO / "vmrt", tmp_path / "vmrt", ignore=shutil.ignore_patterns("__pycache__"))
    cmds = tmp_path / "vmrt" / "containercmds.py"
    cmds.write_text(cmds.read_text() + "\n\ndef f() -> None:\n    from click import echo  # noqa\n")
    net = tmp_path / "vmrt" / "netcmds.py"
    net.write_text(net.read_text() + "\nimport click.testing  # noqa\n")
    assert [p.partition(":")[0] for p in click_importers(tmp_path / "vmrt")] == ["containercmds.py", "netcmds.py"]


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


def private_names_crossed(source: str) -> list[str]:
    """``module._name`` uses and ``from module import _name`` imports of another vmrt module's
    private names in ``source`` (names bound by an import are modules or their members)."""
    tree = ast.parse(source)
    imported, found = set(), []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            for a in node.names:
                if a.name.startswith("_") and not a.name.startswith("__"):
                    found.append(f"from {node.module} import {a.name}")
                imported.add(a.asname or a.name)
        elif isinstance(node, ast.Import):
            imported |= {(a.asname or a.name).split(".")[0] for a in node.names}
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in imported \
                and node.attr.startswith("_") and not node.attr.startswith("__") and node.value.id != "os":
            found.append(f"{node.value.id}.{node.attr} (line {node.lineno})")
    return found


def test_no_module_reaches_into_anothers_private_names() -> None:
    """Names to their owners (issue 15, part 2): a name another module needs is public where it lives."""
    bad = [f"{p.relative_to(REPO)}: {use}" for p in sorted((REPO / "vmrt").rglob("*.py"))
           for use in private_names_crossed(p.read_text())]
    assert not bad, "\n".join(bad)
    assert private_names_crossed("from . import pool\npool._read_hello()\nfrom .x import _y\n") == \
        ["from x import _y", "pool._read_hello (line 2)"]


def uncommented_local_imports(source: str) -> list[int]:
    """The lines of the imports inside functions that have no comment (on one of their own lines
    or on the line above) saying why they are not at module level."""
    commented = {tok.start[0] for tok in tokenize.generate_tokens(io.StringIO(source).readline)
                 if tok.type == tokenize.COMMENT}
    found = set()
    for fn in ast.walk(ast.parse(source)):
        if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
            for node in ast.walk(fn):
                if isinstance(node, (ast.Import, ast.ImportFrom)) and \
                        not commented & set(range(node.lineno - 1, (node.end_lineno or node.lineno) + 1)):
                    found.add(node.lineno)
    return sorted(found)


def test_local_imports_say_why() -> None:
    """Imports are at module level (issue 15, part 1); one inside a function is there for start-up
    time only (the import time of `vmrt run`'s path must not grow) and says so in a comment."""
    bad = []
    for path in sorted((REPO / "vmrt").rglob("*.py")):
        rel = path.relative_to(REPO).as_posix()
        source = path.read_text()
        lines = source.splitlines()
        bad += [f"{rel}:{n}: {lines[n - 1].strip()}" for n in uncommented_local_imports(source)]
    assert not bad, "function-local imports without a comment saying why:\n" + "\n".join(bad)


def test_local_import_check_is_not_vacuous() -> None:
    source = (
        "import os\n"
        "def f():\n"
        "    import json\n"                      # 3: no comment
        "    x = 1  # a comment on code\n"
        "    import re  # on use: cheap enough\n"
        "    # on use: the reason\n"
        "    from a import (b,\n"
        "                   c)\n"
        "    y = 2  # a comment on the line above counts\n"
        "    import csv\n"
        "    def g():\n"
        "        from x import y\n"              # 12: nested, no comment
        "    return x\n"
    )
    assert uncommented_local_imports(source) == [3, 12]
