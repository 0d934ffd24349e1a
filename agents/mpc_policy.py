"""``MPCPolicy``: the differentiable MPC layer as a Gymnasium-friendly agent (receding horizon).

At each step the policy solves the horizon problem of :class:`diffmpc.MPC` from the observed state and applies
the first control ``u*_0``. The previous plan, shifted by one step, warm-starts the next solve.

* ``act(obs)`` with a numpy observation ``(n,)`` or a batch ``(B, n)`` (``gymnasium.vector`` envs) returns a
  numpy action ``(m,)`` / ``(B, m)`` of the action space's dtype, clipped into the space. No autograd.
* ``act(obs)`` with a torch tensor returns a torch action that is differentiable w.r.t. the observation and
  the parameters of the dynamics and cost (IFT backward), for training.
* ``reset(seed=None)`` forgets the warm start and reseeds the sampler: same seed, same actions.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import Tensor

from diffmpc.mpc import MPC, MPCInfo
from diffmpc.sampling import shift_plan

__all__ = ["MPCPolicy"]


class MPCPolicy:
    """Receding-horizon agent around an :class:`diffmpc.MPC` layer.

    Args:
        mpc: the layer; or give ``dynamics``, ``cost``, ``horizon``, ``u_low``, ``u_high`` (and any
            :class:`diffmpc.MPC` keyword in ``mpc_kwargs``) to build one.
        action_space: optional ``gymnasium.spaces.Box``; numpy actions are clipped into it and cast to its
            dtype. Its bounds are also the default ``u_low``/``u_high`` when building the layer.
        warm_start: reuse the shifted previous plan as the sampler's extra candidate.
        dtype: dtype of the tensors numpy observations are converted to (default: the layer's parameters'
            dtype, else float64).
        seed: seed of the sampler (reset with :meth:`reset`).
    """

    def __init__(self, mpc: MPC | None = None, *, dynamics: Any = None, cost: Any = None,
                 horizon: int | None = None, u_low: Any = None, u_high: Any = None, action_space: Any = None,
                 warm_start: bool = True, dtype: torch.dtype | None = None, seed: int | None = None,
                 **mpc_kwargs: Any) -> None:
        if mpc is None:
            if dynamics is None or cost is None or horizon is None:
                raise ValueError("give an MPC layer, or dynamics, cost and horizon to build one")
            if u_low is None and action_space is not None:
                u_low, u_high = action_space.low, action_space.high
            mpc = MPC(dynamics, cost, horizon, u_low, u_high, seed=seed, **mpc_kwargs)
        elif not isinstance(mpc, MPC):
            raise TypeError(f"mpc must be a diffmpc.MPC, got {type(mpc).__name__}")
        self.mpc = mpc
        self.action_space = action_space
        self.warm_start = warm_start
        if dtype is None:
            p = next(iter(mpc.parameters()), None)
            dtype = p.dtype if p is not None else torch.float64
        self.dtype = dtype
        self._seed = seed
        self._plan: Tensor | None = None
        self.last_info: MPCInfo | None = None
        self.reset(seed)

    def reset(self, seed: int | None = None) -> None:
        """Forget the warm start; reseed the sampler (``seed=None`` keeps the constructor's seed)."""
        self._plan = None
        self.last_info = None
        self.mpc.seed(seed if seed is not None else self._seed)

    @property
    def plan(self) -> Tensor | None:
        """The last solved plan ``(B, H, m)`` (detached), or ``None`` after :meth:`reset`."""
        return self._plan

    def _warm(self, batch: int, like: Tensor) -> Tensor | None:
        if not self.warm_start or self._plan is None or self._plan.shape[0] != batch:
            return None
        return shift_plan(self._plan).to(like)

    def act(self, obs: Any) -> Any:
        """First control of the MPC plan for ``obs`` ``(n,)`` or ``(B, n)`` (see module docstring)."""
        if isinstance(obs, Tensor):
            x = obs if obs.is_floating_point() else obs.to(self.dtype)
            xb = x.unsqueeze(0) if x.ndim == 1 else x
            u, info = self.mpc(xb, self._warm(xb.shape[0], xb))
            self._remember(u, info)
            return u[0, 0] if x.ndim == 1 else u[:, 0]
        x = torch.as_tensor(np.asarray(obs), dtype=self.dtype)
        if x.ndim not in (1, 2):
            raise ValueError(f"observation must have shape (n,) or (B, n), got {tuple(x.shape)}")
        xb = x.unsqueeze(0) if x.ndim == 1 else x
        with torch.no_grad():
            u, info = self.mpc(xb, self._warm(xb.shape[0], xb))
        self._remember(u, info)
        a = u[:, 0].cpu().numpy()
        a = a[0] if x.ndim == 1 else a
        if self.action_space is not None:
            a = np.clip(a, self.action_space.low, self.action_space.high).astype(self.action_space.dtype)
        return a

    __call__ = act

    def _remember(self, u: Tensor, info: MPCInfo) -> None:
        self._plan = u.detach()
        self.last_info = info
