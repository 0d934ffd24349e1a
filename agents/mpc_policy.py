"""``MPCPolicy``: the one receding-horizon agent (the differentiable MPC layer, or a sampling-only planner).

At each step the policy solves the horizon problem from the observed state and applies the first control
``u*_0``; the previous plan, shifted by one step, warm-starts the next solve. The planner is

* a :class:`diffmpc.MPC` layer (sampler + gradient refinement to a converged optimum; differentiable), or
* a :class:`SamplingPlanner` (``refine=False``): random shooting or CEM only — the paper's cart-pole expert
  (:func:`agents.expert.sampling_expert`) is this configuration. It has no gradients and no convergence test.

Interface (one implementation of warm start, shift and reseed for every agent in :mod:`agents`):

* ``act(obs)`` with a numpy observation ``(n,)`` or a batch ``(B, n)`` (``gymnasium.vector`` envs) returns a
  numpy action ``(m,)`` / ``(B, m)`` of the action space's dtype, clipped into the space. No autograd.
* ``act(obs)`` with a torch tensor returns a torch action; with an MPC layer it is differentiable w.r.t. the
  observation and the parameters of the dynamics and cost (IFT backward), for training.
* ``reset(seed=None)`` forgets the warm start and reseeds the sampler: same seed, same actions.
* ``solves`` / ``converged_solves`` count the plans solved and how many met the layer's convergence test;
  a plan that did not converge warns (:class:`diffmpc.ConvergenceWarning`) with its residual unless
  ``warn=False`` — it is counted either way.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

from diffmpc import ConvergenceWarning
from diffmpc.mpc import MPC
from diffmpc.sampling import cem, random_shooting, shift_plan

__all__ = ["MPCPolicy", "SamplingPlanner", "SamplingInfo", "action_space_of"]

SAMPLERS = ("rs", "cem")


def action_space_of(env_or_space: Any) -> Any:
    """The per-environment action ``Box`` of an env, a vector env (``single_action_space``) or a space.

    A batched space (``gymnasium.vector``'s ``action_space``, shape ``(num_envs, m)``) is rejected: it would
    silently build a ``num_envs·m``-dimensional control.
    """
    import gymnasium as gym

    space = env_or_space
    if hasattr(env_or_space, "single_action_space"):
        space = env_or_space.single_action_space
    elif hasattr(env_or_space, "action_space") and not isinstance(env_or_space, gym.Space):
        space = env_or_space.action_space
    if not isinstance(space, gym.spaces.Box):
        raise TypeError(f"MPCPolicy needs a continuous gymnasium.spaces.Box action space, got {space!r}")
    if len(space.shape) != 1:
        raise ValueError(
            f"the action space has shape {space.shape}; MPCPolicy needs a flat Box (m,). For a vector env "
            "pass the env itself or env.single_action_space, not env.action_space (the batched space)")
    if not (np.all(np.isfinite(space.low)) and np.all(np.isfinite(space.high))):
        raise ValueError(f"the action space {space} is unbounded; pass u_low/u_high to MPCPolicy")
    return space


@dataclass
class SamplingInfo:
    """Diagnostics of a sampling-only plan: its horizon cost per sample ``(B,)``. A sampled plan is not a
    solution of an optimality condition, so there is no convergence test (``converged`` is ``None``)."""

    cost: Tensor
    converged: None = None


class SamplingPlanner:
    """Receding-horizon sampling planner over box-bounded plans, with the call contract of
    :class:`diffmpc.MPC`: ``u_plan (B, H, m), info = planner(x0 (B, n), u_init=None)``.

    The horizon cost is ``plan_cost(x0, u) -> (P,)`` if given, else that of an ``MPC`` over ``dynamics`` and
    ``cost`` (same cost convention: a state-only ``c(x)`` is charged at the next state). ``sampler="rs"``:
    ``n_samples`` plans uniform in the box, keep the cheapest; ``"cem"``: the cross-entropy method
    (:func:`diffmpc.sampling.cem`). A warm start is always one of the candidates.
    """

    def __init__(self, dynamics: Any = None, cost: Any = None, horizon: int = 10, u_low: Any = -1.0,
                 u_high: Any = 1.0, *, plan_cost: Any = None, sampler: str = "rs", n_samples: int = 1000,
                 n_elites: int | None = None, cem_iterations: int = 5, cem_init_std: float | None = None,
                 seed: int | None = None) -> None:
        if sampler not in SAMPLERS:
            raise ValueError(f"unknown sampler {sampler!r}; choose one of {SAMPLERS}")
        if not isinstance(horizon, int) or horizon < 1 or n_samples < 1 or cem_iterations < 1:
            raise ValueError("horizon, n_samples and cem_iterations must be positive ints")
        low = torch.as_tensor(u_low, dtype=torch.float64).flatten()
        high = torch.as_tensor(u_high, dtype=torch.float64).flatten()
        m = max(low.numel(), high.numel())
        self.low, self.high = low.expand(m).clone(), high.expand(m).clone()
        if not bool((self.low < self.high).all()):
            raise ValueError(f"u_low must be below u_high, got {self.low.tolist()}, {self.high.tolist()}")
        if plan_cost is None:
            if dynamics is None or cost is None:
                raise ValueError("SamplingPlanner needs plan_cost, or dynamics and cost")
            plan_cost = MPC(dynamics, cost, horizon, self.low, self.high, sampler=None).horizon_cost
        self.plan_cost = plan_cost
        self.horizon, self.action_dim, self.sampler = horizon, m, sampler
        self.n_samples, self.cem_iterations, self.cem_init_std = n_samples, cem_iterations, cem_init_std
        self.n_elites = n_elites if n_elites is not None else max(1, n_samples // 10)
        if sampler == "cem" and not 1 <= self.n_elites <= n_samples:
            raise ValueError(f"n_elites must be in [1, n_samples], got {self.n_elites}")
        self.generator = torch.Generator()
        self.seed(seed)

    def seed(self, seed: int | None) -> None:
        """Reseed the sampler (``None``: a fresh random seed)."""
        if seed is None:
            self.generator.seed()
        else:
            self.generator.manual_seed(int(seed))

    def parameters(self):
        """No learnable parameters (``MPCPolicy`` infers its dtype from them)."""
        return iter(())

    @torch.no_grad()
    def __call__(self, x0: Tensor, u_init: Tensor | None = None) -> tuple[Tensor, SamplingInfo]:
        if x0.ndim != 2:
            raise ValueError(f"x0 must have shape (B, n), got {tuple(x0.shape)}")
        if not bool(torch.isfinite(x0).all()):
            raise ValueError(f"observation must be finite, got {x0.tolist()}")
        low, high = self.low.to(x0), self.high.to(x0)
        if x0.shape[0] == 0:  # empty batch: an empty plan, as torch ops do for empty tensors
            return x0.new_zeros(0, self.horizon, low.shape[-1]), SamplingInfo(cost=x0.new_zeros(0))
        if x0.device != self.generator.device:  # sample where the observations are, from the same seed
            self.generator = torch.Generator(device=x0.device).manual_seed(self.generator.initial_seed())
        if self.sampler == "rs":
            u, c = random_shooting(self.plan_cost, x0, self.horizon, low, high, self.n_samples, u_init,
                                   self.generator)
        else:
            u, c = cem(self.plan_cost, x0, self.horizon, low, high, self.n_samples, self.n_elites,
                       self.cem_iterations, init_std=self.cem_init_std, u_init=u_init,
                       generator=self.generator)
        return u, SamplingInfo(cost=c)


class MPCPolicy:
    """The receding-horizon agent: an :class:`diffmpc.MPC` layer or a :class:`SamplingPlanner` in a loop.

    Args:
        mpc: the planner (an ``MPC`` layer or a ``SamplingPlanner``); or give ``dynamics``, ``cost``,
            ``horizon`` and the bounds (``u_low``/``u_high``, or ``action_space``/``env``) to build one:
            an ``MPC`` with any :class:`diffmpc.MPC` keyword in ``mpc_kwargs``, or with ``refine=False`` a
            ``SamplingPlanner`` (keywords ``sampler``, ``n_samples``, ``n_elites``, ``cem_iterations``, ...).
        env: a Gymnasium env or vector env whose (single) action space is used (see ``action_space``).
        action_space: a flat ``Box`` ``(m,)``; numpy actions are clipped into it and cast to its dtype, and
            its bounds are the default ``u_low``/``u_high``. A vector env's batched space is rejected.
        warm_start: reuse the shifted previous plan as the solver's starting candidate.
        dtype: dtype of the tensors observations are converted to (default: the layer's parameters'
            dtype, else float64).
        seed: seed of the sampler (reset with :meth:`reset`).
        warn: warn (``ConvergenceWarning``) for each plan that did not converge; counted either way.
    """

    def __init__(self, mpc: Any = None, *, dynamics: Any = None, cost: Any = None,
                 horizon: int | None = None, u_low: Any = None, u_high: Any = None, env: Any = None,
                 action_space: Any = None, refine: bool = True, warm_start: bool = True,
                 dtype: torch.dtype | None = None, seed: int | None = None, warn: bool = True,
                 **mpc_kwargs: Any) -> None:
        if env is not None:
            if action_space is not None:
                raise ValueError("give env or action_space, not both")
            action_space = action_space_of(env)
        elif action_space is not None:
            action_space = action_space_of(action_space)
        if mpc is None:
            if dynamics is None or cost is None or horizon is None:
                raise ValueError("give an MPC layer, or dynamics, cost and horizon to build one")
            if u_low is None and action_space is not None:
                u_low, u_high = action_space.low, action_space.high
            if refine:
                mpc = MPC(dynamics, cost, horizon, u_low, u_high, seed=seed, **mpc_kwargs)
            else:
                if u_low is None:
                    raise ValueError("a sampling planner needs bounds: pass u_low/u_high or action_space")
                mpc = SamplingPlanner(dynamics, cost, horizon, u_low, u_high, seed=seed, **mpc_kwargs)
        elif not isinstance(mpc, (MPC, SamplingPlanner)):
            raise TypeError(f"mpc must be a diffmpc.MPC or an agents.SamplingPlanner, got "
                            f"{type(mpc).__name__}")
        if action_space is not None and action_space.shape[0] != mpc.action_dim:
            raise ValueError(f"the action space has {action_space.shape[0]} dimensions but the planner plans "
                             f"{mpc.action_dim}")
        self.mpc = mpc
        self.action_space = action_space
        self.warm_start = warm_start
        self.warn = warn
        p = next(iter(mpc.parameters()), None)
        if dtype is None:
            dtype = p.dtype if p is not None else torch.float64
        self.dtype = dtype
        # numpy observations go to the device of the planner's parameters (tensors keep their own device)
        self.device = p.device if p is not None else torch.device("cpu")
        self._seed = seed
        self._plan: Tensor | None = None
        self.last_info: Any = None
        self.solves = 0
        self.converged_solves = 0
        self.reset(seed)

    @property
    def differentiable(self) -> bool:
        """True when the planner is an MPC layer (torch actions carry IFT gradients)."""
        return isinstance(self.mpc, MPC)

    def reset(self, seed: int | None = None) -> None:
        """Forget the warm start; reseed the sampler (``seed=None`` keeps the constructor's seed)."""
        self._plan = None
        self.last_info = None
        self.mpc.seed(seed if seed is not None else self._seed)

    @property
    def plan(self) -> Tensor | None:
        """The last solved plan ``(B, H, m)`` (detached), or ``None`` after :meth:`reset`."""
        return self._plan

    @property
    def converged_fraction(self) -> float | None:
        """Fraction of solved plans that met the layer's convergence test (``None``: none counted)."""
        return self.converged_solves / self.solves if self.solves else None

    def reset_counts(self) -> None:
        """Zero :attr:`solves` and :attr:`converged_solves` (e.g. before an evaluation)."""
        self.solves = self.converged_solves = 0

    def _warm(self, batch: int, like: Tensor) -> Tensor | None:
        if not self.warm_start or self._plan is None or self._plan.shape[0] != batch:
            return None
        return shift_plan(self._plan).to(like)

    def _solve(self, xb: Tensor) -> tuple[Tensor, Any]:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", ConvergenceWarning)
            u, info = self.mpc(xb, self._warm(xb.shape[0], xb))
        for w in caught:  # the layer's own messages are replaced by the count below; others pass through
            if not issubclass(w.category, ConvergenceWarning):
                warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
        self._plan = u.detach()
        self.last_info = info
        conv = getattr(info, "converged", None)
        if conv is not None:
            ok = torch.as_tensor(conv).reshape(-1)
            self.solves += ok.numel()
            self.converged_solves += int(ok.sum())
            if self.warn and not bool(ok.all()):
                res = getattr(info, "stationarity_residual", None)
                worst = "" if res is None else f" (largest residual {float(torch.as_tensor(res).max()):.3g})"
                grad = (" Its IFT gradient is not valid there." if torch.is_grad_enabled() and u.requires_grad
                        else "")
                warnings.warn(
                    f"MPCPolicy: {int((~ok).sum())} of {ok.numel()} plans did not meet the MPC layer's "
                    f"convergence test{worst}; the action is the first control of the best plan found.{grad} "
                    "Raise the layer's max_iter, a larger n_samples, or keep warm_start=True. "
                    f"So far {self.solves - self.converged_solves} of {self.solves} plans unconverged.",
                    ConvergenceWarning, stacklevel=3)
        return u, info

    def act(self, obs: Any) -> Any:
        """First control of the plan for ``obs`` ``(n,)`` or ``(B, n)`` (see module docstring)."""
        if isinstance(obs, Tensor):
            x = obs.to(self.dtype)
            if x.ndim not in (1, 2):
                raise ValueError(f"observation must have shape (n,) or (B, n), got {tuple(x.shape)}")
            xb = x.unsqueeze(0) if x.ndim == 1 else x
            u, _ = self._solve(xb)
            return u[0, 0] if x.ndim == 1 else u[:, 0]
        x = torch.as_tensor(np.asarray(obs), dtype=self.dtype).to(self.device)
        if x.ndim not in (1, 2):
            raise ValueError(f"observation must have shape (n,) or (B, n), got {tuple(x.shape)}")
        xb = x.unsqueeze(0) if x.ndim == 1 else x
        with torch.no_grad():
            u, _ = self._solve(xb)
        a = u[:, 0].cpu().numpy()
        a = a[0] if x.ndim == 1 else a
        if self.action_space is not None:
            a = np.clip(a, self.action_space.low, self.action_space.high).astype(self.action_space.dtype)
        return a

    __call__ = act
