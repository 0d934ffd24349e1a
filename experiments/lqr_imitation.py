r"""Imitation learning through a differentiable infinite-horizon LQR (paper Appx. C, Fig. 4).

An expert controls the mass-spring-damper ``x_{t+1} = A x_t + B u_t`` (m = k = 1, damping c) with the LQR
law ``u = −K(A) x``, K from the DARE with Q = I, R = 2 (:func:`diffmpc.dlqr`). A learner knows B, Q, R but
not A; it holds an estimate Â and acts with ``u = −K(Â) x``. Training data: one 50-step expert trajectory from
x₀ = [0, 3]. Each iteration picks a random start x_t on it and rolls the *learner's* closed loop
``x̂_{k+1} = Â x̂_k + B û_k``, ``û_k = −K(Â) x̂_k`` six steps ahead from x̂_0 = x_t; the imitation loss is

.. math::  ℓ(Â) = \frac{1}{6} \sum_{k=0}^{5} \lVert u_{t+k} − û_k \rVert^2,

and its gradient flows through K(Â), i.e. through the DARE, by the selected IFT backward mode. The model
loss ``‖A − Â‖_F`` tracks whether the dynamics themselves are recovered. Â starts at A + U[−0.5, 0.5] per
entry, 5 initialisations (batched: the DARE layer solves all of them in one call), 3000 Adam steps (step
size 1e-2, cosine-annealed to 0; ``--constant-lr`` keeps it fixed).

Every backward mode computes the same gradient up to solver tolerance, so the curves of the modes must
coincide; what differs is their cost (see ``benchmarks/dare_backward.py``). This module imports only
``diffmpc`` and ``envs`` (no other ``agents`` module).
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from diffmpc._checks import check_choice, check_fields, check_real
from diffmpc.device import add_device_argument, resolve_device
from diffmpc.lqr import LQRError, dare, dlqr, is_stabilizable
from diffmpc.sweep import RunContext, SweepResult, Task, add_sweep_arguments, report, run_sweep
from envs.mass_spring_damper import X0, msd_cost_matrices, msd_matrices

MODES = ("cg", "dense", "analytic", "lyapunov")
MODE_LABELS = {"cg": "IFT-CG (normal eq.)", "gmres": "IFT-GMRES", "dense": "naive IFT (dense)",
               "analytic": "analytic (East et al.)", "lyapunov": "Lyapunov adjoint (ours)"}
DAMPINGS = (1.0, 0.1, -0.6)


@dataclass(frozen=True)
class ImitationConfig:
    """One imitation run per (damping, backward mode); all modes share inits and random starts."""

    dampings: tuple[float, ...] = DAMPINGS
    modes: tuple[str, ...] = MODES
    iterations: int = 3000
    inits: int = 5
    horizon: int = 6
    trajectory: int = 50
    init_noise: float = 0.5
    lr: float = 1e-2
    cosine: bool = True  # cosine-anneal the Adam step size to 0 over the run
    eval_every: int = 10
    seed: int = 0
    x0: tuple[float, ...] = field(default=X0)

    def __post_init__(self) -> None:
        for d in self.dampings:
            check_real("--damping", d)
        check_fields(self, ints=("iterations", "inits", "horizon", "trajectory", "eval_every"),
                     positive=("lr",), nonneg=("init_noise",))
        for m in self.modes:
            check_choice("--modes", m, tuple(MODE_LABELS))


def expert_data(damping: float, device: str | torch.device | None = None) -> dict[str, torch.Tensor]:
    """The true (A, B, Q, R) and the expert gain K(A), on ``device``."""
    A, B = msd_matrices(damping=damping, dtype=torch.float64, device=device)
    Q, R = msd_cost_matrices(dtype=torch.float64, device=device)
    return {"A": A, "B": B, "Q": Q, "R": R, "K": dlqr(A, B, Q, R)}


def rollout(A: torch.Tensor, B: torch.Tensor, K: torch.Tensor, x0: torch.Tensor, steps: int):
    """Closed loop ``x_{k+1} = A x_k + B u_k``, ``u_k = −K x_k``; batched ``x0 (..., n)`` → (states, controls)
    of shapes ``(..., steps, n)`` and ``(..., steps, m)`` (states x_0..x_{steps−1})."""
    xs, us = [], []
    x = x0
    for _ in range(steps):
        u = -(K @ x.unsqueeze(-1)).squeeze(-1)
        xs.append(x)
        us.append(u)
        x = (A @ x.unsqueeze(-1)).squeeze(-1) + (B @ u.unsqueeze(-1)).squeeze(-1)
    return torch.stack(xs, -2), torch.stack(us, -2)


def imitation_loss(A_hat: torch.Tensor, data: dict, xs: torch.Tensor, us: torch.Tensor, starts: torch.Tensor,
                   horizon: int, backward: str) -> torch.Tensor:
    """ℓ per learner: ``A_hat (I, n, n)``, ``starts (I, S)`` indices into the expert trajectory → (I, S)."""
    K_hat = dlqr(A_hat, data["B"], data["Q"], data["R"], backward=backward)          # (I, m, n)
    x0 = xs[starts]                                                                     # (I, S, n)
    _, u_hat = rollout(A_hat[:, None], data["B"], K_hat[:, None], x0, horizon)         # (I, S, H, m)
    idx = starts[..., None] + torch.arange(horizon, device=starts.device)               # (I, S, H)
    return ((us[idx] - u_hat) ** 2).sum(-1).mean(-1)


def train(cfg: ImitationConfig, damping: float, mode: str, progress: bool = True,
          device: str | torch.device | None = None) -> dict[str, Any]:
    """Learn Â for every init with one backward ``mode`` on ``device``; returns curves and final numbers.

    Host syncs: the DARE's own checks each step (an Â without a stabilising gain raises), and the
    evaluation every ``eval_every`` iterations; the per-step training loss is kept on the device."""
    from tqdm import tqdm

    data = expert_data(damping, device)
    A, n = data["A"], data["A"].shape[0]
    x0 = torch.tensor(cfg.x0, dtype=torch.float64, device=A.device)
    xs, us = rollout(A, data["B"], data["K"], x0, cfg.trajectory)
    gen = torch.Generator().manual_seed(cfg.seed)  # same inits and starts for every mode (and device)
    noise = torch.rand(cfg.inits, n, n, generator=gen, dtype=torch.float64).to(A.device)
    A_hat = (A + (noise * 2 - 1) * cfg.init_noise)
    A_hat.requires_grad_()
    opt = torch.optim.Adam([A_hat], lr=cfg.lr)
    n_starts = cfg.trajectory - cfg.horizon + 1
    all_starts = torch.arange(n_starts, device=A.device).expand(cfg.inits, -1)
    train_loss, eval_iters, eval_loss, model_loss, failures = [], [], [], [], 0
    backward_s = 0.0
    t0 = time.perf_counter()
    for it in tqdm(range(cfg.iterations + 1), desc=f"c={damping:g} {mode}", disable=not progress,
                   mininterval=2.0, leave=False):
        if it % cfg.eval_every == 0 or it == cfg.iterations:
            with torch.no_grad():
                eval_iters.append(it)
                eval_loss.append(_safe_loss(A_hat, data, xs, us, all_starts, cfg.horizon).tolist())
                model_loss.append(torch.linalg.matrix_norm(A - A_hat).tolist())
                report(step=it, imitation_loss=float(np.nanmean(eval_loss[-1])))  # shown by a sweep's bar
        if it == cfg.iterations:
            break
        starts = torch.randint(0, n_starts, (cfg.inits, 1), generator=gen).to(A.device)
        try:
            loss = imitation_loss(A_hat, data, xs, us, starts, cfg.horizon, mode)[:, 0]
        except LQRError:
            failures += 1  # some Â has no stabilising LQR gain: skip this step (counted and reported)
            continue
        opt.zero_grad()
        tb = time.perf_counter()
        loss.sum().backward()  # the inits are independent problems: their gradients do not mix
        if A.device.type == "cuda":
            torch.cuda.synchronize(A.device)  # time the backward, not its launch
        backward_s += time.perf_counter() - tb
        if cfg.cosine:
            opt.param_groups[0]["lr"] = 0.5 * cfg.lr * (1 + math.cos(math.pi * it / cfg.iterations))
        opt.step()
        train_loss.append(loss.detach())
    train_loss = torch.stack(train_loss).tolist() if train_loss else []  # one host sync, not one per step
    wall = time.perf_counter() - t0
    final_eval = np.asarray(eval_loss[-1])
    final_model = np.asarray(model_loss[-1])
    return {
        "damping": damping, "mode": mode, "eval_iterations": eval_iters, "imitation_loss": eval_loss,
        "model_loss": model_loss, "train_loss": train_loss, "failed_steps": failures,
        "final_imitation_loss_mean": float(np.nanmean(final_eval)),
        "final_imitation_loss_std": float(np.nanstd(final_eval)),
        "final_model_loss_mean": float(final_model.mean()), "final_model_loss_std": float(final_model.std()),
        "A_hat": A_hat.detach().tolist(), "wall_s": wall, "backward_s": backward_s,
    }


def _safe_loss(A_hat, data, xs, us, starts, horizon) -> torch.Tensor:
    try:
        return imitation_loss(A_hat, data, xs, us, starts, horizon, "lyapunov").mean(-1)
    except LQRError:  # evaluate one by one so that one bad Â does not hide the others
        out = []
        for i in range(A_hat.shape[0]):
            try:
                out.append(imitation_loss(A_hat[i:i + 1], data, xs, us, starts[i:i + 1], horizon,
                                          "lyapunov").mean())
            except LQRError:
                out.append(torch.tensor(float("nan"), dtype=A_hat.dtype, device=A_hat.device))
        return torch.stack(out)


def system_report(damping: float) -> dict[str, Any]:
    """Stabilisability of (A, B) and solvability of the DARE for one damping (the paper's A used as a map)."""
    A, B = msd_matrices(damping=damping, dtype=torch.float64)
    Q, R = msd_cost_matrices(dtype=torch.float64)
    report = {
        "damping": damping, "A": A.tolist(), "B": B.tolist(),
        "eig_abs_A": torch.linalg.eigvals(A).abs().tolist(),
        "controllability_rank": int(torch.linalg.matrix_rank(torch.cat([B, A @ B], dim=1))),
        "stabilizable": bool(is_stabilizable(A.numpy(), B.numpy())),
    }
    try:
        S = dare(A, B, Q, R)
    except LQRError as err:
        return {**report, "dare_solvable": False, "error": f"{type(err).__name__}: {err}"}
    K = dlqr(A, B, Q, R)
    return {**report, "dare_solvable": True, "S": S.tolist(), "K": K.tolist(),
            "spectral_radius_closed_loop": float(torch.linalg.eigvals(A - B @ K).abs().max())}


def _task_config(cfg: ImitationConfig, damping: float, mode: str) -> dict[str, Any]:
    """One (damping, mode) run's full config: what its run directory is keyed on."""
    config = json.loads(json.dumps(asdict(cfg)))
    del config["dampings"], config["modes"]
    return {**config, "damping": damping, "mode": mode}


def run_task(config: dict[str, Any], ctx: RunContext | None = None, device: str | None = None
             ) -> dict[str, Any]:
    """One (damping, mode) training run from its :func:`_task_config` (a sweep task; runs in a worker).
    ``device`` is where it runs, recorded in the results, not part of the run's key."""
    torch.set_num_threads(1)  # tiny matrices: threads only add overhead
    fields = {k: v for k, v in config.items() if k not in ("damping", "mode")}
    cfg = ImitationConfig(**{**fields, "x0": tuple(fields["x0"])})
    r = train(cfg, config["damping"], config["mode"], progress=False, device=device)
    r["device"] = str(device or "cpu")
    print(f"c={config['damping']:g} {config['mode']:9s}: imitation {r['final_imitation_loss_mean']:.3e} ± "
          f"{r['final_imitation_loss_std']:.1e}, model ‖A−Â‖ {r['final_model_loss_mean']:.2e} ± "
          f"{r['final_model_loss_std']:.1e}, {r['wall_s']:.1f}s (backward {r['backward_s']:.1f}s)")
    return r


def run(cfg: ImitationConfig, out: str | Path, progress: bool = True, jobs: int = 1,
        address: str | None = None, device: str | None = None) -> dict[str, Any]:
    """All (damping, mode) runs as one sweep (:func:`diffmpc.sweep.run_sweep`: ``jobs`` Ray workers or an
    existing cluster at ``address``; in-process by default): each run in ``out/runs/c=C_MODE/`` keyed on its
    full config (finished runs are skipped, so adding a mode or a damping trains only the new runs); the
    aggregate ``out/results.json`` and the figure are rebuilt from the finished runs, also after Ctrl-C."""
    from diffmpc.io import write_results

    out = Path(out)
    keys = {f"c={c:g}_{mode}": (c, mode) for c in cfg.dampings for mode in cfg.modes}
    tasks = [Task(name, _task_config(cfg, c, mode)) for name, (c, mode) in keys.items()]

    def aggregate(sweep: SweepResult) -> dict[str, Any]:
        results: dict[str, Any] = {"config": asdict(cfg), "systems": {f"{c:g}": system_report(c)
                                                                      for c in cfg.dampings}}
        label = {n: f"c={c:g}/{mode}" for n, (c, mode) in keys.items()}
        results["runs"] = {label[n]: sweep.finished[n] for n in keys if n in sweep.finished}
        results["failed_runs"] = {label[n]: tb.strip().splitlines()[-1] if tb.strip() else "failed"
                                  for n, tb in sweep.failed.items()}
        results["mode_agreement"] = _agreement(results, cfg)
        if results["runs"]:
            results["figure"] = str(plot(results, cfg, out / "lqr_imitation.png"))
        write_results(out, results)
        return results

    gpus = 1.0 / jobs if str(device or "cpu").startswith("cuda") else 0.0  # the runs share one GPU
    res = run_sweep(tasks, functools.partial(run_task, device=device), out / "runs", jobs=jobs,
                    address=address, progress=progress, desc="lqr-imitation", aggregate=aggregate,
                    gpus_per_run=gpus)
    return res.aggregate


def _agreement(results: dict, cfg: ImitationConfig) -> dict[str, float]:
    """max |Â_mode − Â_lyapunov| after training: the modes compute one gradient, so this should be tiny."""
    agree = {}
    for c in cfg.dampings:
        ref = results["runs"].get(f"c={c:g}/lyapunov")
        for mode in cfg.modes:
            r = results["runs"].get(f"c={c:g}/{mode}")
            if ref and r and mode != "lyapunov":
                diff = np.asarray(r["A_hat"]) - np.asarray(ref["A_hat"])
                agree[f"c={c:g}/{mode}"] = float(np.abs(diff).max())
    return agree


def plot(results: dict, cfg: ImitationConfig, path: Path) -> Path:
    """Fig. 4: imitation loss, model loss (over inits: geometric mean ×/÷ geometric std for the log-scale
    imitation loss, mean ± std for the model loss) for every backward mode, and each mode's backward time;
    one row per damping."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = len(cfg.dampings)
    fig, axes = plt.subplots(rows, 3, figsize=(14, 3.1 * rows), squeeze=False,
                             gridspec_kw={"width_ratios": [1, 1, 0.6]})
    styles = {"cg": ("C0", "-"), "gmres": ("C4", "-"), "dense": ("C1", "--"), "analytic": ("C2", ":"),
              "lyapunov": ("C3", "-.")}
    for row, c in enumerate(cfg.dampings):
        times, names, colors = [], [], []
        for mode in cfg.modes:
            r = results["runs"].get(f"c={c:g}/{mode}")
            if r is None:
                continue
            its = np.asarray(r["eval_iterations"])
            color, ls = styles.get(mode, ("k", "-"))
            label = MODE_LABELS.get(mode, mode)
            logv = np.log10(np.asarray(r["imitation_loss"], dtype=float))
            mu, sd = np.nanmean(logv, 1), np.nanstd(logv, 1)
            axes[row, 0].plot(its, 10 ** mu, color=color, ls=ls, lw=1.3, label=label)
            axes[row, 0].fill_between(its, 10 ** (mu - sd), 10 ** (mu + sd), color=color, alpha=0.08)
            v = np.asarray(r["model_loss"], dtype=float)
            mean, std = v.mean(1), v.std(1)
            axes[row, 1].plot(its, mean, color=color, ls=ls, lw=1.3, label=label)
            axes[row, 1].fill_between(its, np.maximum(mean - std, 0), mean + std, color=color, alpha=0.08)
            times.append(1e3 * r["backward_s"] / max(1, len(r["train_loss"])))
            names.append(mode)
            colors.append(color)
        axes[row, 2].barh(names, times, color=colors)
        axes[row, 0].set_yscale("log")
        axes[row, 0].set_ylabel(f"c = {c:g}\nimitation loss")
        axes[row, 1].set_ylabel("model loss ‖A − Â‖_F")
        axes[row, 2].set_xlabel("backward ms / iteration")
    for ax in axes[-1, :2]:
        ax.set_xlabel("iteration")
    axes[0, 0].legend(fontsize=8)
    fig.suptitle(f"LQR imitation on the mass-spring-damper ({cfg.inits} inits; shaded: ±1 std)")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def register(subparsers) -> None:
    """Add the ``lqr-imitation`` subcommand."""
    p = subparsers.add_parser("lqr-imitation", help="imitation learning through a differentiable DARE "
                              "(paper Appx. C, Fig. 4)")
    p.add_argument("--out", default="runs/lqr-imitation")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--iterations", type=int, default=ImitationConfig.iterations)
    p.add_argument("--inits", type=int, default=ImitationConfig.inits)
    p.add_argument("--damping", type=float, nargs="+", default=list(DAMPINGS),
                   help="damping value(s) c (default: 1 0.1 -0.6)")
    p.add_argument("--modes", nargs="+", default=list(MODES), choices=("cg", "gmres", "dense", "analytic",
                                                                       "lyapunov"))
    p.add_argument("--lr", type=float, default=ImitationConfig.lr, help="Adam learning rate")
    p.add_argument("--constant-lr", action="store_true", help="no cosine annealing of the step size")
    p.add_argument("--no-progress", action="store_true")
    add_sweep_arguments(p, "(damping, mode) runs in parallel, one CPU each, on a local Ray")
    add_device_argument(p)
    p.set_defaults(handler=_main)


def _main(args: argparse.Namespace) -> int:
    torch.set_num_threads(1)  # tiny matrices: threads only add overhead
    cfg = ImitationConfig(dampings=tuple(args.damping), modes=tuple(args.modes), iterations=args.iterations,
                          inits=args.inits, lr=args.lr, seed=args.seed, cosine=not args.constant_lr)
    res = run(cfg, args.out, progress=not args.no_progress, jobs=args.jobs, address=args.address,
              device=str(resolve_device(args.device)))
    for c, s in res["systems"].items():
        print(f"c={c}: |eig(A)| = {np.round(s['eig_abs_A'], 6).tolist()}, stabilizable={s['stabilizable']}, "
              f"DARE solvable, ρ(A − BK) = {s['spectral_radius_closed_loop']:.4f}")
    worst = max(res["mode_agreement"].values(), default=float("nan"))
    print(f"max |Â_mode − Â_lyapunov| over modes and dampings: {worst:.2e}")
    print(f"figure: {res.get('figure')}\nresults: {Path(args.out) / 'results.json'}")
    return 1 if res["failed_runs"] else 0
