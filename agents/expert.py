r"""The cart-pole expert of the paper (Sec. 3.2): sampling MPC on the *true* dynamics and cost.

Each step plans ``u_{0:H-1} = argmin Σ_{t=1}^{H} c(x_t)`` over ``x_{t+1} = F(x_t, u_t)`` (the env's
:func:`envs.cartpole_dynamics`, RK4 with 4 substeps, and :func:`envs.cartpole_cost`, both at float64) and
applies ``u_0`` (receding horizon). Planners:

* ``"rs"`` — the paper's expert: random shooting, 1000 plans uniform in ``[-1, 1]^{H}``, H = 10, no warm
  start (each step samples afresh). Paper-faithful; used for the paper's dataset.
* ``"cem"`` — a stronger planner on the same horizon and model: the cross-entropy method warm-started from
  the previous plan shifted by one step (:func:`diffmpc.sampling.cem`).

``backend="compile"`` wraps the batched rollout in ``torch.compile`` (one fused CPU kernel, minutes to compile
on a busy machine, then several times faster than eager); ``"eager"`` is the default.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

from diffmpc.sampling import cem, random_shooting, shift_plan

__all__ = ["ExpertConfig", "SamplingExpert", "evaluate_expert", "run_episode", "make_env", "PLANNERS"]

PLANNERS = ("rs", "cem")
_DTYPES = {"float64": torch.float64, "float32": torch.float32}


@dataclass(frozen=True)
class ExpertConfig:
    """Settings of :class:`SamplingExpert` (defaults: the paper's RS expert)."""

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


class SamplingExpert:
    """Receding-horizon sampling MPC on the true cart-pole model; ``act(obs) -> action`` (numpy, (1,)).

    ``plan_cost`` can be replaced (any ``(x0 (P, n), u (P, H, m)) -> (P,)``) to plan on another model.
    Deterministic under a seed: :meth:`reset` reseeds the sampler.
    """

    def __init__(self, config: ExpertConfig | None = None, seed: int | None = None, plan_cost: Any = None,
                 u_low: float = -1.0, u_high: float = 1.0) -> None:
        self.config = config or ExpertConfig()
        c = self.config
        self.dtype = _DTYPES[c.dtype]
        fn = plan_cost or (lambda x, u: cartpole_plan_cost(x, u, c.dt, c.substeps))
        self.plan_cost = torch.compile(fn, dynamic=False) if c.backend == "compile" else fn
        self.low = torch.tensor([u_low], dtype=self.dtype)
        self.high = torch.tensor([u_high], dtype=self.dtype)
        self.generator = torch.Generator()
        self._seed = seed
        self._plan: Tensor | None = None
        self.last_cost: float | None = None
        self.reset(seed)

    def reset(self, seed: int | None = None) -> None:
        """Forget the warm start and reseed (``seed=None`` keeps the constructor's seed, or draws one)."""
        seed = seed if seed is not None else self._seed
        if seed is None:
            self.generator.seed()
        else:
            self.generator.manual_seed(int(seed))
        self._plan = None

    def plan(self, obs: Any) -> Tensor:
        """The best plan ``(H, 1)`` found from ``obs`` (also stored for the warm start)."""
        c = self.config
        x0 = torch.as_tensor(np.asarray(obs), dtype=self.dtype).reshape(1, -1)
        if not bool(torch.isfinite(x0).all()):
            raise ValueError(f"observation must be finite, got {x0.tolist()}")
        warm = shift_plan(self._plan).unsqueeze(0) if (c.uses_warm_start and self._plan is not None) else None
        with torch.no_grad():
            if c.planner == "rs":
                u, cost = random_shooting(self.plan_cost, x0, c.horizon, self.low, self.high, c.n_samples,
                                          u_init=warm, generator=self.generator)
            else:
                u, cost = cem(self.plan_cost, x0, c.horizon, self.low, self.high, c.n_samples, c.n_elites,
                              c.cem_iterations, init_std=c.cem_init_std, u_init=warm,
                              generator=self.generator)
        self._plan = u[0]
        self.last_cost = float(cost[0])
        return u[0]

    def act(self, obs: Any) -> np.ndarray:
        return self.plan(obs)[0].numpy().astype(np.float32)

    __call__ = act


def run_episode(env: Any, expert: Any, seed: int) -> dict[str, Any]:
    """One episode: env and expert both seeded with ``seed``; exact float64 states from ``info["state"]``.

    Returns ``states (T+1, 4)``, ``actions (T, 1)``, ``costs (T,)`` (``info["cost"]``), ``cost`` (their sum)
    and ``latencies`` (seconds per action).
    """
    obs, info = env.reset(seed=seed)
    expert.reset(seed=seed)
    state = info.get("state", obs)
    states, actions, costs, latencies = [np.asarray(state, dtype=np.float64)], [], [], []
    done = False
    while not done:
        t0 = time.perf_counter()
        a = expert.act(state)
        latencies.append(time.perf_counter() - t0)
        obs, _, terminated, truncated, info = env.step(a)
        state = info.get("state", obs)
        costs.append(float(info["cost"]))
        states.append(np.asarray(state, dtype=np.float64))
        actions.append(np.asarray(a, dtype=np.float64).reshape(-1))
        done = terminated or truncated
    return {"states": np.stack(states), "actions": np.stack(actions), "costs": np.asarray(costs),
            "cost": float(np.sum(costs)), "latencies": latencies}


def make_env(start_variance: float = 0.04, env_id: str | None = None, **kwargs: Any) -> Any:
    """``gymnasium.make`` of the cart-pole swing-up (``import envs`` registers it)."""
    import gymnasium as gym

    import envs

    return gym.make(env_id or envs.CARTPOLE_ID, start_variance=start_variance, **kwargs)


def evaluate_expert(expert: Any, episodes: int = 50, seed: int = 0, start_variance: float = 0.04,
                    env_id: str | None = None, progress: bool = True) -> dict[str, Any]:
    """Run ``episodes`` episodes (env and expert seeds ``seed + i``) and sum ``info["cost"]`` per episode.

    Returns mean episode cost, its standard error, per-episode costs and per-action latency (median, mean).
    """
    from tqdm import tqdm

    env = make_env(start_variance, env_id)
    costs, latencies = [], []
    bar = tqdm(range(episodes), desc="expert episodes", disable=not progress)
    for ep in bar:
        res = run_episode(env, expert, seed + ep)
        costs.append(res["cost"])
        latencies += res["latencies"]
        bar.set_postfix(mean_cost=f"{np.mean(costs):.2f}")
    env.close()
    costs_a = np.asarray(costs)
    return {
        "episodes": episodes, "seed": seed, "start_variance": start_variance,
        "mean_cost": float(costs_a.mean()),
        "stderr": float(costs_a.std(ddof=1) / np.sqrt(len(costs_a))) if len(costs_a) > 1 else float("nan"),
        "episode_costs": costs_a.tolist(),
        "latency_median_ms": float(np.median(latencies) * 1e3),
        "latency_mean_ms": float(np.mean(latencies) * 1e3),
        "config": asdict(expert.config) if hasattr(expert, "config") else None,
    }
