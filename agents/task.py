"""What an imitation learner must know about an environment, as plain data (recorded in every checkpoint).

A :class:`Task` holds the state and action dimensions, the action bounds, which state dimensions are
angles, and (optionally) the env id. The learners build everything dimension-dependent from it: the
feature map ``φ(x)`` (:class:`diffmpc.nn.AngleFeatures`: each declared angle → ``(sin, cos)``), the learned
dynamics and cost, the policies, the random simulator queries. Nothing here assumes the cart-pole; the
cart-pole is :data:`CARTPOLE`.

Declaring angles: ``Task.from_env("diffmpc/CartPoleSwingUp-v0", angle_dims=[2])`` ("dimension 2 is an
angle"); an observation that already embeds its angle, like ``Pendulum-v1``'s ``(cos θ, sin θ, θ̇)``, has
no raw angle; declare its ``(cos, sin)`` pair instead: ``Task.from_env("Pendulum-v1", circle_dims=[(0, 1)])``.

The simulator query ``F(x (N, n), u (N, m)) -> x' (N, n)`` (a batched torch function) is *not* data: pass
it to the trainer. :func:`simulator_for` returns the fast batched one for our envs, or steps the env
itself when it can be set to a state (``reset(options={"state": x})``), and otherwise says to pass one.
From the command line it is ``--simulator module:function`` (:func:`import_simulator`).

Env ids read from files (dataset metadata, checkpoints) are never of Gymnasium's ``module:EnvId`` form:
``gymnasium.make`` would import ``module``, and a file must not choose code to run (:func:`recorded_env_id`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

from diffmpc.errors import BadArgumentError

__all__ = ["Task", "TaskError", "CARTPOLE", "simulator_for", "env_simulator", "Simulator", "import_simulator",
           "recorded_env_id", "make_env_by_id", "SIMULATOR_HINT"]

Simulator = Callable[[Tensor, Tensor], Tensor]


class TaskError(BadArgumentError):
    """The environment, data or simulator do not fit the task (dimensions, bounds, settable state)."""


# How to pass the simulator query, in every message that asks for one (Python API and command line).
SIMULATOR_HINT = ("pass a simulator: a batched torch function F(x (N, n), u (N, m)) -> x' (N, n) (Python: "
                  "simulator=F; command line: --simulator module:function)")


@dataclass(frozen=True)
class Task:
    """State/action dimensions, action box and angle dimensions of an environment (see module docstring)."""

    state_dim: int
    action_dim: int
    u_low: tuple[float, ...]
    u_high: tuple[float, ...]
    angle_dims: tuple[int, ...] = ()
    env_id: str | None = None
    # Pairs (i, j) of observation dims that hold (cos φ, sin φ) of one angle φ (Pendulum-v1: ((0, 1),)). The
    # learned cost then keeps its target for the pair on the unit circle and gives the pair one weight: two
    # free weights/targets would let the cost vary non-monotonically along the circle (see agents.ifo).
    circle_dims: tuple[tuple[int, int], ...] = ()

    def __post_init__(self) -> None:
        if self.state_dim < 1 or self.action_dim < 1:
            raise TaskError(f"state_dim and action_dim must be >= 1, got {self.state_dim}, {self.action_dim}")
        low = tuple(float(v) for v in np.broadcast_to(self.u_low, (self.action_dim,)))
        high = tuple(float(v) for v in np.broadcast_to(self.u_high, (self.action_dim,)))
        if not all(np.isfinite(low + high)) or not all(a < b for a, b in zip(low, high, strict=True)):
            raise TaskError(f"the action bounds must be finite with u_low < u_high, got {low}, {high}")
        angles = tuple(int(i) for i in self.angle_dims)
        if len(set(angles)) != len(angles) or any(not 0 <= i < self.state_dim for i in angles):
            raise TaskError(f"angle_dims {angles} must be distinct indices in [0, {self.state_dim})")
        pairs = _index_pairs(self.circle_dims)
        flat = [k for pair in pairs for k in pair]
        outside = sorted({k for k in flat if not 0 <= k < self.state_dim})
        if outside:
            raise TaskError(f"circle_dims {pairs}: index {outside[0]} is out of range; a state of dimension "
                            f"{self.state_dim} has indices 0 … {self.state_dim - 1}")
        repeated = sorted({k for k in flat if flat.count(k) > 1})
        if repeated:
            raise TaskError(f"circle_dims {pairs}: index {repeated[0]} appears more than once; each "
                            "(cos, sin) pair needs two dimensions of its own")
        if pairs and angles:
            raise TaskError("declare angles either as angle_dims (raw angles) or as circle_dims ((cos, sin) "
                            "pairs), not both")
        if self.env_id is not None:
            object.__setattr__(self, "env_id", recorded_env_id(self.env_id, "the task"))
        object.__setattr__(self, "circle_dims", pairs)
        object.__setattr__(self, "u_low", low)
        object.__setattr__(self, "u_high", high)
        object.__setattr__(self, "angle_dims", angles)

    @property
    def feature_dim(self) -> int:
        """Length of ``φ(x)``: each angle becomes two features."""
        return self.state_dim + len(self.angle_dims)

    def features(self) -> Any:
        """The feature map ``φ`` (:class:`diffmpc.nn.AngleFeatures`)."""
        from diffmpc.nn import AngleFeatures

        return AngleFeatures(self.state_dim, self.angle_dims)

    def bounds(self, dtype: torch.dtype = torch.float64) -> tuple[Tensor, Tensor]:
        """``(u_low, u_high)`` as ``(m,)`` tensors."""
        return torch.tensor(self.u_low, dtype=dtype), torch.tensor(self.u_high, dtype=dtype)

    def sample_actions(self, n: int, generator: torch.Generator, dtype: torch.dtype) -> Tensor:
        """``n`` controls uniform in the box ``(n, m)``."""
        low, high = self.bounds(dtype)
        return low + (high - low) * torch.rand(n, self.action_dim, generator=generator, dtype=dtype)

    def check_states(self, *arrays: Tensor, what: str = "expert states") -> None:
        """Raise :class:`TaskError` unless every array is a finite ``(N, state_dim)`` tensor."""
        for a in arrays:
            if a.ndim != 2 or a.shape[1] != self.state_dim:
                raise TaskError(f"{what} must be (N, {self.state_dim}) arrays (state_dim of the task "
                                f"{self.env_id or ''}), got shape {tuple(a.shape)}")
            if not bool(torch.isfinite(a).all()):
                raise TaskError(f"{what} contain NaN or inf")

    def to_dict(self) -> dict[str, Any]:
        """Plain data (JSON / ``weights_only`` checkpoints)."""
        return {"state_dim": self.state_dim, "action_dim": self.action_dim, "u_low": list(self.u_low),
                "u_high": list(self.u_high), "angle_dims": list(self.angle_dims), "env_id": self.env_id,
                "circle_dims": [list(p) for p in self.circle_dims]}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Task:
        """Inverse of :meth:`to_dict`; a malformed entry raises :class:`TaskError`."""
        try:
            return cls(int(d["state_dim"]), int(d["action_dim"]), tuple(d["u_low"]), tuple(d["u_high"]),
                       tuple(d.get("angle_dims", ())), d.get("env_id"),
                       tuple(tuple(p) for p in d.get("circle_dims", ())))
        except (KeyError, TypeError) as err:
            raise TaskError(f"not a task description: {d!r} ({err})") from err

    @classmethod
    def from_env(cls, env: Any, angle_dims: Sequence[int] = (), state_dim: int | None = None,
                 circle_dims: Sequence[Sequence[int]] = ()) -> Task:
        """The task of a Gymnasium env (an instance, or a registered id): dimensions and bounds from its
        spaces (a vector env's ``single_*`` spaces). ``state_dim`` overrides the observation size when the
        recorded state is not the observation (our envs' ``info["state"]``)."""
        import gymnasium as gym

        own = isinstance(env, str)
        e = make_env_by_id(env) if own else env
        try:
            obs_space = getattr(e, "single_observation_space", e.observation_space)
            act_space = getattr(e, "single_action_space", e.action_space)
            if not isinstance(act_space, gym.spaces.Box) or len(act_space.shape) != 1:
                raise TaskError(f"the env needs a flat continuous Box action space, got {act_space}")
            if state_dim is None:
                if not isinstance(obs_space, gym.spaces.Box) or len(obs_space.shape) != 1:
                    raise TaskError(f"the env needs a flat Box observation space, got {obs_space}")
                state_dim = int(obs_space.shape[0])
            spec = getattr(e, "spec", None)  # its id: a registered id (``module:`` prefix stripped)
            env_id = spec.id if spec is not None else None
            return cls(state_dim, int(act_space.shape[0]), tuple(act_space.low.tolist()),
                       tuple(act_space.high.tolist()), tuple(angle_dims), env_id,
                       circle_dims)  # validated by __post_init__
        finally:
            if own:
                e.close()


def _index_pairs(pairs: Any) -> tuple[tuple[int, int], ...]:
    """``[(i, j), ...]`` as a tuple of int pairs; anything else raises :class:`TaskError`."""
    try:
        out = tuple(tuple(int(k) for k in p) for p in pairs)
    except (TypeError, ValueError) as err:
        raise TaskError(f"circle_dims must be (cos, sin) index pairs like [(0, 1)], got {pairs!r}") from err
    bad = [p for p in out if len(p) != 2]
    if bad:
        raise TaskError(f"circle_dims must be (cos, sin) index pairs like [(0, 1)], got {bad[0]} "
                        f"({len(bad[0])} indices)")
    return out  # type: ignore[return-value]


def recorded_env_id(env_id: Any, source: str) -> str:
    """``env_id`` as read from ``source`` (a dataset's metadata, a checkpoint), checked to be a plain id.

    Gymnasium's ``module:EnvId`` form makes ``gymnasium.make`` import ``module``: fine on the user's own
    command line (it is their code), never for a name found in a file. Raises :class:`TaskError` naming the
    id and the source."""
    if not isinstance(env_id, str) or not env_id.strip():
        raise TaskError(f"{source} records no valid env id, got {env_id!r}")
    if ":" in env_id:
        raise TaskError(f"{source} records the env id {env_id!r}, which names a module to import; an env id "
                        "read from a file must be a registered id like 'Pendulum-v1' (the module part is "
                        "not imported)")
    return env_id


def make_env_by_id(env_id: str, **kwargs: Any) -> Any:
    """``gymnasium.make(env_id)`` after registering our envs; an id Gymnasium does not know raises
    :class:`TaskError` naming it (register your env first: import the module that calls
    ``gymnasium.register``, e.g. through ``--simulator module:function`` or ``--env module:EnvId``)."""
    import gymnasium as gym

    import envs  # noqa: F401 - registers our envs

    try:
        return gym.make(env_id, **kwargs)
    except gym.error.UnregisteredEnv as err:  # NameNotFound, VersionNotFound, NamespaceNotFound, ...
        raise TaskError(f"env {env_id!r} is not registered in this process ({err}); import the module that "
                        "registers it (gymnasium.register) first, e.g. pass its id as module:EnvId on the "
                        "command line") from err


def import_simulator(spec: str) -> Simulator:
    """The simulator query named by ``spec = "module:function"`` (the command line's ``--simulator``): a
    batched torch function ``F(x (N, n), u (N, m)) -> x' (N, n)``; see :func:`import_callable`."""
    return import_callable(spec, "--simulator", "a callable F(x, u) -> x'",
                           "examples.pendulum_ifo:pendulum_step")


def import_callable(spec: str, flag: str, what: str, example: str) -> Any:
    """The callable named by ``spec = "module:function"`` on the command line (``flag``, e.g. ``--simulator``,
    ``--expert``), in the style of ``python -m`` / uvicorn's ``module:app``: ``module`` is imported with the
    current directory on ``sys.path`` (as ``python -m`` puts it there), ``function`` may be a dotted
    attribute path, and the result must be callable (``what`` it should be, ``example`` a valid spec, both
    for the messages).

    Only for names the user typed: never call it with a name read from a file. A missing colon, a module that
    is not found, a missing attribute or a non-callable raise :class:`TaskError` naming the problem; an
    exception raised by the module's own code while importing it propagates unchanged (a bug in it, with its
    traceback)."""
    import importlib
    import os
    import sys

    module_name, colon, attr = (spec or "").partition(":")
    module_name, attr = module_name.strip(), attr.strip()
    if not colon or not module_name or not attr:
        raise TaskError(f"{flag} {spec!r} is not of the form module:function (e.g. {example})")
    if os.getcwd() not in sys.path and "" not in sys.path:  # the console script lacks it; python -m has it
        sys.path.insert(0, os.getcwd())
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as err:
        if err.name is not None and (module_name == err.name or module_name.startswith(err.name + ".")):
            raise TaskError(f"{flag} {spec!r}: module {module_name!r} not found (searched the current "
                            f"directory {os.getcwd()} and the installed packages)") from err
        raise TaskError(f"{flag} {spec!r}: importing {module_name!r} failed: {err}") from err
    obj: Any = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise TaskError(f"{flag} {spec!r}: module {module_name!r} has no attribute {attr!r}")
        obj = getattr(obj, part)
    if not callable(obj):
        raise TaskError(f"{flag} {spec!r} is a {type(obj).__name__}, not {what}")
    return obj


def _cartpole() -> Task:
    import envs

    return Task(4, 1, (-1.0,), (1.0,), (2,), envs.CARTPOLE_ID)


CARTPOLE = _cartpole()


def _cartpole_simulator(x: Tensor, u: Tensor) -> Tensor:
    from envs import cartpole_dynamics

    with torch.no_grad():
        return cartpole_dynamics(x, u)


def env_simulator(env: Any) -> Simulator:
    """A batched simulator query that steps ``env`` itself: for each row, ``reset(options={"state": x})`` then
    ``step(u)``; the next state is ``info["state"]`` (else the observation). Slow (one Python step per
    query) but exact. Raises :class:`TaskError` when the env cannot be set to a state."""
    e = make_env_by_id(env) if isinstance(env, str) else env
    name = e.spec.id if getattr(e, "spec", None) is not None else type(e.unwrapped).__name__
    probe = None
    try:
        _, info = e.reset(seed=0)
        probe = np.asarray(info.get("state", _), dtype=np.float64)
        _, info2 = e.reset(options={"state": probe})
        back = np.asarray(info2.get("state", _), dtype=np.float64)
        settable = back.shape == probe.shape and np.allclose(back, probe, atol=1e-6)
    except Exception:  # noqa: BLE001 - any failure means: cannot be set to a state
        settable = False
    if not settable:
        raise TaskError(
            f"{name} cannot be set to a state (reset(options={{'state': x}}) is not supported), so the "
            f"learner cannot query it at the expert's states; {SIMULATOR_HINT}")

    def simulate(x: Tensor, u: Tensor) -> Tensor:
        out = []
        for xi, ui in zip(x.detach().cpu().numpy(), u.detach().cpu().numpy(), strict=True):
            e.reset(options={"state": xi})
            obs, _, _, _, info = e.step(ui.astype(e.action_space.dtype))
            out.append(np.asarray(info.get("state", obs), dtype=np.float64))
        return torch.as_tensor(np.stack(out), dtype=x.dtype, device=x.device)

    return simulate


def simulator_for(task: Task, simulator: Simulator | None = None) -> Simulator:
    """``simulator`` if given; the batched true dynamics for the cart-pole; else :func:`env_simulator` on the
    task's env (which raises when that env cannot be set to a state)."""
    if simulator is not None:
        if not callable(simulator):
            raise TaskError(f"simulator must be a callable F(x, u) -> x', got {type(simulator).__name__}")
        return simulator
    import envs

    if task.env_id == envs.CARTPOLE_ID and task.state_dim == 4:
        return _cartpole_simulator
    if task.env_id is None:
        raise TaskError(f"the task names no env; {SIMULATOR_HINT}")
    return env_simulator(task.env_id)
