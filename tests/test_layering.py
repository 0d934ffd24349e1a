"""Dependencies point one way (docs/architecture.md):

    diffmpc (library)   envs          at the bottom, independent of each other; the library knows no Gymnasium
    agents                             on both
    experiments                        on agents
    diffmpc.cli                        on top; nothing imports it

Checked twice: dynamically (import every module of a package in a fresh interpreter, then look at
``sys.modules``) and statically (every ``import`` statement in the package's files, including the ones inside
functions that the dynamic check cannot see)."""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# The command: the one part of diffmpc/ that looks up (sweep_command re-enters cli.main for each run).
CLI = ("diffmpc/cli.py", "diffmpc/__main__.py", "diffmpc/sweep_command.py")

# package -> top-level names it must never import (nor anything it imports)
FORBIDDEN = {
    "diffmpc": ("envs", "agents", "experiments", "gymnasium", "diffmpc.cli"),
    "envs": ("diffmpc", "agents", "experiments"),
    "agents": ("experiments", "diffmpc.cli"),
    "experiments": ("diffmpc.cli",),
}


def _files(package: str) -> list[Path]:
    return [p for p in sorted((ROOT / package).rglob("*.py")) if p.relative_to(ROOT).as_posix() not in CLI]


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _hits(name: str, forbidden: tuple[str, ...]) -> list[str]:
    return [f for f in forbidden if name == f or name.startswith(f + ".")]


def _imports(path: Path) -> list[str]:
    """Absolute names of every module imported anywhere in ``path`` (relative imports resolved)."""
    package = _module_name(path).split(".")
    if path.name != "__init__.py":
        package = package[:-1]
    names = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package[: len(package) - node.level + 1] + ([base] if base else []))
            names += [base] + [f"{base}.{a.name}" for a in node.names]
    return names


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_no_import_statement_points_up(package):
    bad = [f"{p.relative_to(ROOT)} imports {n}" for p in _files(package) for n in _imports(p)
           if _hits(n, FORBIDDEN[package])]
    assert not bad, "imports against the arrows (docs/architecture.md):\n" + "\n".join(bad)


def test_nothing_imports_the_cli():
    users = [f"{p.relative_to(ROOT)}" for d in ("diffmpc", "envs", "agents", "experiments", "examples",
                                                 "benchmarks") for p in sorted((ROOT / d).rglob("*.py"))
             if p.relative_to(ROOT).as_posix() not in CLI and _hits_any_cli(_imports(p))]
    assert not users, f"only the command itself may import diffmpc.cli: {users}"


def _hits_any_cli(names: list[str]) -> bool:
    return any(_hits(n, ("diffmpc.cli", "diffmpc.__main__")) for n in names)


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_importing_a_package_loads_nothing_above_it(package):
    modules = [_module_name(p) for p in _files(package)]
    code = ("import importlib, json, sys\n"
            f"for m in {modules!r}: importlib.import_module(m)\n"
            "print(json.dumps(sorted(sys.modules)))")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, env=env,
                         timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    loaded = json.loads(run.stdout.strip().splitlines()[-1])
    bad = sorted({f for name in loaded for f in _hits(name, FORBIDDEN[package])})
    assert not bad, f"importing all of {package} loads {bad}"
