r"""Evaluation of cart-pole policies as in the paper's Table 2: average episode cost over 50 fixed starts.

The 50 initial states are drawn once from ``N(0, v·I)`` (``v = 0.04`` low, ``0.08`` high start variance) with
a fixed seed, and every policy is rolled out from the same states for 40 steps. Rollouts are batched over
the 50 starts with the very functions ``CartPoleSwingUp-v0.step`` uses (:func:`envs.cartpole_dynamics`,
:func:`envs.cartpole_cost` of the next state, actions clipped to [-1, 1]), so one episode here equals one
episode of the Gymnasium env from the same state (tested), at a fraction of the Python overhead.

A *policy* here is a batched callable ``x (B, 4) float64 -> u (B, 1)`` with an optional ``reset(seed)``;
:func:`expert_policy`, :func:`mpc_policy` and :class:`agents.bc.BCPolicy` are such policies.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
import torch
from torch import Tensor

__all__ = [
    "start_states",
    "rollout",
    "evaluate_policy",
    "expert_policy",
    "mpc_policy",
    "START_VARIANCES",
    "EVAL_EPISODES",
    "EVAL_SEED",
    "plot_trajectories",
    "render_comparison",
    "plot_state_trajectories",
    "record_side_by_side",
    "evaluate_in_env",
]

START_VARIANCES = {"low": 0.04, "high": 0.08}
EVAL_EPISODES = 50
EVAL_SEED = 2024  # the fixed seed of the 50 test starts (independent of every training seed)

Policy = Callable[[Tensor], Tensor]


def start_states(variance: float, n: int = EVAL_EPISODES, seed: int = EVAL_SEED) -> Tensor:
    """``n`` fixed initial states ``x₀ ~ N(0, variance·I)`` (float64 ``(n, 4)``), the same on every call."""
    if not variance > 0:
        raise ValueError(f"start variance must be positive, got {variance}")
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 4, generator=g, dtype=torch.float64) * variance**0.5


def rollout(policy: Policy, x0: Tensor, steps: int | None = None,
            device: str | torch.device | None = None) -> dict[str, Tensor]:
    """Roll ``policy`` from the starts ``x0 (B, 4)``: ``states (B, T+1, 4)``, ``actions (B, T, 1)``,
    ``costs (B, T)`` (cost of the state after each step, as the env's ``info["cost"]``) and
    ``episode_cost (B,)``. The rollout runs on ``device`` (default: ``x0``'s); the policy gets its
    observations there (move a learned policy's modules there first).
    """
    from envs import CARTPOLE_EPISODE_STEPS, cartpole_cost, cartpole_dynamics

    steps = CARTPOLE_EPISODE_STEPS if steps is None else steps
    x = torch.as_tensor(x0, dtype=torch.float64)
    x = x if device is None else x.to(device)
    if x.ndim != 2 or x.shape[1] != 4:
        raise ValueError(f"x0 must have shape (B, 4), got {tuple(x.shape)}")
    states, actions, costs = [x], [], []
    with torch.no_grad():
        for _ in range(steps):
            u = torch.as_tensor(policy(x)).to(x.device, torch.float64).reshape(x.shape[0], 1)
            if not bool(torch.isfinite(u).all()):  # one host sync per step: a NaN action is an error
                raise ValueError("the policy returned a NaN/inf action")
            u = u.clamp(-1.0, 1.0)
            x = cartpole_dynamics(x, u)
            states.append(x)
            actions.append(u)
            costs.append(cartpole_cost(x))
    c = torch.stack(costs, 1)
    return {
        "states": torch.stack(states, 1),
        "actions": torch.stack(actions, 1),
        "costs": c,
        "episode_cost": c.sum(1),
    }


def evaluate_policy(
    policy: Policy, variance: float, seed: int = 0, n: int = EVAL_EPISODES, start_seed: int = EVAL_SEED,
    device: str | torch.device | None = None,
) -> dict[str, Any]:
    """Mean episode cost (± standard error over the ``n`` starts) of ``policy`` from the fixed starts.

    ``seed`` reseeds a stochastic policy (sampling planners) through its ``reset(seed)``; the batched
    rollout runs on ``device`` (default CPU; the starts are drawn on the CPU, so they are the same).
    """
    import time

    if hasattr(policy, "reset"):
        policy.reset(seed)
    if hasattr(policy, "reset_counts"):
        policy.reset_counts()
    t0 = time.perf_counter()
    res = rollout(policy, start_states(variance, n, start_seed), device=device)
    ep = res["episode_cost"].cpu().numpy()
    return {
        "converged_fraction": getattr(policy, "converged_fraction", None),
        "variance": variance,
        "episodes": n,
        "mean_cost": float(ep.mean()),
        "stderr": float(ep.std(ddof=1) / np.sqrt(n)) if n > 1 else float("nan"),
        "episode_costs": ep.tolist(),
        "wall_time_s": time.perf_counter() - t0,
    }


def expert_policy(
    horizon: int = 10, n_samples: int = 1000, substeps: int = 4, planner: str = "rs",
    cem_iterations: int = 4,
) -> Any:
    """The cart-pole expert on the true model and cost, batched over B starts: an :class:`agents.MPCPolicy`
    with a sampling-only planner (seeded 0 unless :meth:`reset` is given a seed).

    ``planner="rs"`` is the paper's expert: random shooting (1000 plans, H = 10, no warm start) —
    :func:`agents.expert.sampling_expert` with ``ExpertConfig()``. ``planner="cem"`` is a stronger reference
    with the sampling budget MPC_IFT gets at test time (CEM ``n_samples`` × ``cem_iterations``, 10 % elites,
    warm-started by the shifted previous plan): it separates "the learner beats a noisy planner" from
    "the learner beats the true model".
    """
    from .expert import cartpole_plan_cost
    from .mpc_policy import MPCPolicy, SamplingPlanner

    if planner not in ("rs", "cem"):
        raise ValueError(f"unknown expert planner {planner!r}; use 'rs' (the paper's) or 'cem'")

    def plan_cost(x0: Tensor, u: Tensor) -> Tensor:
        return cartpole_plan_cost(x0, u, substeps=substeps)

    sampler = SamplingPlanner(plan_cost=plan_cost, horizon=horizon, u_low=-1.0, u_high=1.0, sampler=planner,
                              n_samples=n_samples, cem_iterations=cem_iterations, seed=0)
    return MPCPolicy(sampler, warm_start=planner == "cem", dtype=torch.float64, seed=0)


def mpc_policy(dynamics: torch.nn.Module, cost: torch.nn.Module, config: Any, task: Any = None,
               device: str | torch.device | None = None) -> Any:
    """MPC_IFT at test time: the learned model and cost in the MPC layer (sampler + Newton refinement, no
    gradients), an :class:`agents.MPCPolicy` warm-started by the shifted previous plan, at
    ``config.eval_dtype`` on ``device`` (default: the modules' own). Unconverged plans are counted
    (``converged_fraction``), not warned one by one."""
    import copy

    from .ifo import _DTYPES, make_mpc
    from .mpc_policy import MPCPolicy

    dtype = _DTYPES[config.eval_dtype]
    dyn = copy.deepcopy(dynamics).to(device=device, dtype=dtype).requires_grad_(False)
    cst = copy.deepcopy(cost).to(device=device, dtype=dtype).requires_grad_(False)
    mpc = make_mpc(dyn, cst, config, evaluation=True, seed=0, task=task)
    return MPCPolicy(mpc, dtype=dtype, seed=0, warn=False)


def plot_trajectories(rollouts: Mapping[str, Mapping[str, Tensor]], path: Any, index: int = 0) -> Any:
    """Fig. 3-style trajectory plot: pole angle θ and cart position x over time for each policy."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    from envs import DT

    fig, axes = plt.subplots(2, 1, figsize=(7, 5), sharex=True)
    for name, r in rollouts.items():
        s = r["states"][index].numpy()
        t = np.arange(s.shape[0]) * DT
        axes[0].plot(t, s[:, 2], label=name)
        axes[1].plot(t, s[:, 0], label=name)
    axes[0].axhline(np.pi, color="grey", lw=0.8, ls="--")
    axes[0].set_ylabel("pole angle θ [rad] (π = up)")
    axes[1].set_ylabel("cart position x [m]")
    axes[1].set_xlabel("time [s]")
    axes[0].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def plot_state_trajectories(trajectories: Mapping[str, Any], path: Any, dims: Any = None,
                            title: str | None = None) -> Any:
    """Any env's counterpart of :func:`plot_trajectories`: one panel per state/observation dimension (or
    the ``dims`` given), each policy's trajectory ``(T+1, n)`` over the steps; written to ``path``."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    arrays = {name: np.asarray(t, dtype=float).reshape(len(t), -1) for name, t in trajectories.items()}
    if not arrays:
        raise ValueError("plot_state_trajectories needs at least one trajectory")
    n = next(iter(arrays.values())).shape[1]
    dims = list(range(n)) if dims is None else [int(d) for d in dims]
    fig, axes = plt.subplots(len(dims), 1, figsize=(7, 1.8 * len(dims) + 0.8), sharex=True, squeeze=False)
    for ax, d in zip(axes[:, 0], dims, strict=True):
        for name, a in arrays.items():
            ax.plot(np.arange(len(a)), a[:, d], label=name)
        ax.set_ylabel(f"x[{d}]")
    axes[-1, 0].set_xlabel("step")
    axes[0, 0].legend(fontsize="small")
    if title:
        axes[0, 0].set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def render_comparison(
    rollouts: Mapping[str, Mapping[str, Tensor]],
    path: Any,
    index: int = 0,
    width: int = 320,
    height: int = 240,
) -> list[Any]:
    """Fig. 3 as a video: the same start rolled out by each policy, side by side and labelled (mp4 + gif)."""
    from envs import DT
    from envs.cartpole_swingup import draw_cartpole
    from envs.video import side_by_side

    frames = {}
    for name, r in rollouts.items():
        s, a = r["states"][index].numpy(), r["actions"][index, :, 0].numpy()
        acts = np.concatenate([[0.0], a])
        frames[name] = [draw_cartpole(s[t], float(acts[t]), width, height) for t in range(s.shape[0])]
    return side_by_side(frames, path, fps=1.0 / DT)


# ---------------------------------------------------------------------------------------------- any env
def numpy_policy(policy: Any) -> Callable[[np.ndarray], np.ndarray]:
    """``obs (B, n) -> action (B, m)`` in numpy for any policy: an object with ``act`` (e.g.
    :class:`agents.MPCPolicy`), a torch module / torch callable (``(B, n) -> (B, m)`` tensors), or a numpy
    callable."""
    if hasattr(policy, "act") and callable(policy.act):
        return policy.act
    if not callable(policy):
        raise TypeError(f"policy must be callable or have .act(obs), got {type(policy).__name__}")
    params = list(policy.parameters()) if isinstance(policy, torch.nn.Module) else []
    dtype = params[0].dtype if params else torch.float64

    def act(obs: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            out = policy(torch.as_tensor(np.asarray(obs), dtype=dtype))
        return out.detach().cpu().numpy() if isinstance(out, Tensor) else np.asarray(out)

    return act


def evaluate_in_env(policy: Any, env_id: str | Callable[[], Any], seeds: Any, max_steps: int | None = None,
                    progress: bool = False) -> dict[str, Any]:
    """Run ``policy`` on one episode per seed of any Gymnasium env, all seeds at once in a
    ``gymnasium.vector.SyncVectorEnv`` (the policy sees batched observations ``(B, n)``).

    ``env_id`` is a registered id or a zero-argument env factory. An episode's cost is the sum of
    ``info["cost"]`` where the env reports one, else of ``-reward``; its return is the sum of rewards; steps
    after an env's episode ended are ignored. ``policy.reset(seed)`` is called with the first seed. Returns
    mean/stderr of cost and return over the seeds, per-episode values, episode lengths, wall time and, for
    an :class:`agents.MPCPolicy`, the fraction of plans that met the layer's convergence test.
    """
    import time

    import gymnasium as gym
    from tqdm import tqdm

    seeds = [int(s) for s in seeds]
    if not seeds:
        raise ValueError("evaluate_in_env needs at least one seed")

    def make() -> Any:
        if callable(env_id):
            return env_id()
        import envs  # noqa: F401 - registers our envs

        return gym.make(env_id)

    venv = gym.vector.SyncVectorEnv([make for _ in seeds])
    act = numpy_policy(policy)
    if hasattr(policy, "reset"):
        policy.reset(seeds[0])
    if hasattr(policy, "reset_counts"):
        policy.reset_counts()
    B = len(seeds)
    cost, ret = np.zeros(B), np.zeros(B)
    length = np.zeros(B, dtype=int)
    alive = np.ones(B, dtype=bool)
    t0 = time.perf_counter()
    obs, _ = venv.reset(seed=seeds)
    limit = max_steps if max_steps is not None else venv.envs[0].spec.max_episode_steps
    if limit is None:
        raise ValueError("the env has no time limit (spec.max_episode_steps): pass max_steps")
    bar = tqdm(total=limit, desc="evaluation steps", disable=not progress, leave=False)
    while alive.any() and int(length.max()) < limit:
        a = np.asarray(act(obs), dtype=venv.single_action_space.dtype).reshape(B, -1)
        obs, reward, term, trunc, info = venv.step(a)
        c = np.asarray(info["cost"], dtype=float) if "cost" in info else -np.asarray(reward, dtype=float)
        cost += np.where(alive, c, 0.0)
        ret += np.where(alive, reward, 0.0)
        length += alive
        alive &= ~(np.asarray(term) | np.asarray(trunc))
        bar.update(1)
    bar.close()
    venv.close()

    def se(v: np.ndarray) -> float:
        return float(v.std(ddof=1) / np.sqrt(len(v))) if len(v) > 1 else float("nan")

    return {
        "env_id": env_id if isinstance(env_id, str) else None,
        "seeds": seeds,
        "mean_cost": float(cost.mean()), "stderr": se(cost), "episode_costs": cost.tolist(),
        "mean_return": float(ret.mean()), "return_stderr": se(ret), "episode_returns": ret.tolist(),
        "episode_lengths": length.tolist(),
        "converged_fraction": getattr(policy, "converged_fraction", None),
        "wall_time_s": time.perf_counter() - t0,
    }


def record_side_by_side(policies: Mapping[str, Any], env_id: str | Callable[[], Any], path: Any,
                        seed: int = 0, max_steps: int | None = None, fps: float | None = None,
                        rollouts: dict[str, dict[str, Any]] | None = None) -> list[Any]:
    """One episode per policy from the same seed of any env (``render_mode="rgb_array"``), written side by
    side and labelled with each episode's return (mp4 + gif, :func:`envs.video.side_by_side`); ``fps``
    defaults to the env's ``metadata["render_fps"]``. A dict passed as ``rollouts`` receives each policy's
    episode (the stats of :func:`envs.video.rollout_frames`: ``observations``, ``actions``, ``return``,
    ``steps``, ...)."""
    import gymnasium as gym

    from envs.video import rollout_frames, side_by_side

    frames: dict[str, list[np.ndarray]] = {}
    env_fps = None
    for name, policy in policies.items():
        env = env_id() if callable(env_id) else gym.make(env_id, render_mode="rgb_array")
        env_fps = env.metadata.get("render_fps")
        act = numpy_policy(policy)
        if hasattr(policy, "reset"):
            policy.reset(seed)

        def single(obs: np.ndarray, act: Any = act) -> np.ndarray:
            return np.asarray(act(np.asarray(obs)[None]))[0]

        f, stats = rollout_frames(env, single, seed=seed, max_steps=max_steps)
        env.close()
        frames[f"{name} (return {stats['return']:.0f})"] = f
        if rollouts is not None:
            rollouts[name] = stats
    return side_by_side(frames, path, fps=fps or env_fps)
