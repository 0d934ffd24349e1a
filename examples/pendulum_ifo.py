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
(``circle_dims``), so the learned cost's target for it stays a point of the unit circle with one weight, its
angle term is the squared wrapped angle error (``circle_distance="geodesic"``), and the cost starts at the
mean expert state (``cost_init="expert_mean"``); 128 expert pairs per cost step keep its gradient steady.

    python examples/pendulum_ifo.py --out runs/pendulum_ifo            # the full run (results.json, video)
    python examples/pendulum_ifo.py --out runs/pendulum_smoke --smoke  # seconds: the test suite's setting
    python examples/pendulum_ifo.py --out runs/pendulum_seeds --seeds 5  # 5 training seeds: paired diffs
    python examples/pendulum_ifo.py --out runs/pendulum_restarts --seeds 5 --cost-restarts 3  # IfOConfig
    python examples/pendulum_ifo.py --out runs/pendulum_chord --seeds 5 --circle-distance chord  # ablation
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import gymnasium as gym
import numpy as np
import torch

from agents import MPCPolicy
from agents.bc import BC_PRESETS, BCOConfig, BCOTrainer, BCTrainer
from agents.dataset import generate_dataset, load_dataset
from agents.evaluation import evaluate_in_env, mpc_policy, record_side_by_side
from agents.ifo import IfOConfig, IfOTrainer, load_ifo_checkpoint
from agents.task import Task
from diffmpc.io import load_checkpoint, write_results

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


def make_expert(env: gym.Env, horizon: int = 20, n_samples: int = 200, seed: int = 0) -> MPCPolicy:
    """The expert: an :class:`agents.MPCPolicy` on Pendulum-v1's true dynamics and cost, sampling only (CEM
    ``n_samples`` × 4, no Newton refinement). Also the command line's expert:
    ``diffmpc dataset --env Pendulum-v1 --expert examples.pendulum_ifo:make_expert``."""
    return MPCPolicy(dynamics=pendulum_step, cost=pendulum_cost, horizon=horizon, env=env, refine=False,
                     sampler="cem", n_samples=n_samples, cem_iterations=4, seed=seed)


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="runs/pendulum_ifo")
    p.add_argument("--seed", type=int, default=0, help="seed of the expert data, the expert's planner "
                   "and the first training seed")
    p.add_argument("--seeds", type=int, default=1,
                   help="training seeds SEED, SEED+1, ... (IfO, BC and BCO each); > 1: one run per seed "
                        "under OUT/seed_<s>/ on the same expert data, evaluated on the same episodes, and "
                        "paired differences (MPC_IFT - BC, each - expert) with s.e. over the seeds")
    p.add_argument("--episodes", type=int, default=10, help="expert episodes (200 steps each)")
    p.add_argument("--horizon", type=int, default=20, help="MPC horizon, steps of 0.05 s (swing-up ~ 1 s)")
    p.add_argument("--eval-seeds", type=int, default=10, help="evaluation episodes (seeds 1000, 1001, ...)")
    p.add_argument("--iterations", type=int, default=60, help="IfO cost iterations")
    p.add_argument("--cost-batch", type=int, default=128,
                   help="expert pairs per cost step (IfOConfig.cost_batch); at 32 the noisy cost gradient "
                        "left the velocity weight stalled too high (no swing-up) on 4 of 10 training seeds")
    p.add_argument("--cost-init", choices=("expert_mean", "random"), default="expert_mean",
                   help="where the learned cost's target starts (IfOConfig.cost_init)")
    p.add_argument("--circle-distance", choices=("chord", "geodesic"), default="geodesic",
                   help="the learned cost's angle term (IfOConfig.circle_distance): squared wrapped angle "
                        "(θ - θ̄)² or squared chord 2 (1 - cos(θ - θ̄)), which saturates away from the target "
                        "(docs/own_env.md: chord plays below BC here)")
    p.add_argument("--cost-restarts", type=int, default=1,
                   help="IfOConfig.cost_restarts: run the alternation after the warm-up K times and keep the "
                        "run with the lowest final training imitation loss")
    p.add_argument("--only", type=int, nargs="+", metavar="S",
                   help="with --seeds: train and evaluate only these training seeds and write no aggregate "
                        "(to run seeds in parallel processes; a later call without --only reuses them)")
    p.add_argument("--no-circle", action="store_true",
                   help="ablation: do not declare the (cos, sin) pair (free target and two weights for it)")
    p.add_argument("--smoke", action="store_true", help="tiny settings (seconds): for the test suite")
    args = p.parse_args(argv)
    if args.only and (args.seeds == 1 or not set(args.only) <= set(range(args.seed, args.seed + args.seeds))):
        p.error(f"--only takes training seeds of --seed {args.seed} --seeds {args.seeds} (needs --seeds > 1)")
    for name in ("seeds", "episodes", "horizon", "eval_seeds", "iterations", "cost_batch", "cost_restarts"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    return args


def ifo_settings(args: argparse.Namespace) -> IfOConfig:
    """The IfO settings of this example (``--smoke``: seconds). From the command line the same run is
    ``diffmpc train ifo --cost-init expert_mean --set hidden=64,64 warmup_steps=2000 iterations=60
    cost_batch=128 horizon=20 curriculum_iters=30 eval_newton_iters=3 checkpoint_every=10
    circle_distance=geodesic`` over the ``quick`` preset (docs/own_env.md; a test keeps the two equal)."""
    cfg = IfOConfig(hidden=(64, 64), warmup_queries=20000, warmup_steps=2000, iterations=args.iterations,
                    cost_batch=args.cost_batch, horizon=args.horizon,
                    curriculum_iters=max(1, args.iterations // 2),
                    n_samples=100, cem_iterations=3, newton_iters=20, eval_samples=200, eval_cem_iterations=4,
                    eval_newton_iters=3, checkpoint_every=10, cost_init=args.cost_init,
                    circle_distance=args.circle_distance, cost_restarts=args.cost_restarts)
    if args.smoke:
        cfg = replace(cfg, hidden=(16, 16), warmup_queries=500, warmup_steps=50, iterations=2, cost_batch=8,
                      horizon=3, curriculum_iters=1, n_samples=16, cem_iterations=1, newton_iters=3,
                      eval_samples=16, eval_cem_iterations=1, eval_newton_iters=1)
    return cfg


# The paired comparisons of a multi-seed run: (a, b) -> a - b, per evaluation episode, same episode seeds.
PAIRS = (("MPC_IFT", "BC"), ("MPC_IFT", "BCO"), ("MPC_IFT", "expert"), ("BC", "expert"), ("BCO", "expert"))
LEARNED = ("BC", "BCO", "MPC_IFT")


def train_one(seed: int, run_dir: Path, x: torch.Tensor, x_next: torch.Tensor, trajectories: torch.Tensor,
              task: Task, cfg: IfOConfig, bc_cfg: Any, bco_cfg: BCOConfig, progress: bool
              ) -> tuple[dict[str, Any], dict[str, Any]]:
    """IfO (Alg. 2), then BC through its learned model and BCO, all with ``seed``, checkpointed (resumable)
    under ``run_dir``; returns the test-time policies and the training summaries."""
    ifo = IfOTrainer(x, x_next, cfg, seed=seed, simulator=pendulum_step, out=run_dir / "ifo", task=task)
    ifo_summary = ifo.run(progress=progress, resume=True)
    bc = BCTrainer(x, x_next, ifo.dynamics, bc_cfg, seed=seed, out=run_dir / "bc", task=task,
                   trajectories=trajectories if bc_cfg.rollout_steps > 1 else None)
    bc_summary = bc.run(progress=progress, resume=True)
    bco = BCOTrainer(x, x_next, pendulum_step, bco_cfg, seed=seed, out=run_dir / "bco", task=task)
    bco_summary = bco.run(progress=progress, resume=True)
    policies = {"BC": bc.policy.requires_grad_(False), "BCO": bco.policy.requires_grad_(False),
                "MPC_IFT": mpc_policy(ifo.dynamics, ifo.cost, cfg, task)}
    return policies, {"ifo": ifo_summary, "bc": bc_summary, "bco": bco_summary}


def paired_differences(returns: dict[str, np.ndarray]) -> dict[str, Any]:
    """``a - b`` for each pair of :data:`PAIRS` from per-episode returns ``(seeds, episodes)`` (the expert's
    row is its one evaluation, repeated): per seed the mean over the same episodes, then the mean over
    training seeds ± its standard error (``stderr_over_seeds``, n = seeds), the number of seeds where
    ``a > b``, and the relative gap ``mean / |mean return of b|``."""
    out = {}
    for a, b in PAIRS:
        d = returns[a] - returns[b]  # (seeds, episodes), paired by evaluation episode
        per_seed = d.mean(1)
        k = len(per_seed)
        out[f"{a} - {b}"] = {
            "mean": float(per_seed.mean()),
            "stderr_over_seeds": float(per_seed.std(ddof=1) / np.sqrt(k)) if k > 1 else float("nan"),
            "per_seed": per_seed.tolist(),
            "per_seed_episode_stderr": (d.std(1, ddof=1) / np.sqrt(d.shape[1])).tolist(),
            "seeds_a_better": int((per_seed > 0).sum()),
            "relative_to_b": float(per_seed.mean() / abs(returns[b].mean())),
        }
    return out


def learned_cost_of(run_dir: Path, last: int = 10) -> dict[str, Any]:
    """What IfO learned in ``run_dir/ifo``: the cost's target and weights (on (cos θ, sin θ, θ̇)) and its own
    training objective at the end, the imitation loss averaged over the ``last`` cost iterations."""
    path = run_dir / "ifo" / "ifo_checkpoint.pt"
    _, cost, cfg, _ = load_ifo_checkpoint(path)
    state = load_checkpoint(path, {"kind": "ifo"})
    history = state["history"]
    restarts = {"cost_restarts": state["restarts"], "kept_restart": state["best"]["restart"]} \
        if cfg.cost_restarts > 1 else {}
    return {"learned_target": cost.target.detach().tolist(),
            "learned_weights": cost.weights.detach().tolist(),
            f"imitation_loss_last_{last}": float(np.mean([h["loss"] for h in history[-last:]])), **restarts}


def main(argv: list[str] | None = None) -> dict:
    args = parse(argv)
    torch.set_num_threads(1)
    out = Path(args.out)
    t_start, cpu_start = time.perf_counter(), time.process_time()
    steps = 20 if args.smoke else None  # episode length (None: the env's 200)
    command = "python examples/pendulum_ifo.py " + " ".join(sys.argv[1:] if argv is None else argv)

    def make_env(render_mode: str | None = None) -> gym.Env:
        return gym.make(ENV_ID, render_mode=render_mode, **({"max_episode_steps": steps} if steps else {}))

    # ---------------------------------------------------------------- 1. expert data (states only)
    env = make_env()
    # state_dim 3, action_dim 1, |u| <= 2; observation (cos θ, sin θ, θ̇): one (cos, sin) pair
    task = Task.from_env(env, circle_dims=[] if args.no_circle else [(0, 1)])
    n_samples = 32 if args.smoke else 200
    expert = make_expert(env, horizon=args.horizon, n_samples=n_samples, seed=args.seed)
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

    # ---------------------------------------------------------------- 2. MPC_IFT (Alg. 2) and 3. baselines
    cfg = ifo_settings(args)
    # Baselines on the same data through the same learned model: BC (the preset's k-step rollout loss over
    # the expert trajectories) and BCO (inverse-dynamics labels).
    bc_cfg = BC_PRESETS["tiny" if args.smoke else "quick"]
    bco_cfg = BCOConfig(queries=500, inverse_steps=50, policy_steps=50) if args.smoke else BCOConfig()
    trajectories = torch.as_tensor(data.states)
    seeds = list(range(1000, 1000 + (2 if args.smoke else args.eval_seeds)))
    if args.seeds > 1:
        return multi_seed(args, out, command, make_env, expert, data, task, cfg, bc_cfg, bco_cfg,
                          trajectories, seeds, t_data)
    t0 = time.perf_counter()
    learned, summaries = train_one(args.seed, out, x, x_next, trajectories, task, cfg, bc_cfg, bco_cfg,
                                   progress=not args.smoke)
    ifo_summary = summaries["ifo"]

    # ---------------------------------------------------------------- 4. evaluation over fixed seeds
    policies = {"expert": expert, **learned}
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
        "command": command,
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
        "time_s": {"dataset": t_data, "ifo": ifo_summary["elapsed_s"], "bc": summaries["bc"]["elapsed_s"],
                   "bco": summaries["bco"]["elapsed_s"], "total": time.perf_counter() - t_start},
        "cpu_s": time.process_time() - cpu_start,
        "threads": torch.get_num_threads(),
        "media": [str(p) for p in media],
    }
    path = write_results(out, results)
    print(f"MPC_IFT vs expert: {100 * results['mpc_ift_gap_to_expert']:+.1f} % return; "
          f"total {results['time_s']['total'] / 60:.1f} min -> {path}; video {media[0]}")
    return results


def multi_seed(args: argparse.Namespace, out: Path, command: str, make_env: Any, expert: MPCPolicy, data: Any,
               task: Task, cfg: IfOConfig, bc_cfg: Any, bco_cfg: BCOConfig, trajectories: torch.Tensor,
               seeds: list[int], t_data: float) -> dict:
    """``--seeds K``: K training runs on the same expert data, each evaluated on the same episodes (seeds),
    against one evaluation of the expert; per-seed results are kept in ``OUT/seed_<s>/results.json`` (a
    finished seed is skipped when its settings match), the paired differences in ``OUT/results.json``."""
    t_start = time.perf_counter()
    progress = not args.smoke
    x, x_next = data.transitions()
    expert_eval = None if args.only else evaluate_in_env(expert, make_env, seeds, progress=progress)
    if expert_eval is not None:
        print(f"  expert: return {expert_eval['mean_return']:8.1f} ± {expert_eval['return_stderr']:.1f} "
              f"over {len(seeds)} episodes")
    settings = {"ifo_config": cfg.to_dict(), "bc_config": bc_cfg.to_dict(), "bco_config": asdict(bco_cfg),
                "task": task.to_dict(), "eval_seeds": seeds,
                "dataset_states_sha256": data.meta["states_sha256"]}
    settings = json.loads(json.dumps(settings))  # as stored (tuples become lists): comparable with a rerun's
    per_seed = {}
    for k in range(args.seeds):
        seed = args.seed + k
        if args.only and seed not in args.only:
            continue
        run_dir = out / f"seed_{seed}"
        done = run_dir / "results.json"
        if done.is_file():
            old = json.loads(done.read_text())
            if old.get("settings") == settings and old.get("seed") == seed:
                per_seed[seed] = old
                print(f"seed {seed}: done before, kept ({done})")
                continue
        t0, c0 = time.perf_counter(), time.process_time()
        learned, summaries = train_one(seed, run_dir, x, x_next, trajectories, task, cfg, bc_cfg, bco_cfg,
                                       progress)
        evaluation = {name: evaluate_in_env(pol, make_env, seeds, progress=progress)
                      for name, pol in learned.items()}
        per_seed[seed] = {
            "seed": seed, "settings": settings, "evaluation": evaluation,
            "ifo_converged_fraction": summaries["ifo"]["converged_fraction"],
            "ifo_mpc_solves": summaries["ifo"]["mpc_solves"],
            "ifo_mpc_unconverged": summaries["ifo"]["mpc_unconverged"],
            "train_s": {n: s["elapsed_s"] for n, s in summaries.items()},
            "wall_s": time.perf_counter() - t0, "cpu_s": time.process_time() - c0,
        }
        write_results(run_dir, per_seed[seed])
        print(f"seed {seed}: " + ", ".join(f"{n} {r['mean_return']:.1f}" for n, r in evaluation.items())
              + f" ({per_seed[seed]['cpu_s']:.0f} CPU s)")

    if args.only:
        print(f"trained seeds {sorted(per_seed)} (--only: no aggregate)")
        return {"per_seed": per_seed}
    train_seeds = sorted(per_seed)
    for seed in train_seeds:  # read from the checkpoints (also for seeds finished by an earlier call)
        per_seed[seed].update(learned_cost_of(out / f"seed_{seed}"))
    returns = {n: np.array([per_seed[s]["evaluation"][n]["episode_returns"] for s in train_seeds])
               for n in LEARNED}
    returns["expert"] = np.tile(np.array(expert_eval["episode_returns"]), (len(train_seeds), 1))
    seed_means = {n: returns[n].mean(1) for n in LEARNED}
    k = len(train_seeds)
    summary = {n: {"mean_return": float(v.mean()),
                   "stderr_over_seeds": float(v.std(ddof=1) / np.sqrt(k)) if k > 1 else float("nan"),
                   "per_seed": v.tolist()} for n, v in seed_means.items()}
    summary["expert"] = {"mean_return": expert_eval["mean_return"], "stderr_over_seeds": 0.0,
                         "per_seed": [expert_eval["mean_return"]] * k}
    results = {
        "command": command, "env_id": ENV_ID, "task": task.to_dict(), "smoke": args.smoke,
        "data_seed": args.seed, "training_seeds": train_seeds, "eval_seeds": seeds,
        "expert": {"policy": "MPCPolicy(refine=False, sampler='cem')", "planner_seed": args.seed,
                   "horizon": args.horizon, "dataset_mean_return": float(-data.episode_costs.mean()),
                   "dataset_episodes": data.episodes, "evaluation": expert_eval},
        **settings,
        "summary": summary,
        "paired_differences": paired_differences(returns),
        "per_seed": {str(s): {k: v for k, v in per_seed[s].items() if k != "settings"} for s in train_seeds},
        "ifo_mpc_solves": sum(per_seed[s]["ifo_mpc_solves"] for s in train_seeds),
        "ifo_mpc_unconverged": sum(per_seed[s]["ifo_mpc_unconverged"] for s in train_seeds),
        "cpu_s_per_seed": [per_seed[s]["cpu_s"] for s in train_seeds],
        "wall_s_per_seed": [per_seed[s]["wall_s"] for s in train_seeds],
        "time_s": {"dataset": t_data, "total_this_call": time.perf_counter() - t_start},
        "threads": torch.get_num_threads(),
    }
    path = write_results(out, results)
    for name, d in results["paired_differences"].items():
        print(f"{name:>18s}: {d['mean']:+8.2f} ± {d['stderr_over_seeds']:.2f} (s.e. over {k} seeds; "
              f"{d['seeds_a_better']}/{k} seeds better)")
    print(f"-> {path}")
    return results


if __name__ == "__main__":
    main()
