"""Backward cost of the implicit layer: CG (paper Alg. 1) vs dense "naive IFT" vs unrolling.

    python -m benchmarks.implicit_backward [--quick]

Problem: a chain-structured (tridiagonal-Hessian) strictly convex score in D unknowns,

    f(y; θ, a) = ½ Σ aᵢ yᵢ² + ½ κ Σ (yᵢ₊₁ − yᵢ)² + Σ log cosh yᵢ − θᵀy,

whose Hessian is sparse but never formed by CG. Measured per D: backward time of each mode, the backward in
units of one Hessian-vector product (HVP), CG iterations, and peak tensor memory. A second table fixes D
and varies the number of forward iterations K of a gradient-descent solver: the IFT backward's memory
must stay flat while unrolling grows with K.
"""

from __future__ import annotations

import argparse
import warnings

import torch

import diffmpc
from diffmpc.solvers import GradientDescent

from .common import peak_memory, timeit, write_table

KAPPA = 1.0


def score(y: torch.Tensor, theta: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    chain = (y[1:] - y[:-1]).pow(2).sum()
    return 0.5 * (a * y * y).sum() + 0.5 * KAPPA * chain + torch.log(torch.cosh(y)).sum() - theta @ y


def problem(D: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    theta = torch.randn(D, generator=g, dtype=torch.float64).requires_grad_()
    a = (1 + torch.rand(D, generator=g, dtype=torch.float64)).requires_grad_()
    return theta, a


def backward_time(D: int, mode: str, repeat: int) -> dict:
    theta, a = problem(D)
    solver = "newton" if mode != "unroll" else GradientDescent(lr=0.2, max_iter=200, tol=1e-9)
    holder = {}

    def forward():
        y, info = diffmpc.argmin(
            score,
            torch.zeros(D, dtype=torch.float64),
            theta,
            a,
            solver=solver,
            backward=mode,
            return_info=True,
        )
        holder["info"] = info
        return y

    def fwd_bwd():
        y = forward()
        torch.autograd.grad(y.sum(), (theta, a))

    t_fwd = timeit(forward, repeat=repeat)["median_s"]
    t_all = timeit(fwd_bwd, repeat=repeat)["median_s"]
    mem = peak_memory(fwd_bwd)
    info = holder["info"]
    row = {
        "D": D,
        "mode": mode,
        "backward_s": max(t_all - t_fwd, 0.0),
        "forward_s": t_fwd,
        "peak_MB": mem / 2**20,
    }
    if info.backward is not None:
        row["lin_iters"] = int(info.backward.iterations.max())
    return row


def hvp_time(D: int, repeat: int) -> float:
    theta, a = problem(D)
    y = torch.randn(D, dtype=torch.float64, requires_grad=True)
    (g,) = torch.autograd.grad(score(y, theta, a), y, create_graph=True)
    v = torch.randn(D, dtype=torch.float64)
    return timeit(lambda: torch.autograd.grad(g, y, v, retain_graph=True), repeat=repeat * 20)["median_s"]


def memory_vs_iterations(D: int, iters: list[int]) -> list[dict]:
    rows = []
    for K in iters:
        for mode in ("cg", "unroll"):
            theta, a = problem(D)
            gd = GradientDescent(lr=0.2, max_iter=K, tol=0.0)

            def fwd_bwd(theta=theta, a=a, gd=gd, mode=mode):
                y = diffmpc.argmin(
                    score, torch.zeros(D, dtype=torch.float64), theta, a, solver=gd, backward=mode
                )
                torch.autograd.grad(y.sum(), (theta, a))

            rows.append({"D": D, "forward_iters": K, "mode": mode, "peak_MB": peak_memory(fwd_bwd) / 2**20})
    return rows


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument(
        "--quick",
        action="store_true",
        help="3 repeats instead of 5 (in both modes D = 10000 runs once, without dense)",
    )
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    torch.manual_seed(args.seed)
    # the memory table runs gradient descent for a fixed K on purpose
    warnings.simplefilter("ignore", diffmpc.ConvergenceWarning)
    repeat = 3 if args.quick else 5
    rows = []
    for D in (10, 100, 1000, 2000, 10000):
        t_hvp = hvp_time(D, repeat)
        for mode in ("cg", "dense", "unroll"):
            if mode == "dense" and D > 2000:
                rows.append({"D": D, "mode": mode, "note": "skipped: D HVPs + O(D³) solve, ~minutes"})
                continue
            r = backward_time(D, mode, repeat if D <= 2000 else 1)
            r["backward_in_HVPs"] = r["backward_s"] / t_hvp
            r["hvp_ms"] = t_hvp * 1e3
            rows.append(r)
            print(r, flush=True)
    by = {(r["D"], r["mode"]): r for r in rows}
    speedup = by[(2000, "dense")]["backward_s"] / by[(2000, "cg")]["backward_s"]
    mem_rows = memory_vs_iterations(1000, [10, 50, 200, 800])
    for r in mem_rows:
        print(r, flush=True)
    meta = {
        "speedup_cg_vs_dense_D2000": speedup,
        "target": ">= 20x",
        "kappa": KAPPA,
        "memory_vs_iterations": mem_rows,
        "command": "python -m benchmarks.implicit_backward" + (" --quick" if args.quick else ""),
    }
    write_table(
        "implicit_backward",
        rows,
        meta,
        ["D", "mode", "backward_s", "backward_in_HVPs", "lin_iters", "forward_s", "peak_MB", "note"],
        title="Implicit backward: CG vs dense vs unroll (tridiagonal-Hessian score, float64, 1 thread)",
        notes=f"CG backward is {speedup:.0f}x faster than dense at D = 2000 (target ≥ 20x).",
    )
    write_table(
        "implicit_backward_memory",
        mem_rows,
        meta | {"memory_vs_iterations": None},
        ["D", "forward_iters", "mode", "peak_MB"],
        title="Peak memory of forward+backward vs forward iterations (D = 1000, gradient descent)",
    )
    print(f"cg vs dense speed-up at D=2000: {speedup:.1f}x")


if __name__ == "__main__":
    main()
