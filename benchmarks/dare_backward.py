"""Gradient time of every DARE backward mode vs scipy's forward solve (issue 6 benchmark).

For n ∈ {2, 8, 32, 64, 128} states and m = max(1, n/8) inputs, one random problem (A with spectral radius
1.05, so some modes are open-loop unstable; Q = I, R = I): time

* ``scipy_forward``: ``scipy.linalg.solve_discrete_are`` (the anchor),
* ``sda_forward``: our batched torch SDA forward (``dare`` without grad, including its checks),
* one backward per mode (``torch.autograd.grad`` of ⟨W, S⟩ w.r.t. A, B, Q, R on a retained graph).

Target: the default (``lyapunov``) backward costs less than the scipy forward at n = 64; ``dense`` and
``analytic`` grow like n⁶ (they are skipped above ``--max-dense-n``; their n²×n² matrices need
8·n⁴ bytes each). Run: ``OPENBLAS_NUM_THREADS=1 python -m benchmarks.dare_backward [--full]`` (the env var
keeps scipy's BLAS from spinning threads on a shared CPU).
"""

from __future__ import annotations

import argparse
import os
import time

import numpy as np
import scipy.linalg
import torch

from benchmarks.common import ConvergenceCounter, Run, timeit, write_table
from diffmpc.lqr import BACKWARDS, dare


def problem(n: int, m: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    A = torch.randn(n, n, generator=g, dtype=torch.float64)
    A = 1.05 * A / torch.linalg.eigvals(A).abs().max()
    B = torch.randn(n, m, generator=g, dtype=torch.float64)
    return A, B, torch.eye(n, dtype=torch.float64), torch.eye(m, dtype=torch.float64)


def _time(fn, budget_s: float) -> dict[str, float]:
    t0 = time.perf_counter()
    fn()
    first = time.perf_counter() - t0
    repeat = max(1, min(7, int(budget_s / max(first, 1e-6))))
    return timeit(fn, repeat=repeat, warmup=0)


def measure(n: int, args: argparse.Namespace, counter: ConvergenceCounter) -> dict:
    """One table row: forward times and the backward time of every mode for n states (ConvergenceWarnings
    of the solves counted under ``n=<n>``)."""
    with counter.count(f"n={n}"):
        row = _measure(n, args)
    row["warnings"] = counter.total(f"n={n}")
    return row


def _measure(n: int, args: argparse.Namespace) -> dict:
    m = max(1, n // 8)
    A, B, Q, R = problem(n, m, args.seed)
    An, Bn, Qn, Rn = (t.numpy() for t in (A, B, Q, R))
    fwd = _time(lambda: scipy.linalg.solve_discrete_are(An, Bn, Qn, Rn), args.budget)["median_s"]
    with torch.no_grad():
        ours = _time(lambda: dare(A, B, Q, R), args.budget)["median_s"]
    row = {"n": n, "m": m, "scipy_forward_ms": 1e3 * fwd, "sda_forward_ms": 1e3 * ours,
           "sda/scipy": ours / fwd}
    W = torch.randn(n, n, generator=torch.Generator().manual_seed(args.seed + 1), dtype=torch.float64)
    grads = {}
    for mode in args.modes:
        if mode in ("dense", "analytic") and n > args.max_dense_n:
            row[f"{mode}_ms"] = f"skipped (n²×n² = {8 * n ** 4 / 2 ** 20:.0f} MiB)"
            continue
        leaves = [t.clone().requires_grad_() for t in (A, B, Q, R)]
        loss = (dare(*leaves, backward=mode) * W).sum()
        grads[mode] = _grad(loss, leaves)
        t = _time(lambda loss=loss, leaves=leaves: _grad(loss, leaves), args.budget)["median_s"]
        row[f"{mode}_ms"] = 1e3 * t
        row[f"{mode}/scipy_fwd"] = t / fwd
    ref = grads.get("lyapunov")
    if ref is not None:
        row["max_rel_diff_vs_lyapunov"] = max(
            float((a - b).abs().max() / b.abs().max().clamp_min(1e-300))
            for g in grads.values() for a, b in zip(g, ref, strict=True))
    return row


def _grad(loss, leaves):
    return torch.autograd.grad(loss, leaves, retain_graph=True)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", type=int, nargs="+", default=[2, 8, 32, 64, 128])
    p.add_argument("--modes", nargs="+", default=list(BACKWARDS), choices=BACKWARDS)
    p.add_argument("--max-dense-n", type=int, default=32, help="largest n for the O(n⁶) dense/analytic modes")
    p.add_argument("--full", action="store_true", help="same as --max-dense-n 64")
    p.add_argument("--budget", type=float, default=1.0, help="seconds of repeats per measurement")
    p.add_argument("--seed", type=int, default=0)
    run = Run.start("benchmarks.dare_backward", argv)
    args = p.parse_args(run.argv)
    if args.full:
        args.max_dense_n = max(args.max_dense_n, 64)
    torch.set_num_threads(1)
    rows = []
    counter = ConvergenceCounter()
    for n in args.sizes:
        rows.append(measure(n, args, counter))
        print({k: (round(v, 4) if isinstance(v, float) else v) for k, v in rows[-1].items()}, flush=True)
    cols = ["n", "m", "scipy_forward_ms", "sda_forward_ms"]
    for mode in args.modes:
        cols += [f"{mode}_ms", f"{mode}/scipy_fwd"]
    cols += ["max_rel_diff_vs_lyapunov", "warnings"]
    meta = {"sizes": args.sizes, "modes": args.modes, "max_dense_n": args.max_dense_n, "seed": args.seed,
            "OPENBLAS_NUM_THREADS": os.environ.get("OPENBLAS_NUM_THREADS"), "numpy": np.__version__,
            "scipy": scipy.__version__, "convergence_warnings": counter.totals,
            "warning_examples": counter.messages}
    path = write_table("dare_backward", rows, meta, cols, run=run,
                       title="DARE backward modes vs scipy forward",
                       notes="Gradient (backward-only) time per mode, ratio to scipy's "
                             "solve_discrete_are in the same run; float64, 1 torch thread.")
    print(path.read_text())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
