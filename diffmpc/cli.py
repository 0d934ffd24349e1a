"""The ``diffmpc`` command (also ``python -m diffmpc``): a dispatch table over the paper's experiments.

Each job module in :mod:`experiments` exposes ``register(subparsers)``, adding its subcommands with a
``handler(args) -> int`` that writes ``results.json`` under ``--out``. This module only dispatches, and it is
the one place that decides how a command fails — one line on stderr, and an exit code:

=====  ==========================================================================================
code   when
=====  ==========================================================================================
0      success
1      a runtime failure: a bad or missing file (:class:`~diffmpc.errors.BadFileError`, ``OSError``),
       a locked or unusable ``--out`` (:class:`~diffmpc.errors.RunDirError`), a solve that did not
       converge under ``strict`` (:class:`~diffmpc.errors.ConvergenceError`)
2      a usage error: unknown command or option, a value argparse rejects, or an argument a job
       rejects (:class:`~diffmpc.errors.BadArgumentError`)
128+s  stopped by signal s (Ctrl-C: 130, SIGTERM: 143); checkpoints and partial results are kept
=====  ==========================================================================================

Any other exception is a bug and keeps its traceback. The CLI (this module, ``__main__`` and
:mod:`diffmpc.sweep_command`, which re-enters :func:`main` per run) sits on top of everything (library, envs,
agents, experiments) and nothing else imports it.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
from typing import NoReturn

from experiments import expert_data, kepler, lqr_imitation, table1, table2

from . import sweep_command
from .errors import BadArgumentError, DiffmpcError
from .io import Terminated, run_lock, sigterm_as_interrupt

# The dispatch table: each module adds its subcommands, in this order in `diffmpc --help`.
JOBS = (
    kepler,  # kepler (paper Fig. 1)
    lqr_imitation,  # lqr-imitation (Appx. C, Fig. 4)
    table1,  # table1 (neural ODEs)
    expert_data,  # expert, dataset (the cart-pole expert for Table 2)
    table2,  # train, evaluate, render, table2, demo (Table 2, Fig. 3)
    sweep_command,  # sweep (any command above over seeds / option values)
)


class UsageError(Exception):
    """A command line argparse rejects; reported in one line with exit code 2."""


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error raises :class:`UsageError` instead of printing usage and exiting."""

    def error(self, message: str) -> NoReturn:
        raise UsageError(f"{self.prog}: error: {message} (see `{self.prog} --help`)")


def build_parser() -> argparse.ArgumentParser:
    """The ``diffmpc`` parser with one subparser per job subcommand (subparsers inherit :class:`_Parser`)."""
    parser = _Parser(prog="diffmpc", description="The paper's experiments and jobs, one subcommand each; "
                     "each writes results.json under --out. Exit codes: 0 ok, 1 runtime error, 2 usage.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for job in JOBS:
        job.register(sub)
    return parser


def _fail(message: str, code: int) -> int:
    print(" ".join(str(message).split()), file=sys.stderr)  # exactly one line
    return code


def main(argv: list[str] | None = None) -> int:
    """Run ``diffmpc ARGV``; return the exit code (see the module docstring for what each code means)."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except UsageError as err:
        return _fail(str(err), 2)
    if not getattr(args, "handler", None):
        return _fail("diffmpc: error: a COMMAND is required (see `diffmpc --help`)", 2)
    out = getattr(args, "out", None)
    where = f"diffmpc {args.command}: error:"
    try:
        # SIGTERM (timeout, schedulers) is handled like Ctrl-C; one writer per --out at a time.
        with sigterm_as_interrupt(), (run_lock(out) if out else contextlib.nullcontext()):
            return int(args.handler(args) or 0)
    except KeyboardInterrupt as err:
        what = "terminated" if isinstance(err, Terminated) else "interrupted"
        return _fail(f"diffmpc {args.command}: {what}: checkpoints and partial results are kept under --out",
                     128 + getattr(err, "signum", 2))
    except (BadArgumentError, UsageError) as err:
        return _fail(f"{where} {err}", 2)
    except (DiffmpcError, OSError) as err:
        return _fail(f"{where} {err}", 1)


if __name__ == "__main__":
    raise SystemExit(main())
