"""Run every benchmark (``make bench``); each writes benchmarks/results/<name>.{json,md}.

    python -m benchmarks.run_all [--full] [--seed S] [--only NAME ...] [--dry-run]

The benchmarks do not share one set of flags, so this script maps one mode to each one's own flags:
quick (the default) runs every benchmark in its quick mode, ``--full`` in its full mode (see ``MODES``).
Only ``--seed`` is passed through. ``--dry-run`` prints the commands without running them. BLAS / OpenMP
threads default to 1 (set in the environment of every benchmark process, and recorded in its JSON).

Each benchmark runs in its own process (its JSON records its own command line, and one benchmark's memory
or threads cannot leak into the next). Before anything runs, the anchors of the selected benchmarks are
checked (``ANCHORS``); a missing anchor stops ``make bench`` with exit status 2 and says how to install it,
instead of writing results without the comparison. A benchmark that fails makes the run exit 1 (the others
still run).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BENCH_PY = ROOT / ".venv-bench" / "bin" / "python"

# name -> (flags in quick mode, flags in full mode)
MODES: dict[str, tuple[list[str], list[str]]] = {
    # quick: 3 repeats instead of 5 (dense is skipped at D = 10000 in both modes)
    "implicit_backward": (["--quick"], []),
    # the default is the quick mode (dense/analytic up to n = 32); --full runs them up to n = 64
    "dare_backward": ([], ["--full"]),
    # quick: 3 repeats instead of 5; the mpc.pytorch anchor needs .venv-bench (`make bench-venv`)
    "mpc_layer": (["--quick"], []),
    # quick: 10 example problems + a batch of 16, one round; CasADi + IPOPT need the [casadi] extra
    "mpc_casadi": (["--quick"], []),
    # quick: 2 repeats instead of 6; full also times torch.compile (minutes of compilation)
    "expert_latency": (["--quick"], ["--compile"]),
    # quick: only the quick preset's Newton budget (20); default: budgets 20 and 100 (two short IfO trainings)
    "ifo_convergence": (["--quick"], []),
    # quick: 10 NODE initialisations instead of the paper's 100 (both: mu in {1, 3, 10, 30})
    "ode_backward": (["--quick"], []),
}
BENCHMARKS = tuple(f"benchmarks.{name}" for name in MODES)

# name -> [(anchor, python to check with, module it must import, how to get it)]
ANCHORS: dict[str, list[tuple[str, str, str, str]]] = {
    "dare_backward": [("scipy.linalg.solve_discrete_are", "self", "scipy", "pip install scipy")],
    "ode_backward": [("torchdiffeq (DOPRI5 adjoint)", "self", "torchdiffeq", "pip install -e '.[dev]'")],
    "mpc_layer": [("mpc.pytorch in .venv-bench", "bench", "mpc", "make bench-venv")],
    "mpc_casadi": [("CasADi / IPOPT", "self", "casadi", "pip install -e '.[casadi]'")],
}


def missing_anchors(names: list[str]) -> list[str]:
    """One line per anchor of ``names`` that cannot be imported where its benchmark needs it."""
    out = []
    for name in names:
        for what, where, module, fix in ANCHORS.get(name, []):
            py = sys.executable if where == "self" else str(BENCH_PY)
            if where == "bench" and not BENCH_PY.exists():
                out.append(f"{name}: {what} — {BENCH_PY} does not exist (run `{fix}`)")
                continue
            probe = subprocess.run([py, "-c", f"import {module}"], capture_output=True, text=True)
            if probe.returncode != 0:
                err = (probe.stderr.strip().splitlines() or ["?"])[-1]
                out.append(f"{name}: {what} — `import {module}` failed in {py}: {err} (fix: `{fix}`)")
    return out


def commands(full: bool = False, seed: int | None = None, only: list[str] | None = None) -> list[list[str]]:
    """``[module, *flags]`` for each selected benchmark, in run order."""
    out = []
    for name, (quick_flags, full_flags) in MODES.items():
        if only and name not in only:
            continue
        flags = list(full_flags if full else quick_flags)
        if seed is not None:
            flags += ["--seed", str(seed)]
        out.append([f"benchmarks.{name}", *flags])
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--full", action="store_true", help="each benchmark's full mode (much longer)")
    p.add_argument("--seed", type=int, default=None, help="passed to every benchmark (their default: 0)")
    p.add_argument("--only", nargs="+", choices=list(MODES), metavar="NAME",
                   help=f"run only these ({', '.join(MODES)})")
    p.add_argument("--dry-run", action="store_true", help="print the commands, run nothing")
    args = p.parse_args(argv)
    cmds = commands(args.full, args.seed, args.only)
    env = dict(os.environ)
    for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        env.setdefault(var, "1")
    if args.dry_run:
        for module_name, *flags in cmds:
            print(f"== python -m {' '.join([module_name, *flags])}", flush=True)
        return 0
    missing = missing_anchors([c[0].removeprefix("benchmarks.") for c in cmds])
    if missing:
        print("make bench: missing anchors — no benchmark was run:\n  " + "\n  ".join(missing)
              + "\n(run the others with `python -m benchmarks.run_all --only NAME ...`)", file=sys.stderr)
        return 2
    failed = []
    for module_name, *flags in cmds:
        print(f"== python -m {' '.join([module_name, *flags])}", flush=True)
        rc = subprocess.run([sys.executable, "-m", module_name, *flags], cwd=ROOT, env=env).returncode
        if rc != 0:
            failed.append(f"{module_name} (exit {rc})")
    if failed:
        print("make bench: failed: " + ", ".join(failed), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
