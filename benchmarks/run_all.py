"""Run every benchmark (``make bench``); each writes benchmarks/results/<name>.{json,md}.

    python -m benchmarks.run_all [--full] [--seed S] [--only NAME ...] [--dry-run]

The benchmarks do not share one set of flags, so this script maps one mode to each one's own flags:
quick (the default) runs every benchmark in its quick mode, ``--full`` in its full mode (see ``MODES``).
Only ``--seed`` is passed through. ``--dry-run`` prints the commands without running them. BLAS / OpenMP
threads default to 1 (the README's commands set ``OMP_NUM_THREADS=1`` / ``OPENBLAS_NUM_THREADS=1``).
"""

from __future__ import annotations

import argparse
import importlib
import os

# One BLAS/OpenMP thread, as the README's commands use (set before numpy/torch are imported).
for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

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
    # quick: 20 initialisations and mu in {1, 3, 10}; full: 100 initialisations and mu up to 30
    "ode_backward": (["--quick"], []),
}
BENCHMARKS = tuple(f"benchmarks.{name}" for name in MODES)


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
    for module_name, *flags in commands(args.full, args.seed, args.only):
        print(f"== python -m {' '.join([module_name, *flags])}", flush=True)
        if args.dry_run:
            continue
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as err:
            print(f"skip {module_name}: {err}")
            continue
        module.main(flags)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
