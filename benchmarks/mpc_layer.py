"""MPC layer forward + backward: diffmpc.MPC (sampling + Newton, IFT/CG backward) vs mpc.pytorch (iLQR).

Problem: batch of 64 cart-pole-sized problems (n = 4, m = 1, H = 10), residual MLP dynamics
(4+1 → 32 → 32 → 4, tanh), quadratic cost ``½ xᵀQx + ½ uᵀRu`` on (x_t, u_t), t = 0..H−1, controls boxed
in [−1, 1]. Timed: one forward solve and the backward of ``Σ u*`` to the MLP parameters, float64, one thread.

The anchor ``mpc.pytorch`` (pip ``mpc``, iLQR with autodiff Jacobians and a differentiable box-LQR backward)
pins numpy < 2, so it runs in ``.venv-bench`` (``make bench-venv``): this script re-invokes itself there as a
subprocess with ``--anchor-worker`` and reads its timings and solutions back, so that both sides appear in one
table. A linear-quadratic case (linear dynamics, loose bounds) both solve exactly checks that the plans and
``∂(Σu*)/∂x0`` agree.

Run: ``.venv/bin/python -m benchmarks.mpc_layer [--quick] [--seed 0]``.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
BENCH_PY = ROOT / ".venv-bench" / "bin" / "python"
N, M, H, BATCH = 4, 1, 10, 64
Q_DIAG = torch.tensor([1.0, 0.1, 1.0, 0.1], dtype=torch.float64)
R_DIAG = torch.tensor([0.1], dtype=torch.float64)


def make_problem(seed: int) -> dict:
    from diffmpc.nn import MLPDynamics

    torch.manual_seed(seed)
    mlp = MLPDynamics(N, M, hidden=(32, 32), out_scale=0.5).double()
    x0 = 0.5 * torch.randn(BATCH, N, dtype=torch.float64)
    A = torch.eye(N, dtype=torch.float64) + 0.1 * torch.randn(N, N, dtype=torch.float64)
    B = 0.1 * torch.randn(N, M, dtype=torch.float64)
    return {"mlp": mlp.state_dict(), "x0": x0, "A": A, "B": B, "seed": seed}


def _mlp(problem: dict):
    from diffmpc.nn import MLPDynamics

    mlp = MLPDynamics(N, M, hidden=(32, 32)).double()
    mlp.load_state_dict(problem["mlp"])
    return mlp


def _sync_time(fn, repeat: int) -> tuple[float, object]:
    out, times = None, []
    for _ in range(repeat):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    times.sort()
    return times[len(times) // 2], out


# ---------------------------------------------------------------------------------------------- anchor side
def anchor_worker(problem_path: str, out_path: str, repeat: int) -> None:
    """Runs inside .venv-bench: mpc.pytorch on the same problems."""
    from mpc import mpc as mpc_lib

    torch.set_num_threads(1)
    problem = torch.load(problem_path)
    mlp = _mlp(problem)
    x0 = problem["x0"]
    C = torch.diag(torch.cat([Q_DIAG, R_DIAG])).expand(H, BATCH, N + M, N + M)
    c = torch.zeros(H, BATCH, N + M, dtype=torch.float64)
    cost = mpc_lib.QuadCost(C, c)
    lo = -torch.ones(H, BATCH, M, dtype=torch.float64)

    def solve(dx, x, bound=1.0, grad_method=mpc_lib.GradMethods.AUTO_DIFF):
        ctrl = mpc_lib.MPC(N, M, H, u_lower=bound * lo, u_upper=-bound * lo, lqr_iter=50, eps=1e-8,
                           grad_method=grad_method, verbose=-1, exit_unconverged=False, n_batch=BATCH,
                           backprop=True)
        return ctrl(x, cost, dx)

    def fwd_bwd():
        x_, u_, objs = solve(mlp, x0)
        grads = torch.autograd.grad(u_.sum(), list(mlp.parameters()))
        return u_, objs, grads

    fwd_bwd()  # warm-up
    t, (u, objs, grads) = _sync_time(fwd_bwd, repeat)
    # linear-quadratic case: both solvers are exact
    A, Bm = problem["A"], problem["B"]
    F = torch.cat([A, Bm], 1).expand(H, BATCH, N, N + M)
    dx_lin = mpc_lib.LinDx(F)
    xg = x0.clone().requires_grad_()
    _, u_lq, _ = solve(dx_lin, xg, bound=100.0)
    (g_lq,) = torch.autograd.grad(u_lq.sum(), xg)
    torch.save({"time_s": t, "u": u.detach().transpose(0, 1), "objs": objs.detach(), "grads": grads,
                "u_lq": u_lq.detach().transpose(0, 1), "g_lq": g_lq}, out_path)


# ---------------------------------------------------------------------------------------------- our side
def ours(problem: dict, repeat: int, sampler: str | None) -> dict:
    from diffmpc import MPC

    mlp = _mlp(problem)
    x0 = problem["x0"]

    def cost(x, u):
        return 0.5 * (Q_DIAG * x * x).sum(-1) + 0.5 * (R_DIAG * u * u).sum(-1)

    mpc = MPC(mlp, cost, H, -1.0, 1.0, sampler=sampler, n_samples=64, seed=0, tol=1e-7, bound_reg=1e-6)

    def fwd_bwd():
        u, info = mpc(x0)
        grads = torch.autograd.grad(u.sum(), list(mlp.parameters()))
        return u, info, grads

    fwd_bwd()
    t, (u, info, grads) = _sync_time(fwd_bwd, repeat)
    with torch.no_grad():
        obj = mpc.horizon_cost(x0, u)
    return {"time_s": t, "u": u.detach(), "obj": obj, "grads": grads, "info": info}


def ours_lq(problem: dict) -> tuple[torch.Tensor, torch.Tensor]:
    from diffmpc import MPC

    A, Bm = problem["A"], problem["B"]

    def cost(x, u):
        return 0.5 * (Q_DIAG * x * x).sum(-1) + 0.5 * (R_DIAG * u * u).sum(-1)

    mpc = MPC(lambda x, u: x @ A.T + u @ Bm.T, cost, H, -100.0, 100.0, sampler=None, bound_reg=0.0)
    x = problem["x0"].clone().requires_grad_()
    u, _ = mpc(x)
    (g,) = torch.autograd.grad(u.sum(), x)
    return u.detach(), g


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--quick", action="store_true", help="3 repeats instead of 5")
    ap.add_argument("--anchor-worker", nargs=2, metavar=("PROBLEM", "OUT"), help=argparse.SUPPRESS)
    args, _ = ap.parse_known_args(argv)
    repeat = 3 if args.quick else 5
    torch.set_num_threads(1)
    if args.anchor_worker:
        anchor_worker(*args.anchor_worker, repeat)
        return 0
    from benchmarks.common import write_table

    problem = make_problem(args.seed)
    rows = []
    anchor = None
    with tempfile.TemporaryDirectory() as tmp:
        ppath, opath = Path(tmp) / "problem.pt", Path(tmp) / "anchor.pt"
        torch.save(problem, ppath)
        if BENCH_PY.exists():
            proc = subprocess.run([str(BENCH_PY), "-m", "benchmarks.mpc_layer", "--anchor-worker", str(ppath),
                                   str(opath)], cwd=ROOT, capture_output=True, text=True)
            if proc.returncode == 0:
                anchor = torch.load(opath)
            else:
                print(f"anchor failed:\n{proc.stderr[-2000:]}", file=sys.stderr)
        else:
            print(f"skip anchor: {BENCH_PY} missing (run `make bench-venv`)", file=sys.stderr)
    u_lq, g_lq = ours_lq(problem)
    for sampler in (None, "rs"):
        res = ours(problem, repeat, sampler)
        info = res["info"]
        row = {"method": f"diffmpc.MPC (sampler={sampler}, dense Newton, IFT-CG)",
               "fwd+bwd_ms": res["time_s"] * 1e3,
               "mean_objective": float(res["obj"].mean()),
               "max_stationarity": float(info.stationarity_residual.max())}
        if anchor is not None:
            row["speedup_vs_mpc.pytorch"] = anchor["time_s"] / res["time_s"]
            row["max|u - u_anchor|"] = float((res["u"] - anchor["u"]).abs().max())
        rows.append(row)
    if anchor is not None:
        mlp = _mlp(problem)

        def cost(x, u):
            return 0.5 * (Q_DIAG * x * x).sum(-1) + 0.5 * (R_DIAG * u * u).sum(-1)

        from diffmpc import MPC

        with torch.no_grad():
            obj_a = MPC(mlp, cost, H, -1.0, 1.0).horizon_cost(problem["x0"], anchor["u"])
        rows.append({"method": "mpc.pytorch (iLQR, AUTO_DIFF, 50 iter max)",
                     "fwd+bwd_ms": anchor["time_s"] * 1e3,
                     "mean_objective": float(obj_a.mean()), "speedup_vs_mpc.pytorch": 1.0})
        lq = {"lq_max|u - u_anchor|": float((u_lq - anchor["u_lq"]).abs().max()),
              "lq_max|du/dx0 - anchor|": float((g_lq - anchor["g_lq"]).abs().max()),
              "lq_max|du/dx0|": float(g_lq.abs().max())}
    else:
        lq = {}
    meta = {"batch": BATCH, "n": N, "m": M, "horizon": H, "dtype": "float64", "threads": 1, "seed": args.seed,
            "repeat": repeat, **lq,
            "note": "shared 2-core machine with other jobs running: absolute times are noisy, ratios less so"}
    path = write_table("mpc_layer", rows, meta,
                       ["method", "fwd+bwd_ms", "speedup_vs_mpc.pytorch", "mean_objective",
                        "max_stationarity", "max|u - u_anchor|"],
                       title="MPC layer forward+backward, batch 64, H=10, MLP dynamics, |u| ≤ 1",
                       notes=f"LQ agreement: {lq}")
    print(path.read_text())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
