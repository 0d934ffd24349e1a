"""The prepared GPU check (issue 19): CUDA tests + the batched paths timed on one device, in < ~8 minutes.

    python -m benchmarks.gpu_check --device cuda          # on a machine with a GPU (~5-8 min)
    python -m benchmarks.gpu_check --device cpu --quick   # smoke test of this script on a CPU (~1 min)

Sections (each stops early when ``--budget-s`` is spent, and says so in the output):

1. **CUDA tests**: ``pytest -m "" -k cuda tests/`` (every ``test_cuda_*`` / ``*_cuda_*`` test; they skip
   without a GPU) — pass/skip/fail counts.
2. **MPC layer** (:class:`diffmpc.MPC`): the ``benchmarks/mpc_layer.py`` problem (cart-pole-sized MLP
   dynamics, H = 10, boxed controls, CEM sampler + dense Newton, IFT-CG backward to the MLP parameters) at
   batch 64 / 512 / 4096: forward and backward time (timed separately), converged fraction, max KKT residual.
3. **Implicit backward** (:func:`diffmpc.argmin`, Newton forward, CG backward): the
   ``benchmarks/implicit_backward.py`` objective at D = 10⁴ / 10⁵ / 10⁶: forward and backward time, CG
   iterations, peak memory.
4. **One IfO iteration** (:class:`agents.ifo.IfOTrainer`, quick preset at full horizon): query + dynamics
   steps + one cost step through the MPC layer; time and converged fraction.

With ``--cpu-baseline`` (default when the device is CUDA) sections 2-4 also run on the CPU at the smaller
sizes, side by side (same problem, same seed, same tolerances), and the table gives the ratio. Results:
``benchmarks/results/gpu_check_<device>[_quick].json`` and ``.md`` (command, git commit, load, machine).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import torch

from benchmarks.common import git_state

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"


class Budget:
    """Wall-clock budget of the whole check: sections ask before each measurement."""

    def __init__(self, seconds: float) -> None:
        self.t0, self.seconds = time.perf_counter(), seconds

    def left(self) -> float:
        return self.seconds - (time.perf_counter() - self.t0)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _time(fn: Any, device: torch.device, repeat: int) -> tuple[float, Any]:
    """Median wall time of ``fn()`` over ``repeat`` runs after one warm-up run (synchronised)."""
    out = fn()
    times = []
    for _ in range(repeat):
        _sync(device)
        t0 = time.perf_counter()
        out = fn()
        _sync(device)
        times.append(time.perf_counter() - t0)
    times.sort()
    return times[len(times) // 2], out


def _time_fwd_bwd(forward: Any, backward: Any, device: torch.device, repeat: int) -> tuple[float, float, Any]:
    """Median forward and backward times (timed separately, synchronised) after one warm-up; last output."""
    backward(forward())
    t_f, t_b, out = [], [], None
    for _ in range(repeat):
        _sync(device)
        t0 = time.perf_counter()
        out = forward()
        _sync(device)
        t1 = time.perf_counter()
        backward(out)
        _sync(device)
        t_f.append(t1 - t0)
        t_b.append(time.perf_counter() - t1)
    return sorted(t_f)[len(t_f) // 2], sorted(t_b)[len(t_b) // 2], out


def _peak_reset(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def _peak_mb(device: torch.device) -> float | None:
    return torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None


# ---------------------------------------------------------------------------------------------- sections
def cuda_tests(budget: Budget) -> dict[str, Any]:
    cmd = [sys.executable, "-m", "pytest", "-q", "-m", "", "-k", "cuda", "-p", "no:cacheprovider", "tests/"]
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True,
                              timeout=max(30, budget.left() / 3))
    except subprocess.TimeoutExpired:
        return {"command": " ".join(cmd[2:]), "status": "timed out"}
    tail = proc.stdout.strip().splitlines()[-1] if proc.stdout.strip() else proc.stderr[-300:]
    counts = {k: int(n) for n, k in re.findall(r"(\d+) (passed|failed|skipped|deselected|error)", tail)}
    return {"command": "python -m pytest -q -m '' -k cuda tests/", "returncode": proc.returncode,
            "summary": tail, "wall_s": time.perf_counter() - t0, **counts,
            "failures": proc.stdout[-3000:] if proc.returncode not in (0, 5) else ""}


def mpc_layer(device: torch.device, batches: list[int], repeat: int, budget: Budget) -> list[dict[str, Any]]:
    from benchmarks.mpc_layer import Q_DIAG, R_DIAG, H, _mlp, make_problem
    from diffmpc import MPC

    rows = []
    problem = make_problem(0)
    mlp = _mlp(problem).to(device)
    q, r = Q_DIAG.to(device), R_DIAG.to(device)

    def cost(x, u):
        return 0.5 * (q * x * x).sum(-1) + 0.5 * (r * u * u).sum(-1)

    for B in batches:
        if budget.left() < 30:
            rows.append({"device": device.type, "batch": B, "note": "skipped: budget"})
            continue
        g = torch.Generator().manual_seed(B)
        x0 = (0.5 * torch.randn(B, 4, generator=g, dtype=torch.float64)).to(device)
        mpc = MPC(mlp, cost, H, -1.0, 1.0, sampler="cem", n_samples=64, seed=0, tol=1e-7, bound_reg=1e-6)

        def forward(mpc=mpc, x0=x0):
            return mpc(x0)

        def backward(out):
            torch.autograd.grad(out[0].sum(), list(mlp.parameters()))

        _peak_reset(device)
        t_f, t_b, (u, info) = _time_fwd_bwd(forward, backward, device, repeat)
        rows.append({"device": device.type, "batch": B, "forward_ms": 1e3 * t_f,
                     "fwd+bwd_ms": 1e3 * (t_f + t_b), "backward_ms": 1e3 * t_b,
                     "converged": float(info.converged.float().mean()),
                     "max_stationarity": float(info.stationarity_residual.max()),
                     "peak_MB": _peak_mb(device)})
        print("mpc", rows[-1], flush=True)
    return rows


def implicit_backward(device: torch.device, dims: list[int], repeat: int, budget: Budget) -> list[dict]:
    import diffmpc
    from benchmarks.implicit_backward import problem, score

    rows = []
    for D in dims:
        if budget.left() < 30:
            rows.append({"device": device.type, "D": D, "note": "skipped: budget"})
            continue
        theta, a = (t.detach().to(device).requires_grad_() for t in problem(D))
        holder: dict[str, Any] = {}

        def forward(D=D, theta=theta, a=a, holder=holder):
            y, info = diffmpc.argmin(score, torch.zeros(D, dtype=torch.float64, device=device), theta, a,
                                     solver="newton", backward="cg", return_info=True)
            holder["info"] = info
            return y

        def backward(y, theta=theta, a=a):
            torch.autograd.grad(y.sum(), (theta, a))

        _peak_reset(device)
        with diffmpc.record_backward() as records:
            t_f, t_b, _ = _time_fwd_bwd(forward, backward, device, repeat)
        info = holder["info"]
        row = {"device": device.type, "D": D, "forward_ms": 1e3 * t_f,
               "backward_ms": 1e3 * t_b, "peak_MB": _peak_mb(device),
               "forward_converged": bool(info.converged.all())}
        solves = [sol for r in records for sol in r.solves]
        if solves:
            row["cg_iters"] = max(int(sol.iterations.max()) for sol in solves)
            row["cg_residual"] = max(float(sol.residual.max()) for sol in solves)
            row["backward_converged"] = all(bool(sol.converged.all()) for sol in solves)
        rows.append(row)
        print("implicit", row, flush=True)
    return rows


def ifo_iteration(device: torch.device, preset: str, repeat: int, budget: Budget) -> dict[str, Any]:
    from dataclasses import replace

    from agents.ifo import IFO_PRESETS, IfOTrainer
    from envs import cartpole_dynamics

    if budget.left() < 30:
        return {"device": device.type, "preset": preset, "note": "skipped: budget"}
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2000, 4, generator=g, dtype=torch.float64) * torch.tensor([0.5, 0.5, 3.0, 1.0],
                                                                                dtype=torch.float64)
    u = 2 * torch.rand(2000, 1, generator=g, dtype=torch.float64) - 1
    xn = cartpole_dynamics(x, u)
    cfg = replace(IFO_PRESETS[preset], warmup_steps=20)
    trainer = IfOTrainer(x.numpy(), xn.numpy(), cfg, seed=0, device=device)
    trainer.warmup()
    trainer.iteration = cfg.curriculum_iters  # full horizon: the most expensive iteration

    def one_iteration():
        trainer.query(cfg.dyn_queries_per_iter)
        trainer.dynamics_steps(cfg.dyn_steps_per_iter)
        return trainer.cost_step()

    t, rec = _time(one_iteration, device, repeat)
    row = {"device": device.type, "preset": preset, "horizon": rec["horizon"], "cost_batch": cfg.cost_batch,
           "iteration_ms": 1e3 * t, "converged": rec["converged"], "loss": rec["loss"]}
    print("ifo", row, flush=True)
    return row


# ---------------------------------------------------------------------------------------------- report
def _table(rows: list[dict[str, Any]], columns: list[str]) -> list[str]:
    def fmt(v: Any) -> str:
        return f"{v:.3g}" if isinstance(v, float) else ("" if v is None else str(v))

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(fmt(r.get(c)) for c in columns) + " |" for r in rows]
    return lines


def _ratios(rows: list[dict[str, Any]], key: str, time_col: str) -> None:
    """Add ``cpu/device`` time ratios where both devices measured the same size."""
    cpu = {r[key]: r[time_col] for r in rows if r.get("device") == "cpu" and time_col in r}
    for r in rows:
        if r.get("device") != "cpu" and time_col in r and r[key] in cpu:
            r["cpu/device"] = cpu[r[key]] / r[time_col]


def markdown(res: dict[str, Any]) -> str:
    out = [f"### GPU check on {res['device_name']}", "",
           f"`{res['command']}` at commit {res['git_commit'][:10]}, {res['wall_s']:.0f} s, load before "
           f"{res['loadavg_before']}, torch {res['torch']} (CUDA {res['cuda_version']}).", ""]
    t = res["cuda_tests"]
    out += [f"**CUDA tests**: `{t.get('command')}` → {t.get('summary', t.get('status'))}", ""]
    out += ["**MPC layer** (H = 10, n = 4, m = 1, float64, CEM 64 + dense Newton, IFT-CG backward):", ""]
    out += _table(res["mpc_layer"], ["device", "batch", "forward_ms", "backward_ms", "fwd+bwd_ms",
                                     "cpu/device", "converged", "max_stationarity", "peak_MB", "note"]) + [""]
    out += ["**Implicit backward** (argmin, Newton forward, CG backward, float64):", ""]
    out += _table(res["implicit_backward"], ["device", "D", "forward_ms", "backward_ms", "cpu/device",
                                             "cg_iters", "cg_residual", "forward_converged",
                                             "backward_converged", "peak_MB", "note"]) + [""]
    out += ["**One IfO iteration** (query + dynamics steps + cost step through the MPC layer, full horizon):",
            ""]
    out += _table(res["ifo_iteration"], ["device", "preset", "horizon", "cost_batch", "iteration_ms",
                                         "cpu/device", "converged", "note"]) + [""]
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda", help="cuda (default), cuda:N or cpu")
    p.add_argument("--quick", action="store_true",
                   help="small sizes (MPC batch 8/32, D = 10^3/10^4, tiny IfO) and 1 repeat: a smoke test")
    p.add_argument("--budget-s", type=float, default=450.0, help="stop measuring after this many seconds")
    p.add_argument("--cpu-baseline", action=argparse.BooleanOptionalAction, default=None,
                   help="also run sections 2-4 on the CPU at the smaller sizes (default: on for CUDA)")
    p.add_argument("--skip-tests", action="store_true", help="skip the CUDA tests section")
    p.add_argument("--out", default=str(RESULTS), help="directory for gpu_check_*.json/.md")
    args = p.parse_args(argv)

    from diffmpc.device import resolve_device

    device = resolve_device(args.device)
    baseline = args.cpu_baseline if args.cpu_baseline is not None else device.type == "cuda"
    budget = Budget(args.budget_s)
    warnings.simplefilter("ignore")  # convergence is reported in the tables (converged, residuals)
    torch.set_num_threads(max(1, min(8, os.cpu_count() or 1)))
    if args.quick:
        batches, dims, preset, repeat = [8, 32], [1000, 10000], "tiny", 1
    else:
        batches, dims, preset, repeat = [64, 512, 4096], [10**4, 10**5, 10**6], "quick", 3
    load = [round(x, 2) for x in os.getloadavg()]
    t0 = time.perf_counter()
    res: dict[str, Any] = {
        "command": "python -m benchmarks.gpu_check " + " ".join(argv if argv is not None else sys.argv[1:]),
        "git_commit": git_state()["commit"], "loadavg_before": load, "torch": torch.__version__,
        "cuda_version": torch.version.cuda, "torch_threads": torch.get_num_threads(),
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU",
        "cpu_count": os.cpu_count(),
    }
    res["cuda_tests"] = {"status": "skipped (--skip-tests)"} if args.skip_tests else cuda_tests(budget)
    print("cuda tests:", res["cuda_tests"].get("summary", res["cuda_tests"].get("status")), flush=True)
    res["mpc_layer"] = mpc_layer(device, batches, repeat, budget)
    res["implicit_backward"] = implicit_backward(device, dims, repeat, budget)
    res["ifo_iteration"] = [ifo_iteration(device, preset, repeat, budget)]
    if baseline:
        cpu = torch.device("cpu")
        res["mpc_layer"] += mpc_layer(cpu, batches[:2], 1, budget)
        res["implicit_backward"] += implicit_backward(cpu, dims[:2], 1, budget)
        res["ifo_iteration"].append(ifo_iteration(cpu, preset, 1, budget))
        _ratios(res["mpc_layer"], "batch", "fwd+bwd_ms")
        _ratios(res["implicit_backward"], "D", "backward_ms")
        _ratios(res["ifo_iteration"], "preset", "iteration_ms")
    res["wall_s"] = time.perf_counter() - t0
    res["loadavg_after"] = [round(x, 2) for x in os.getloadavg()]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = f"gpu_check_{device.type}" + ("_quick" if args.quick else "")
    (out / f"{stem}.json").write_text(json.dumps(res, indent=2, default=str) + "\n")
    md = markdown(res)
    (out / f"{stem}.md").write_text(md + "\n")
    print(md)
    print(f"-> {out / stem}.json / .md ({res['wall_s']:.0f} s)")
    failed = res["cuda_tests"].get("returncode") not in (None, 0, 5)
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
