"""MPC layer forward + backward at equal solution quality: diffmpc.MPC vs mpc.pytorch (box-DDP / iLQR).

Problem: a batch of 64 cart-pole-sized problems (n = 4, m = 1, H = 10), residual MLP dynamics
(4+1 → 32 → 32 → 4, tanh), quadratic cost ``½ xᵀQx + ½ uᵀRu`` on (x_t, u_t), t = 0..H−1, controls boxed
in [−1, 1], float64, one thread. Both sides start from u = 0 (ours: ``sampler=None``). Timed: the forward
solve and the backward of ``Σ u*`` to the MLP parameters, separately.

Both libraries are scored the same way, by this script, on the single-shooting objective J(u): the mean
objective reached, the KKT residual ``‖u − P(u − ∇J)‖∞`` per sample (converged: ≤ 1e-6), and iterations
(ours: projected-Newton iterations; mpc.pytorch: its iLQR iterations, ``lqr_iter`` caps them, ``eps`` is
its own stopping test on ‖Δu‖, and samples failing it are silently detached from its backward — we count
them). Each side runs a sweep of iteration caps, including mpc.pytorch's defaults (``lqr_iter=10,
eps=1e-7``) and our defaults; the *time to reach the objective* is that of the fastest setting whose mean
objective is within 1e-6 (relative) of the best any setting reached, and ``at_best_J_per_sample`` counts
the problems on which a setting is within 1e-6 of the best objective any setting reached on that problem
(the two libraries can end in different local minima).

mpc.pytorch pins numpy < 2, so it runs in ``.venv-bench`` (``make bench-venv``) as a worker process that
stays alive: the two libraries run in **alternating rounds** (one anchor setting, one of ours, …) in one
process pair; timings are medians over rounds. A linear-quadratic case (linear dynamics, loose bounds) both
solve exactly checks that plans and ``∂(Σu*)/∂x0`` agree.

Run: ``python -m benchmarks.mpc_layer [--quick] [--rounds 3] [--seed 0]``; writes
``benchmarks/results/mpc_layer.{json,md}``. Exits non-zero when the anchor is missing.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
BENCH_PY = ROOT / ".venv-bench" / "bin" / "python"
N, M, H, BATCH = 4, 1, 10, 64
Q_DIAG = torch.tensor([1.0, 0.1, 1.0, 0.1], dtype=torch.float64)
R_DIAG = torch.tensor([0.1], dtype=torch.float64)
KKT_TOL = 1e-6
# (tag, lqr_iter, eps): mpc.pytorch's defaults are lqr_iter=10, eps=1e-7
ANCHOR_SETTINGS = [
    ("lqr_iter=2", 2, 1e-7),
    ("lqr_iter=3", 3, 1e-7),
    ("lqr_iter=5", 5, 1e-7),
    ("defaults (lqr_iter=10, eps=1e-7)", 10, 1e-7),
    ("lqr_iter=20", 20, 1e-7),
    ("lqr_iter=50, eps=1e-8", 50, 1e-8),
]
# (tag, max_iter, tol): ours defaults are max_iter=100, tol=1e-8 (float64)
OURS_SETTINGS = [
    ("max_iter=2", 2, 1e-8),
    ("max_iter=3", 3, 1e-8),
    ("max_iter=5", 5, 1e-8),
    ("max_iter=10", 10, 1e-8),
    ("defaults (max_iter=100, tol=1e-8)", 100, 1e-8),
]


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


def quad_cost(x, u):
    return 0.5 * (Q_DIAG * x * x).sum(-1) + 0.5 * (R_DIAG * u * u).sum(-1)


# ---------------------------------------------------------------------------------------------- anchor side
def anchor_worker(problem_path: str) -> None:
    """Runs inside .venv-bench: mpc.pytorch on the same problems, one setting per request on stdin."""
    from mpc import mpc as mpc_lib

    torch.set_num_threads(1)
    problem = torch.load(problem_path, weights_only=True)
    mlp = _mlp(problem)
    x0 = problem["x0"]
    C = torch.diag(torch.cat([Q_DIAG, R_DIAG])).expand(H, BATCH, N + M, N + M)
    c = torch.zeros(H, BATCH, N + M, dtype=torch.float64)
    cost = mpc_lib.QuadCost(C, c)
    lo = -torch.ones(H, BATCH, M, dtype=torch.float64)
    calls = {"n": 0, "du": None}
    orig = mpc_lib.MPC.solve_lqr_subproblem

    def counting(self, *args, no_op_forward=False, **kw):  # count iLQR iterations, keep the last ‖Δu‖
        out = orig(self, *args, no_op_forward=no_op_forward, **kw)
        if not no_op_forward:
            calls["n"] += 1
            calls["du"] = out[4].detach().clone()
        return out

    mpc_lib.MPC.solve_lqr_subproblem = counting

    def solve(dx, x, lqr_iter, eps, bound=1.0):
        ctrl = mpc_lib.MPC(
            N,
            M,
            H,
            u_lower=bound * lo,
            u_upper=-bound * lo,
            lqr_iter=lqr_iter,
            eps=eps,
            grad_method=mpc_lib.GradMethods.AUTO_DIFF,
            verbose=-1,
            exit_unconverged=False,
            n_batch=BATCH,
            backprop=True,
        )
        return ctrl(x, cost, dx)

    store = {}
    print("ready", flush=True)
    for line in sys.stdin:
        req = json.loads(line)
        if req["cmd"] == "quit":
            break
        if req["cmd"] == "dump":
            A, Bm = problem["A"], problem["B"]
            F = torch.cat([A, Bm], 1).expand(H, BATCH, N, N + M)
            xg = x0.clone().requires_grad_()
            _, u_lq, _ = solve(mpc_lib.LinDx(F), xg, 50, 1e-8, bound=100.0)
            (g_lq,) = torch.autograd.grad(u_lq.sum(), xg)
            store["lq"] = {"u": u_lq.detach().transpose(0, 1), "g": g_lq}
            torch.save(store, req["path"])
            print(json.dumps({"ok": True}), flush=True)
            continue
        calls["n"] = 0
        t0, c0 = time.perf_counter(), time.process_time()
        _, u, _ = solve(mlp, x0, req["lqr_iter"], req["eps"])
        t1, c1 = time.perf_counter(), time.process_time()
        grads = torch.autograd.grad(u.sum(), list(mlp.parameters()), allow_unused=True)
        t2, c2 = time.perf_counter(), time.process_time()
        own = int((calls["du"] < req["eps"]).sum()) if calls["du"] is not None else 0
        store[req["tag"]] = {
            "u": u.detach().transpose(0, 1).clone(),
            "grads": [
                g if g is not None else torch.zeros_like(p)
                for g, p in zip(grads, mlp.parameters(), strict=True)
            ],
        }
        print(
            json.dumps(
                {
                    "fwd_wall": t1 - t0,
                    "fwd_cpu": c1 - c0,
                    "bwd_wall": t2 - t1,
                    "bwd_cpu": c2 - c1,
                    "iterations": calls["n"],
                    "own_converged": own,
                }
            ),
            flush=True,
        )


# ---------------------------------------------------------------------------------------------- our side
def ours_run(mpc, mlp, x0: torch.Tensor) -> tuple[dict, torch.Tensor, list[torch.Tensor], object]:
    t0, c0 = time.perf_counter(), time.process_time()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # non-convergence is counted from info below
        u, info = mpc(x0)
    t1, c1 = time.perf_counter(), time.process_time()
    grads = torch.autograd.grad(u.sum(), list(mlp.parameters()))
    t2, c2 = time.perf_counter(), time.process_time()
    timing = {
        "fwd_wall": t1 - t0,
        "fwd_cpu": c1 - c0,
        "bwd_wall": t2 - t1,
        "bwd_cpu": c2 - c1,
        "iterations_mean": float(info.forward_iterations.double().mean()),
        "iterations": int(info.forward_iterations.max()),
        "own_converged": int(info.converged.sum()),
    }
    return timing, u.detach(), [g.detach() for g in grads], info


def ours_lq(problem: dict) -> tuple[torch.Tensor, torch.Tensor]:
    from diffmpc import MPC

    A, Bm = problem["A"], problem["B"]
    mpc = MPC(lambda x, u: x @ A.T + u @ Bm.T, quad_cost, H, -100.0, 100.0, sampler=None)
    x = problem["x0"].clone().requires_grad_()
    u, _ = mpc(x)
    (g,) = torch.autograd.grad(u.sum(), x)
    return u.detach(), g


def score(scorer, x0: torch.Tensor, u: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    from diffmpc._box_newton import kkt_residual

    uc = u.clamp(-1.0, 1.0)
    with torch.no_grad():
        J = scorer.horizon_cost(x0, uc)
    g, _ = scorer.derivatives(x0, uc)
    one = torch.ones(1, dtype=u.dtype)
    return J, kkt_residual(uc.reshape(u.shape[0], -1), g, -one, one)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--rounds", type=int, default=3, help="alternating rounds (timings are medians)")
    ap.add_argument("--quick", action="store_true", help="one round")
    ap.add_argument("--anchor-worker", metavar="PROBLEM", help=argparse.SUPPRESS)
    args, _ = ap.parse_known_args(argv)
    torch.set_num_threads(1)
    if args.anchor_worker:
        anchor_worker(args.anchor_worker)
        return 0
    if not BENCH_PY.exists():
        print(f"anchor missing: {BENCH_PY} (run `make bench-venv`)", file=sys.stderr)
        return 1
    from benchmarks.common import git_state, write_table
    from diffmpc import MPC

    rounds = 1 if args.quick else args.rounds
    load_before = os.getloadavg()
    from benchmarks.common import Run

    run = Run.start("benchmarks.mpc_layer", argv)
    problem = make_problem(args.seed)
    mlp = _mlp(problem)
    x0 = problem["x0"]
    scorer = MPC(mlp, quad_cost, H, -1.0, 1.0, sampler=None)
    ours = {
        tag: MPC(mlp, quad_cost, H, -1.0, 1.0, sampler=None, max_iter=it, tol=tol)
        for tag, it, tol in OURS_SETTINGS
    }
    times: dict[str, list[dict]] = {}
    results: dict[str, dict] = {}
    with tempfile.TemporaryDirectory() as tmp:
        ppath, opath = Path(tmp) / "problem.pt", Path(tmp) / "anchor.pt"
        torch.save(problem, ppath)
        worker = subprocess.Popen(
            [str(BENCH_PY), "-m", "benchmarks.mpc_layer", "--anchor-worker", str(ppath)],
            cwd=ROOT,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            env={**os.environ, "OMP_NUM_THREADS": "1"},
        )

        def ask(req: dict) -> dict:
            worker.stdin.write(json.dumps(req) + "\n")
            worker.stdin.flush()
            line = worker.stdout.readline()
            if not line:
                raise RuntimeError("the mpc.pytorch worker died; run it by hand to see why")
            return json.loads(line)

        try:
            if worker.stdout.readline().strip() != "ready":
                raise RuntimeError(
                    "the mpc.pytorch worker did not start (is `mpc` installed in .venv-bench?)"
                )
            ask({"cmd": "run", "tag": "warm-up", "lqr_iter": 2, "eps": 1e-7})
            ours_run(ours["max_iter=2"], mlp, x0)
            for _ in range(rounds):  # alternate: one anchor setting, one of ours, ...
                for i in range(max(len(ANCHOR_SETTINGS), len(OURS_SETTINGS))):
                    if i < len(ANCHOR_SETTINGS):
                        tag, it, eps = ANCHOR_SETTINGS[i]
                        times.setdefault("mpc.pytorch " + tag, []).append(
                            ask({"cmd": "run", "tag": tag, "lqr_iter": it, "eps": eps})
                        )
                    if i < len(OURS_SETTINGS):
                        tag = OURS_SETTINGS[i][0]
                        t, u, grads, _ = ours_run(ours[tag], mlp, x0)
                        times.setdefault("diffmpc " + tag, []).append(t)
                        results["diffmpc " + tag] = {"u": u, "grads": grads}
            ask({"cmd": "dump", "path": str(opath)})
            anchor = torch.load(opath, weights_only=True)
        finally:
            if worker.poll() is None:
                worker.stdin.write(json.dumps({"cmd": "quit"}) + "\n")
                worker.stdin.close()
                worker.wait(timeout=60)
    for tag, *_ in ANCHOR_SETTINGS:
        results["mpc.pytorch " + tag] = anchor[tag]
    med = statistics.median
    rows = []
    scored = {name: score(scorer, x0, results[name]["u"]) for name in times}
    # per-sample best objective any setting of either library reached (equal quality, sample by sample)
    best_each = torch.stack([J for J, _ in scored.values()]).amin(0)
    for name, runs in times.items():
        J, kkt = scored[name]
        at_best = int((J <= best_each + 1e-6 * best_each.abs().clamp_min(1.0)).sum())
        rows.append(
            {
                "setting": name,
                "fwd_cpu_ms": 1e3 * med(r["fwd_cpu"] for r in runs),
                "bwd_cpu_ms": 1e3 * med(r["bwd_cpu"] for r in runs),
                "total_cpu_ms": 1e3 * med(r["fwd_cpu"] + r["bwd_cpu"] for r in runs),
                "total_wall_ms": 1e3 * med(r["fwd_wall"] + r["bwd_wall"] for r in runs),
                "iterations": runs[0]["iterations"],
                "mean_J": float(J.mean()),
                "at_best_J_per_sample": f"{at_best}/{BATCH}",
                f"kkt<={KKT_TOL:g}": f"{int((kkt <= KKT_TOL).sum())}/{BATCH}",
                "max_kkt": float(kkt.max()),
                "converged (own test)": f"{runs[0]['own_converged']}/{BATCH}",
            }
        )
    best_J = min(r["mean_J"] for r in rows)
    target = best_J + 1e-6 * max(1.0, abs(best_J))
    reach = {}
    for lib in ("diffmpc", "mpc.pytorch"):
        ok = [r for r in rows if r["setting"].startswith(lib + " ") and r["mean_J"] <= target]
        reach[lib] = min(ok, key=lambda r: r["fwd_cpu_ms"]) if ok else None
    for r in rows:
        r["reaches_best_J"] = r["mean_J"] <= target
    # gradients where both sides reached the same plan (per sample, |Δu| ≤ 1e-6, both KKT ≤ 1e-6)
    ours_best = results["diffmpc " + OURS_SETTINGS[-1][0]]
    anc_best = results["mpc.pytorch " + ANCHOR_SETTINGS[-1][0]]
    same = (ours_best["u"] - anc_best["u"]).abs().flatten(1).amax(1) <= 1e-6
    u_lq, g_lq = ours_lq(problem)
    meta = {
        "command": "python -m benchmarks.mpc_layer " + " ".join(argv if argv is not None else sys.argv[1:]),
        "git_commit": git_state()["commit"],
        "threads": torch.get_num_threads(),
        "loadavg_before": load_before,
        "loadavg_after": os.getloadavg(),
        "rounds": rounds,
        "batch": BATCH,
        "n": N,
        "m": M,
        "horizon": H,
        "dtype": "float64",
        "seed": args.seed,
        "kkt_tol": KKT_TOL,
        "best_mean_J": best_J,
        "time_to_best_J_ms": {k: (v["fwd_cpu_ms"] if v else None) for k, v in reach.items()},
        "setting_reaching_best_J": {k: (v["setting"] if v else None) for k, v in reach.items()},
        "samples_same_plan(|du|<=1e-6)": int(same.sum()),
        "lq_max|u - u_anchor|": float((u_lq - anchor["lq"]["u"]).abs().max()),
        "lq_max|du/dx0 - anchor|": float((g_lq - anchor["lq"]["g"]).abs().max()),
        "lq_max|du/dx0|": float(g_lq.abs().max()),
    }
    ratio = None
    if reach["diffmpc"] and reach["mpc.pytorch"]:
        ratio = reach["mpc.pytorch"]["fwd_cpu_ms"] / reach["diffmpc"]["fwd_cpu_ms"]
    meta["time_to_best_J_ratio(anchor/ours)"] = ratio
    cols = [
        "setting",
        "fwd_cpu_ms",
        "bwd_cpu_ms",
        "total_cpu_ms",
        "total_wall_ms",
        "iterations",
        "mean_J",
        "reaches_best_J",
        "at_best_J_per_sample",
        f"kkt<={KKT_TOL:g}",
        "max_kkt",
        "converged (own test)",
    ]
    notes = (
        f"Best mean objective {best_J:.8g}; fastest forward reaching it (≤ +1e-6 rel.): "
        + ", ".join(
            f"{k}: {v['setting']} {v['fwd_cpu_ms']:.0f} ms CPU" if v else f"{k}: never"
            for k, v in reach.items()
        )
        + (f" (anchor/ours = {ratio:.2f})" if ratio else "")
        + f". Same plan (|Δu| ≤ 1e-6) on {int(same.sum())}/{BATCH} samples at the longest settings. "
        f"LQ case: plans agree to {meta['lq_max|u - u_anchor|']:.1e}, ∂(Σu*)/∂x0 to "
        f"{meta['lq_max|du/dx0 - anchor|']:.1e}. Load average {load_before[0]:.1f} → "
        f"{os.getloadavg()[0]:.1f} on {os.cpu_count()} cores; CPU times are the comparable numbers. "
        "iterations: the largest per-sample "
        "count (ours) / iLQR iterations of the batch (mpc.pytorch); 'own test': ours KKT ≤ tol and step ≤ "
        "step_tol, mpc.pytorch ‖Δu‖ < eps at its last iteration (the others it detaches from its backward)."
    )
    path = write_table(
        "mpc_layer",
        rows,
        meta,
        cols,
        title="MPC layer forward + backward, batch 64, H = 10, MLP dynamics, |u| ≤ 1 "
        "(equal solution quality)",
        notes=notes,
        run=run,
    )
    print(path.read_text())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
