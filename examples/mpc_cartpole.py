"""MPCPolicy on the cart-pole swing-up with the true dynamics and cost, in a plain Gymnasium loop + a video.

Each step solves the horizon problem (paper Eq. 5) with random shooting followed by the box-constrained
(projected) Newton method to a KKT point (so the same policy is differentiable by the active-set IFT),
warm-started from the shifted previous plan. Every solve's KKT residual, Newton iterations, convergence and
CPU time are recorded.

    .venv/bin/python examples/mpc_cartpole.py --seed 0 --out runs/mpc_cartpole [--steps 40] [--samples 200]

Writes ``OUT/mpc_cartpole.mp4`` (+ ``.gif``) and ``OUT/results.json`` (episode cost, per-step KKT residual,
iterations, converged, wall and CPU seconds per action; command, git commit, threads, load average).
--steps shortens the episode, --no-video skips rendering.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
import warnings

import gymnasium as gym
import numpy as np
import torch

import envs
from agents import MPCPolicy
from diffmpc import ConvergenceWarning
from diffmpc.io import write_results
from envs.video import write_video


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="runs/mpc_cartpole")
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--horizon", type=int, default=10)
    ap.add_argument("--samples", type=int, default=200, help="random-shooting particles before refinement")
    ap.add_argument("--max-iter", type=int, default=25, help="Newton iteration budget per action")
    ap.add_argument("--tol", type=float, default=1e-6, help="KKT tolerance (and Newton step tolerance)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1: the one-core measurement)")
    ap.add_argument("--no-video", action="store_true", help="skip rendering (timing runs)")
    ap.add_argument("--substeps", type=int, default=4,
                    help="RK4 substeps of the planner's model (the env integrates with 10; 4 is the expert's "
                         "planning model, 2.5x cheaper)")
    ap.add_argument("--expert-batch", type=int, default=0, metavar="N",
                    help="instead of the episode: solve N states of data/expert_cartpole_rs.npz in a batch "
                         "(the IfO cost batch; CEM 100 x 4 like IfO) and report the converged "
                         "fraction within --max-iter")
    args = ap.parse_args(argv)
    if args.expert_batch:
        return expert_batch(args, argv)
    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)

    env = gym.make(envs.CARTPOLE_ID, render_mode=None if args.no_video else "rgb_array")

    def model(x: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        return envs.cartpole_dynamics(x, u, substeps=args.substeps)

    policy = MPCPolicy(dynamics=model, cost=envs.cartpole_cost,
                       horizon=args.horizon, action_space=env.action_space, n_samples=args.samples,
                       max_iter=args.max_iter, tol=args.tol, seed=args.seed)
    obs, info = env.reset(seed=args.seed)
    policy.reset(seed=args.seed)
    frames = [] if args.no_video else [env.render()]
    costs, residuals, iterations, converged, times, cpu = [], [], [], [], [], []
    load_before = os.getloadavg()
    with warnings.catch_warnings(record=True):  # non-convergence is counted below, not printed per step
        warnings.simplefilter("always", ConvergenceWarning)
        for _ in range(args.steps):  # the plain Gymnasium loop
            t0, c0 = time.perf_counter(), time.process_time()
            action = policy.act(obs)
            times.append(time.perf_counter() - t0)
            cpu.append(time.process_time() - c0)
            info_mpc = policy.last_info
            residuals.append(float(info_mpc.stationarity_residual.max()))
            iterations.append(int(info_mpc.forward_iterations.max()))
            converged.append(bool(info_mpc.converged.all()))
            obs, reward, terminated, truncated, info = env.step(action)
            costs.append(info["cost"])
            if not args.no_video:
                frames.append(env.render())
            if terminated or truncated:
                break
    env.close()
    paths = [] if args.no_video else write_video(frames, f"{args.out}/mpc_cartpole",
                                                 fps=env.metadata.get("render_fps", 10))
    res = {"command": "python " + " ".join([sys.argv[0], *(argv if argv is not None else sys.argv[1:])]),
           "git_commit": _git_commit(), "threads": torch.get_num_threads(),
           "loadavg_before": load_before, "loadavg_after": os.getloadavg(),
           "seed": args.seed, "steps": len(costs), "episode_cost": float(np.sum(costs)), "step_costs": costs,
           "kkt_residual": residuals, "stationarity_residual": residuals, "iterations": iterations,
           "converged": converged, "n_converged": int(sum(converged)), "max_iterations": max(iterations),
           "mean_iterations": float(np.mean(iterations)), "seconds_per_action": float(np.mean(times)),
           "cpu_seconds_per_action": float(np.mean(cpu)), "wall_seconds": times, "cpu_seconds": cpu,
           "videos": [str(p) for p in paths], "horizon": args.horizon, "samples": args.samples,
           "substeps": args.substeps, "max_iter": args.max_iter, "tol": args.tol}
    write_results(args.out, res)
    print(f"{len(costs)} steps, episode cost {res['episode_cost']:.3f}, converged {res['n_converged']}/"
          f"{len(costs)} (KKT ≤ {args.tol:g}), iterations mean {res['mean_iterations']:.1f} max "
          f"{res['max_iterations']}, {res['seconds_per_action']:.3f} s/action wall, "
          f"{res['cpu_seconds_per_action']:.3f} s CPU -> {paths}")
    return 0


def expert_batch(args: argparse.Namespace, argv: list[str] | None) -> int:
    """Converged fraction of one batched MPC solve over expert states (IfO's cost batch, true model)."""
    from pathlib import Path

    from agents.dataset import load_dataset
    from diffmpc import MPC

    torch.set_num_threads(args.threads)
    data = load_dataset(Path(__file__).resolve().parents[1] / "data" / "expert_cartpole_rs.npz")
    states = np.asarray(data.states).reshape(-1, 4)
    rng = np.random.default_rng(args.seed)
    pick = rng.choice(len(states), args.expert_batch, replace=False)
    x0 = torch.as_tensor(states[pick], dtype=torch.float64)

    def model(x: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        return envs.cartpole_dynamics(x, u, substeps=args.substeps)

    mpc = MPC(model, envs.cartpole_cost, args.horizon, -1.0, 1.0, sampler="cem", n_samples=100,
              cem_iterations=4, max_iter=args.max_iter, tol=args.tol, seed=args.seed)
    load_before = os.getloadavg()
    t0, c0 = time.perf_counter(), time.process_time()
    with warnings.catch_warnings(record=True):
        warnings.simplefilter("always", ConvergenceWarning)
        _, info = mpc(x0)
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    it = info.forward_iterations
    res = {"command": "python " + " ".join([sys.argv[0], *(argv if argv is not None else sys.argv[1:])]),
           "git_commit": _git_commit(), "threads": torch.get_num_threads(), "loadavg_before": load_before,
           "loadavg_after": os.getloadavg(), "batch": args.expert_batch, "horizon": args.horizon,
           "max_iter": args.max_iter, "tol": args.tol, "substeps": args.substeps,
           "converged": int(info.converged.sum()), "converged_fraction": info.converged_fraction,
           "iterations_mean": float(it.double().mean()), "iterations_max": int(it.max()),
           "iterations_median": float(it.double().median()),
           "max_kkt": float(info.stationarity_residual.max()),
           "wall_s": wall, "cpu_s": cpu}
    write_results(args.out, res)
    print(f"{res['converged']}/{args.expert_batch} converged (KKT ≤ {args.tol:g}) within {args.max_iter} "
          f"Newton iterations; iterations mean {res['iterations_mean']:.1f} median "
          f"{res['iterations_median']:.0f} max {res['iterations_max']}; {cpu:.1f} s CPU, {wall:.1f} s wall")
    return 0


def _git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10,
                             cwd=os.path.dirname(os.path.abspath(__file__)))
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


if __name__ == "__main__":
    raise SystemExit(main())
