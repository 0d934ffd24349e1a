"""``diffmpc sweep``: run any other ``diffmpc`` command over seeds and option values, one run directory each.

    diffmpc sweep --out runs/sw --seeds 0 1 2 --grid lr=1e-2,1e-3 --jobs 2 -- lqr-imitation --iterations 200

expands to 6 runs ``lqr-imitation --iterations 200 --seed S --lr V --out runs/sw/seed=S,lr=V`` executed by
:func:`diffmpc.sweep.run_sweep` (Ray with ``--jobs``/``--address``, else in this process). Each run's config
is its full argument list, so a finished run is skipped on the next call and a changed command is refused for
an existing run directory. ``OUT/sweep.json`` and ``OUT/sweep.md`` tabulate the numeric top-level fields of
each finished run's ``results.json`` (rebuilt from whatever runs finished, also after Ctrl-C).
"""

from __future__ import annotations

import itertools
import json
import math
from pathlib import Path
from typing import Any

from .errors import BadArgumentError
from .io import write_json
from .sweep import RunContext, SweepResult, Task, add_sweep_arguments, run_sweep

__all__ = ["expand", "run_command", "register"]


def _parse_grid(items: list[str]) -> list[tuple[str, list[str]]]:
    grid = []
    for item in items:
        key, sep, values = item.partition("=")
        if not sep or not key or not values or key.startswith("-"):
            raise BadArgumentError(f"--grid {item!r}: expected OPTION=V1,V2,... (e.g. lr=1e-2,1e-3)")
        grid.append((key, values.split(",")))
    return grid


def expand(command: list[str], seeds: list[int] | None, grid: list[str]) -> list[Task]:
    """One :class:`Task` per (seed, grid point): ``config = {"argv": [...]}`` without ``--out``."""
    if not command:
        raise BadArgumentError("diffmpc sweep needs a command after `--`, e.g. `-- lqr-imitation`")
    if "--out" in command or any(a.startswith("--out=") for a in command):
        raise BadArgumentError("do not pass --out to the swept command: each run gets OUT/<run name>")
    axes = [("seed", [str(s) for s in seeds])] if seeds else []
    axes += _parse_grid(grid)
    tasks = []
    for point in itertools.product(*[[(k, v) for v in vals] for k, vals in axes]):
        argv = list(command)
        for key, value in point:
            argv += [f"--{key.replace('_', '-')}", value]
        name = ",".join(f"{k}={v}".replace("/", "_") for k, v in point) or "run"
        tasks.append(Task(name, {"argv": argv}))
    return tasks


def run_command(config: dict[str, Any], ctx: RunContext) -> dict[str, Any]:
    """Run one ``diffmpc`` command line with ``--out`` = the run directory; its ``results.json`` is the run's
    result (a non-zero exit is this run's failure; an interrupted command interrupts the sweep)."""
    from .cli import main

    code = main([*config["argv"], "--out", str(ctx.dir)])
    if code in (130, 143):  # the command was interrupted (Ctrl-C / SIGTERM): so is the sweep
        raise KeyboardInterrupt
    if code:
        raise RuntimeError(f"`diffmpc {' '.join(config['argv'])}` exited with status {code} (see log.txt)")
    path = ctx.dir / "results.json"
    return json.loads(path.read_text()) if path.is_file() else {}


def _scalars(results: Any, prefix: str = "") -> dict[str, float]:
    """Numeric leaves of nested dicts, by dotted key (lists are skipped)."""
    out: dict[str, float] = {}
    if isinstance(results, dict):
        for k, v in results.items():
            key = f"{prefix}{k}"
            if isinstance(v, dict):
                out.update(_scalars(v, key + "."))
            elif isinstance(v, (int, float)) and not isinstance(v, bool):
                out[key] = float(v)
    return out


_PREFERRED = ("loss", "cost", "mse", "error", "reward", "return", "accuracy")


def _pick_metrics(rows: dict[str, dict[str, float]], limit: int = 8) -> list[str]:
    common = set.intersection(*(set(r) for r in rows.values())) if rows else set()
    preferred = sorted(k for k in common if any(p in k.rsplit(".", 1)[-1].lower() for p in _PREFERRED))
    return (preferred or sorted(common))[:limit]


def table(finished: dict[str, Any], metrics: list[str] | None = None) -> tuple[dict[str, Any], str]:
    """The chosen numeric results (``metrics``: dotted keys; default: up to 8 loss/cost-like ones that
    every run has) per run and their mean ± std over runs, as a JSON-able dict and a markdown table."""
    rows = {name: _scalars(r) for name, r in sorted(finished.items())}
    keys = list(metrics) if metrics else _pick_metrics(rows)
    summary = {}
    for k in keys:
        vals = [r[k] for r in rows.values() if k in r and math.isfinite(r[k])]
        if vals:
            mean = sum(vals) / len(vals)
            std = math.sqrt(sum((v - mean) ** 2 for v in vals) / max(1, len(vals) - 1))
            summary[k] = {"mean": mean, "std": std, "runs": len(vals)}
    lines = ["| run | " + " | ".join(keys) + " |", "|---|" + "---|" * len(keys)]
    for name, r in rows.items():
        lines.append(f"| {name} | " + " | ".join(f"{r[k]:.4g}" if k in r else "" for k in keys) + " |")
    if summary:
        cells = [f"{summary[k]['mean']:.4g} ± {summary[k]['std']:.2g}" if k in summary else "" for k in keys]
        lines.append("| **mean ± std** | " + " | ".join(cells) + " |")
    return {"metrics": keys, "runs": {n: {k: r[k] for k in keys if k in r} for n, r in rows.items()},
            "summary": summary}, "\n".join(lines) + "\n"


def _cmd_sweep(args: Any) -> int:
    command = list(args.swept)
    if command and command[0] == "--":
        command = command[1:]
    if command and command[0] == "sweep":
        raise BadArgumentError("diffmpc sweep cannot sweep itself")
    tasks = expand(command, args.seeds, args.grid or [])
    out = Path(args.out)

    def aggregate(result: SweepResult) -> dict[str, Any]:
        finished = result.finished
        data, md = table(finished, args.metric)
        write_json(out / "sweep.json", {"command": ["diffmpc", *command], "seeds": args.seeds,
                                         "grid": args.grid, "finished": sorted(finished),
                                         "total": len(tasks), "failed": sorted(result.failed), **data})
        (out / "sweep.md").write_text(md)
        return data

    res = run_sweep(tasks, run_command, out, jobs=args.jobs, address=args.address, aggregate=aggregate,
                    progress=not args.no_progress, desc="sweep")
    print((out / "sweep.md").read_text())
    return 1 if res.failed else 0


def register(subparsers: Any) -> None:
    """Add the ``sweep`` subcommand."""
    p = subparsers.add_parser(
        "sweep",
        help="run another diffmpc command over seeds and option values (Ray with --jobs/--address)",
        description=__doc__.splitlines()[0],
    )
    p.add_argument("--out", required=True, help="sweep directory: one run directory per (seed, option value)")
    p.add_argument("--seeds", type=int, nargs="+", help="values of the command's --seed")
    p.add_argument("--grid", action="append", metavar="OPTION=V1,V2",
                   help="values of the command's --OPTION (repeatable: the runs are the product)")
    p.add_argument("--metric", action="append",
                   help="a results.json field to tabulate, dotted if nested (repeatable; default: up to "
                        "8 loss/cost-like fields every run has)")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    add_sweep_arguments(p)
    p.add_argument("swept", nargs="...", metavar="-- COMMAND ...", help="the diffmpc command to sweep")
    p.set_defaults(handler=_cmd_sweep)
