"""``diffmpc expert`` (evaluate the cart-pole sampling expert) and ``diffmpc dataset`` (write its dataset)."""

from __future__ import annotations

import argparse
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

from agents.expert import PLANNERS, ExpertConfig


def _expert_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--env", default="diffmpc/CartPoleSwingUp-v0", help="Gymnasium env id")
    p.add_argument("--planner", choices=PLANNERS, default="rs",
                   help="rs: the paper's random shooting (default); cem: warm-started cross-entropy method")
    p.add_argument("--horizon", type=int, default=10)
    p.add_argument("--samples", type=int, default=None, help="particles (default: 1000 for rs, 500 for cem)")
    p.add_argument("--elites", type=int, default=50, help="CEM elites")
    p.add_argument("--iterations", type=int, default=5, help="CEM rounds")
    p.add_argument("--start-variance", type=float, default=0.04, help="x0 ~ N(0, v·I) (paper: 0.04, 0.08)")
    p.add_argument("--backend", choices=("eager", "compile"), default="eager",
                   help="compile: torch.compile the rollout (slow to compile, faster per action)")
    p.add_argument("--seed", type=int, default=0, help="episode i uses env/expert seed SEED + i")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")


def config_from_args(args: Any) -> ExpertConfig:
    """The :class:`agents.expert.ExpertConfig` of the parsed ``expert`` / ``dataset`` arguments."""
    samples = args.samples if args.samples is not None else (1000 if args.planner == "rs" else 500)
    return ExpertConfig(planner=args.planner, horizon=args.horizon, n_samples=samples,
                        n_elites=min(args.elites, samples), cem_iterations=args.iterations,
                        backend=args.backend)


def _check_plannable(env_id: str) -> None:
    """The sampling expert plans on the cart-pole's true model: refuse another env before any work."""
    import envs
    from diffmpc.errors import BadArgumentError

    if env_id != envs.CARTPOLE_ID:
        raise BadArgumentError(f"--env {env_id}: the sampling expert plans with the cart-pole's true model "
                               f"and cannot plan for it; use --env {envs.CARTPOLE_ID}, or write the dataset "
                               "from Python with any expert: agents.dataset.generate_dataset(path, "
                               "expert=..., env=...), e.g. an agents.MPCPolicy on a model of that env "
                               "(docs/own_env.md)")


def run_expert(args: Any) -> int:
    """``diffmpc expert``: evaluate the sampling expert over ``--episodes`` starts; results in ``--out``."""
    from agents.expert import SamplingExpert, evaluate_expert
    from diffmpc._checks import check_int
    from diffmpc.io import write_results

    check_int("--episodes", args.episodes, 1)
    _check_plannable(args.env)
    config = config_from_args(args)
    t0 = time.perf_counter()
    res = evaluate_expert(SamplingExpert(config), episodes=args.episodes, seed=args.seed,
                          start_variance=args.start_variance, env_id=args.env, progress=not args.no_progress)
    res.update(env=args.env, wall_time_s=time.perf_counter() - t0, command="expert")
    path = write_results(args.out, res)
    print(f"{config.planner} expert: mean episode cost {res['mean_cost']:.3f} ± {res['stderr']:.3f} (s.e.) "
          f"over "
          f"{args.episodes} episodes, {res['latency_median_ms']:.1f} ms/action (median) -> {path}")
    return 0


def run_dataset(args: Any) -> int:
    """``diffmpc dataset``: roll expert trajectories into a (resumable) dataset file under ``--out``."""
    from agents.dataset import generate_dataset
    from diffmpc._checks import check_int
    from diffmpc.io import write_results

    check_int("--episodes", args.episodes, 1)
    _check_plannable(args.env)
    config = config_from_args(args)
    out = Path(args.out)
    target = out / args.name
    t0 = time.perf_counter()
    data = generate_dataset(target, episodes=args.episodes, seed=args.seed,
                            start_variance=args.start_variance, config=config,
                            progress=not args.no_progress, resume=not args.no_resume,
                            env_id=args.env)
    costs = data.episode_costs
    res = {"command": "dataset", "path": str(target), "episodes": data.episodes, "steps": data.steps,
           "mean_cost": float(costs.mean()), "stderr": float(costs.std(ddof=1) / len(costs) ** 0.5)
           if len(costs) > 1 else float("nan"), "episode_costs": costs.tolist(), "seed": args.seed,
           "expert": asdict(config), "wall_time_s": time.perf_counter() - t0, "meta": data.meta}
    path = write_results(out, res)
    print(f"wrote {data.episodes} trajectories x {data.steps} steps to {target} (mean expert cost "
          f"{res['mean_cost']:.3f}) -> {path}")
    return 0


def register(subparsers: Any) -> None:
    """Add the ``expert`` and ``dataset`` subcommands."""
    p = subparsers.add_parser("expert", help="evaluate the cart-pole sampling-MPC expert",
                              description="Evaluate the random-shooting (paper) or CEM expert.")
    _expert_args(p)
    p.add_argument("--episodes", type=int, default=50)
    p.set_defaults(handler=run_expert)
    d = subparsers.add_parser("dataset", help="write the expert dataset (states only, + diagnostics)",
                              description="Roll expert trajectories, save them (format v1).")
    _expert_args(d)
    d.add_argument("--episodes", type=int, default=100, help="trajectories (the paper: 100 x 40 steps)")
    d.add_argument("--name", default="expert_cartpole.npz", help="file name under --out")
    d.add_argument("--no-resume", action="store_true", help="ignore a checkpoint from an interrupted run")
    d.set_defaults(handler=run_dataset)
