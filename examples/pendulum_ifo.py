"""Imitation from observation on a stock Gymnasium env (``Pendulum-v1``), read top to bottom.

1. Expert: an ``agents.MPCPolicy`` on Pendulum-v1's *true* dynamics and cost (sampling-only: CEM, H = 20),
   rolled out in the env; the dataset keeps the observed states only.
2. MPC_IFT (paper Alg. 2): learned dynamics + learned cost inside the differentiable MPC layer, trained from
   the expert's state pairs and simulator queries ``F(x, u)``. Pendulum-v1 cannot be reset to a given
   state, so the query is the env's step written as a batched torch function (:func:`pendulum_step`).
3. Baselines on the same data and the same learned dynamics: BC (controls inferred through the model) and
   BCO (an inverse-dynamics model labels the expert's transitions, Torabi et al. 2018).
4. Evaluation over fixed seeds in the Gymnasium loop (return = sum of rewards), a side-by-side video.

The observation ``(cos θ, sin θ, θ̇)`` already embeds its angle: the task declares the ``(cos, sin)`` pair
(``circle_dims``), so the learned cost's target for it stays a point of the unit circle with one weight, and
the cost starts at the mean expert state (``cost_init="expert_mean"``).

    python examples/pendulum_ifo.py --out runs/pendulum_ifo            # the full run (results.json, video)
    python examples/pendulum_ifo.py --out runs/pendulum_smoke --smoke  # seconds: the test suite's setting
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path

import gymnasium as gym
import torch

from agents import MPCPolicy
from agents.bc import BC_PRESETS, BCOConfig, BCOTrainer, BCTrainer
from agents.dataset import generate_dataset, load_dataset
from agents.evaluation import evaluate_in_env, mpc_policy, record_side_by_side
from agents.ifo import IfOConfig, IfOTrainer
from agents.task import Task
from diffmpc.io import write_results

ENV_ID = "Pendulum-v1"
# Pendulum-v1's constants (gymnasium/envs/classic_control/pendulum.py)
G, M, L, DT, MAX_SPEED, MAX_TORQUE = 10.0, 1.0, 1.0, 0.05, 8.0, 2.0


def pendulum_step(x: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Pendulum-v1's ``step`` on observations ``(cos θ, sin θ, θ̇)``, batched: ``(N, 3), (N, 1) -> (N, 3)``."""
    th, thdot = torch.atan2(x[:, 1], x[:, 0]), x[:, 2]
    u = u[:, 0].clamp(-MAX_TORQUE, MAX_TORQUE)
    thdot = thdot + (3 * G / (2 * L) * torch.sin(th) + 3.0 / (M * L**2) * u) * DT
    thdot = thdot.clamp(-MAX_SPEED, MAX_SPEED)
    th = th + thdot * DT
    return torch.stack([torch.cos(th), torch.sin(th), thdot], 1)


def pendulum_cost(x: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Pendulum-v1's ``-reward`` of a step: ``θ² + 0.1 θ̇² + 0.001 u²`` (θ wrapped to [-π, π))."""
    th = torch.atan2(x[:, 1], x[:, 0])
    return th**2 + 0.1 * x[:, 2] ** 2 + 0.001 * u[:, 0].clamp(-MAX_TORQUE, MAX_TORQUE) ** 2


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="runs/pendulum_ifo")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--episodes", type=int, default=10, help="expert episodes (200 steps each)")
    p.add_argument("--horizon", type=int, default=20, help="MPC horizon, steps of 0.05 s (swing-up ~ 1 s)")
    p.add_argument("--eval-seeds", type=int, default=10, help="evaluation episodes (seeds 1000, 1001, ...)")
    p.add_argument("--iterations", type=int, default=60, help="IfO cost iterations")
    p.add_argument("--cost-init", choices=("expert_mean", "random"), default="expert_mean",
                   help="where the learned cost's target starts (IfOConfig.cost_init)")
    p.add_argument("--no-circle", action="store_true",
                   help="ablation: do not declare the (cos, sin) pair (free target and two weights for it)")
    p.add_argument("--smoke", action="store_true", help="tiny settings (seconds): for the test suite")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    args = parse(argv)
    torch.set_num_threads(1)
    out = Path(args.out)
    t_start = time.perf_counter()
    steps = 20 if args.smoke else None  # episode length (None: the env's 200)

    def make_env(render_mode: str | None = None) -> gym.Env:
        return gym.make(ENV_ID, render_mode=render_mode, **({"max_episode_steps": steps} if steps else {}))

    # ---------------------------------------------------------------- 1. expert data (states only)
    env = make_env()
    # state_dim 3, action_dim 1, |u| <= 2; observation (cos θ, sin θ, θ̇): one (cos, sin) pair
    task = Task.from_env(env, circle_dims=[] if args.no_circle else [(0, 1)])
    n_samples = 32 if args.smoke else 200
    expert = MPCPolicy(dynamics=pendulum_step, cost=pendulum_cost, horizon=args.horizon, env=env,
                       refine=False, sampler="cem", n_samples=n_samples, cem_iterations=4, seed=args.seed)
    episodes = 2 if args.smoke else args.episodes
    t0 = time.perf_counter()
    path = out / "expert_pendulum.npz"
    if path.is_file():  # reuse the expert data of an earlier run (delete the file to regenerate it)
        data = load_dataset(path, expect={"env_id": ENV_ID, "episodes": episodes, "seed": args.seed})
    else:
        data = generate_dataset(path, episodes=episodes, seed=args.seed, expert=expert, env=env,
                                progress=not args.smoke)
    t_data = time.perf_counter() - t0
    x, x_next = data.transitions()
    print(f"expert data: {data.episodes} episodes, {len(x)} state pairs, mean return "
          f"{-data.episode_costs.mean():.1f} ({t_data:.0f} s)")

    # ---------------------------------------------------------------- 2. MPC_IFT (Alg. 2)
    cfg = IfOConfig(hidden=(64, 64), warmup_queries=20000, warmup_steps=2000, iterations=args.iterations,
                    cost_batch=32, horizon=args.horizon, curriculum_iters=max(1, args.iterations // 2),
                    n_samples=100, cem_iterations=3, newton_iters=20, eval_samples=200, eval_cem_iterations=4,
                    eval_newton_iters=3, checkpoint_every=10, cost_init=args.cost_init)
    if args.smoke:
        cfg = replace(cfg, hidden=(16, 16), warmup_queries=500, warmup_steps=50, iterations=2, cost_batch=8,
                      horizon=3, curriculum_iters=1, n_samples=16, cem_iterations=1, newton_iters=3,
                      eval_samples=16, eval_cem_iterations=1, eval_newton_iters=1)
    ifo = IfOTrainer(x, x_next, cfg, seed=args.seed, simulator=pendulum_step, out=out / "ifo", task=task)
    ifo_summary = ifo.run(progress=not args.smoke, resume=True)

    # ---------------------------------------------------------------- 3. baselines through the same model
    bc_cfg = BC_PRESETS["tiny" if args.smoke else "quick"]
    bc = BCTrainer(x, x_next, ifo.dynamics, bc_cfg, seed=args.seed, out=out / "bc", task=task)
    bc_summary = bc.run(progress=not args.smoke, resume=True)
    bco_cfg = BCOConfig(queries=500, inverse_steps=50, policy_steps=50) if args.smoke else BCOConfig()
    bco = BCOTrainer(x, x_next, pendulum_step, bco_cfg, seed=args.seed, out=out / "bco", task=task)
    bco_summary = bco.run(progress=not args.smoke, resume=True)

    # ---------------------------------------------------------------- 4. evaluation over fixed seeds
    seeds = list(range(1000, 1000 + (2 if args.smoke else args.eval_seeds)))
    policies = {
        "expert": expert,
        "BC": bc.policy.requires_grad_(False),
        "BCO": bco.policy.requires_grad_(False),
        "MPC_IFT": mpc_policy(ifo.dynamics, ifo.cost, cfg, task),
    }
    evaluation = {}
    for name, policy in policies.items():
        evaluation[name] = evaluate_in_env(policy, make_env, seeds, progress=not args.smoke)
        r = evaluation[name]
        print(f"{name:>8s}: return {r['mean_return']:8.1f} ± {r['return_stderr']:.1f} over {len(seeds)} "
              f"seeds ({r['wall_time_s']:.0f} s)")
    media = record_side_by_side(policies, lambda: make_env("rgb_array"), out / "pendulum_side_by_side",
                                seed=seeds[0])

    expert_ret, ift_ret = evaluation["expert"]["mean_return"], evaluation["MPC_IFT"]["mean_return"]
    results = {
        "command": "python examples/pendulum_ifo.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "env_id": ENV_ID, "task": task.to_dict(), "seed": args.seed, "smoke": args.smoke,
        "expert": {"policy": "MPCPolicy(refine=False, sampler='cem')", "n_samples": n_samples,
                   "horizon": args.horizon, "dataset_mean_return": float(-data.episode_costs.mean()),
                   "dataset_episodes": data.episodes},
        "ifo_config": cfg.to_dict(), "bc_config": bc_cfg.to_dict(), "bco_config": asdict(bco_cfg),
        "evaluation": evaluation,
        "mpc_ift_gap_to_expert": (ift_ret - expert_ret) / abs(expert_ret),
        "mpc_ift_within_25pct_of_expert": bool(ift_ret >= expert_ret - 0.25 * abs(expert_ret)),
        "mpc_ift_beats_bc": bool(ift_ret > evaluation["BC"]["mean_return"]),
        "ifo_converged_fraction": ifo_summary["converged_fraction"],
        "ifo_mpc_solves": ifo_summary["mpc_solves"], "ifo_mpc_unconverged": ifo_summary["mpc_unconverged"],
        "dataset_reused": t_data < 5,
        "time_s": {"dataset": t_data, "ifo": ifo_summary["elapsed_s"], "bc": bc_summary["elapsed_s"],
                   "bco": bco_summary["elapsed_s"], "total": time.perf_counter() - t_start},
        "threads": torch.get_num_threads(),
        "media": [str(p) for p in media],
    }
    path = write_results(out, results)
    print(f"MPC_IFT vs expert: {100 * results['mpc_ift_gap_to_expert']:+.1f} % return; "
          f"total {results['time_s']['total'] / 60:.1f} min -> {path}; video {media[0]}")
    return results


if __name__ == "__main__":
    main()
