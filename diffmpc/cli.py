"""The ``diffmpc`` command (also ``python -m diffmpc``): one subcommand per job.

Each job lives in its own module exposing ``register(subparsers)``; the module adds one or more subcommands
whose handler takes the parsed ``args`` and writes ``results.json`` under ``--out``. Modules are imported
lazily so that ``diffmpc --help`` stays fast and an optional job never breaks the others.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
import tempfile
from pathlib import Path
from typing import Any

# Modules that contribute subcommands (import path, in help order).
COMMAND_MODULES = (
    "experiments.kepler",  # kepler
    "experiments.lqr_imitation",  # lqr-imitation (uses envs' mass-spring-damper)
    "experiments.table1",  # table1 (neural ODE)
    "experiments.expert_data",  # expert, dataset, mpc-rollout
    "experiments.table2",  # train, evaluate, render, table2, demo
)


def write_results(out: str | os.PathLike, results: dict[str, Any], name: str = "results.json") -> Path:
    """Write ``results`` as JSON under ``out`` atomically (temp file + rename): never a half-written file."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / name
    fd, tmp = tempfile.mkstemp(dir=out, prefix=f".{name}.", suffix=".tmp")
    with os.fdopen(fd, "w") as fh:
        json.dump(results, fh, indent=2, default=_jsonable)
        fh.write("\n")
    os.replace(tmp, path)
    return path


def _jsonable(o: Any) -> Any:
    if hasattr(o, "tolist"):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="diffmpc", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as err:
            if err.name and name.startswith(err.name):
                continue  # that job is not installed in this build
            raise
        module.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "handler", None):
        parser.print_help()
        return 2
    try:
        return int(args.handler(args) or 0)
    except KeyboardInterrupt:
        print("interrupted: checkpoints and partial results are kept under --out", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
