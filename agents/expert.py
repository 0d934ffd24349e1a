r"""Experts and episodes: the paper's cart-pole expert (Sec. 3.2) and the Gymnasium loop for any policy/env.

The cart-pole expert is an :class:`agents.MPCPolicy` configuration (a sampling-only planner, no gradient
refinement) on the *true* dynamics and cost: each step plans ``u_{0:H-1} = argmin Σ_{t=1}^{H} c(x_t)``
over ``x_{t+1} = F(x_t, u_t)`` (the env's
:func:`envs.cartpole_dynamics`, RK4 with 4 substeps, and :func:`envs.cartpole_cost`, both at float64) and
applies ``u_0`` (receding horizon). Planners:

* ``"rs"`` — the paper's expert: random shooting, 1000 plans uniform in ``[-1, 1]^{H}``, H = 10, no warm
  start (each step samples afresh). Paper-faithful; used for the paper's dataset.
* ``"cem"`` — a stronger planner on the same horizon and model: the cross-entropy method warm-started from
  the previous plan shifted by one step (:func:`diffmpc.sampling.cem`).

``backend="compile"`` wraps the batched rollout in ``torch.compile`` (one fused CPU kernel, minutes to compile
on a busy machine, then several times faster than eager); ``"eager"`` is the default.

:func:`run_episode` / :func:`evaluate_expert` run *any* policy (an ``MPCPolicy`` on a model you provide, or
any callable ``obs -> action``) in *any* Gymnasium env; the cost is ``info["cost"]`` where the env gives one,
else ``-reward``.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

from diffmpc._checks import check_fields, check_int

__all__ = ["ExpertConfig", "SamplingExpert", "sampling_expert", "evaluate_expert", "run_episode", "make_env",
           "PLANNERS"]

PLANNERS = ("rs", "cem")
_DTYPES = {"float64": torch.float64, "float32": torch.float32}


@dataclass(frozen=True)
class ExpertConfig:
    """Settings of :func:`sampling_expert` (defaults: the paper's RS expert)."""

    planner: str = "rs"
    horizon: int = 10
    n_samples: int = 1000
    n_elites: int = 50
    cem_iterations: int = 5
    cem_init_std: float = 0.5
    warm_start: bool | None = None  # None: off for "rs" (paper), on for "cem"
    dt: float = 0.1
    substeps: int = 4
    dtype: str = "float64"
    backend: str = "eager"

    def __post_init__(self) -> None:
        if self.planner not in PLANNERS:
            raise ValueError(f"unknown planner {self.planner!r}; choose one of {PLANNERS}")
        if self.horizon < 1 or self.n_samples < 1 or self.cem_iterations < 1 or self.substeps < 1:
            raise ValueError("horizon, n_samples, cem_iterations and substeps must be >= 1")
        if self.planner == "cem" and not 1 <= self.n_elites <= self.n_samples:
            raise ValueError(f"n_elites must be in [1, n_samples], got {self.n_elites}")
        if self.dtype not in _DTYPES:
            raise ValueError(f"dtype must be one of {sorted(_DTYPES)}, got {self.dtype!r}")
        if self.backend not in ("eager", "compile"):
            raise ValueError(f"backend must be 'eager' or 'compile', got {self.backend!r}")
        check_fields(self, positive=("dt", "cem_init_std"))

    @property
    def uses_warm_start(self) -> bool:
        return self.warm_start if self.warm_start is not None else self.planner != "rs"


def cartpole_plan_cost(x0: Tensor, u: Tensor, dt: float = 0.1, substeps: int = 4) -> Tensor:
    """``Σ_{t=1}^{H} c(x_t)`` of plans ``u (P, H, 1)`` from ``x0 (P, 4)`` on the true cart-pole model."""
    from envs import cartpole_cost, cartpole_dynamics

    x = x0
    total = x0.new_zeros(x0.shape[0])
    for t in range(u.shape[1]):
        x = cartpole_dynamics(x, u[:, t], dt=dt, substeps=substeps)
        total = total + cartpole_cost(x)
    return total


def sampling_expert(config: ExpertConfig | None = None, seed: int | None = None, plan_cost: Any = None,
                    u_low: Any = -1.0, u_high: Any = 1.0, action_space: Any = None) -> Any:
    """The sampling expert as an :class:`agents.MPCPolicy` configuration (``refine=False``).

    Default: the paper's cart-pole expert (``ExpertConfig()``: random shooting, 1000 plans, H = 10, no warm
    start, on the true model with 4 RK4 substeps). ``plan_cost`` (any ``(x0 (P, n), u (P, H, m)) -> (P,)``)
    plans on another model; ``u_low``/``u_high`` or ``action_space`` give its bounds. ``act(obs)`` returns a
    float32 numpy action; :meth:`reset` reseeds the sampler (deterministic under a seed). The returned
    policy carries the settings as ``policy.config``.
    """
    import gymnasium as gym

    from .mpc_policy import MPCPolicy, SamplingPlanner

    c = config or ExpertConfig()
    fn = plan_cost or (lambda x, u: cartpole_plan_cost(x, u, c.dt, c.substeps))
    if c.backend == "compile":
        fn = torch.compile(fn, dynamic=False)
    if action_space is None:
        low = np.broadcast_to(np.asarray(u_low, dtype=np.float32), np.shape(np.atleast_1d(u_high)))
        high = np.asarray(np.atleast_1d(u_high), dtype=np.float32)
        action_space = gym.spaces.Box(low, high, dtype=np.float32)
    planner = SamplingPlanner(plan_cost=fn, horizon=c.horizon, u_low=action_space.low.astype(np.float64),
                              u_high=action_space.high.astype(np.float64), sampler=c.planner,
                              n_samples=c.n_samples, n_elites=c.n_elites, cem_iterations=c.cem_iterations,
                              cem_init_std=c.cem_init_std, seed=seed)
    policy = MPCPolicy(planner, action_space=action_space, warm_start=c.uses_warm_start,
                       dtype=_DTYPES[c.dtype], seed=seed)
    policy.config = c
    return policy


SamplingExpert = sampling_expert  # the name of the former class; the expert is an MPCPolicy now


def run_episode(env: Any, policy: Any, seed: int, max_steps: int | None = None) -> dict[str, Any]:
    """One episode of any ``policy`` (a callable ``obs -> action`` or an object with ``act``; its
    ``reset(seed)`` is called first) in any Gymnasium ``env``, both seeded with ``seed``.

    The recorded state is ``info["state"]`` where the env provides it (exact float64 states of our envs),
    else the observation. The cost of a step is ``info["cost"]`` where present, else ``-reward``.
    Returns ``states (T+1, n)``, ``actions (T, m)``, ``costs (T,)``, ``rewards (T,)``, ``cost`` and
    ``return`` (their sums) and ``latencies`` (seconds per action).
    """
    act = policy.act if hasattr(policy, "act") else policy
    if not callable(act):
        raise TypeError(f"policy must be callable obs -> action or have .act(obs), got "
                        f"{type(policy).__name__}")
    obs, info = env.reset(seed=seed)
    if hasattr(policy, "reset"):
        policy.reset(seed=seed)
    state = info.get("state", obs)
    states, actions, costs, rewards, latencies = [np.asarray(state, dtype=np.float64)], [], [], [], []
    done = False
    while not done and (max_steps is None or len(actions) < max_steps):
        t0 = time.perf_counter()
        a = act(state)
        latencies.append(time.perf_counter() - t0)
        if hasattr(a, "detach"):
            a = a.detach().cpu().numpy()
        obs, reward, terminated, truncated, info = env.step(a)
        state = info.get("state", obs)
        rewards.append(float(reward))
        costs.append(float(info["cost"]) if "cost" in info else -float(reward))
        states.append(np.asarray(state, dtype=np.float64))
        actions.append(np.asarray(a, dtype=np.float64).reshape(-1))
        done = terminated or truncated
    return {"states": np.stack(states), "actions": np.stack(actions), "costs": np.asarray(costs),
            "rewards": np.asarray(rewards), "cost": float(np.sum(costs)), "return": float(np.sum(rewards)),
            "latencies": latencies}


def make_env(env_id: str | None = None, start_variance: float | None = None, **kwargs: Any) -> Any:
    """``gymnasium.make(env_id)`` for any registered id (default: the cart-pole swing-up; ``import envs``
    registers ours). ``start_variance`` is passed only when given (default 0.04 for the cart-pole)."""
    import gymnasium as gym

    import envs

    env_id = env_id or envs.CARTPOLE_ID
    if start_variance is None and env_id == envs.CARTPOLE_ID:
        start_variance = 0.04
    if start_variance is not None:
        kwargs["start_variance"] = start_variance
    try:
        return gym.make(env_id, **kwargs)
    except TypeError as err:
        if "start_variance" in kwargs and "start_variance" in str(err):
            raise ValueError(f"{env_id} does not take a start variance; leave start_variance unset") from err
        raise


def evaluate_expert(expert: Any, episodes: int = 50, seed: int = 0, start_variance: float | None = None,
                    env_id: str | None = None, progress: bool = True, env: Any = None) -> dict[str, Any]:
    """Run ``episodes`` episodes (env and expert seeds ``seed + i``) of any policy in any env.

    Returns mean episode cost (``info["cost"]``, else ``-reward``) and return, standard errors, per-episode
    values, per-action latency (median, mean) and, for an :class:`agents.MPCPolicy`, its converged fraction.
    """
    from tqdm import tqdm

    check_int("episodes", episodes, 1)  # the mean cost of zero episodes is NaN, not a result
    own = env is None
    env = make_env(env_id, start_variance) if own else env
    costs, returns, latencies = [], [], []
    bar = tqdm(range(episodes), desc="expert episodes", disable=not progress)
    for ep in bar:
        res = run_episode(env, expert, seed + ep)
        costs.append(res["cost"])
        returns.append(res["return"])
        latencies += res["latencies"]
        bar.set_postfix(mean_cost=f"{np.mean(costs):.2f}")
    if own:
        env.close()
    costs_a, returns_a = np.asarray(costs), np.asarray(returns)

    def se(a: np.ndarray) -> float:
        return float(a.std(ddof=1) / np.sqrt(len(a))) if len(a) > 1 else float("nan")

    cfg = getattr(expert, "config", None)
    return {
        "episodes": episodes, "seed": seed, "start_variance": start_variance,
        "env_id": env.spec.id if getattr(env, "spec", None) is not None else None,
        "mean_cost": float(costs_a.mean()), "stderr": se(costs_a), "episode_costs": costs_a.tolist(),
        "mean_return": float(returns_a.mean()), "return_stderr": se(returns_a),
        "episode_returns": returns_a.tolist(),
        "latency_median_ms": float(np.median(latencies) * 1e3),
        "latency_mean_ms": float(np.mean(latencies) * 1e3),
        "converged_fraction": getattr(expert, "converged_fraction", None),
        "config": asdict(cfg) if cfg is not None and hasattr(cfg, "__dataclass_fields__") else None,
    }
