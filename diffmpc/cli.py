"""The ``diffmpc`` command (also ``python -m diffmpc``): one subcommand per job.

Each job lives in its own module exposing ``register(subparsers)``; the module adds one or more subcommands
whose handler takes the parsed ``args`` and writes ``results.json`` under ``--out``. Modules are imported
lazily so that ``diffmpc --help`` stays fast and an optional job never breaks the others.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import sys

from .errors import BadArgumentError, DiffmpcError
from .io import Terminated, run_lock, sigterm_as_interrupt, write_results  # noqa: F401 - re-exported

# Modules that contribute subcommands (import path, in help order).
COMMAND_MODULES = (
    "experiments.kepler",  # kepler
    "experiments.lqr_imitation",  # lqr-imitation (uses envs' mass-spring-damper)
    "experiments.table1",  # table1 (neural ODE)
    "experiments.expert_data",  # expert, dataset, mpc-rollout
    "experiments.table2",  # train, evaluate, render, table2, demo
    "diffmpc.sweep_command",  # sweep (any command above over seeds / option values)
)


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
    out = getattr(args, "out", None)
    try:
        # SIGTERM (timeout, schedulers) is handled like Ctrl-C; one writer per --out at a time.
        with sigterm_as_interrupt(), (run_lock(out) if out else contextlib.nullcontext()):
            return int(args.handler(args) or 0)
    except KeyboardInterrupt as err:
        what = "terminated" if isinstance(err, Terminated) else "interrupted"
        print(f"{what}: checkpoints and partial results are kept under --out", file=sys.stderr)
        return 128 + getattr(err, "signum", 2)
    except BadArgumentError as err:
        print(f"diffmpc {args.command}: error: {err}", file=sys.stderr)
        return 2
    except DiffmpcError as err:
        print(f"diffmpc {args.command}: error: {err}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    raise SystemExit(main())
