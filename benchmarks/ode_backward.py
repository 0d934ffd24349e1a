"""Fig. 2 of the paper: forward, backward and total time, memory and convergence of neural-ODE gradients.

Panel (a): over ``--inits`` random initialisations of a NODE (MLP 2 → 30 → 30 → 2, tanh) on Van der Pol
windows (``--batch`` windows of ``--steps`` steps, Δt = 0.1), time the forward solve and the backward pass
of an MSE loss for

* DOPRI5 + adjoint (``torchdiffeq.odeint_adjoint``; the anchor),
* backward Euler + adjoint (ours: adjoint ODE by backward Euler),
* backward Euler + IFT naive (per-step Jacobian built and solved densely),
* backward Euler + IFT CG (the paper's method; the default fused backward of :func:`diffmpc.odeint`),
* the same IFT CG chained through per-step ``diffmpc.root`` layers (``step_layers``), IFT CG warm-started
  per step (``warm_start``), and backward Euler unrolled (autograd through the forward solver's iterations).

Within one initialisation every method runs once, in an order rotated per initialisation (alternating
rounds), so the per-initialisation ratios compare methods under the same machine load. Reported per method:
forward, backward and total (forward + backward) medians, the DOPRI5 adjoint's total / this total and
backward / this backward (medians of the per-initialisation ratios), and

* **convergence**: every backward-Euler step is checked against the documented test ``‖F‖ ≤ tol`` *by this
  script* from the returned states (``F = x_{n+1} − x_n − Δt h(x_{n+1})`` per trajectory), and every
  ``ConvergenceWarning`` of the forward and of the backward is counted (:class:`ConvergenceCounter`);
  DOPRI5 counts as failed when it needs more than ``MAX_DOPRI_STEPS`` steps per output interval;
* **memory**: bytes of the tensors autograd keeps from the forward for the backward (counted with
  ``torch.autograd.graph.saved_tensors_hooks``, each storage once, parameters and inputs excluded) — the
  memory a method holds between forward and backward — and the peak resident-memory increase of one
  forward + backward (``common.peak_memory``; page-granular, so only differences of ~100 kB mean anything).

"Equal acceptance criteria": DOPRI5 uses ``rtol = atol = tol`` and every backward-Euler step is solved to
``‖F‖ ≤ tol`` with backward linear solves at relative tolerance ``tol`` (``--tol``, default 1e-5).

Panel (c): memory only — what each method stores for its backward when 20, 80 or 320 steps
(``step_size`` 0.01) lie between two outputs.

Panel (b): the vector field is Van der Pol itself with a learnable μ (stiffness grows with μ). The target
data are the *true* Van der Pol trajectories (``scipy.integrate.solve_ivp``, Radau, rtol 1e-10) plus noise
— not a backward-Euler solve, which need not converge at large μ. The model starts at 1.1 μ; per method:
forward / backward / total time (median of up to 3 repetitions), non-converged backward-Euler steps and the
worst ‖F‖, backward warnings. An IFT gradient is only valid where every forward step converged (the IFT
holds at a root), so rows with non-converged steps are marked ``gradient_valid = False``.

``python -m benchmarks.ode_backward [--quick] [--inits N] [--mus ...] [--seed S]`` writes
``benchmarks/results/ode_backward.{json,md,png}`` (after panel a and after every μ, so a stopped run keeps
what it measured).
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from torch import nn

from benchmarks.common import RESULTS, ConvergenceCounter, Run, peak_memory, write_table
from diffmpc import odeint
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
MAX_DOPRI_STEPS = 1000  # per output interval; beyond it DOPRI5 counts as failed (stiff μ)
SLOW_S = 5.0  # panel b: one repetition slower than this is measurement enough


class VdPField(nn.Module):
    """Van der Pol ``(x, v)' = (v, μ(1 − x²)v − x)`` with a learnable μ."""

    def __init__(self, mu: float):
        super().__init__()
        self.mu = nn.Parameter(torch.tensor(float(mu)))

    def forward(self, t, y):
        x, v = y[..., 0], y[..., 1]
        return torch.stack([v, self.mu * (1 - x**2) * v - x], dim=-1)


def solve(method: str, func: nn.Module, y0, t, tol: float):
    if method == "dopri5_adjoint":
        return odeint(func, y0, t, method="dopri5", backward="adjoint", rtol=tol, atol=tol,
                      options={"max_num_steps": MAX_DOPRI_STEPS})
    backward, extra = BE[method]
    return odeint(func, y0, t, backward=backward, options={"tol": tol, "backward_tol": tol, **extra})


def step_residuals(func: Callable, ys: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """``‖x_{n+1} − x_n − Δt h(t_{n+1}, x_{n+1})‖`` per step and trajectory, ``(steps, B)`` (Eq. 4)."""
    with torch.no_grad():
        ys = ys.detach()
        dt = (t[1:] - t[:-1]).view(-1, *([1] * (ys.ndim - 1)))
        h = torch.stack([func(t[n + 1], ys[n + 1]) for n in range(len(t) - 1)])
        return (ys[1:] - ys[:-1] - dt * h).flatten(2).norm(dim=-1)


class SavedBytes:
    """Bytes autograd saves for the backward while active (each storage once, ``exclude`` storages not)."""

    def __init__(self, exclude: list[torch.Tensor]):
        self.skip = {x.untyped_storage().data_ptr() for x in exclude}
        self.seen: set[int] = set()
        self.bytes = 0

    def pack(self, x: torch.Tensor) -> torch.Tensor:
        if isinstance(x, torch.Tensor):
            ptr = x.untyped_storage().data_ptr()
            if ptr not in self.skip and ptr not in self.seen:
                self.seen.add(ptr)
                self.bytes += x.untyped_storage().nbytes()
        return x

    def hooks(self):
        return torch.autograd.graph.saved_tensors_hooks(self.pack, lambda x: x)


def measure(method: str, func: nn.Module, y0, t, target, tol: float, counter: ConvergenceCounter,
            memory: bool = False) -> dict[str, Any]:
    """One forward + backward of ``method``: times, convergence counts and (optionally) memory."""
    func.zero_grad()
    y0 = y0.clone().requires_grad_()
    out: dict[str, Any] = {"failed": None}
    saved = SavedBytes([y0, target, t, *func.parameters()])
    try:
        with counter.count(f"{method}/forward"), saved.hooks() if memory else _null():
            t0 = time.perf_counter()
            ys = solve(method, func, y0, t, tol)
            t1 = time.perf_counter()
    except AssertionError as err:  # torchdiffeq: max_num_steps exceeded / underflow in dt
        nan = float("nan")
        return {"failed": str(err)[:200], "fwd_s": nan, "bwd_s": nan, "total_s": nan}
    loss = (ys - target).pow(2).mean()
    with counter.count(f"{method}/backward"):
        t2 = time.perf_counter()
        loss.backward()
        t3 = time.perf_counter()
    out.update(fwd_s=t1 - t0, bwd_s=t3 - t2, total_s=(t1 - t0) + (t3 - t2))
    if method != "dopri5_adjoint":
        res = step_residuals(func, ys, t)
        out.update(steps_checked=res.numel(), steps_not_converged=int((res > tol).sum()),
                   max_step_residual=float(res.max()))
    if memory:
        out["saved_for_backward_kB"] = saved.bytes / 1024

        def fwd_bwd():
            func.zero_grad()
            ((solve(method, func, y0, t, tol) - target).pow(2).mean()).backward()

        with counter.count(f"{method}/memory_run"):
            out["peak_rss_kB"] = peak_memory(fwd_bwd) / 1024
    return out


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def _median(xs: list[float]) -> float:
    xs = [x for x in xs if x == x]
    return statistics.median(xs) if xs else float("nan")


def panel_a(args, x: torch.Tensor, t: torch.Tensor, gen: torch.Generator, counter: ConvergenceCounter):
    rec = {m: {"fwd": [], "bwd": [], "total": [], "not_converged": 0, "checked": 0, "max_res": 0.0,
               "failed": 0} for m in METHODS}
    memory: dict[str, dict[str, float]] = {}
    # warm-up (first autograd calls are slow); its warnings are counted under warmup/*
    torch.manual_seed(args.seed)
    f0 = ODEFunc(2)
    warm = ConvergenceCounter()
    for m in METHODS:
        measure(m, f0, x[:2], t[:3], x[:2].expand(3, 2, 2), args.tol, warm)
    for i in range(args.inits):
        torch.manual_seed(args.seed + i)
        func = ODEFunc(2)
        starts = torch.randint(0, len(x) - args.steps, (args.batch,), generator=gen)
        target = torch.stack([x[starts + k] for k in range(args.steps + 1)])
        order = METHODS[i % len(METHODS):] + METHODS[: i % len(METHODS)]
        for m in order:
            r = measure(m, func, target[0], t, target, args.tol, counter, memory=(i == 0))
            if r["failed"]:
                rec[m]["failed"] += 1
            for k in ("fwd", "bwd", "total"):
                rec[m][k].append(r[f"{k}_s"])
            rec[m]["not_converged"] += r.get("steps_not_converged", 0)
            rec[m]["checked"] += r.get("steps_checked", 0)
            rec[m]["max_res"] = max(rec[m]["max_res"], r.get("max_step_residual", 0.0))
            if i == 0:
                memory[m] = {k: r[k] for k in ("saved_for_backward_kB", "peak_rss_kB") if k in r}
        msg = ", ".join(f"{m} {rec[m]['total'][-1] * 1e3:.0f}" for m in METHODS)
        print(f"init {i + 1}/{args.inits} total ms: {msg}", flush=True)
    rows = []
    ref = rec["dopri5_adjoint"]

    def ratio(m: str, key: str) -> float:
        return _median([a / b for a, b in zip(ref[key], rec[m][key], strict=True)])

    for m in METHODS:
        r = rec[m]
        row = {"panel": "a", "method": LABELS[m], "fwd_ms": _median(r["fwd"]) * 1e3,
               "bwd_ms": _median(r["bwd"]) * 1e3, "total_ms": _median(r["total"]) * 1e3,
               "dopri5_total_over_this": ratio(m, "total"), "dopri5_bwd_over_this": ratio(m, "bwd"),
               "n": args.inits, "fwd_warnings": counter.total(f"{m}/forward"),
               "bwd_warnings": counter.total(f"{m}/backward"),
               **memory.get(m, {})}
        if m == "dopri5_adjoint":
            row["dopri5_failed"] = r["failed"]
        else:
            row.update(steps_not_converged=f"{r['not_converged']}/{r['checked']}",
                       max_step_residual=r["max_res"])
        rows.append(row)
    return rows, {m: {k: rec[m][k] for k in ("fwd", "bwd", "total")} for m in METHODS}


def vdp_target(mu: float, y0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """True Van der Pol trajectories from every row of ``y0`` (Radau, rtol 1e-10) + ``noise``."""
    from scipy.integrate import solve_ivp

    ts = t.double().numpy()
    out = []
    for y in y0.double().numpy():
        sol = solve_ivp(lambda _, s: [s[1], mu * (1 - s[0] ** 2) * s[1] - s[0]], (ts[0], ts[-1]), y,
                        t_eval=ts, method="Radau", rtol=1e-10, atol=1e-10)
        if not sol.success:
            raise RuntimeError(f"reference solve failed at mu={mu}: {sol.message}")
        out.append(sol.y.T)
    return torch.tensor(np.stack(out, 1), dtype=y0.dtype) + noise


def panel_b_row(mu: float, m: str, field: VdPField, y0, t, target, tol: float,
                counter: ConvergenceCounter) -> dict[str, Any]:
    reps: list[dict[str, Any]] = []
    local = ConvergenceCounter()
    for _ in range(3):
        r = measure(m, field, y0, t, target, tol, local)
        reps.append(r)
        if r["failed"] or r["total_s"] > SLOW_S:
            break
    for k, v in local.totals.items():
        counter.totals[f"mu={mu:g}/{k}"] = v
        counter.messages[f"mu={mu:g}/{k}"] = local.messages.get(k, [])
    first = reps[0]
    row: dict[str, Any] = {"panel": "b", "method": LABELS[m], "mu": mu, "n": len(reps),
                           "fwd_ms": _median([r["fwd_s"] for r in reps]) * 1e3,
                           "bwd_ms": _median([r["bwd_s"] for r in reps]) * 1e3,
                           "total_ms": _median([r["total_s"] for r in reps]) * 1e3,
                           "fwd_warnings": local.total(f"{m}/forward"),
                           "bwd_warnings": local.total(f"{m}/backward")}
    if m == "dopri5_adjoint":
        row["dopri5_failed"] = bool(first["failed"])
        row["gradient_valid"] = not first["failed"]
    else:
        row.update(steps_not_converged=f"{first['steps_not_converged']}/{first['steps_checked']}",
                   max_step_residual=first["max_step_residual"],
                   gradient_valid=first["steps_not_converged"] == 0 and row["bwd_warnings"] == 0)
    return row


def panel_c(args, x: torch.Tensor, counter: ConvergenceCounter) -> list[dict[str, Any]]:
    """Memory vs number of steps between two outputs: ``t = (0, T)`` with ``options["step_size"]``.

    With every step an output (panels a, b) all methods must keep the outputs anyway; here only y(T) is
    returned, so what a method stores for its backward shows: the IFT keeps every state (O(steps)), the
    adjoints only the outputs (O(1) in the steps), unrolling every solver iterate."""
    torch.manual_seed(args.seed)
    func = ODEFunc(2)
    y0 = x[: args.batch]
    rows = []
    for k in (20, 80, 320):
        T = 0.1 * k / 10  # Δt = 0.01
        t = torch.tensor([0.0, T])
        target = torch.stack([y0, x[10 : 10 + args.batch]])
        for m in METHODS:
            y = y0.clone().requires_grad_()
            saved = SavedBytes([y, target, t, *func.parameters()])
            with counter.count(f"steps={k}/{m}"), saved.hooks():
                if m == "dopri5_adjoint":
                    ys = solve(m, func, y, t, args.tol)
                else:
                    backward, extra = BE[m]
                    opts = {"tol": args.tol, "backward_tol": args.tol, "step_size": 0.01, **extra}
                    ys = odeint(func, y, t, backward=backward, options=opts)
            with counter.count(f"steps={k}/{m}"):
                (ys - target).pow(2).mean().backward()
            steps = "adaptive" if m == "dopri5_adjoint" else k
            rows.append({"panel": "c", "method": LABELS[m], "steps": steps,
                         "saved_for_backward_kB": saved.bytes / 1024,
                         "warnings": counter.total(f"steps={k}/{m}")})
    return rows


COLUMNS = ["panel", "method", "mu", "steps", "fwd_ms", "bwd_ms", "total_ms", "dopri5_total_over_this",
           "dopri5_bwd_over_this", "steps_not_converged", "max_step_residual", "fwd_warnings", "bwd_warnings",
           "warnings", "dopri5_failed", "gradient_valid", "saved_for_backward_kB", "peak_rss_kB", "n",
           "skipped"]


def main(argv: list[str] | None = None) -> int:
    run = Run.start("benchmarks.ode_backward", argv)
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true",
                    help="10 initialisations (instead of 100); panel b skips a method at larger μ once one "
                         "measurement took > 10 s")
    ap.add_argument("--inits", type=int, default=None, help="NODE initialisations (paper: 100)")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--tol", type=float, default=1e-5)
    ap.add_argument("--mus", type=float, nargs="+", default=[1.0, 3.0, 10.0, 30.0])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--skip-after", type=float, default=None,
                    help="panel b: skip a method at larger μ once it took longer than this many seconds "
                         "(default: 10 with --quick, never otherwise)")
    args = ap.parse_args(run.argv)
    if args.skip_after is None:
        args.skip_after = 10.0 if args.quick else float("inf")
    args.inits = args.inits or (10 if args.quick else 100)
    torch.set_num_threads(1)
    counter = ConvergenceCounter()
    series = van_der_pol()
    x = torch.tensor(series.x, dtype=torch.float32)
    t = torch.arange(args.steps + 1, dtype=torch.float32) * 0.1
    gen = torch.Generator().manual_seed(args.seed)
    rows, times = panel_a(args, x, t, gen, counter)
    stiff: dict[str, list[float]] = {m: [] for m in METHODS}
    valid: dict[str, list[bool]] = {m: [] for m in METHODS}
    done: list[float] = []

    def write() -> None:
        meta = {"inits": args.inits, "steps": args.steps, "batch": args.batch, "dt": 0.1, "tol": args.tol,
                "mus": done, "mus_requested": args.mus, "seed": args.seed, "dtype": "float32",
                "max_dopri_steps": MAX_DOPRI_STEPS, "times_s": times, "stiffness_total_s": stiff,
                "convergence_warnings": counter.totals, "warning_examples": counter.messages,
                "memory_note": "saved_for_backward_kB: storages autograd keeps for the backward (params and "
                               "inputs excluded); peak_rss_kB: page-granular VmHWM increase of one fwd+bwd"}
        write_table("ode_backward", rows, meta, COLUMNS, run=run,
                    title="Fig. 2: neural-ODE forward / backward / total time, memory, convergence (CPU, "
                          "float32)",
                    notes=f"Panel a: {args.inits} NODE initialisations (2→30→30→2 tanh), {args.batch} VdP "
                          f"windows × {args.steps} steps of Δt=0.1, tol={args.tol:g}; ratios are medians of "
                          "per-initialisation ratios. Panel b: VdP field with learnable μ "
                          f"(measured: {done}), target = true VdP trajectories + noise; "
                          "steps_not_converged counts (step, trajectory) pairs with ‖F‖ > tol.")
        _plot(times, stiff, valid, done)

    rows += panel_c(args, x, counter)
    write()
    y0 = x[torch.randint(0, len(x), (args.batch,), generator=gen)]
    too_slow: dict[str, str] = {}
    for mu in args.mus:
        noise = 0.1 * torch.randn(len(t), *y0.shape, generator=gen)
        target = vdp_target(mu, y0, t, noise)
        for m in METHODS:
            if m in too_slow:  # stiffer μ only gets slower: not worth minutes of a shared machine
                rows.append({"panel": "b", "method": LABELS[m], "mu": mu, "skipped": too_slow[m]})
                stiff[m].append(float("nan"))
                valid[m].append(True)
                continue
            field = VdPField(1.1 * mu)
            row = panel_b_row(mu, m, field, y0, t, target, args.tol, counter)
            rows.append(row)
            stiff[m].append(row["total_ms"] / 1e3)
            valid[m].append(bool(row["gradient_valid"]))
            print(f"  mu={mu:g} {m}: total {row['total_ms']:.0f} ms, not converged "
                  f"{row.get('steps_not_converged', '-')}, valid {row['gradient_valid']}", flush=True)
            if row["total_ms"] / 1e3 > args.skip_after:
                too_slow[m] = f"skipped: {row['total_ms'] / 1e3:.0f} s > {args.skip_after:g} s at μ = {mu:g}"
        done.append(mu)
        print(f"mu={mu:g}: " + ", ".join(
            f"{m} {stiff[m][-1] * 1e3:.0f} ms{'' if valid[m][-1] else ' (INVALID)'}" for m in METHODS),
            flush=True)
        write()
    for r in rows:
        if r["panel"] == "a":
            print(f"{r['method']:40s} fwd {r['fwd_ms']:7.1f}  bwd {r['bwd_ms']:7.1f}  "
                  f"total {r['total_ms']:7.1f} ms  DOPRI5-adj total/this "
                  f"{r['dopri5_total_over_this']:.2f}, bwd/this {r['dopri5_bwd_over_this']:.2f}")
    return 0


def _plot(times, stiff, valid, mus) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 4, figsize=(21, 4.8))
    labels = [LABELS[m].replace(" (", "\n(") for m in METHODS]
    for ax, key in zip(axes[:3], ("fwd", "bwd", "total"), strict=True):
        ax.boxplot([[v * 1e3 for v in times[m][key] if v == v] for m in METHODS], showfliers=False)
        ax.set_xticks(range(1, len(METHODS) + 1), labels, rotation=35, ha="right", fontsize=7)
        ax.set_yscale("log")
        ax.set_ylabel("time [ms]")
        ax.set_title(f"{ {'fwd': 'forward', 'bwd': 'backward', 'total': 'forward + backward'}[key]} time")
    ax = axes[3]
    for m in METHODS:
        line, = ax.plot(mus, [v * 1e3 for v in stiff[m]], marker="o", label=LABELS[m])
        bad = [(mu, v * 1e3) for mu, v, ok in zip(mus, stiff[m], valid[m], strict=True) if not ok]
        if bad:
            ax.scatter(*zip(*bad, strict=True), s=120, facecolors="none", edgecolors="red", zorder=3)
    if mus:
        ax.set_xscale("log")
        ax.set_yscale("log")
    ax.set_xlabel("Van der Pol μ (stiffness)")
    ax.set_ylabel("forward + backward time [ms]")
    ax.legend(fontsize=7)
    ax.set_title("total time vs stiffness (red ring: gradient invalid)")
    fig.tight_layout()
    RESULTS.mkdir(parents=True, exist_ok=True)
    fig.savefig(RESULTS / "ode_backward.png", dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    raise SystemExit(main())
