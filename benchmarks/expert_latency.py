"""Per-action latency of the cart-pole sampling expert (RS 1000 particles × H 10, RK4 × 4 substeps), one core.

Rows: our torch expert (eager, float64 and float32; ``torch.compile`` with ``--compile``), the warm-started
CEM expert, and the anchor — the same random-shooting planner hand-written in NumPy (same physics, RK4 with
4 substeps; its plan costs are checked against the torch planner's to 1e-9 relative before timing).
Target: ≤ 5 ms per action.

Run: ``.venv/bin/python -m benchmarks.expert_latency [--quick] [--compile] [--seed 0]``.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from envs import CART_MASS, COST_WIDTH, FORCE_SCALE, FRICTION, GRAVITY, POLE_LENGTH, POLE_MASS


def _np_deriv(s: np.ndarray, f: np.ndarray) -> np.ndarray:
    M, m, l, b, g = CART_MASS, POLE_MASS, POLE_LENGTH, FRICTION, GRAVITY
    xd, th, thd = s[1], s[2], s[3]
    sn, cs = np.sin(th), np.cos(th)
    fb = f - b * xd
    den = 4.0 * (M + m) - 3.0 * m * cs * cs
    w2s = thd * thd * sn
    xdd = (2.0 * m * l * w2s + 3.0 * m * g * sn * cs + 4.0 * fb) / den
    thdd = -(3.0 * m * l * w2s * cs + 6.0 * (M + m) * g * sn + 6.0 * fb * cs) / (l * den)
    return np.stack([xd, xdd, thd, thdd])


def numpy_rs_costs(x0: np.ndarray, u: np.ndarray, dt: float = 0.1, substeps: int = 4) -> np.ndarray:
    """Horizon costs of plans ``u (N, H)`` from ``x0 (4,)``; state kept as ``(4, N)`` for contiguous rows."""
    n = u.shape[0]
    s = np.repeat(x0[:, None], n, axis=1)
    h = dt / substeps
    total = np.zeros(n)
    for t in range(u.shape[1]):
        f = FORCE_SCALE * u[:, t]
        for _ in range(substeps):
            k1 = _np_deriv(s, f)
            k2 = _np_deriv(s + h / 2 * k1, f)
            k3 = _np_deriv(s + h / 2 * k2, f)
            k4 = _np_deriv(s + h * k3, f)
            s = s + h / 6 * (k1 + 2 * (k2 + k3) + k4)
        dx = s[0] + POLE_LENGTH * np.sin(s[2])
        dy = POLE_LENGTH * (1 + np.cos(s[2]))
        total += 1 - np.exp(-(dx * dx + dy * dy) / (2 * COST_WIDTH**2))
    return total


def numpy_rs_act(x0: np.ndarray, rng: np.random.Generator, n: int = 1000, horizon: int = 10) -> np.ndarray:
    u = rng.uniform(-1, 1, size=(n, horizon))
    return u[np.argmin(numpy_rs_costs(x0, u))][:1]


def _latency(act, states, repeat: int) -> dict:
    times = []
    for _ in range(repeat):
        for x in states:
            t0 = time.perf_counter()
            act(x)
            times.append(time.perf_counter() - t0)
    return {"median_ms": float(np.median(times) * 1e3), "mean_ms": float(np.mean(times) * 1e3)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--quick", action="store_true", help="2 repeats instead of 6")
    ap.add_argument("--compile", action="store_true", help="also time torch.compile (minutes to compile)")
    from benchmarks.common import ConvergenceCounter, Run

    run = Run.start("benchmarks.expert_latency", argv)
    args = ap.parse_args(run.argv)
    counter = ConvergenceCounter()
    torch.set_num_threads(1)
    from agents.expert import ExpertConfig, SamplingExpert, cartpole_plan_cost
    from benchmarks.common import write_table

    rng = np.random.default_rng(args.seed)
    states = [rng.normal(0, 0.2, 4) for _ in range(5)]
    repeat = 2 if args.quick else 6
    # the anchor computes the same costs as the torch planner
    u = rng.uniform(-1, 1, size=(50, 10))
    ref = cartpole_plan_cost(torch.as_tensor(states[0]).expand(50, 4), torch.as_tensor(u).unsqueeze(-1))
    assert np.allclose(numpy_rs_costs(states[0], u), ref.numpy(), rtol=1e-9), "numpy anchor disagrees"

    rows = []
    anchor = _latency(lambda x: numpy_rs_act(x, rng), states, repeat)
    configs = [("torch eager float64 (default)", ExpertConfig()),
               ("torch eager float32", ExpertConfig(dtype="float32"))]
    if args.compile:
        configs += [("torch.compile float32", ExpertConfig(dtype="float32", backend="compile")),
                    ("torch.compile float64", ExpertConfig(backend="compile"))]
    configs.append(("CEM 500 x 5 iters, warm start, eager float64",
                    ExpertConfig(planner="cem", n_samples=500)))
    for name, cfg in configs:
        expert = SamplingExpert(cfg, seed=args.seed)
        t0 = time.perf_counter()
        expert.act(states[0])  # warm-up (compiles for backend="compile")
        warm = time.perf_counter() - t0
        with counter.count(name):
            lat = _latency(expert.act, states, repeat)
        rows.append({"planner": name, "ms_per_action": lat["median_ms"], "mean_ms": lat["mean_ms"],
                     "vs_numpy_anchor": anchor["median_ms"] / lat["median_ms"], "first_call_s": warm,
                     "meets_5ms": lat["median_ms"] <= 5.0, "warnings": counter.total(name)})
    rows.append({"planner": "anchor: NumPy RS float64", "ms_per_action": anchor["median_ms"],
                 "mean_ms": anchor["mean_ms"], "vs_numpy_anchor": 1.0,
                 "meets_5ms": anchor["median_ms"] <= 5.0})
    meta = {"particles": 1000, "horizon": 10, "rk4_substeps": 4, "threads": 1, "seed": args.seed,
            "repeat": repeat, "convergence_warnings": counter.totals}
    path = write_table("expert_latency", rows, meta,
                       ["planner", "ms_per_action", "mean_ms", "vs_numpy_anchor", "first_call_s",
                        "meets_5ms", "warnings"], run=run,
                       title="Cart-pole expert: latency per action (RS 1000 × H 10, RK4 × 4), 1 thread")
    print(path.read_text())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
