"""Backward cost of the implicit layer: CG (paper Alg. 1) vs dense "naive IFT" vs unrolling.

    python -m benchmarks.implicit_backward [--quick]

Problem: a chain-structured (tridiagonal-Hessian) strictly convex score in D unknowns,

    f(y; θ, a) = ½ Σ aᵢ yᵢ² + ½ κ Σ (yᵢ₊₁ − yᵢ)² + Σ log cosh yᵢ − θᵀy,

whose Hessian is sparse but never formed by CG; θ and a are drawn from ``--seed``. Measured per D and mode:
forward and backward time (each timed on its own in every repetition, medians), CG iterations, peak
memory, and how many forward / backward solves did not converge (``info.converged`` and counted
``ConvergenceWarning`` s). The time of one bare Hessian-vector product (HVP) is listed for scale; the earlier
"backward in HVP units" ratio is dropped: at these sizes both times are dominated by per-call Python/autograd
overhead, so the ratio moved by 2× between runs and measured overhead, not HVP counts.

A second table fixes D and varies the number of forward iterations K of a gradient-descent solver: the IFT
backward's memory must stay flat while unrolling grows with K. That solver runs exactly K steps on purpose
(solver ``tol = 1e-300``, never met); where K is too small for the layer's own test (‖∇f‖ ≤ tol) the
layer warns, and those warnings are counted and reported.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

import diffmpc
from diffmpc.solvers import GradientDescent

from .common import ConvergenceCounter, Run, peak_memory, timeit, write_table

KAPPA = 1.0


def score(y: torch.Tensor, theta: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    chain = (y[1:] - y[:-1]).pow(2).sum()
    return 0.5 * (a * y * y).sum() + 0.5 * KAPPA * chain + torch.log(torch.cosh(y)).sum() - theta @ y


def problem(D: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    theta = torch.randn(D, generator=g, dtype=torch.float64).requires_grad_()
    a = (1 + torch.rand(D, generator=g, dtype=torch.float64)).requires_grad_()
    return theta, a


def backward_time(D: int, mode: str, repeat: int, seed: int, counter: ConvergenceCounter) -> dict:
    theta, a = problem(D, seed)
    solver = "newton" if mode != "unroll" else GradientDescent(lr=0.2, max_iter=200, tol=1e-9)

    def forward():
        return diffmpc.argmin(score, torch.zeros(D, dtype=torch.float64), theta, a, solver=solver,
                              backward=mode, return_info=True)

    def fwd_bwd():
        y, _ = forward()
        torch.autograd.grad(y.sum(), (theta, a))

    fwd_bwd()  # warm-up
    t_fwd, t_bwd, fwd_bad, bwd_bad, iters = [], [], 0, 0, 0
    with counter.count(f"D={D}/{mode}"):
        for _ in range(repeat):
            t0 = time.perf_counter()
            y, info = forward()
            t1 = time.perf_counter()
            with _record_backward() as records:
                torch.autograd.grad(y.sum(), (theta, a))
            t2 = time.perf_counter()
            t_fwd.append(t1 - t0)
            t_bwd.append(t2 - t1)
            fwd_bad += int((~info.converged).sum())
            solves = [s for r in records for s in r.solves] if records else (
                [info.backward] if getattr(info, "backward", None) is not None else [])
            for sol in solves:  # per-sample linear-solve reports of this backward
                bwd_bad += int((~sol.converged).sum())
                iters = max(iters, int(sol.iterations.max()))
        mem = peak_memory(fwd_bwd)
    row = {
        "D": D,
        "mode": mode,
        "forward_s": statistics.median(t_fwd),
        "backward_s": statistics.median(t_bwd),
        "peak_MB": mem / 2**20,
        "solves": repeat,
        "fwd_not_converged": fwd_bad,
        "bwd_not_converged": bwd_bad if mode != "unroll" else "n/a",
        "warnings": counter.total(f"D={D}/{mode}"),
    }
    if mode != "unroll":
        row["lin_iters"] = iters
    return row


def _record_backward():
    """``diffmpc.record_backward()`` where the core delivers backward reports by value, else an empty list
    (older core: the report is ``info.backward``)."""
    from contextlib import nullcontext

    rec = getattr(diffmpc, "record_backward", None)
    return rec() if rec is not None else nullcontext([])


def hvp_time(D: int, repeat: int, seed: int) -> float:
    theta, a = problem(D, seed)
    y = torch.randn(D, dtype=torch.float64, requires_grad=True)
    (g,) = torch.autograd.grad(score(y, theta, a), y, create_graph=True)
    v = torch.randn(D, dtype=torch.float64)
    return timeit(lambda: torch.autograd.grad(g, y, v, retain_graph=True), repeat=repeat * 20)["median_s"]


def memory_vs_iterations(D: int, iters: list[int], seed: int, counter: ConvergenceCounter) -> list[dict]:
    rows = []
    for K in iters:
        for mode in ("cg", "unroll"):
            theta, a = problem(D, seed)
            gd = GradientDescent(lr=0.2, max_iter=K, tol=1e-300)  # never met: exactly K steps

            def fwd_bwd(theta=theta, a=a, gd=gd, mode=mode):
                y = diffmpc.argmin(
                    score, torch.zeros(D, dtype=torch.float64), theta, a, solver=gd, backward=mode
                )
                torch.autograd.grad(y.sum(), (theta, a))

            key = f"memory/K={K}/{mode}"
            with counter.count(key):
                mb = peak_memory(fwd_bwd) / 2**20
            rows.append({"D": D, "forward_iters": K, "mode": mode, "peak_MB": mb,
                         "warnings": counter.total(key)})
    return rows


def main(argv: list[str] | None = None) -> None:
    run = Run.start("benchmarks.implicit_backward", argv)
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument(
        "--quick",
        action="store_true",
        help="3 repeats instead of 5 (in both modes D = 10000 runs once, without dense)",
    )
    p.add_argument("--seed", type=int, default=0, help="draws θ and a (the problem)")
    args = p.parse_args(run.argv)
    torch.set_num_threads(1)
    torch.manual_seed(args.seed)
    counter = ConvergenceCounter()
    repeat = 3 if args.quick else 5
    rows = []
    for D in (10, 100, 1000, 2000, 10000):
        t_hvp = hvp_time(D, repeat, args.seed)
        for mode in ("cg", "dense", "unroll"):
            if mode == "dense" and D > 2000:
                rows.append({"D": D, "mode": mode, "note": "skipped: D HVPs + O(D³) solve, ~minutes"})
                continue
            r = backward_time(D, mode, repeat if D <= 2000 else 1, args.seed, counter)
            r["hvp_ms"] = t_hvp * 1e3
            rows.append(r)
            print(r, flush=True)
    by = {(r["D"], r["mode"]): r for r in rows}
    speedup = by[(2000, "dense")]["backward_s"] / by[(2000, "cg")]["backward_s"]
    mem_rows = memory_vs_iterations(1000, [10, 50, 200, 800], args.seed, counter)
    for r in mem_rows:
        print(r, flush=True)
    meta = {
        "speedup_cg_vs_dense_D2000": speedup,
        "target": ">= 20x",
        "kappa": KAPPA,
        "seed": args.seed,
        "repeat": repeat,
        "memory_vs_iterations": mem_rows,
        "convergence_warnings": counter.totals,
        "warning_examples": counter.messages,
    }
    write_table(
        "implicit_backward",
        rows,
        meta,
        ["D", "mode", "forward_s", "backward_s", "lin_iters", "hvp_ms", "peak_MB", "solves",
         "fwd_not_converged", "bwd_not_converged", "warnings", "note"],
        title="Implicit backward: CG vs dense vs unroll (tridiagonal-Hessian score, float64, 1 thread)",
        notes=f"CG backward is {speedup:.0f}x faster than dense at D = 2000 (target ≥ 20x). hvp_ms: one bare "
              "Hessian-vector product, for scale.",
        run=run,
    )
    write_table(
        "implicit_backward_memory",
        mem_rows,
        meta | {"memory_vs_iterations": None},
        ["D", "forward_iters", "mode", "peak_MB", "warnings"],
        title="Peak memory of forward+backward vs forward iterations (D = 1000, gradient descent)",
        notes="Gradient descent runs exactly K steps (solver tol = 1e-300, never met); where K is too small "
              "for the layer's test ‖∇f‖ ≤ tol it warns: `warnings` counts those, nothing is silenced.",
        run=run,
    )
    print(f"cg vs dense speed-up at D=2000: {speedup:.1f}x")


if __name__ == "__main__":
    main()
