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
    p.add_argument("--expert", default=None, metavar="MODULE:FUNCTION",
                   help="your expert for any env: FUNCTION(env) returns a policy (an agents.MPCPolicy on "
                        "your model, or any callable obs -> action), imported with the current directory on "
                        "the path, e.g. examples.pendulum_ifo:make_expert; default: the cart-pole sampling "
                        "expert below")
    cartpole = p.add_argument_group("the built-in cart-pole sampling expert (not with --expert)")
    cartpole.add_argument("--planner", choices=PLANNERS, default=None,
                          help="rs: the paper's random shooting (default); cem: warm-started cross-entropy "
                               "method")
    cartpole.add_argument("--horizon", type=int, default=None, help="default 10")
    cartpole.add_argument("--samples", type=int, default=None,
                          help="particles (default: 1000 for rs, 500 for cem)")
    cartpole.add_argument("--elites", type=int, default=None, help="CEM elites (default 50)")
    cartpole.add_argument("--iterations", type=int, default=None, help="CEM rounds (default 5)")
    cartpole.add_argument("--start-variance", type=float, default=None,
                          help="x0 ~ N(0, v·I) (default 0.04; paper: 0.04, 0.08)")
    cartpole.add_argument("--backend", choices=("eager", "compile"), default=None,
                          help="compile: torch.compile the rollout (slow to compile, faster per action)")
    p.add_argument("--seed", type=int, default=0, help="episode i uses env/expert seed SEED + i")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")


_CARTPOLE_FLAGS = ("planner", "horizon", "samples", "elites", "iterations", "start_variance", "backend")


def config_from_args(args: Any) -> ExpertConfig:
    """The :class:`agents.expert.ExpertConfig` of the parsed ``expert`` / ``dataset`` arguments (a flag not
    given: the config's default; ``--samples``: 1000 for rs, 500 for cem)."""
    from dataclasses import replace

    planner = args.planner or ExpertConfig.planner
    samples = args.samples if args.samples is not None else (1000 if planner == "rs" else 500)
    elites = min(ExpertConfig.n_elites if args.elites is None else args.elites, samples)
    given = {"horizon": args.horizon, "cem_iterations": args.iterations, "backend": args.backend}
    return replace(ExpertConfig(), planner=planner, n_samples=samples, n_elites=elites,
                   **{k: v for k, v in given.items() if v is not None})


def _user_expert(args: Any) -> Any:
    """``--expert module:function``: the env (``--env``, any registered id) and ``function(env)``, the
    policy; ``None`` without ``--expert`` (the cart-pole sampling expert, which plans on the cart-pole's
    true model only: another env is refused before any work, naming the flag that is missing)."""
    import envs
    from agents.expert import make_env
    from agents.task import import_callable
    from diffmpc.errors import BadArgumentError

    if args.expert is None:
        if args.env != envs.CARTPOLE_ID:
            raise BadArgumentError(
                f"--env {args.env}: the built-in sampling expert plans with the cart-pole's true model and "
                f"cannot plan for it; pass your expert: --expert module:function, where function(env) "
                "returns a policy (e.g. examples.pendulum_ifo:make_expert; docs/own_env.md)")
        return None
    given = [f"--{k.replace('_', '-')}" for k in _CARTPOLE_FLAGS if getattr(args, k) is not None]
    if given:
        raise BadArgumentError(f"{', '.join(given)} configure the built-in cart-pole expert, not --expert "
                               f"{args.expert}; set your expert's options in its function")
    factory = import_callable(args.expert, "--expert", "a function env -> policy",
                              "examples.pendulum_ifo:make_expert")
    env = make_env(args.env)
    policy = factory(env)
    if not callable(policy) and not hasattr(policy, "act"):
        raise BadArgumentError(f"--expert {args.expert} returned a {type(policy).__name__}, not a policy (an "
                               "agents.MPCPolicy or a callable obs -> action)")
    return env, policy


def run_expert(args: Any) -> int:
    """``diffmpc expert``: evaluate the sampling expert over ``--episodes`` starts; results in ``--out``."""
    from agents.expert import SamplingExpert, evaluate_expert
    from diffmpc._checks import check_int
    from diffmpc.io import write_results

    check_int("--episodes", args.episodes, 1)
    user = _user_expert(args)
    t0 = time.perf_counter()
    if user is None:
        config = config_from_args(args)
        name = config.planner
        res = evaluate_expert(SamplingExpert(config), episodes=args.episodes, seed=args.seed,
                              start_variance=args.start_variance, env_id=args.env,
                              progress=not args.no_progress)
    else:
        name = args.expert
        res = evaluate_expert(user[1], episodes=args.episodes, seed=args.seed, env=user[0],
                              progress=not args.no_progress)
        user[0].close()
    res.update(env=args.env, expert=args.expert, wall_time_s=time.perf_counter() - t0, command="expert")
    path = write_results(args.out, res)
    print(f"{name} expert: mean episode cost {res['mean_cost']:.3f} ± {res['stderr']:.3f} (s.e.) "
          f"over "
          f"{args.episodes} episodes, {res['latency_median_ms']:.1f} ms/action (median) -> {path}")
    return 0


def run_dataset(args: Any) -> int:
    """``diffmpc dataset``: roll expert trajectories into a (resumable) dataset file under ``--out``."""
    from agents.dataset import generate_dataset
    from diffmpc._checks import check_int
    from diffmpc.io import write_results

    check_int("--episodes", args.episodes, 1)
    check_int("--max-steps", args.max_steps, 1, allow_none=True)
    user = _user_expert(args)
    out = Path(args.out)
    target = out / (args.name or ("expert_cartpole.npz" if user is None else "expert.npz"))
    t0 = time.perf_counter()
    if user is None:
        config = config_from_args(args)
        data = generate_dataset(target, episodes=args.episodes, seed=args.seed,
                                start_variance=args.start_variance, config=config,
                                progress=not args.no_progress, resume=not args.no_resume,
                                env_id=args.env, max_steps=args.max_steps)
    else:
        config = None
        data = generate_dataset(target, episodes=args.episodes, seed=args.seed, expert=user[1], env=user[0],
                                progress=not args.no_progress, resume=not args.no_resume,
                                max_steps=args.max_steps, expert_spec=args.expert)
        user[0].close()
    costs = data.episode_costs
    res = {"command": "dataset", "path": str(target), "episodes": data.episodes, "steps": data.steps,
           "mean_cost": float(costs.mean()), "stderr": float(costs.std(ddof=1) / len(costs) ** 0.5)
           if len(costs) > 1 else float("nan"), "episode_costs": costs.tolist(), "seed": args.seed,
           "expert": asdict(config) if config is not None else args.expert,
           "wall_time_s": time.perf_counter() - t0, "meta": data.meta}
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
    d.add_argument("--name", default=None,
                   help="file name under --out (default: expert_cartpole.npz, with --expert expert.npz)")
    d.add_argument("--max-steps", type=int, default=None,
                   help="cut every episode after N steps (default: the env's time limit)")
    d.add_argument("--no-resume", action="store_true", help="ignore a checkpoint from an interrupted run")
    d.set_defaults(handler=run_dataset)
