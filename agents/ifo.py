r"""Imitation from observation with the differentiable MPC layer (paper Alg. 2, Sec. 3.2).

The learner sees expert *states only* — consecutive pairs ``(x, x')`` — and may query the simulator
``x' = F(x, u)`` at states and controls of its choice, without knowing its equations. It learns

* a neural dynamics model ``h(x, u; θ_h)`` (:class:`diffmpc.nn.MLPDynamics` on angle features) by regression
  on triplets ``(x, u, F(x, u))`` with ``x`` drawn from the expert states and ``u ~ U(u_low, u_high)``;
* a cost ``c(x; θ_c)`` (:class:`diffmpc.nn.TargetStateCost`: a learnable target ``φ̄`` in the feature
  space ``φ(x)`` — for the cart-pole ``(x, ẋ, θ̇, sin θ, cos θ)`` — and learnable, normalised weights;
  for an observation with ``(cos, sin)`` pairs, ``task.circle_dims``, :class:`CircleTargetCost` keeps each
  pair's target on the unit circle with one weight)
  *through the MPC layer*: for a batch of expert pairs, ``u*(x) = MPC(x; θ_h, θ_c)`` (Eq. 5, solved to a
  stationary point), ``x̂ = h(x, u*_0)`` and

  .. math::  L(θ_c) = \frac{1}{|B|} \sum_{(x, x') ∈ B} \lVert (x' − h(x, u^*_0(x; θ_c))) ⊘ σ \rVert^2

  (σ: the per-dimension scale of the state increments), differentiated by the implicit function theorem
  (Eqs. 2–3; CG on Hessian-vector products) with ``θ_h`` frozen.

Alg. 2 alternates the two: every iteration queries ``dyn_queries_per_iter`` new triplets into the replay
buffer, takes ``dyn_steps_per_iter`` Adam steps on the dynamics, then one Adam step on the cost. Choices
beyond the paper (see :class:`IfOConfig`): a dynamics warm-up before the first cost step (the cost gradient
through a random model is noise); samples whose MPC solve did not reach ``‖∇J‖ ≤ tol`` are left out of the
cost loss (the IFT gradient does not hold there) and their fraction is logged; the horizon curriculum grows
H linearly from 1 to ``horizon`` over ``curriculum_iters`` iterations (paper: "start at 1, grow").

Any environment: the :class:`agents.task.Task` (state/action dims, action box, angle dimensions, env id)
sizes every module and is stored in the checkpoint; the simulator query is any batched torch function
``F(x, u)`` (or the env itself when it can be set to a state, :func:`agents.task.simulator_for`). The
default task is the cart-pole (:data:`agents.task.CARTPOLE`).

Everything random comes from one ``torch.Generator`` saved in the checkpoint, and the MPC sampler is reseeded
every iteration, so ``resume`` reproduces an uninterrupted run exactly (same machine, same thread count).
"""

from __future__ import annotations

import copy
import dataclasses
import math
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
from torch import Tensor

from diffmpc._checks import check_choice, check_fields
from diffmpc.errors import BadArgumentError
from diffmpc.io import CheckpointError, check_state_dict
from diffmpc.mpc import MPC
from diffmpc.nn import MLPDynamics, TargetStateCost
from diffmpc.sweep import report

from .task import CARTPOLE, Simulator, Task, simulator_for
from .training import load_checkpoint, quiet_convergence_warnings, save_checkpoint

__all__ = [
    "IfOConfig",
    "IfOTrainer",
    "IFO_PRESETS",
    "make_dynamics",
    "make_cost",
    "CircleTargetCost",
    "make_mpc",
    "cartpole_simulator",
    "load_ifo_models",
    "load_ifo_checkpoint",
    "IfOModels",
    "normalized_error",
]

_DTYPES = {"float64": torch.float64, "float32": torch.float32}
_SELECT_LAST = 10  # cost iterations averaged by IfOTrainer.selection_loss
_RESTART_SEED_STRIDE = 1_000_003  # restart r's generator: seed + stride * r (and its MPC sampler seeds)


@dataclass(frozen=True)
class IfOConfig:
    """Settings of :class:`IfOTrainer` (defaults: the ``"quick"`` preset; see :data:`IFO_PRESETS`)."""

    # learned dynamics h(x, u; θ_h)
    hidden: tuple[int, ...] = (128, 128)
    dyn_lr: float = 3e-3
    dyn_batch: int = 256
    warmup_queries: int = 20000  # simulator queries before the first cost step
    warmup_steps: int = 2500  # Adam steps of the warm-up (cosine-decayed learning rate)
    dyn_queries_per_iter: int = 64  # Alg. 2: new triplets per iteration
    dyn_steps_per_iter: int = 5
    # learned cost c(x; θ_c) trained through the MPC layer
    iterations: int = 100
    cost_batch: int = 64
    cost_lr: float = 0.05
    target_init_std: float = 0.1  # θ_c init: target ~ N(0, std²) in feature space, uniform weights
    # "random": the target above (an angle of a (cos, sin) pair: uniform); "expert_mean": the target starts at
    # the mean of the expert's states (in feature space; a (cos, sin) pair: the direction of its mean)
    cost_init: str = "random"
    # Restarts of the alternation (Alg. 2 after the warm-up), the one with the lowest final training
    # imitation loss kept (see IfOTrainer.run). Restart 0 is the run of cost_restarts=1; restart r >= 1 starts
    # from the same warmed-up model and cost init, perturbed by N(0, restart_init_std^2) on every cost
    # parameter, with its own generator (seed + 1_000_003 r) for queries, batches and MPC samples.
    cost_restarts: int = 1
    restart_init_std: float = 0.1
    # the angle term of a declared (cos, sin) pair (task.circle_dims; see CircleTargetCost): "chord", the
    # squared chord 2 (1 - cos(φ - φ̄)) (smooth, saturates at 4 opposite the target), or "geodesic", the
    # squared wrapped angle (φ - φ̄)² on (-π, π] (grows to π² opposite the target; kink there)
    circle_distance: str = "chord"
    # the MPC layer used for training (forward: sampler + Newton refinement; backward: IFT with CG)
    horizon: int = 10
    curriculum_iters: int = 50  # H grows linearly from 1 to `horizon` over these iterations
    sampler: str = "cem"
    n_samples: int = 100
    cem_iterations: int = 3
    newton_iters: int = 20
    tol: float = 1e-6
    dtype: str = "float64"
    # the MPC policy at evaluation time (no gradients: a stronger planner, float32)
    eval_samples: int = 200
    eval_cem_iterations: int = 4
    eval_newton_iters: int = 5
    eval_dtype: str = "float32"
    checkpoint_every: int = 25

    def __post_init__(self) -> None:
        if self.dtype not in _DTYPES or self.eval_dtype not in _DTYPES:
            raise BadArgumentError(f"dtype and eval_dtype must be one of {sorted(_DTYPES)}, got "
                                   f"{self.dtype!r}, {self.eval_dtype!r}")
        positive = (
            "dyn_batch",
            "warmup_queries",
            "iterations",
            "cost_batch",
            "horizon",
            "n_samples",
            "newton_iters",
            "eval_samples",
            "checkpoint_every",
            "curriculum_iters",
            "cost_restarts",
        )
        bad = [k for k in positive if getattr(self, k) < 1]
        if bad:
            raise BadArgumentError(f"these settings must be >= 1: {bad}")
        check_fields(self, ints=positive + ("cem_iterations", "eval_cem_iterations"),
                     nonneg_ints=("warmup_steps", "dyn_queries_per_iter", "dyn_steps_per_iter",
                                  "eval_newton_iters"),
                     positive=("dyn_lr", "cost_lr", "tol"), nonneg=("target_init_std", "restart_init_std"))
        check_choice("IfOConfig.sampler", self.sampler, ("cem", "rs", None))
        check_choice("IfOConfig.cost_init", self.cost_init, ("random", "expert_mean"))
        check_choice("IfOConfig.circle_distance", self.circle_distance, ("chord", "geodesic"))
        if not all(isinstance(h, int) and h >= 1 for h in self.hidden):
            raise BadArgumentError(f"IfOConfig.hidden must be layer widths >= 1, got {self.hidden!r}")

    def horizon_at(self, iteration: int) -> int:
        """The curriculum: ``H = 1`` at iteration 0, growing linearly to ``horizon``."""
        return min(self.horizon, 1 + (self.horizon * iteration) // self.curriculum_iters)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["hidden"] = list(self.hidden)
        if self.cost_restarts == 1:  # without restarts: the dict (and checkpoints, results) of before them
            del d["cost_restarts"], d["restart_init_std"]
        if self.circle_distance == "chord":  # the dict (and checkpoints, results) of before the option
            del d["circle_distance"]
        return d

    def with_overrides(self, items: Sequence[str]) -> IfOConfig:
        """This config with ``KEY=VALUE`` overrides (the command line's ``train ifo --set``), each value
        parsed by the field's type: ``horizon=20``, ``cost_lr=0.02``, ``hidden=64,64``, ``sampler=none``,
        ``circle_distance=geodesic``; then validated like any config. Unknown keys and unparsable values
        raise :class:`~diffmpc.errors.BadArgumentError` naming them."""
        fields = {f.name: f for f in dataclasses.fields(self)}
        changes: dict[str, Any] = {}
        for item in items:
            key, sep, text = item.partition("=")
            key = key.strip().replace("-", "_")
            if not sep or key not in fields:
                raise BadArgumentError(f"--set {item!r}: expected KEY=VALUE with KEY one of the IfOConfig "
                                       f"fields {sorted(fields)}")
            current = getattr(self, key)
            try:
                if key == "hidden":
                    value: Any = tuple(int(t) for t in text.split(",") if t.strip())
                elif key == "sampler":
                    value = None if text.lower() == "none" else text
                elif isinstance(current, int):
                    value = int(text)
                elif isinstance(current, float):
                    value = float(text)
                else:
                    value = text
            except ValueError:
                raise BadArgumentError(f"--set {item!r}: {text!r} is not a valid {type(current).__name__} "
                                       f"for {key}") from None
            changes[key] = value
        return dataclasses.replace(self, **changes)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> IfOConfig:
        d = {k: v for k, v in d.items() if k not in _LEGACY_KEYS}
        d["hidden"] = tuple(d.get("hidden", cls.hidden))
        return cls(**d)


_LEGACY_KEYS = ("u_low", "u_high")  # bounds moved into the Task (checkpoints before issue 15)

IFO_PRESETS: dict[str, IfOConfig] = {
    "quick": IfOConfig(),
    "paper": IfOConfig(
        warmup_queries=40000,
        warmup_steps=6000,
        iterations=300,
        cost_batch=128,
        curriculum_iters=100,
        n_samples=300,
        cem_iterations=4,
        newton_iters=100,  # at H = 10 Newton needs ~30 iterations on average, some up to ~200
        eval_samples=500,
        eval_cem_iterations=5,
        eval_newton_iters=10,
    ),
    # for tests: seconds, not minutes
    "tiny": IfOConfig(
        hidden=(32, 32),
        warmup_queries=2000,
        warmup_steps=200,
        dyn_queries_per_iter=32,
        dyn_steps_per_iter=2,
        iterations=6,
        cost_batch=16,
        horizon=3,
        curriculum_iters=3,
        n_samples=32,
        cem_iterations=2,
        newton_iters=10,
        eval_samples=32,
        eval_cem_iterations=2,
        eval_newton_iters=2,
        checkpoint_every=2,
    ),
}


def cartpole_simulator(x: Tensor, u: Tensor) -> Tensor:
    """Query the cart-pole simulator in a batch: the function ``CartPoleSwingUp-v0.step`` integrates.

    The learner only calls it (``x (N, 4), u (N, 1) -> x' (N, 4)``), as it would call ``env.step`` after
    setting the state; it never differentiates it or reads its equations.
    """
    return simulator_for(CARTPOLE)(x, u)


def make_dynamics(cfg: IfOConfig, task: Task | None = None) -> MLPDynamics:
    """The learned model: residual tanh MLP on ``(φ(x), u)`` (cart-pole: ``(x, ẋ, θ̇, sin θ, cos θ, u)``)."""
    task = task or CARTPOLE
    return MLPDynamics(task.state_dim, task.action_dim, hidden=cfg.hidden, features=task.features()).to(
        _DTYPES[cfg.dtype])


class CircleTargetCost(torch.nn.Module):
    r"""State-only cost for observations that embed angles as ``(cos φ, sin φ)`` pairs (``task.circle_dims``):

    ``c(x) = Σ_p w_p ‖(x_i, x_j)_p − (cos φ̄_p, sin φ̄_p)‖² + Σ_k w_k (x_k − x̄_k)²``,

    on a valid observation the pair term is ``2 w_p (1 − cos(φ − φ̄_p))``: monotone in ``|φ − φ̄_p|``. The
    target of a pair is an angle (a valid point of the circle) and the pair has one weight. With a free
    target ``(c̄, s̄)`` and two weights (:class:`diffmpc.nn.TargetStateCost` on the raw observation) the pair
    term is ``(w_c − w_s) cos²φ − 2 (w_c c̄ cos φ + w_s s̄ sin φ) + const``: ``w_s > w_c`` adds a local
    minimum at the opposite point, and a short target ``|(c̄, s̄)| < 1`` weakens the angle against the other
    terms. Weights ``w = G·softmax(w_raw)`` over the ``G`` groups (as ``normalize_weights=True``).
    ``target`` and ``weights`` are exposed per observation dim, like :class:`TargetStateCost`'s.

    ``distance="geodesic"`` replaces the pair term by ``w_p wrap(φ − φ̄_p)²`` with ``φ = atan2(x_j, x_i)`` and
    ``wrap`` onto ``(−π, π]``: the squared arc length, quadratic in the angle error everywhere instead of
    saturating (``2 (1 − cos δ) ≈ δ²`` only near the target), e.g. Pendulum-v1's own ``θ²`` reward term. Its
    gradient jumps at the point opposite the target (a measure-zero set the MPC plans pass through, not
    stop at)."""

    def __init__(self, state_dim: int, circle_dims: tuple[tuple[int, int], ...], angle: Tensor,
                 plain_target: Tensor, distance: str = "chord") -> None:
        super().__init__()
        check_choice("CircleTargetCost distance", distance, ("chord", "geodesic"))
        self.distance = distance
        self.state_dim = state_dim
        self.circle_dims = tuple(tuple(p) for p in circle_dims)
        paired = {k for p in self.circle_dims for k in p}
        self.plain_dims = tuple(k for k in range(state_dim) if k not in paired)
        self.angle = torch.nn.Parameter(angle.clone())
        self.plain_target = torch.nn.Parameter(plain_target.clone())
        self.w_raw = torch.nn.Parameter(torch.zeros(len(self.circle_dims) + len(self.plain_dims),
                                                    dtype=angle.dtype))

    @property
    def group_weights(self) -> Tensor:
        return self.w_raw.numel() * torch.softmax(self.w_raw, 0)

    @property
    def target(self) -> Tensor:
        t = [torch.zeros((), dtype=self.angle.dtype, device=self.angle.device)] * self.state_dim
        for a, (i, j) in zip(self.angle, self.circle_dims, strict=True):
            t[i], t[j] = torch.cos(a), torch.sin(a)
        for v, k in zip(self.plain_target, self.plain_dims, strict=True):
            t[k] = v
        return torch.stack(t)

    @property
    def weights(self) -> Tensor:
        g, w = self.group_weights, [None] * self.state_dim
        for n, (i, j) in enumerate(self.circle_dims):
            w[i] = w[j] = g[n]
        for n, k in enumerate(self.plain_dims):
            w[k] = g[len(self.circle_dims) + n]
        return torch.stack(w)

    def forward(self, x: Tensor) -> Tensor:
        if x.shape[-1] != self.state_dim:
            raise ValueError(f"state x must end in {self.state_dim}, got shape {tuple(x.shape)}")
        if self.distance == "chord":
            d = x - self.target
            return (self.weights * d * d).sum(-1)
        g = self.group_weights
        c = 0
        for n, (i, j) in enumerate(self.circle_dims):
            a = self.angle[n]  # the error δ = φ − φ̄ wrapped by atan2 of its own (cos, sin)
            cos_d = x[..., i] * torch.cos(a) + x[..., j] * torch.sin(a)
            sin_d = x[..., j] * torch.cos(a) - x[..., i] * torch.sin(a)
            c = c + g[n] * torch.atan2(sin_d, cos_d) ** 2
        for n, k in enumerate(self.plain_dims):
            c = c + g[len(self.circle_dims) + n] * (x[..., k] - self.plain_target[n]) ** 2
        return c


def make_cost(cfg: IfOConfig, generator: torch.Generator | None = None, task: Task | None = None,
              expert_states: Tensor | None = None) -> TargetStateCost | CircleTargetCost:
    """The learned cost, uniform learnable weights; target ``φ̄ ~ N(0, target_init_std²)`` in feature space
    (``cost_init="random"``) or the mean of ``expert_states`` (``"expert_mean"``). A task with
    ``circle_dims`` gets a :class:`CircleTargetCost` (random init: each pair's angle uniform)."""
    task = task or CARTPOLE
    dtype = _DTYPES[cfg.dtype]
    mean = None
    if cfg.cost_init == "expert_mean" and expert_states is not None:
        mean = torch.as_tensor(expert_states, dtype=dtype).cpu()
    if task.circle_dims:
        plain = [k for k in range(task.state_dim) if k not in {i for p in task.circle_dims for i in p}]
        if mean is None:
            angle = (2 * torch.rand(len(task.circle_dims), generator=generator, dtype=dtype) - 1) * math.pi
            plain_target = cfg.target_init_std * torch.randn(len(plain), generator=generator, dtype=dtype)
        else:
            m = mean.mean(0)
            angle = torch.stack([torch.atan2(m[j], m[i]) for i, j in task.circle_dims])
            plain_target = m[plain]
        return CircleTargetCost(task.state_dim, task.circle_dims, angle, plain_target, cfg.circle_distance)
    if mean is None:
        target = cfg.target_init_std * torch.randn(task.feature_dim, generator=generator, dtype=dtype)
    else:
        target = task.features()(mean).mean(0)
    return TargetStateCost(target, learn_weights=True, normalize_weights=True, features=task.features())


def make_mpc(
    dynamics: Any,
    cost: Any,
    cfg: IfOConfig,
    horizon: int | None = None,
    evaluation: bool = False,
    seed: int | None = None,
    task: Task | None = None,
) -> MPC:
    """The MPC layer of training (``evaluation=False``) or of the evaluated policy (stronger planner)."""
    task = task or CARTPOLE
    if evaluation:
        return MPC(
            dynamics,
            cost,
            horizon or cfg.horizon,
            task.u_low,
            task.u_high,
            sampler=cfg.sampler,
            n_samples=cfg.eval_samples,
            cem_iterations=cfg.eval_cem_iterations,
            max_iter=cfg.eval_newton_iters,
            seed=seed,
        )
    return MPC(
        dynamics,
        cost,
        horizon or cfg.horizon,
        task.u_low,
        task.u_high,
        sampler=cfg.sampler,
        n_samples=cfg.n_samples,
        cem_iterations=cfg.cem_iterations,
        max_iter=cfg.newton_iters,
        tol=cfg.tol,
        seed=seed,
    )


def normalized_error(pred: Tensor, target: Tensor, scale: Tensor) -> Tensor:
    """Per-sample ``‖(target − pred) ⊘ scale‖² / n``: the next-state error every learner here minimises."""
    return (((target - pred) / scale) ** 2).mean(-1)


@dataclass
class IfOTrainer:
    """Alg. 2 on expert state pairs ``(x, x')`` (arrays ``(N, n)``) of ``task`` (default: the cart-pole);
    ``simulator`` is the query ``F(x, u)`` (default: :func:`agents.task.simulator_for`). ``run()`` trains,
    checkpointing to ``out/ifo_checkpoint.pt`` (``resume=True`` continues from there)."""

    x: Tensor
    x_next: Tensor
    config: IfOConfig = field(default_factory=IfOConfig)
    seed: int = 0
    simulator: Simulator | None = None
    out: Path | None = None
    task: Task | None = None
    # What the run was trained on (dataset SHA-256, ...): stored in the checkpoint, must match on resume.
    provenance: dict[str, Any] = field(default_factory=dict)
    device: str | torch.device | None = None  # where models, data and MPC solves live (default: CPU)

    def __post_init__(self) -> None:
        cfg = self.config
        dtype = _DTYPES[cfg.dtype]
        self.task = self.task or CARTPOLE
        self.device = torch.device(self.device or "cpu")
        self.x = torch.as_tensor(np.asarray(self.x), dtype=dtype).to(self.device)
        self.x_next = torch.as_tensor(np.asarray(self.x_next), dtype=dtype).to(self.device)
        self.task.check_states(self.x, self.x_next, what="expert pairs")
        if self.x.shape != self.x_next.shape:
            raise ValueError(f"expert pairs must have equal shapes, got {tuple(self.x.shape)} and "
                             f"{tuple(self.x_next.shape)}")
        self.simulator = simulator_for(self.task, self.simulator)
        torch.manual_seed(self.seed)  # module initialisation
        # Index/action draws stay on a CPU generator (reproducible on every device; small transfers).
        self.generator = torch.Generator().manual_seed(self.seed)
        self.dynamics = make_dynamics(cfg, self.task).to(self.device)
        self.cost = make_cost(cfg, self.generator, self.task, self.x).to(self.device)
        self.dyn_opt = torch.optim.Adam(self.dynamics.parameters(), cfg.dyn_lr)
        self.cost_opt = torch.optim.Adam(self.cost.parameters(), cfg.cost_lr)
        self.buffer: tuple[Tensor, Tensor, Tensor] | None = None
        self.iteration = 0  # cost iterations done
        self.warmed_up = False
        self.history: list[dict[str, float]] = []
        self.dyn_history: list[float] = []
        self.elapsed = 0.0
        # cost_restarts > 1: the restart under way, the finished ones ({restart, selection_loss}), the
        # state each restart starts from (after the warm-up) and the best finished restart's state
        self.restart = 0
        self.restarts: list[dict[str, float]] = []
        self.restart_start: dict[str, Any] | None = None
        self.best: dict[str, Any] | None = None

    # ------------------------------------------------------------------ state
    @property
    def checkpoint_path(self) -> Path | None:
        return None if self.out is None else Path(self.out) / "ifo_checkpoint.pt"

    def state_dict(self) -> dict[str, Any]:
        return {
            "kind": "ifo",
            "config": self.config.to_dict(),
            "task": self.task.to_dict(),
            "seed": self.seed,
            "provenance": dict(self.provenance),
            "iteration": self.iteration,
            "warmed_up": self.warmed_up,
            "dynamics": self.dynamics.state_dict(),
            "cost": self.cost.state_dict(),
            "dyn_opt": self.dyn_opt.state_dict(),
            "cost_opt": self.cost_opt.state_dict(),
            "buffer": self.buffer,
            "generator": self.generator.get_state(),
            "history": self.history,
            "dyn_history": self.dyn_history,
            "elapsed": self.elapsed,
            "restart": self.restart,
            "restarts": self.restarts,
            "restart_start": self.restart_start,
            "best": self.best,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.dynamics.load_state_dict(state["dynamics"])
        self.cost.load_state_dict(state["cost"])
        self.dyn_opt.load_state_dict(state["dyn_opt"])
        self.cost_opt.load_state_dict(state["cost_opt"])
        self.buffer = None if state["buffer"] is None else tuple(t.to(self.device) for t in state["buffer"])
        self.generator.set_state(state["generator"])
        self.iteration, self.warmed_up = state["iteration"], state["warmed_up"]
        self.history, self.dyn_history = list(state["history"]), list(state["dyn_history"])
        self.elapsed = float(state.get("elapsed", 0.0))
        self.restart, self.restarts = int(state.get("restart", 0)), list(state.get("restarts", []))
        self.restart_start, self.best = state.get("restart_start"), state.get("best")

    def save(self) -> Path | None:
        return (
            None if self.checkpoint_path is None else save_checkpoint(self.checkpoint_path, self.state_dict())
        )

    def resume(self) -> bool:
        """Load ``out/ifo_checkpoint.pt`` if it exists (same config and seed required); True if loaded."""
        path = self.checkpoint_path
        if path is None or not path.is_file():
            return False
        self.load_state_dict(
            load_checkpoint(path, {"kind": "ifo", "config": self.config.to_dict(), "seed": self.seed,
                                   "task": self.task.to_dict(), "provenance": dict(self.provenance)},
                            schema=_IFO_SCHEMA)
        )
        return True

    # ------------------------------------------------------------------ (a) dynamics
    def query(self, n: int) -> None:
        """Alg. 2, line "collect": ``x`` from the expert states, ``u ~ U(box)``, ``x' = F(x, u)``."""
        idx = torch.randint(0, self.x.shape[0], (n,), generator=self.generator).to(self.device)
        x = self.x[idx]
        u = self.task.sample_actions(n, self.generator, x.dtype).to(self.device)
        xn = torch.as_tensor(self.simulator(x, u)).to(x.dtype)
        if xn.shape != x.shape:
            raise ValueError(f"the simulator returned shape {tuple(xn.shape)} for states {tuple(x.shape)}")
        if self.buffer is None:
            self.buffer = (x, u, xn)
        else:
            self.buffer = tuple(torch.cat([a, b]) for a, b in zip(self.buffer, (x, u, xn), strict=True))

    def dynamics_steps(self, steps: int, lr: float | None = None) -> float:
        """``steps`` Adam steps on the one-step regression loss (normalised increments); last loss."""
        if self.buffer is None:
            raise RuntimeError("dynamics_steps needs simulator data: call query() (or warmup()) first")
        x, u, xn = self.buffer
        dyn = self.dynamics
        dyn.requires_grad_(True)
        loss = torch.zeros(())
        for _ in range(steps):
            b = torch.randint(0, x.shape[0], (self.config.dyn_batch,), generator=self.generator).to(x.device)
            if lr is not None:
                for group in self.dyn_opt.param_groups:
                    group["lr"] = lr
            loss = normalized_error(dyn(x[b], u[b]), xn[b], dyn.out_scale).mean()
            self.dyn_opt.zero_grad()
            loss.backward()
            self.dyn_opt.step()
        return float(loss.detach())

    def warmup(self, progress: bool = False) -> None:
        """Fit the normalisation and pre-train the dynamics on ``warmup_queries`` triplets (cosine LR)."""
        from tqdm import tqdm

        cfg = self.config
        self.query(cfg.warmup_queries)
        self.dynamics.fit_normalization(*self.buffer)
        for step in tqdm(range(cfg.warmup_steps), desc="dynamics warm-up", disable=not progress, leave=False):
            lr = cfg.dyn_lr * 0.5 * (1 + math.cos(math.pi * step / cfg.warmup_steps))
            loss = self.dynamics_steps(1, lr=max(lr, 0.02 * cfg.dyn_lr))
            if step % 100 == 0 or step == cfg.warmup_steps - 1:
                self.dyn_history.append(loss)
        for group in self.dyn_opt.param_groups:
            group["lr"] = 0.1 * cfg.dyn_lr  # small steps during the alternation: the cost tracks the model
        self.warmed_up = True

    # ------------------------------------------------------------------ (b) cost through the MPC layer
    def cost_step(self) -> dict[str, float]:
        """One Adam step of the cost on a batch of expert pairs (Alg. 2, the IFT step)."""
        cfg = self.config
        H = cfg.horizon_at(self.iteration)
        idx = torch.randint(0, self.x.shape[0], (cfg.cost_batch,), generator=self.generator).to(self.device)
        x, xn = self.x[idx], self.x_next[idx]
        self.dynamics.requires_grad_(False)  # θ_h is fixed while the cost learns
        mpc = make_mpc(self.dynamics, self.cost, cfg, horizon=H, task=self.task,
                       seed=self.seed * 1_000_003 + self.iteration + _RESTART_SEED_STRIDE * self.restart)
        with quiet_convergence_warnings():
            u, info = mpc(x)
        x_hat = self.dynamics(x, u[:, 0])
        err = normalized_error(x_hat, xn, self.dynamics.out_scale)
        ok = info.converged
        n_ok = int(ok.sum())  # host sync, once per iteration: the converged fraction is logged
        if n_ok:
            loss = err[ok].mean()
            self.cost_opt.zero_grad()
            loss.backward()
            self.cost_opt.step()
        self.dynamics.requires_grad_(True)
        return {
            "iteration": self.iteration,
            "horizon": H,
            "loss": float(err.detach().mean()),
            "loss_converged": float(err.detach()[ok].mean()) if n_ok else float("nan"),
            "converged": n_ok / cfg.cost_batch,
            "solves": cfg.cost_batch,
            "solves_converged": n_ok,
        }

    def imitation_loss(self, x: Tensor, x_next: Tensor, horizon: int | None = None, seed: int = 0) -> float:
        """The cost loss on given expert pairs with a fixed sampler seed (all samples; no gradient).

        The fraction of these MPC solves that converged is kept in ``last_imitation_converged``."""
        dtype = _DTYPES[self.config.dtype]
        x = torch.as_tensor(x, dtype=dtype).to(self.device)
        x_next = torch.as_tensor(x_next, dtype=dtype).to(self.device)
        mpc = make_mpc(self.dynamics, self.cost, self.config, horizon=horizon, seed=seed, task=self.task)
        with torch.no_grad(), quiet_convergence_warnings():  # counted below instead of warned per solve
            u, info = mpc(x)
            self.last_imitation_converged = float(info.converged.double().mean())
            return float(normalized_error(self.dynamics(x, u[:, 0]), x_next, self.dynamics.out_scale).mean())

    # ------------------------------------------------------------------ restarts (cost_restarts > 1)
    def _trained_state(self) -> dict[str, Any]:
        """What differs between restarts: models, optimisers, buffer, generator and the cost iterations."""
        return copy.deepcopy({k: v for k, v in self.state_dict().items()
                              if k in ("dynamics", "cost", "dyn_opt", "cost_opt", "buffer", "generator",
                                       "iteration", "history")})

    def _load_models(self, state: dict[str, Any]) -> None:
        """Models, optimisers and replay buffer from a :meth:`_trained_state` record."""
        self.dynamics.load_state_dict(state["dynamics"])
        self.cost.load_state_dict(state["cost"])
        self.dyn_opt.load_state_dict(state["dyn_opt"])
        self.cost_opt.load_state_dict(state["cost_opt"])
        self.buffer = tuple(t.to(self.device) for t in state["buffer"])

    def selection_loss(self) -> float:
        """The restart selection score: the training imitation loss (the cost loss, all samples of the
        batch) averaged over the last ``min(10, iterations)`` cost iterations."""
        return float(np.mean([h["loss"] for h in self.history[-_SELECT_LAST:]]))

    def _finish_restart(self) -> None:
        """Record the finished restart; keep its state if its selection loss is the lowest so far."""
        loss = self.selection_loss()
        if self.best is None or loss < min(r["selection_loss"] for r in self.restarts):
            self.best = self._trained_state() | {"restart": self.restart}
        self.restarts.append({"restart": self.restart, "selection_loss": loss,
                              "solves": sum(h["solves"] for h in self.history),
                              "solves_converged": sum(h["solves_converged"] for h in self.history)})

    def _begin_restart(self, r: int) -> None:
        """Restart ``r`` >= 1: the warmed-up state, its own generator, the cost init perturbed."""
        self._load_models(self.restart_start)
        self.generator.manual_seed(self.seed + _RESTART_SEED_STRIDE * r)
        with torch.no_grad():
            for p in self.cost.parameters():
                noise = torch.randn(p.shape, generator=self.generator, dtype=p.dtype).to(p.device)
                p.add_(self.config.restart_init_std * noise)
        self.restart, self.iteration, self.history = r, 0, []

    def _keep_best(self) -> None:
        best = self.best
        self._load_models(best)
        self.generator.set_state(best["generator"])
        self.iteration, self.history = best["iteration"], list(best["history"])

    @property
    def restarts_done(self) -> bool:
        return len(self.restarts) == self.config.cost_restarts

    # ------------------------------------------------------------------ Alg. 2
    def run(
        self, progress: bool = True, resume: bool = False, stop_after: int | None = None
    ) -> dict[str, Any]:
        """Train to ``config.iterations`` cost iterations (``stop_after``: stop early, for tests).

        With ``cost_restarts = K > 1`` the alternation after the warm-up runs K times from the same
        warmed-up state (restart ``r >= 1``: its own generator, the cost init perturbed, see
        :class:`IfOConfig`) and the restart with the lowest :meth:`selection_loss` — the training imitation
        loss, IfO's own objective; nothing from the environment's reward — is kept (models, history); the
        per-restart losses are in ``summary()["cost_restarts"]``. ``stop_after`` counts the iterations of the
        restart under way. Checkpoints every ``checkpoint_every`` iterations, between restarts and on
        Ctrl-C (then re-raises).
        """
        cfg = self.config
        if resume:
            self.resume()
        t0 = time.perf_counter() - self.elapsed
        self._snapshot = copy.deepcopy(self.state_dict())  # what Ctrl-C saves (see _alternate)
        try:
            if not self.warmed_up:
                self.warmup(progress)
                if cfg.cost_restarts > 1:
                    self.restart_start = self._trained_state()
                self.elapsed = time.perf_counter() - t0
                self.save()
            while True:
                stopped = self._alternate(progress, stop_after, t0)
                if stopped or cfg.cost_restarts == 1 or self.restarts_done:
                    break
                self._finish_restart()
                if self.restarts_done:
                    self._keep_best()
                else:
                    self._begin_restart(self.restart + 1)
                self.elapsed = time.perf_counter() - t0
                self.save()
        except KeyboardInterrupt:
            if self.checkpoint_path is not None:
                save_checkpoint(self.checkpoint_path, self._snapshot)
            raise
        self.elapsed = time.perf_counter() - t0
        self.save()
        return self.summary()

    def _alternate(self, progress: bool, stop_after: int | None, t0: float) -> bool:
        """Alg. 2's alternation up to ``config.iterations``; True if ``stop_after`` stopped it."""
        from tqdm import tqdm

        cfg = self.config
        restart = f" restart {self.restart + 1}/{cfg.cost_restarts}" if cfg.cost_restarts > 1 else ""
        # Ctrl-C saves the state at the start of the interrupted iteration, not a half-done one: resuming
        # from it replays that iteration exactly (same generator draws), as an uninterrupted run would.
        self._snapshot = copy.deepcopy(self.state_dict())
        bar = tqdm(total=cfg.iterations, initial=self.iteration, desc="IfO (cost through MPC)" + restart,
                   disable=not progress)
        try:
            while self.iteration < cfg.iterations:
                if stop_after is not None and self.iteration >= stop_after:
                    return True
                self._snapshot = copy.deepcopy(self.state_dict())
                self.query(cfg.dyn_queries_per_iter)
                dyn_loss = self.dynamics_steps(cfg.dyn_steps_per_iter)
                rec = self.cost_step()
                rec["dyn_loss"] = dyn_loss
                self.history.append(rec)
                self.iteration += 1
                self.elapsed = time.perf_counter() - t0
                bar.update(1)
                bar.set_postfix(H=rec["horizon"], loss=f"{rec['loss']:.3g}", conv=f"{rec['converged']:.2f}")
                # shown beside a sweep's progress bar (no-op outside a sweep)
                report(iteration=self.iteration, loss=rec["loss"], converged=rec["converged"])
                if self.iteration % cfg.checkpoint_every == 0:
                    self.save()
        finally:
            bar.close()
        return False

    def summary(self) -> dict[str, Any]:
        c = self.cost
        return {
            "iterations": self.iteration,
            "elapsed_s": self.elapsed,
            "config": self.config.to_dict(),
            "task": self.task.to_dict(),
            "seed": self.seed,
            "converged_fraction": [h["converged"] for h in self.history],
            "mpc_solves": sum(h.get("solves", 0) for h in self.history),
            "mpc_unconverged": sum(h.get("solves", 0) - h.get("solves_converged", 0) for h in self.history),
            "learned_target": c.target.detach().tolist(),
            "learned_weights": c.weights.detach().tolist(),
            "dyn_loss_final": self.dyn_history[-1] if self.dyn_history else None,
            "history": self.history,
        } | ({"cost_restarts": self.restarts, "kept_restart": self.best["restart"] if self.best else None}
             if self.config.cost_restarts > 1 else {})


class IfOModels(NamedTuple):
    """What an IfO checkpoint holds for its users: the learned modules, the settings and the task."""

    dynamics: MLPDynamics
    cost: TargetStateCost | CircleTargetCost
    config: IfOConfig
    task: Task


def load_ifo_checkpoint(path: str | Path) -> IfOModels:
    """The learned dynamics and cost of an IfO checkpoint of any task, rebuilt from its recorded dims.

    Loaded without running code (``weights_only``) and validated (entries, state-dict keys and shapes)."""
    state = load_checkpoint(path, {"kind": "ifo"}, schema=_IFO_SCHEMA)
    try:
        cfg = IfOConfig.from_dict(state["config"])
        task = Task.from_dict(state["task"]) if "task" in state else CARTPOLE  # before issue 15: cart-pole
    except (TypeError, ValueError, KeyError) as err:
        raise CheckpointError(f"{path}: the stored config/task is not valid ({err})") from err
    dyn, cost = make_dynamics(cfg, task), make_cost(cfg, task=task)
    check_state_dict(dyn, state["dynamics"], "dynamics", path)
    check_state_dict(cost, state["cost"], "cost", path)
    dyn.load_state_dict(state["dynamics"])
    cost.load_state_dict(state["cost"])
    return IfOModels(dyn, cost, cfg, task)


def load_ifo_models(path: str | Path) -> tuple[MLPDynamics, TargetStateCost | CircleTargetCost, IfOConfig]:
    """The learned dynamics and cost of an IfO checkpoint (for evaluation / BC); see
    :func:`load_ifo_checkpoint` for the task too."""
    return load_ifo_checkpoint(path)[:3]


# What an IfO checkpoint must hold before any of it is used (diffmpc.io.load_checkpoint validates it).
_IFO_SCHEMA = {"config": dict, "seed": int, "iteration": int, "warmed_up": bool, "dynamics": dict,
               "cost": dict, "dyn_opt": dict, "cost_opt": dict, "generator": (None,), "history": list,
               "dyn_history": list}


