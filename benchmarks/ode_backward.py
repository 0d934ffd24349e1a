"""Fig. 2 of the paper: forward / backward time of neural-ODE gradients, and backward time vs stiffness.

Panel (a): over ``--inits`` random initialisations of a NODE (MLP 2 → 30 → 30 → 2, tanh) on Van der Pol
windows (``--batch`` windows of ``--steps`` steps, Δt = 0.1), time the forward solve and the backward pass
of an MSE loss for

* DOPRI5 + adjoint (``torchdiffeq.odeint_adjoint``; the anchor),
* backward Euler + adjoint (ours: adjoint ODE by backward Euler),
* backward Euler + IFT naive (per-step Jacobian built and solved densely),
* backward Euler + IFT CG (the paper's method; the default fused backward of :func:`diffmpc.odeint`),
* the same IFT CG chained through per-step ``diffmpc.root`` layers (``step_layers``: the implementation
  before the fused backward, same gradient), IFT CG warm-started per step (``warm_start``), and backward
  Euler unrolled (for reference).

"Equal acceptance criteria": DOPRI5 uses ``rtol = atol = tol`` and every backward-Euler step is solved to
``‖F‖ ≤ tol`` with backward linear solves at relative tolerance ``tol`` (``--tol``, default 1e-5): the
fused IFT CG / GMRES stop at ``‖v − Jᵀw‖ ≤ tol·‖v‖``; the core's ``normal_cg`` (per-step layers, and the
backward-Euler adjoint) stops at ``tol/100`` on the normal equations and reports the same residual.

Panel (b): the vector field is Van der Pol itself with a learnable μ (stiffness grows with μ); backward time
of each method vs μ for the gradient w.r.t. μ and the initial states (median of 3; NaN where DOPRI5 needs
more than ``MAX_DOPRI_STEPS`` steps per output interval).

``python -m benchmarks.ode_backward [--quick] [--inits N] [--seed S]`` writes
``benchmarks/results/ode_backward.{json,md,png}``.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
import warnings

import torch
from torch import nn

from benchmarks.common import RESULTS, write_table
from diffmpc import ConvergenceWarning, odeint
from diffmpc.nn import ODEFunc
from experiments.ode_data import van_der_pol

METHODS = ("dopri5_adjoint", "beuler_adjoint", "beuler_ift_dense", "beuler_ift_cg", "beuler_ift_cg_layers",
           "beuler_ift_cg_warm", "beuler_unroll")
LABELS = {"dopri5_adjoint": "DOPRI5 adjoint (torchdiffeq)", "beuler_adjoint": "Bwd Euler adjoint",
          "beuler_ift_dense": "Bwd Euler IFT naive (dense)", "beuler_ift_cg": "Bwd Euler IFT CG",
          "beuler_ift_cg_layers": "Bwd Euler IFT CG (per-step root layers)",
          "beuler_ift_cg_warm": "Bwd Euler IFT CG (warm start)", "beuler_unroll": "Bwd Euler unrolled"}
# method -> (backward, extra options) for backward Euler
BE = {"beuler_adjoint": ("adjoint", {}), "beuler_ift_dense": ("dense", {}), "beuler_ift_cg": ("cg", {}),
      "beuler_ift_cg_layers": ("cg", {"step_layers": True}),
      "beuler_ift_cg_warm": ("cg", {"warm_start": True}), "beuler_unroll": ("unroll", {})}


class VdPField(nn.Module):
    """Van der Pol ``(x, v)' = (v, μ(1 − x²)v − x)`` with a learnable μ."""

    def __init__(self, mu: float):
        super().__init__()
        self.mu = nn.Parameter(torch.tensor(float(mu)))

    def forward(self, t, y):
        x, v = y[..., 0], y[..., 1]
        return torch.stack([v, self.mu * (1 - x**2) * v - x], dim=-1)


MAX_DOPRI_STEPS = 1000  # per output interval; beyond it DOPRI5 counts as failed (stiff μ)


def solve(method: str, func: nn.Module, y0, t, tol: float):
    if method == "dopri5_adjoint":
        return odeint(func, y0, t, method="dopri5", backward="adjoint", rtol=tol, atol=tol,
                      options={"max_num_steps": MAX_DOPRI_STEPS})
    backward, extra = BE[method]
    return odeint(func, y0, t, backward=backward, options={"tol": tol, "backward_tol": tol, **extra})


def time_once(method, func, y0, t, target, tol):
    func.zero_grad()
    y0 = y0.clone().requires_grad_()
    t0 = time.perf_counter()
    ys = solve(method, func, y0, t, tol)
    t1 = time.perf_counter()
    loss = (ys - target).pow(2).mean()
    loss.backward()
    t2 = time.perf_counter()
    return t1 - t0, t2 - t1


def _write(args, inits, mus, rows, times, stiff, t_start) -> None:
    """Write JSON + markdown + plot for what is measured so far (called after panel a and after every μ,
    so a run stopped during a slow, stiff μ keeps everything before it)."""
    done = mus[: len(stiff[METHODS[0]])]
    meta = {"inits": inits, "steps": args.steps, "batch": args.batch, "dt": 0.1, "tol": args.tol, "mus": done,
            "mus_requested": mus, "seed": args.seed, "dtype": "float32",
            "wall_seconds": time.perf_counter() - t_start, "times": times, "stiffness_bwd_s": stiff,
            "note": "absolute times depend on machine load; ratios are measured per initialisation in the "
                    "same loop iteration"}
    write_table("ode_backward", rows, meta,
                ["panel", "method", "mu", "fwd_median_ms", "bwd_median_ms", "dopri5_bwd_over_this_bwd",
                 "median_per_init_ratio", "n"],
                title="Fig. 2: neural-ODE forward/backward time (CPU, float32)",
                notes=f"{inits} NODE initialisations (2→30→30→2 tanh), {args.batch} VdP windows × "
                      f"{args.steps} steps of Δt=0.1, tol={args.tol:g}. Panel b: VdP field with learnable μ "
                      f"(measured: {done}).")
    _plot(times, stiff, done)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="20 initialisations, 3 stiffness values")
    ap.add_argument("--inits", type=int, default=None, help="NODE initialisations (paper: 100)")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--tol", type=float, default=1e-5)
    ap.add_argument("--mus", type=float, nargs="+", default=None)
    ap.add_argument("--seed", type=int, default=0)
    args, _ = ap.parse_known_args(sys.argv[1:] if argv is None else argv)
    inits = args.inits or (20 if args.quick else 100)
    mus = args.mus or ([1.0, 3.0, 10.0] if args.quick else [1.0, 3.0, 10.0, 30.0])
    torch.set_num_threads(1)
    warnings.simplefilter("ignore", ConvergenceWarning)  # timing only; convergence is checked in tests
    series = van_der_pol()
    x = torch.tensor(series.x, dtype=torch.float32)
    t = torch.arange(args.steps + 1, dtype=torch.float32) * 0.1
    gen = torch.Generator().manual_seed(args.seed)
    times = {m: {"fwd": [], "bwd": []} for m in METHODS}
    t_start = time.perf_counter()
    # warm-up (first autograd calls are slow)
    torch.manual_seed(args.seed)
    f0 = ODEFunc(2)
    for m in METHODS:
        time_once(m, f0, x[:2], t[:3], x[:2].expand(3, 2, 2), args.tol)
    for i in range(inits):
        torch.manual_seed(args.seed + i)
        func = ODEFunc(2)
        starts = torch.randint(0, len(x) - args.steps, (args.batch,), generator=gen)
        target = torch.stack([x[starts + k] for k in range(args.steps + 1)])
        for m in METHODS:
            fwd, bwd = time_once(m, func, target[0], t, target, args.tol)
            times[m]["fwd"].append(fwd)
            times[m]["bwd"].append(bwd)
        msg = ", ".join(f"{m} {times[m]['bwd'][-1] * 1e3:.0f} ms" for m in METHODS)
        print(f"init {i + 1}/{inits} backward: {msg}", flush=True)
    anchor = statistics.median(times["dopri5_adjoint"]["bwd"])
    rows = []
    for m in METHODS:
        fwd, bwd = statistics.median(times[m]["fwd"]), statistics.median(times[m]["bwd"])
        # per-initialisation ratio (same model, same data): robust to drifting CPU contention
        ratios = [a / b for a, b in zip(times["dopri5_adjoint"]["bwd"], times[m]["bwd"], strict=True)]
        rows.append({"panel": "a", "method": LABELS[m], "fwd_median_ms": fwd * 1e3,
                     "bwd_median_ms": bwd * 1e3,
                     "dopri5_bwd_over_this_bwd": anchor / bwd,
                     "median_per_init_ratio": statistics.median(ratios), "n": inits})
    stiff = {m: [] for m in METHODS}
    _write(args, inits, mus, rows, times, stiff, t_start)
    # panel (b): stiffness
    y0 = x[torch.randint(0, len(x), (args.batch,), generator=gen)]
    for mu in mus:
        field = VdPField(mu)
        with torch.no_grad():
            noise = 0.1 * torch.randn(len(t), *y0.shape, generator=gen)
            target = odeint(field, y0, t, solver="newton") + noise
        field.mu.data.mul_(1.1)
        for m in METHODS:
            try:
                reps = []
                for _ in range(3):
                    reps.append(time_once(m, field, y0, t, target, args.tol)[1])
                    if reps[-1] > 20:  # one slow repetition is enough of a measurement
                        break
                stiff[m].append(statistics.median(reps))
            except AssertionError:  # torchdiffeq: max_num_steps exceeded / underflow in dt
                stiff[m].append(float("nan"))
            rows.append({"panel": "b", "method": LABELS[m], "mu": mu, "bwd_median_ms": stiff[m][-1] * 1e3})
        print(f"mu={mu:g}: " + ", ".join(f"{m} {stiff[m][-1] * 1e3:.0f} ms" for m in METHODS), flush=True)
        _write(args, inits, mus, rows, times, stiff, t_start)
    for r in rows:
        if r["panel"] == "a":
            print(f"{r['method']:32s} fwd {r['fwd_median_ms']:8.1f} ms  bwd {r['bwd_median_ms']:8.1f} ms  "
                  f"DOPRI5-adj bwd / this = {r['dopri5_bwd_over_this_bwd']:.2f} "
                  f"(per-init median {r['median_per_init_ratio']:.2f})")
    return 0


def _plot(times, stiff, mus) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(16, 4.5))
    labels = [LABELS[m].replace(" (", "\n(") for m in METHODS]
    for ax, key, title in ((axes[0], "fwd", "forward"), (axes[1], "bwd", "backward")):
        ax.boxplot([[v * 1e3 for v in times[m][key]] for m in METHODS], showfliers=False)
        ax.set_xticks(range(1, len(METHODS) + 1), labels, rotation=35, ha="right", fontsize=7)
        ax.set_yscale("log")
        ax.set_ylabel("time [ms]")
        ax.set_title(f"{title} time over NODE initialisations")
    for m in METHODS:
        axes[2].plot(mus, [v * 1e3 for v in stiff[m]], marker="o", label=LABELS[m])
    if mus:  # panel b is written empty after panel a (no μ measured yet)
        axes[2].set_xscale("log")
        axes[2].set_yscale("log")
    axes[2].set_xlabel("Van der Pol μ (stiffness)")
    axes[2].set_ylabel("backward time [ms]")
    axes[2].legend(fontsize=7)
    axes[2].set_title("backward time vs stiffness")
    fig.tight_layout()
    RESULTS.mkdir(parents=True, exist_ok=True)
    fig.savefig(RESULTS / "ode_backward.png", dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    raise SystemExit(main())
