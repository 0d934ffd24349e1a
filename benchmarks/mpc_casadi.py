"""diffmpc.MPC (box-constrained projected Newton) vs CasADi + IPOPT on the cart-pole MPC problems.

Problems (same model, same first guess on both sides):

* **example** — the 40 horizon problems of ``examples/mpc_cartpole.py`` (seed 0, H = 10, true cart-pole
  model with 4 RK4 substeps, state-only PILCO cost at the next state, |u| ≤ 1). The episode is replayed
  with diffmpc's policy; at every step the sampler's plan (random shooting 200 + the shifted previous
  plan) is recorded as the *first guess* that both solvers start from.
* **batch** — 64 states from the expert dataset ``data/expert_cartpole_rs.npz`` (the IfO cost batch,
  H = 10), first guess from random shooting (200 samples, seed 0): diffmpc solves all 64 in one batched
  call; IPOPT solves them one after another.

IPOPT (CasADi ``nlpsol``, exact Hessian, default ``tol=1e-8``) runs on a *multiple-shooting*
transcription: unknowns ``x_1..x_H, u_0..u_{H-1}``, equality constraints ``x_{t+1} = F(x_t, u_t)`` (the
same RK4 map, written in CasADi), initialised with the first guess and its rollout. Both sides are scored
the same way on the single-shooting objective J(u) computed by torch: the objective reached, and the KKT
residual ``‖u − P(u − ∇J)‖∞`` (converged: ≤ the tolerance, 1e-6 here, the example's test). Timing: wall
and CPU seconds per solve, one thread, ours and IPOPT alternating problem by problem over ``--rounds``
rounds, medians.

``--compile`` adds a third batch row: the same layer with ``compile_derivatives=True`` and
``compile_rollout=True`` (torch.compile / inductor), timed in the same alternating rounds after one warm-up
call; the warm-up's extra CPU and wall time (the compilation) is reported in its own column, not hidden.

``--profile`` only prints where the batched call's time goes (see :func:`profile_batch`).

Run: ``python -m benchmarks.mpc_casadi [--quick] [--rounds 3] [--compile] [--profile]`` (needs ``pip install
'.[casadi]'``). Writes ``benchmarks/results/mpc_casadi.{json,md}``.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
H, SUBSTEPS, TOL = 10, 4, 1e-6


def cartpole_casadi(substeps: int = SUBSTEPS):
    """The cart-pole step ``F(x, u)`` and cost ``c(x)`` of :mod:`envs.cartpole_swingup`, in CasADi."""
    import casadi as ca

    from envs import cartpole_swingup as cp

    M, m, l, b, g = cp.CART_MASS, cp.POLE_MASS, cp.POLE_LENGTH, cp.FRICTION, cp.GRAVITY
    x = ca.SX.sym("x", 4)
    u = ca.SX.sym("u", 1)
    f = cp.FORCE_SCALE * u[0]

    def deriv(s):
        xd, th, thd = s[1], s[2], s[3]
        sn, c = ca.sin(th), ca.cos(th)
        p = f - b * xd + 0.5 * m * l * thd * thd * sn
        inv = 1.0 / ((M + m) - 0.75 * m * c * c)
        xdd = (p + 0.75 * m * g * sn * c) * inv
        thdd = (sn * (-1.5 * (M + m) * g / l) - 1.5 / l * c * p) * inv
        return ca.vertcat(xd, xdd, thd, thdd)

    h = cp.DT / substeps
    s = x
    for _ in range(substeps):
        k1 = deriv(s)
        k2 = deriv(s + h / 2 * k1)
        k3 = deriv(s + h / 2 * k2)
        k4 = deriv(s + h * k3)
        s = s + h / 6 * (k1 + 2 * k2 + 2 * k3 + k4)
    F = ca.Function("F", [x, u], [s])
    dx = x[0] + l * ca.sin(x[2])
    dy = l * (1.0 + ca.cos(x[2]))
    c = ca.Function("c", [x], [1.0 - ca.exp(-(dx * dx + dy * dy) / (2 * cp.COST_WIDTH**2))])
    return F, c


class IpoptMPC:
    """Multiple-shooting NLP of the horizon problem, built once; ``solve(x0, u_guess)`` per problem."""

    def __init__(self, horizon: int = H, substeps: int = SUBSTEPS, tol: float = 1e-8) -> None:
        import casadi as ca

        F, c = cartpole_casadi(substeps)
        X = ca.SX.sym("X", 4, horizon)  # x_1 .. x_H
        U = ca.SX.sym("U", 1, horizon)  # u_0 .. u_{H-1}
        P = ca.SX.sym("P", 4)  # x_0
        g, J, prev = [], 0, P
        for t in range(horizon):
            g.append(X[:, t] - F(prev, U[:, t]))
            J = J + c(X[:, t])
            prev = X[:, t]
        self.horizon = horizon
        self.nlp = {"x": ca.vertcat(ca.vec(X), ca.vec(U)), "p": P, "f": J, "g": ca.vertcat(*g)}
        opts = {"ipopt.print_level": 0, "print_time": False, "ipopt.tol": tol, "ipopt.max_iter": 1000}
        self.solver = ca.nlpsol("mpc", "ipopt", self.nlp, opts)
        self.F = F
        inf = float("inf")
        self.lbx = [-inf] * (4 * horizon) + [-1.0] * horizon
        self.ubx = [inf] * (4 * horizon) + [1.0] * horizon
        self.tol = tol

    def solve(self, x0: np.ndarray, u_guess: np.ndarray) -> dict:
        xs, x = [], x0
        for t in range(self.horizon):  # initial states: the rollout of the first guess
            x = np.asarray(self.F(x, u_guess[t])).ravel()
            xs.append(x)
        w0 = np.concatenate([np.stack(xs, 1).ravel(order="F"), u_guess.ravel()])
        t0, c0 = time.perf_counter(), time.process_time()
        sol = self.solver(x0=w0, p=x0, lbx=self.lbx, ubx=self.ubx, lbg=0, ubg=0)
        wall, cpu = time.perf_counter() - t0, time.process_time() - c0
        st = self.solver.stats()
        u = np.asarray(sol["x"]).ravel()[4 * self.horizon :]
        return {
            "u": u,
            "wall": wall,
            "cpu": cpu,
            "iterations": int(st["iter_count"]),
            "success": bool(st["success"]),
            "status": st["return_status"],
        }


def make_mpc(substeps: int = SUBSTEPS, **kw):
    import envs
    from diffmpc import MPC

    def model(x, u):
        return envs.cartpole_dynamics(x, u, substeps=substeps)

    return MPC(model, envs.cartpole_cost, H, -1.0, 1.0, **kw)


def example_problems(seed: int, steps: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """Replay examples/mpc_cartpole.py's episode; return (x0, first guess) per step."""
    import gymnasium as gym

    import envs
    from diffmpc.sampling import shift_plan

    env = gym.make(envs.CARTPOLE_ID)
    sampler = make_mpc(n_samples=200, seed=seed)
    solver = make_mpc(sampler=None, tol=TOL, max_iter=25)
    obs, _ = env.reset(seed=seed)
    plan, out = None, []
    for _ in range(steps):
        x = torch.as_tensor(obs, dtype=torch.float64).unsqueeze(0)
        lo, hi = sampler.bounds(x)
        warm = None if plan is None else shift_plan(plan)
        with torch.no_grad():
            guess, _ = sampler._sample(x, warm, lo, hi)
            u, _ = solver(x, guess)
        out.append((obs.astype(np.float64).copy(), guess[0].numpy().copy()))
        plan = u.detach()
        obs, _, term, trunc, _ = env.step(u[0, 0].numpy())
        if term or trunc:
            break
    env.close()
    return out


def batch_problems(seed: int, batch: int) -> tuple[np.ndarray, np.ndarray]:
    from agents.dataset import load_dataset

    data = load_dataset(ROOT / "data" / "expert_cartpole_rs.npz")
    states = np.asarray(data.states if hasattr(data, "states") else data["states"]).reshape(-1, 4)
    rng = np.random.default_rng(seed)
    x0 = states[rng.choice(len(states), batch, replace=False)]
    sampler = make_mpc(n_samples=200, seed=seed)
    x = torch.as_tensor(x0, dtype=torch.float64)
    lo, hi = sampler.bounds(x)
    with torch.no_grad():
        guess, _ = sampler._sample(x, None, lo, hi)
    return x0, guess.numpy()


def score(mpc, x0: np.ndarray, u: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Single-shooting objective J(u) and KKT residual ‖u − P(u − ∇J)‖∞ (torch, float64), per problem."""
    from diffmpc._box_newton import kkt_residual

    x = torch.as_tensor(np.atleast_2d(x0), dtype=torch.float64)
    ut = torch.as_tensor(u, dtype=torch.float64).reshape(x.shape[0], H, 1).clamp(-1, 1)
    J = mpc.horizon_cost(x, ut)
    g, _ = mpc.derivatives(x, ut)
    kkt = kkt_residual(
        ut.reshape(x.shape[0], -1), g, -torch.ones(1, dtype=x.dtype), torch.ones(1, dtype=x.dtype)
    )
    return J.numpy(), kkt.numpy()


def _ours_solve(mpc, x0: np.ndarray, guess: np.ndarray) -> dict:
    x = torch.as_tensor(np.atleast_2d(x0), dtype=torch.float64)
    g = torch.as_tensor(guess, dtype=torch.float64).reshape(x.shape[0], H, 1)
    t0, c0 = time.perf_counter(), time.process_time()
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # counted below through info.converged
        u, info = mpc(x, g)
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    return {
        "u": u.reshape(x.shape[0], -1).numpy(),
        "wall": wall,
        "cpu": cpu,
        "iterations": info.forward_iterations.numpy(),
        "converged": info.converged.numpy(),
    }


def profile_batch(args: argparse.Namespace) -> int:
    """``--profile``: where the time of one batched call on the 64 expert states goes (printed only): its CPU
    seconds and iterations, the samples still iterating per iteration, the cProfile share of the exact
    derivatives, the step-length rollouts and the box QP, and those pieces' cost per Newton iteration at 1
    and 64 remaining samples. With ``--compile``: the compiled layer (compiles first)."""
    import cProfile
    import pstats

    torch.set_num_threads(1)
    warnings.simplefilter("ignore")
    kw = {"compile_derivatives": True, "compile_rollout": True} if args.compile else {}
    mpc = make_mpc(sampler=None, tol=TOL, max_iter=100, **kw)
    xb, gb = batch_problems(args.seed, args.batch)
    x, g = torch.as_tensor(xb), torch.as_tensor(gb).reshape(64, H, 1)
    with torch.no_grad():
        c0 = time.process_time()
        mpc(x, g)  # warm-up (compilation with --compile)
        print(f"warm-up call: {time.process_time() - c0:.2f} CPU s")
        c0 = time.process_time()
        _, info = mpc(x, g)
        cpu = time.process_time() - c0
        prof = cProfile.Profile()
        prof.enable()
        mpc(x, g)
        prof.disable()
    it = info.forward_iterations.numpy()
    print(f"one batched call: {cpu:.3f} CPU s; iterations mean {it.mean():.2f}, max {it.max()}, "
          f"{int(info.converged.sum())}/64 converged")
    print("samples iterating per Newton iteration:", [int((it >= k).sum()) for k in range(it.max() + 1)])
    stats = pstats.Stats(prof).stats
    total = max(v[3] for v in stats.values())

    def share(name: str, file_part: str) -> float:
        return sum(v[3] for (f, _, fn), v in stats.items() if fn == name and file_part in f) / total

    derivs = share("structured_derivatives", "_mpc_derivatives")
    rollouts, qp = share("_rollout", "mpc.py"), share("box_qp", "_box_newton")
    print(f"cProfile shares of the call: derivatives {derivs:.0%}, rollouts {rollouts:.0%}, box QP {qp:.0%}")
    from diffmpc._mpc_derivatives import structured_derivatives

    compiled = mpc._compiled_point_derivatives(4) if args.compile else None
    for b in (1, 64):
        u = g[:b].reshape(b, H, 1)
        with torch.no_grad():
            xs, _ = mpc._rollout(x[:b], u)
            cand = u.repeat_interleave(10, 0)  # ten step lengths per sample, as the solve tries them
            reps = 10
            c0 = time.process_time()
            for _ in range(reps):
                structured_derivatives(mpc.step, None, xs, u, compiled=compiled)
            t_d = (time.process_time() - c0) / reps
            c0 = time.process_time()
            for _ in range(reps):
                mpc._rollout(x[:b].repeat_interleave(10, 0), cand)
            t_r = (time.process_time() - c0) / reps
        print(f"b = {b:2d} samples: derivatives {1e3 * t_d:.1f} ms, ten-step-length rollout "
              f"{1e3 * t_r:.1f} ms per Newton iteration")
    return 0



def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--rounds", type=int, default=3, help="alternating timing rounds (medians)")
    ap.add_argument("--quick", action="store_true", help="10 example problems, 16 batch problems, 1 round")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--compile", action="store_true",
                    help="also time the batch with compiled derivatives + rollouts (minutes of compilation)")
    ap.add_argument("--profile", action="store_true",
                    help="only print where one batched call's time goes (eager, or compiled with --compile)")
    args = ap.parse_args(argv)
    if args.profile:
        return profile_batch(args)
    try:
        import casadi  # noqa: F401
    except ImportError:
        print("CasADi is missing: pip install '.[casadi]'", file=sys.stderr)
        return 1
    torch.set_num_threads(1)
    steps, batch, rounds = (10, 16, 1) if args.quick else (40, args.batch, args.rounds)
    load_before = os.getloadavg()
    from benchmarks.common import Run

    run = Run.start("benchmarks.mpc_casadi", argv)
    ipopt = IpoptMPC()
    ours = make_mpc(sampler=None, tol=TOL, max_iter=25)
    scorer = make_mpc(sampler=None)

    # ---- the example's problems, one at a time, alternating ours / IPOPT
    probs = example_problems(args.seed, steps)
    res_o = [[] for _ in probs]
    res_i = [[] for _ in probs]
    _ours_solve(ours, *probs[0])  # warm-up
    ipopt.solve(*probs[0])
    for _ in range(rounds):
        for k, (x0, guess) in enumerate(probs):
            res_o[k].append(_ours_solve(ours, x0, guess))
            res_i[k].append(ipopt.solve(x0, guess))
    med = statistics.median
    rows_p = []
    for k, (x0, _) in enumerate(probs):
        J_o, kkt_o = score(scorer, x0, res_o[k][0]["u"])
        J_i, kkt_i = score(scorer, x0, res_i[k][0]["u"][None])
        rows_p.append(
            {
                "problem": k,
                "ours_cpu_ms": 1e3 * med(r["cpu"] for r in res_o[k]),
                "ours_wall_ms": 1e3 * med(r["wall"] for r in res_o[k]),
                "ipopt_cpu_ms": 1e3 * med(r["cpu"] for r in res_i[k]),
                "ipopt_wall_ms": 1e3 * med(r["wall"] for r in res_i[k]),
                "ours_iterations": int(res_o[k][0]["iterations"][0]),
                "ipopt_iterations": res_i[k][0]["iterations"],
                "ours_J": float(J_o[0]),
                "ipopt_J": float(J_i[0]),
                "ours_kkt": float(kkt_o[0]),
                "ipopt_kkt": float(kkt_i[0]),
                "ours_converged": bool(res_o[k][0]["converged"][0]),
                "ipopt_success": res_i[k][0]["success"],
            }
        )

    def summary(side: str) -> dict:
        pre = "ours" if side == "ours" else "ipopt"
        conv = [r["ours_converged"] if side == "ours" else r["ipopt_kkt"] <= TOL for r in rows_p]
        return {
            "solver": "diffmpc.MPC (projected Newton, single shooting)"
            if side == "ours"
            else "CasADi 3 + IPOPT (multiple shooting, exact Hessian)",
            "problems": len(rows_p),
            "median_cpu_ms": med(r[f"{pre}_cpu_ms"] for r in rows_p),
            "median_wall_ms": med(r[f"{pre}_wall_ms"] for r in rows_p),
            "mean_iterations": float(np.mean([r[f"{pre}_iterations"] for r in rows_p])),
            "max_iterations": int(max(r[f"{pre}_iterations"] for r in rows_p)),
            "sum_J": float(sum(r[f"{pre}_J"] for r in rows_p)),
            "kkt<=1e-6": f"{sum(r[f'{pre}_kkt'] <= TOL for r in rows_p)}/{len(rows_p)}",
            "converged (own test)": f"{sum(conv if side == 'ours' else [r['ipopt_success'] for r in rows_p])}"
            f"/{len(rows_p)}",
            "max_kkt": float(max(r[f"{pre}_kkt"] for r in rows_p)),
        }

    rows = [summary("ours"), summary("ipopt")]
    rows[0]["cpu_ratio_vs_ipopt"] = rows[0]["median_cpu_ms"] / rows[1]["median_cpu_ms"]
    rows[1]["cpu_ratio_vs_ipopt"] = 1.0
    better = sum(r["ours_J"] < r["ipopt_J"] - 1e-9 for r in rows_p)
    worse = sum(r["ours_J"] > r["ipopt_J"] + 1e-9 for r in rows_p)

    # ---- the IfO-like batch: one batched diffmpc call vs sequential IPOPT solves, alternating
    xb, gb = batch_problems(args.seed, batch)
    ours_b = make_mpc(sampler=None, tol=TOL, max_iter=100)
    b_o, b_i, b_c = [], [], []
    if args.compile:
        ours_c = make_mpc(sampler=None, tol=TOL, max_iter=100, compile_derivatives=True, compile_rollout=True)
        warm_c = _ours_solve(ours_c, xb, gb)  # compiles every graph this batch needs
    for _ in range(rounds):
        b_o.append(_ours_solve(ours_b, xb, gb))
        if args.compile:
            b_c.append(_ours_solve(ours_c, xb, gb))
        t0, c0 = time.perf_counter(), time.process_time()
        sols = [ipopt.solve(xb[i], gb[i]) for i in range(batch)]
        b_i.append({"wall": time.perf_counter() - t0, "cpu": time.process_time() - c0, "sols": sols})
    J_o, kkt_o = score(scorer, xb, b_o[0]["u"])
    J_i, kkt_i = score(scorer, xb, np.stack([s["u"] for s in b_i[0]["sols"]]))
    dJ = J_o - J_i  # per problem, same first guess: who ends at the lower objective (|ΔJ| > 1e-9)
    batch_better, batch_worse = int((dJ < -1e-9).sum()), int((dJ > 1e-9).sum())
    batch_max_worse = float(dJ.max())
    batch_rows = [
        {
            "solver": f"diffmpc.MPC, {batch} problems in one batched call",
            "cpu_s": med(r["cpu"] for r in b_o),
            "wall_s": med(r["wall"] for r in b_o),
            "mean_iterations": float(b_o[0]["iterations"].mean()),
            "max_iterations": int(b_o[0]["iterations"].max()),
            "sum_J": float(J_o.sum()),
            "kkt<=1e-6": f"{int((kkt_o <= TOL).sum())}/{batch}",
            "converged (own test)": f"{int(b_o[0]['converged'].sum())}/{batch}",
        },
        {
            "solver": f"IPOPT, {batch} sequential solves",
            "cpu_s": med(r["cpu"] for r in b_i),
            "wall_s": med(r["wall"] for r in b_i),
            "mean_iterations": float(np.mean([s["iterations"] for s in b_i[0]["sols"]])),
            "max_iterations": int(max(s["iterations"] for s in b_i[0]["sols"])),
            "sum_J": float(J_i.sum()),
            "kkt<=1e-6": f"{int((kkt_i <= TOL).sum())}/{batch}",
            "converged (own test)": f"{sum(s['success'] for s in b_i[0]['sols'])}/{batch}",
        },
    ]
    if args.compile:
        J_c, kkt_c = score(scorer, xb, b_c[0]["u"])
        cpu_c = med(r["cpu"] for r in b_c)
        batch_rows.insert(1, {
            "solver": f"diffmpc.MPC compiled (derivatives + rollouts), {batch} problems in one call",
            "cpu_s": cpu_c,
            "wall_s": med(r["wall"] for r in b_c),
            "compile_cpu_s": warm_c["cpu"] - cpu_c,
            "compile_wall_s": warm_c["wall"] - med(r["wall"] for r in b_c),
            "mean_iterations": float(b_c[0]["iterations"].mean()),
            "max_iterations": int(b_c[0]["iterations"].max()),
            "sum_J": float(J_c.sum()),
            "kkt<=1e-6": f"{int((kkt_c <= TOL).sum())}/{batch}",
            "converged (own test)": f"{int(b_c[0]['converged'].sum())}/{batch}",
            "max_abs_du_vs_eager": float(np.abs(b_c[0]["u"] - b_o[0]["u"]).max()),
        })
    for r in batch_rows:
        r.setdefault("compile_cpu_s", 0.0)
        r.setdefault("compile_wall_s", 0.0)
        r["cpu_ratio_vs_ipopt"] = r["cpu_s"] / batch_rows[-1]["cpu_s"]

    from benchmarks.common import RESULTS, git_state, write_table

    meta = {
        "command": "python -m benchmarks.mpc_casadi " + " ".join(argv if argv is not None else sys.argv[1:]),
        "git_commit": git_state()["commit"],
        "threads": torch.get_num_threads(),
        "loadavg_before": load_before,
        "loadavg_after": os.getloadavg(),
        "seed": args.seed,
        "rounds": rounds,
        "horizon": H,
        "substeps": SUBSTEPS,
        "tol_kkt": TOL,
        "ipopt_tol": ipopt.tol,
        "ours_better_J": better,
        "ours_worse_J": worse,
        "batch": batch_rows,
        "batch_ours_better_J": batch_better,
        "batch_ours_worse_J": batch_worse,
        "batch_max_J_excess_vs_ipopt": batch_max_worse,
        "problems": rows_p,
    }
    cols = [
        "solver",
        "problems",
        "median_cpu_ms",
        "median_wall_ms",
        "cpu_ratio_vs_ipopt",
        "mean_iterations",
        "max_iterations",
        "sum_J",
        "kkt<=1e-6",
        "converged (own test)",
        "max_kkt",
    ]
    notes = (
        f"{len(rows_p)} problems of `examples/mpc_cartpole.py` (seed {args.seed}), same first guess; "
        f"objective: ours lower on {better}, IPOPT lower on {worse} (|ΔJ| > 1e-9). "
        f"Load average {load_before[0]:.1f} → {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores: CPU "
        "seconds are the comparable number; wall times are inflated by other jobs."
    )
    path = write_table(
        "mpc_casadi",
        rows,
        meta,
        cols,
        title="Cart-pole MPC (H = 10): diffmpc vs CasADi + IPOPT",
        notes=notes,
        run=run,
    )
    bcols = [
        "solver",
        "cpu_s",
        "wall_s",
        "cpu_ratio_vs_ipopt",
        "compile_cpu_s",
        "mean_iterations",
        "max_iterations",
        "sum_J",
        "kkt<=1e-6",
        "converged (own test)",
    ]
    lines = [
        "",
        f"### {batch} expert states (IfO batch, H = 10): one batched solve vs sequential IPOPT",
        "",
        f"Same first guess per problem; objective (eager plans): ours lower on {batch_better}, IPOPT lower "
        f"on {batch_worse} (|ΔJ| > 1e-9; largest excess of ours {max(batch_max_worse, 0.0):.2g}). "
        "compile_cpu_s: the compiled row's warm-up call minus its median timed call (inductor cache as "
        "found by the run).",
        "",
        "| " + " | ".join(bcols) + " |",
        "|" + "|".join("---" for _ in bcols) + "|",
    ]
    for r in batch_rows:
        lines.append(
            "| " + " | ".join(f"{r[c]:.3g}" if isinstance(r[c], float) else str(r[c]) for c in bcols) + " |"
        )
    with open(RESULTS / "mpc_casadi.md", "a") as fh:
        fh.write("\n".join(lines) + "\n")
    print(path.read_text())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
