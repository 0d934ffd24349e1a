"""Table 1 of the paper: test MSE of neural ODEs trained with five integrator / gradient combinations.

``diffmpc table1 --task vdp|spiral|cmu --runs N --out DIR [--preset tiny|quick|table1] [--seed S]
[--methods ...] [--iters N ...] [--publish benchmarks/results]``

Methods (rows of Table 1):

=====================  ===============================================================================
``dopri5_adjoint``     DOPRI5, adjoint method (torchdiffeq.odeint_adjoint, rtol 1e-4, atol 1e-5)
``euler_adjoint``      explicit Euler on the observation grid, adjoint (torchdiffeq.odeint_adjoint)
``beuler_adjoint``     backward Euler, adjoint ODE by backward Euler (:func:`diffmpc.odeint`, ours)
``beuler_ift_dense``   backward Euler, IFT with the per-step Jacobian built and solved ("IFT naive")
``beuler_ift_cg``      backward Euler, IFT with normal-equation CG (the paper's method)
=====================  ===============================================================================

**Presets** (the paper gives no training budget; these are ours, named for what they are):

* ``tiny`` — a few iterations on tiny windows: CI and tests only, numbers meaningless.
* ``quick`` — the demo budget (VdP / spiral: 300 iterations of 64 random 5-step windows; CMU: 150
  iterations of 15-frame windows, far too short to extrapolate a gait — a smoke run, not a result).
* ``table1`` — the reproduction. VdP: 1500 iterations of 64 × 5-step windows (the budget at which 5 earlier
  runs reached the paper). Spiral: the ``quick`` budget (it already beats the paper). CMU: the protocol of
  Yildiz et al. (2019) as read in issue 17 — 200-frame windows at random start offsets of random training
  walks, batch 16, Adam 3e-3 → 3e-4 (exponential decay), 600 iterations, validation every 50.
* ``paper`` — deprecated alias of ``table1`` (it was the name of an invented budget; warns).

**Protocol.** The vector field is an MLP ``D → 30 → 30 → D`` with tanh (the "2 layers, hidden 30" of Fig. 2).
Van der Pol / spiral: each iteration integrates ``batch`` windows of ``window`` steps that start at random
training observations (batched over windows) and minimises the MSE to the observations; Adam with
exponential learning-rate decay and gradient clipping. CMU: encoder (first 3 frames → latent 8) – NODE
(latent) – decoder (latent → 50) on the data as stored (mean-centred joint angles in degrees; the model works
on the data divided by the global training std, the MSE is reported in raw units); a window's first 3 frames
are encoded and the window is predicted from its first frame.

**Model selection (the same rule for every method and task):** every ``eval_every`` iterations and after
the last one, the model is rolled out over the validation part (VdP / spiral: from the last training
observation; CMU: the 3 validation walks from their first 3 frames); the evaluation with the lowest
validation MSE is kept (the earliest on a tie). The test MSE of the *final* iterate is recorded as well
(``final_test_mse``), never used for selection.

**Test MSE.** VdP / spiral: rolled out from the last validation observation over the whole test part (107 /
150 steps), MSE over all test points and coordinates. CMU: each test walk's frames 0–2 are encoded and frames
3–299 extrapolated; MSE over frames 3–299 and all 50 dimensions in the data's raw units (ODE²VAE's script
averages all 300 frames: < 1 % different). Calibration baselines on the same frames are computed by
:func:`cmu_baselines` and reported beside the results. Run r of every method uses seed ``seed + r`` (same
initial weights and windows), so the methods are compared pairwise.

**Files.** A job is keyed on its whole config (:class:`Table1Config`: task, preset, every override, base
seed, sha256 of the data, protocol version); its runs live in ``DIR/runs/<task>-<preset>-<key hash>/``, one
JSON per finished (method, run) and one checkpoint per unfinished one, each storing the key and refused on
a mismatch (never mixed). Checkpoints load with ``weights_only=True`` and are validated. Training state is
checkpointed atomically every ``ckpt_every`` iterations and on Ctrl-C / SIGTERM; rerunning the same command
skips finished runs and resumes unfinished ones. A per-run lock lets two processes share a job list.
:func:`run_one` is the per-run entry point (one method, one run index) for parallel dispatchers.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import math
import os
import signal
import threading
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from diffmpc.errors import BadArgumentError, BadFileError
from diffmpc.implicit import ConvergenceError, ConvergenceWarning
from diffmpc.io import (
    CheckpointError,
    check_state_dict,
    file_sha256,
    load_checkpoint,
    save_checkpoint,
    write_json,
)
from diffmpc.nn import ODEFunc
from diffmpc.ode import odeint
from diffmpc.sweep import add_sweep_arguments

from .ode_data import CMU_DEFAULT_PATH, Series, cmu_baselines, load_cmu, make_task

__all__ = ["METHODS", "PAPER", "PROTOCOL", "Preset", "PRESETS", "Table1Config", "ODEFunc", "make_config",
           "run_one", "train_series", "train_cmu", "cmu_extrapolation_mse", "register", "run", "markdown",
           "combined_markdown", "publish_combined", "in_progress",
           "published_name"]

METHODS: dict[str, tuple[str, str]] = {
    "dopri5_adjoint": ("dopri5", "adjoint"),
    "euler_adjoint": ("euler", "adjoint"),
    "beuler_adjoint": ("backward_euler", "adjoint"),
    "beuler_ift_dense": ("backward_euler", "dense"),
    "beuler_ift_cg": ("backward_euler", "cg"),
}
TASKS = ("vdp", "spiral", "cmu")
# The paper's Table 1 value for our method (Bwd Euler IFT CG): mean ± standard error, and its run counts.
PAPER = {"vdp": (0.40, 0.06), "spiral": (0.09, 0.01), "cmu": (11.43, 1.27)}
PAPER_RUNS = {"vdp": 20, "spiral": 20, "cmu": 10}
# Published CMU walking results quoted by the paper (Yildiz et al. 2019, Table 2), raw units.
CMU_PUBLISHED = {"DTSBN-S": 34.86, "NeuralODE": 22.49, "ODE²VAE": 10.06, "ODE²VAE-KL": 8.09}
# Bump when training or evaluation code changes what a run computes: old runs are then never reused.
PROTOCOL = 2


@dataclass(frozen=True)
class Preset:
    """A training budget: ``iters`` Adam steps on ``batch`` windows of ``window`` steps, learning rate decayed
    exponentially from ``lr`` to ``lr_final``, validation every ``eval_every`` iterations."""

    iters: int
    window: int
    batch: int
    lr: float
    lr_final: float
    eval_every: int
    hidden: int = 30
    latent: int = 8
    ckpt_every: int = 50
    clip: float = 1.0

    def __post_init__(self) -> None:
        for f in fields(self):
            v = getattr(self, f.name)
            if not (isinstance(v, (int, float)) and math.isfinite(v) and v > 0):
                raise BadArgumentError(f"preset field {f.name} must be a positive finite number, got {v!r}")
        if self.window < 1 or self.batch < 1 or self.iters < 1:
            raise BadArgumentError("preset iters, window and batch must be ≥ 1")


_SERIES_QUICK = Preset(iters=300, window=5, batch=64, lr=1e-2, lr_final=5e-4, eval_every=25)
PRESETS: dict[str, dict[str, Preset]] = {
    "tiny": {
        "vdp": Preset(iters=3, window=3, batch=4, lr=1e-2, lr_final=5e-3, eval_every=1, ckpt_every=1),
        "spiral": Preset(iters=3, window=3, batch=4, lr=1e-2, lr_final=5e-3, eval_every=1, ckpt_every=1),
        "cmu": Preset(iters=3, window=6, batch=2, lr=3e-3, lr_final=3e-4, eval_every=1, ckpt_every=1),
    },
    "quick": {
        "vdp": _SERIES_QUICK,
        "spiral": _SERIES_QUICK,
        "cmu": Preset(iters=150, window=15, batch=16, lr=5e-3, lr_final=5e-4, eval_every=50),
    },
    "table1": {
        "vdp": replace(_SERIES_QUICK, iters=1500),
        "spiral": _SERIES_QUICK,
        "cmu": Preset(iters=600, window=200, batch=16, lr=3e-3, lr_final=3e-4, eval_every=50),
    },
}
DEPRECATED_PRESETS = {"paper": "table1"}


def resolve_preset(name: str, task: str) -> tuple[str, Preset]:
    """``(canonical name, Preset)`` of preset ``name`` for ``task``; ``paper`` warns and means ``table1``."""
    if name in DEPRECATED_PRESETS:
        new = DEPRECATED_PRESETS[name]
        warnings.warn(f"preset {name!r} is deprecated (it named an invented budget); it now means {new!r}",
                      DeprecationWarning, stacklevel=2)
        name = new
    if name not in PRESETS:
        raise BadArgumentError(f"unknown preset {name!r}; choose from {sorted(PRESETS)}")
    if task not in TASKS:
        raise BadArgumentError(f"unknown task {task!r}; choose from {TASKS}")
    return name, PRESETS[name][task]


@dataclass(frozen=True)
class Table1Config:
    """Everything that determines the runs of one Table 1 job; :meth:`key` is what caches are keyed on."""

    task: str
    preset: str
    params: Preset
    seed: int
    data_sha256: str
    overrides: tuple[tuple[str, Any], ...] = ()
    data_path: str | None = field(default=None, compare=False)  # where the data was read (not in the key)

    def key(self) -> dict[str, Any]:
        return {"protocol": PROTOCOL, "task": self.task, "preset": self.preset, "params": asdict(self.params),
                "overrides": dict(self.overrides), "seed": self.seed, "data_sha256": self.data_sha256}

    def key_hash(self) -> str:
        return hashlib.sha256(json.dumps(self.key(), sort_keys=True).encode()).hexdigest()[:16]

    def run_dir(self, out: str | os.PathLike) -> Path:
        return Path(out) / "runs" / f"{self.task}-{self.preset}-{self.key_hash()}"


def series_sha256(series: Series) -> str:
    """sha256 of a generated series (times, states, split): a change of the generator changes the key."""
    h = hashlib.sha256()
    for a in (series.t, series.x, np.array([series.n_train, series.n_val, series.n_test])):
        h.update(np.ascontiguousarray(a, dtype=np.float64).tobytes())
    return h.hexdigest()


def make_config(task: str, preset: str = "quick", seed: int = 0, overrides: dict[str, Any] | None = None,
                cmu_path: str | os.PathLike | None = None) -> Table1Config:
    """Build the config of a job: preset (+ overrides of its fields) and the sha256 of the data it reads."""
    name, params = resolve_preset(preset, task)
    overrides = {k: v for k, v in (overrides or {}).items() if v is not None}
    unknown = sorted(set(overrides) - {f.name for f in fields(Preset)})
    if unknown:
        known = [f.name for f in fields(Preset)]
        raise BadArgumentError(f"unknown preset overrides {unknown}; known: {known}")
    params = replace(params, **overrides)
    if task == "cmu":
        path = Path(cmu_path) if cmu_path is not None else CMU_DEFAULT_PATH
        load_cmu(path)  # checks presence, sha256 and keys before any work
        sha, data_path = file_sha256(path), str(path)
    else:
        sha, data_path = series_sha256(make_task(task)), None
    return Table1Config(task, name, params, int(seed), sha, tuple(sorted(overrides.items())), data_path)


def _load_data(config: Table1Config) -> Series | dict[str, np.ndarray]:
    if config.task != "cmu":
        data = make_task(config.task)
        if series_sha256(data) != config.data_sha256:
            raise CheckpointError(f"the generated {config.task} series differs from the one this job was "
                                  "keyed on (scipy changed?); start a new job")
        return data
    return load_cmu(config.data_path, sha256=config.data_sha256)


def integrate(func: nn.Module, method_name: str, y0: Tensor, t: Tensor) -> Tensor:
    """Integrate with one of :data:`METHODS` (all through :func:`diffmpc.odeint`)."""
    method, backward = METHODS[method_name]
    return odeint(func, y0, t, method=method, backward=backward, rtol=1e-4, atol=1e-5)


class StopRequest:
    """Ctrl-C and SIGTERM set :attr:`requested`; the trainer finishes its iteration, saves, and stops.

    A second signal interrupts at once (``KeyboardInterrupt``). Outside the main thread nothing is installed.
    """

    def __init__(self) -> None:
        self.requested: str | None = None

    @contextlib.contextmanager
    def installed(self) -> Iterator[StopRequest]:
        if threading.current_thread() is not threading.main_thread():
            yield self
            return

        def handler(signum: int, frame: Any) -> None:
            if self.requested:
                raise KeyboardInterrupt(signal.Signals(signum).name)
            self.requested = signal.Signals(signum).name

        sigs = (signal.SIGINT, signal.SIGTERM)
        previous = {s: signal.signal(s, handler) for s in sigs}
        try:
            yield self
        finally:
            for s, h in previous.items():
                signal.signal(s, h)


_IDENT_SCHEMA = {"key": dict, "method": str, "run_index": int}  # present when a job wrote the checkpoint
_CKPT_SCHEMA = {"model": dict, "opt": dict, "sched": dict,
                "gen": (None,), "it": int, "best": float, "best_it": int, "best_state": (dict, type(None)),
                "history": list, "train_seconds": float}


class _Trainer:
    """Adam + exp. LR decay + clipping, best-validation model, atomic keyed checkpoint / resume."""

    def __init__(self, modules: nn.Module, preset: Preset, ckpt: Path | None, seed: int,
                 ident: dict[str, Any] | None = None, stop: StopRequest | None = None):
        self.m, self.p, self.ckpt, self.ident, self.stop = modules, preset, ckpt, dict(ident or {}), stop
        self.opt = torch.optim.Adam(modules.parameters(), lr=preset.lr)
        gamma = (preset.lr_final / preset.lr) ** (1 / max(1, preset.iters))
        self.sched = torch.optim.lr_scheduler.ExponentialLR(self.opt, gamma)
        self.gen = torch.Generator().manual_seed(seed + 7919)
        self.it, self.best, self.best_it, self.best_state, self.history = 0, math.inf, -1, None, []
        self.train_seconds = 0.0
        if ckpt is not None and ckpt.is_file():
            self._resume(ckpt)

    def _resume(self, ckpt: Path) -> None:
        schema = {**{k: v for k, v in _IDENT_SCHEMA.items() if k in self.ident}, **_CKPT_SCHEMA}
        s = load_checkpoint(ckpt, expect=self.ident, schema=schema)
        check_state_dict(self.m, s["model"], "model", ckpt)
        if s["best_state"] is not None:
            check_state_dict(self.m, s["best_state"], "best_state", ckpt)
        if not 0 <= s["it"] <= self.p.iters:
            raise CheckpointError(f"{ckpt}: iteration {s['it']} outside 0..{self.p.iters}")
        try:
            self.opt.load_state_dict(s["opt"])
            self.sched.load_state_dict(s["sched"])
            self.gen.set_state(s["gen"])
        except (KeyError, ValueError, RuntimeError, TypeError) as err:
            raise CheckpointError(f"{ckpt}: optimiser / scheduler / generator state is malformed: {err}"
                                  ) from err
        self.m.load_state_dict(s["model"])
        self.it, self.best, self.best_it, self.best_state = s["it"], s["best"], s["best_it"], s["best_state"]
        self.history, self.train_seconds = s["history"], s["train_seconds"]

    def save(self) -> None:
        if self.ckpt is not None:
            save_checkpoint(self.ckpt, {**self.ident, "model": self.m.state_dict(),
                                        "opt": self.opt.state_dict(), "sched": self.sched.state_dict(),
                                        "gen": self.gen.get_state(),
                                        "it": self.it, "best": float(self.best), "best_it": self.best_it,
                                        "best_state": self.best_state, "history": self.history,
                                        "train_seconds": float(self.train_seconds)})

    def fit(self, loss_fn: Callable, val_fn: Callable, progress: Any = None) -> None:
        """Train to ``iters``; afterwards the module holds the *final* iterate (see :meth:`load_best`)."""
        while self.it < self.p.iters:
            t0 = time.perf_counter()
            loss = loss_fn(self.gen)
            loss_value = float(loss.detach())
            if not math.isfinite(loss_value):
                raise FloatingPointError(f"training loss is {loss_value} at iteration {self.it}")
            self.opt.zero_grad()
            loss.backward()
            nn.utils.clip_grad_norm_(self.m.parameters(), self.p.clip)
            self.opt.step()
            self.sched.step()
            self.it += 1
            self.train_seconds += time.perf_counter() - t0
            if self.it % self.p.eval_every == 0 or self.it == self.p.iters:
                with torch.no_grad():
                    val = float(val_fn())
                self.history.append({"iter": self.it, "loss": loss_value, "val_mse": val})
                if math.isfinite(val) and val < self.best:
                    self.best, self.best_it = val, self.it
                    self.best_state = {k: v.clone() for k, v in self.m.state_dict().items()}
                if progress is not None:
                    progress.set_postfix(it=self.it, loss=f"{loss_value:.3g}", val=f"{val:.3g}")
            if self.it % self.p.ckpt_every == 0:
                self.save()
            if self.stop is not None and self.stop.requested:
                self.save()
                raise KeyboardInterrupt(f"{self.stop.requested}: saved at iteration {self.it}")

    def load_best(self) -> None:
        if self.best_state is not None:
            self.m.load_state_dict(self.best_state)


def _mse(a: Tensor, b: Tensor) -> Tensor:
    return (a - b).pow(2).mean()


def train_series(series: Series, method: str, seed: int, preset: Preset, ckpt: Path | None = None,
                 progress: Any = None, ident: dict[str, Any] | None = None,
                 stop: StopRequest | None = None) -> dict[str, Any]:
    """Train one NODE on a generated series with one method; return its validation and test MSE."""
    torch.manual_seed(seed)
    # The model lives in standardised coordinates z = x / s (per-coordinate std of the training part);
    # MSEs are reported in the data's units.
    s = torch.tensor(series.x[: series.n_train].std(0), dtype=torch.float32)
    x = torch.tensor(series.x, dtype=torch.float32) / s
    t = torch.tensor(series.t, dtype=torch.float32)
    n_tr, n_va = series.n_train, series.n_val
    model = ODEFunc(x.shape[1], preset.hidden)
    trainer = _Trainer(model, preset, ckpt, seed, ident, stop)
    W = preset.window
    if W >= n_tr:
        raise ValueError(f"window {W} must be shorter than the training part ({n_tr} points)")
    tw = t[: W + 1] - t[0]

    def loss_fn(gen):
        starts = torch.randint(0, n_tr - W, (preset.batch,), generator=gen)
        target = torch.stack([x[starts + k] for k in range(W + 1)])  # (W+1, B, D)
        pred = integrate(model, method, target[0], tw)
        return _mse(pred[1:] * s, target[1:] * s)

    def rollout(i0: int, n: int) -> Tensor:
        """Predict observations i0+1 .. i0+n from the observed state at i0."""
        pred = integrate(model, method, x[i0 : i0 + 1], t[i0 : i0 + n + 1] - t[i0])
        return _mse(pred[1:, 0] * s, x[i0 + 1 : i0 + n + 1] * s)

    trainer.fit(loss_fn, lambda: rollout(n_tr - 1, n_va), progress)
    return _finish(trainer, lambda: rollout(n_tr + n_va - 1, series.n_test))


def _finish(trainer: _Trainer, test_fn: Callable[[], Tensor]) -> dict[str, Any]:
    with torch.no_grad():
        final = float(test_fn())
        trainer.load_best()
        test = float(test_fn())
    return {"test_mse": test, "final_test_mse": final, "best_val_mse": trainer.best,
            "best_iter": trainer.best_it, "iters": trainer.it, "train_seconds": trainer.train_seconds,
            "history": trainer.history}


def cmu_extrapolation_mse(pred: Tensor, walks: Tensor, observed: int = 3, scale: float = 1.0) -> Tensor:
    """The CMU test metric: MSE over frames ``observed``..end and all dimensions, in the data's raw units.

    ``pred`` and ``walks`` are ``(walks, frames, features)`` in units of ``scale`` (the model works on
    ``data / scale``); the result is multiplied by ``scale²``. Zeros (the mean frame) predicted for the 4 test
    walks of ``mocap35.mat`` gives 33.67 (pinned by a test).
    """
    return _mse(pred[:, observed:], walks[:, observed:]) * scale**2


class CMUModel(nn.Module):
    """Encoder (3 frames → latent) – NODE in latent space – decoder (latent → frame), ODE2VAE-like but
    deterministic (paper Appx. D uses the ODE2VAE setting; we keep the encoder–ODE–decoder structure)."""

    def __init__(self, features: int, latent: int, hidden: int, frames: int = 3):
        super().__init__()
        self.frames = frames
        self.enc = nn.Sequential(nn.Linear(frames * features, 64), nn.Tanh(), nn.Linear(64, latent))
        self.ode = ODEFunc(latent, hidden)
        self.dec = nn.Sequential(nn.Linear(latent, 64), nn.Tanh(), nn.Linear(64, features))

    def forward(self, first: Tensor, t: Tensor, method: str) -> Tensor:
        z0 = self.enc(first.flatten(1))
        z = integrate(self.ode, method, z0, t)  # (T, B, latent)
        return self.dec(z)


def train_cmu(data: dict[str, np.ndarray], method: str, seed: int, preset: Preset, ckpt: Path | None = None,
              progress: Any = None, dt: float = 0.1, ident: dict[str, Any] | None = None,
              stop: StopRequest | None = None) -> dict[str, Any]:
    """Train the encoder–NODE–decoder on CMU walking; test = 297-step extrapolation from 3 frames."""
    torch.manual_seed(seed)
    scale = float(data["Xtr"].std())
    tr, va, te = (torch.tensor(data[k] / scale, dtype=torch.float32) for k in ("Xtr", "Xval", "Xtest"))
    n_seq, n_frames, n_feat = tr.shape
    model = CMUModel(n_feat, preset.latent, preset.hidden)
    k, W = model.frames, preset.window
    if not k <= W < n_frames:
        raise ValueError(f"window {W} must be in [{k}, {n_frames - 1}] for {n_frames}-frame walks")
    trainer = _Trainer(model, preset, ckpt, seed, ident, stop)
    tw = torch.arange(W + 1, dtype=torch.float32) * dt

    def loss_fn(gen):
        seqs = torch.randint(0, n_seq, (preset.batch,), generator=gen)
        starts = torch.randint(0, n_frames - W, (preset.batch,), generator=gen)
        idx = starts[:, None] + torch.arange(W + 1)[None]
        win = tr[seqs[:, None], idx]  # (B, W+1, F)
        pred = model(win[:, :k], tw, method).transpose(0, 1)  # (B, W+1, F)
        return _mse(pred, win)

    def extrapolation_mse(X: Tensor) -> Tensor:
        # As in training, the latent state encoded from frames 0..k-1 is the state at frame 0.
        T = torch.arange(n_frames, dtype=torch.float32) * dt
        pred = model(X[:, :k], T, method).transpose(0, 1)  # (B, n_frames, F)
        return cmu_extrapolation_mse(pred, X, k, scale)

    trainer.fit(loss_fn, lambda: extrapolation_mse(va), progress)
    return _finish(trainer, lambda: extrapolation_mse(te))


# ------------------------------------------------------------------------------------------------ jobs
_RESULT_KEYS = ("key", "method", "run_index", "seed", "status")


def _run_name(method: str, run_index: int) -> str:
    return f"{method}_run{run_index:02d}"


def read_run(path: Path, config: Table1Config) -> dict[str, Any]:
    """Read a finished run's JSON, refusing one written under another config (never mixed in)."""
    try:
        res = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise CheckpointError(f"{path} is not a readable run result: {err}") from err
    if not isinstance(res, dict) or any(k not in res for k in _RESULT_KEYS):
        raise CheckpointError(f"{path} is not a Table 1 run result (needs {list(_RESULT_KEYS)}); delete it")
    if res["key"] != config.key():
        raise CheckpointError(f"{path} was written for another config "
                              f"({_key_diff(res['key'], config.key())}); refusing to mix it in — delete it "
                              "or use another --out")
    if res["status"] == "ok" and not isinstance(res.get("test_mse"), (int, float)):
        raise CheckpointError(f"{path}: test_mse missing or not a number")
    return res


def _key_diff(have: Any, want: dict[str, Any]) -> str:
    if not isinstance(have, dict):
        return "no key stored"
    diff = [k for k in sorted(set(have) | set(want)) if have.get(k) != want.get(k)]
    return "differs in " + ", ".join(f"{k}: {have.get(k)!r} vs {want.get(k)!r}" for k in diff)


@contextlib.contextmanager
def _run_lock(path: Path) -> Iterator[bool]:
    """Exclusive per-run lock (``O_EXCL`` file with our pid); yields False if a live process holds it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    for _ in range(2):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            try:
                pid = int(path.read_text().strip() or "0")
                os.kill(pid, 0)
            except (ValueError, ProcessLookupError, FileNotFoundError):
                path.unlink(missing_ok=True)  # stale: its holder died
                continue
            except PermissionError:
                pass
            yield False
            return
        with os.fdopen(fd, "w") as fh:
            fh.write(str(os.getpid()))
        try:
            yield True
        finally:
            path.unlink(missing_ok=True)
        return
    yield False


def run_one(config: Table1Config, method: str, run_index: int, out: str | os.PathLike,
            progress: Any = None, stop: StopRequest | None = None) -> dict[str, Any] | None:
    """Train (or resume, or read back) run ``run_index`` of ``method`` under ``config``; return its result.

    Idempotent: a finished run is read back (after checking its key), an unfinished one resumes from its
    checkpoint. Returns None when another live process holds the run's lock.
    """
    if method not in METHODS:
        raise BadArgumentError(f"unknown method {method!r}; choose from {list(METHODS)}")
    run_dir = config.run_dir(out)
    name = _run_name(method, run_index)
    path, ckpt = run_dir / f"{name}.json", run_dir / f"{name}.ckpt"
    if path.is_file():
        return read_run(path, config)
    with _run_lock(run_dir / f"{name}.lock") as mine:
        if not mine:
            return None
        if path.is_file():  # finished by another process meanwhile
            return read_run(path, config)
        data = _load_data(config)
        seed = config.seed + run_index
        ident = {"key": config.key(), "method": method, "run_index": run_index}
        train = train_cmu if config.task == "cmu" else train_series
        t0 = time.perf_counter()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", ConvergenceWarning)
            try:
                res = train(data, method, seed, config.params, ckpt, progress, ident=ident, stop=stop)
                res["status"] = "ok"
            except (FloatingPointError, ConvergenceError, AssertionError, RuntimeError) as err:
                # AssertionError: torchdiffeq's "underflow in dt" on a stiff learned field.
                res = {"status": "failed", "error": f"{type(err).__name__}: {err}"}
        res.update(ident, seed=seed, wall_seconds=time.perf_counter() - t0,
                   convergence_warnings=sum(issubclass(w.category, ConvergenceWarning) for w in caught))
        write_json(path, res)
        ckpt.unlink(missing_ok=True)
        return res


def run_task(task: dict[str, Any], ctx: Any, config: Table1Config, out: str) -> dict[str, Any]:
    """One (method, run) of a job as a :func:`diffmpc.sweep.run_sweep` task (``--jobs``/``--address``): the
    same :func:`run_one` (same run files, checkpoints and keys under ``out``); returns its short summary."""
    torch.set_num_threads(1)
    if task["key"] != config.key():
        raise CheckpointError(f"sweep task {ctx.name} was set up for another config")
    res = run_one(config, task["method"], task["run_index"], out)
    if res is None:
        raise RuntimeError(f"{_run_name(task['method'], task['run_index'])} is held by another live process")
    return {k: res.get(k) for k in ("status", "test_mse", "final_test_mse", "train_seconds", "error")}


def _sweep(config: Table1Config, jobs_list: list[tuple[str, int]], out: str | os.PathLike, jobs: int,
           address: str | None) -> None:
    """The runs of a job as Ray tasks; the sweep's own records live in ``run_dir/sweep/`` (the run results
    stay where :func:`run_one` writes them, so sequential and parallel invocations share them)."""
    import functools

    from diffmpc.sweep import Task, run_sweep

    tasks = [Task(_run_name(m, r), {"key": config.key(), "method": m, "run_index": r}) for m, r in jobs_list]
    run_sweep(tasks, functools.partial(run_task, config=config, out=str(Path(out).resolve())),
              config.run_dir(out) / "sweep", jobs=jobs, address=address, desc=f"table1 {config.task}")


def _summary(values: list[float]) -> dict[str, float]:
    a = np.asarray(values, float)
    if a.size == 0:
        return {"n": 0, "mean": float("nan"), "se": float("nan"), "median": float("nan")}
    se = float(a.std(ddof=1) / math.sqrt(a.size)) if a.size > 1 else float("nan")
    return {"n": int(a.size), "mean": float(a.mean()), "se": se, "median": float(np.median(a)),
            "min": float(a.min()), "max": float(a.max())}


def collect(config: Table1Config, out: str | os.PathLike, runs: int) -> dict[str, dict[int, dict[str, Any]]]:
    """Every finished run (index < ``runs``) of every method under ``config`` in ``out``."""
    run_dir = config.run_dir(out)
    found: dict[str, dict[int, dict[str, Any]]] = {}
    for m in METHODS:
        for r in range(runs):
            path = run_dir / f"{_run_name(m, r)}.json"
            if path.is_file():
                found.setdefault(m, {})[r] = read_run(path, config)
    return found


def summarise(config: Table1Config, out: str | os.PathLike, runs: int, command: str = "") -> dict[str, Any]:
    """The results payload of a job from its finished runs (methods in :data:`METHODS` order)."""
    found = collect(config, out, runs)
    table, per_run = {}, {}
    for m, rs in found.items():
        ok = [rs[r] for r in sorted(rs) if rs[r]["status"] == "ok"]
        table[m] = {**_summary([x["test_mse"] for x in ok]), "runs_finished": len(rs),
                    "runs_requested": runs, "failed": len(rs) - len(ok),
                    "final_iterate": _summary([x["final_test_mse"] for x in ok]),
                    "train_seconds_mean": float(np.mean([x["train_seconds"] for x in ok])) if ok
                    else float("nan"),
                    "convergence_warnings": int(sum(x.get("convergence_warnings", 0) for x in rs.values()))}
        per_run[m] = [{k: v for k, v in rs[r].items() if k not in ("history", "key")} for r in sorted(rs)]
    payload: dict[str, Any] = {
        "task": config.task, "preset": config.preset, "seed": config.seed, "runs": runs,
        "config": asdict(config.params), "key": config.key(), "key_hash": config.key_hash(),
        "command": command,
        "selection_rule": "lowest validation MSE among evaluations every eval_every iterations and the last "
                          "one (earliest on ties); same for every method",
        "methods": {m: METHODS[m] for m in table}, "table": table,
        "paper_ift_cg": {"mean": PAPER[config.task][0], "se": PAPER[config.task][1],
                         "runs": PAPER_RUNS[config.task]},
        "per_run": per_run,
    }
    cg, dense = found.get("beuler_ift_cg", {}), found.get("beuler_ift_dense", {})
    both = [r for r in cg if r in dense and cg[r]["status"] == dense[r]["status"] == "ok"]
    if both:
        payload["cg_vs_dense_max_rel_diff"] = max(abs(cg[r]["test_mse"] - dense[r]["test_mse"])
                                                  / abs(dense[r]["test_mse"]) for r in both)
        payload["cg_vs_dense_runs_compared"] = len(both)
    payload["in_progress"] = in_progress(config, out)
    if config.task == "cmu":
        payload["calibration"] = cmu_baselines(_load_data(config))
        payload["published"] = CMU_PUBLISHED
    return payload


def in_progress(config: Table1Config, out: str | os.PathLike) -> list[dict[str, Any]]:
    """Unfinished runs of the job (from their checkpoints, loaded safely and key-checked): iteration reached,
    best validation MSE so far, training seconds — what a resume continues from."""
    rows = []
    for ckpt in sorted(config.run_dir(out).glob("*_run*.ckpt")):
        s = load_checkpoint(ckpt, expect={"key": config.key()}, schema={**_IDENT_SCHEMA, **_CKPT_SCHEMA})
        rows.append({"method": s["method"], "run_index": s["run_index"], "iter": s["it"],
                     "iters": config.params.iters, "best_val_mse": s["best"], "best_iter": s["best_it"],
                     "train_seconds": s["train_seconds"]})
    return rows


def run(task: str, runs: int, out: str | os.PathLike, seed: int = 0, preset: str = "quick",
        methods: list[str] | None = None, iters: int | None = None, cmu_path: str | os.PathLike | None = None,
        overrides: dict[str, Any] | None = None, publish: str | os.PathLike | None = None,
        command: str = "", train: bool = True, jobs: int = 1, address: str | None = None) -> dict[str, Any]:
    """Run (or resume) Table 1 for one task; write ``results.json`` and ``table1_<task>.md`` under ``out``.

    The summary covers every finished run of the job under ``out`` (methods run by earlier invocations
    too). With ``publish``, the same two files are also written there as ``table1_<task>.{json,md}`` (the
    ``table1`` preset; other presets: ``table1_<task>_<preset>``) and ``table1.md`` (all tasks) is rebuilt.
    ``train=False`` only summarises the runs already finished (``--report-only``). ``jobs > 1`` or ``address``
    runs the (method, run) pairs as Ray tasks (:func:`diffmpc.sweep.run_sweep`; in this process without Ray).
    """
    from tqdm import tqdm

    torch.set_num_threads(1)
    jobs_n = jobs  # `jobs` below is the list of (method, run) pairs
    methods = list(methods or METHODS)
    bad = [m for m in methods if m not in METHODS]
    if bad:
        raise BadArgumentError(f"unknown methods {bad}; choose from {list(METHODS)}")
    if runs < 1:
        raise BadArgumentError(f"--runs must be ≥ 1, got {runs}")
    config = make_config(task, preset, seed, {"iters": iters, **(overrides or {})}, cmu_path)
    run_dir = config.run_dir(out)
    key_file = run_dir / "config.json"
    if key_file.is_file():
        stored = json.loads(key_file.read_text())
        if stored != config.key():
            raise CheckpointError(f"{key_file}: {_key_diff(stored, config.key())}")
    else:
        write_json(key_file, config.key())
    jobs = [(m, r) for m in methods for r in range(runs)] if train else []
    skipped = 0
    stop = StopRequest()
    if train and (jobs_n > 1 or address is not None):
        _sweep(config, jobs, out, jobs_n, address)
        jobs = []
    with stop.installed(), tqdm(jobs, desc=f"table1 {task}", unit="run", dynamic_ncols=True) as bar:
        for m, r in bar:
            bar.set_description(f"table1 {task} {_run_name(m, r)}")
            if run_one(config, m, r, out, bar, stop) is None:
                skipped += 1
                bar.write(f"{_run_name(m, r)}: held by another process, skipped")
    payload = summarise(config, out, runs, command)
    payload["skipped_busy_this_invocation"] = skipped
    write_json(Path(out) / "results.json", payload)
    (Path(out) / f"table1_{task}.md").write_text(markdown(payload))
    if publish is not None:
        name = published_name(task, config.preset)
        write_json(Path(publish) / f"{name}.json", payload)
        (Path(publish) / f"{name}.md").write_text(markdown(payload))
        publish_combined(publish)
    return payload


def _fmt(s: dict[str, Any]) -> str:
    if not s.get("n"):
        return "–"
    se = "–" if not math.isfinite(s["se"]) else f"{s['se']:.2g}"
    return f"{s['mean']:.3g} ± {se}"


def markdown(payload: dict[str, Any]) -> str:
    """The job's table (test MSE per method, finished runs, selection rule, calibration for CMU)."""
    task, p = payload["task"], payload["config"]
    lines = [f"Table 1 ({task}): test MSE, mean ± standard error over finished runs (preset "
             f"{payload['preset']}: {p['iters']} iterations of {p['batch']} × {p['window']}-step windows, "
             f"seed {payload['seed']} + r; key {payload['key_hash']})", "",
             "| method | test MSE (best val.) | median | runs done / asked | failed | final iterate | "
             "train s/run |", "|---|---|---|---|---|---|---|"]
    for m, s in payload["table"].items():
        lines.append(f"| {m} | {_fmt(s)} | {s['median']:.3g} | {s['runs_finished']} / "
                     f"{s['runs_requested']} | {s['failed']} | {_fmt(s['final_iterate'])} | "
                     f"{s['train_seconds_mean']:.0f} |")
    pm = payload["paper_ift_cg"]
    lines.append(f"| paper: Bwd Euler IFT CG ({pm['runs']} runs) | {pm['mean']} ± {pm['se']} | | | | | |")
    for name, v in payload.get("calibration", {}).items():
        lines.append(f"| baseline: {name} | {v:.2f} | | | | | |")
    lines += ["", f"Selection: {payload['selection_rule']}."]
    for row in payload.get("in_progress", []):
        lines.append(f"Unfinished: {row['method']} run {row['run_index']} at iteration {row['iter']} / "
                     f"{row['iters']} (best validation MSE so far {row['best_val_mse']:.3g} at iteration "
                     f"{row['best_iter']}); rerun the command to resume it.")
    if "cg_vs_dense_max_rel_diff" in payload:
        lines.append(f"IFT CG vs IFT naive: max relative test-MSE difference "
                     f"{payload['cg_vs_dense_max_rel_diff']:.2g} over {payload['cg_vs_dense_runs_compared']} "
                     "paired runs.")
    if payload.get("command"):
        lines.append(f"Command: `{payload['command']}`")
    return "\n".join(lines) + "\n"


LABELS = {
    "dopri5_adjoint": "DOPRI5 adj. (torchdiffeq)",
    "euler_adjoint": "Fwd Euler adj. (torchdiffeq)",
    "beuler_adjoint": "Bwd Euler adj. (ours)",
    "beuler_ift_dense": "Bwd Euler IFT naive",
    "beuler_ift_cg": "**Bwd Euler IFT CG**",
}


def _cell(s: dict[str, Any] | None, runs: int) -> str:
    if not s or not s.get("n"):
        return "–"
    done = s.get("runs_finished", s["n"])
    se = s.get("se", float("nan"))
    se = f" ± {se:.2g}" if isinstance(se, float) and math.isfinite(se) else ""
    return f"{s['mean']:.3g}{se} ({done}/{s.get('runs_requested', runs)})"


def combined_markdown(results: dict[str, dict[str, Any]]) -> str:
    """Table 1 as in the paper (methods × tasks) from the per-task results payloads, with the paper's IFT-CG
    value, the CMU calibration baselines, and a line per task saying whether IFT CG reaches the paper.

    ``results`` maps task → the payload written by :func:`run` (older payloads without run counts work).
    """
    tasks = [t for t in TASKS if t in results]
    head = []
    for t in tasks:
        r = results[t]
        head.append(f"{t} ({r.get('preset', '?')}, {r['config']['iters']} it.)")
    lines = ["| method | " + " | ".join(head) + " |", "|---" * (len(tasks) + 1) + "|"]
    for m, label in LABELS.items():
        if any(m in results[t]["table"] for t in tasks):
            cells = [_cell(results[t]["table"].get(m), results[t]["runs"]) for t in tasks]
            lines.append(f"| {label} | " + " | ".join(cells) + " |")
    lines.append("| paper: Bwd Euler IFT CG | " + " | ".join(
        f"{PAPER[t][0]} ± {PAPER[t][1]} ({PAPER_RUNS[t]} runs)" for t in tasks) + " |")
    if "cmu" in results and "calibration" in results["cmu"]:
        for name, v in results["cmu"]["calibration"].items():
            lines.append(f"| CMU baseline: {name} | " + " | ".join(
                f"{v:.2f}" if t == "cmu" else "" for t in tasks) + " |")
        for name, v in results["cmu"].get("published", {}).items():
            lines.append(f"| CMU published: {name} | " + " | ".join(
                f"{v:.2f}" if t == "cmu" else "" for t in tasks) + " |")
    lines += ["", "Cells: test MSE mean ± standard error (finished runs / runs asked); model selection by "
              "the lowest validation MSE, the same rule for every method."]
    for t in tasks:
        s = results[t]["table"].get("beuler_ift_cg")
        unfinished = [row for row in results[t].get("in_progress", []) if row["method"] == "beuler_ift_cg"]
        if unfinished:
            lines.append(f"- **{t}**: IFT-CG runs unfinished (checkpointed, resumable): " + ", ".join(
                f"run {row['run_index']} at iteration {row['iter']}/{row['iters']} (best validation MSE "
                f"{row['best_val_mse']:.3g})" for row in unfinished) + ".")
        if not s or not s.get("n"):
            lines.append(f"- **{t}**: no finished IFT-CG run yet.")
            continue
        target, n_paper = PAPER[t][0], PAPER_RUNS[t]
        verdict = "reaches" if s["mean"] <= target else "does **not** reach"
        count = "" if s["n"] >= n_paper else f" — only {s['n']} of the paper's {n_paper} runs finished"
        lines.append(f"- **{t}**: IFT CG {s['mean']:.3g} (median {s['median']:.3g}, {s['n']} runs) {verdict} "
                     f"the paper's {target}{count}.")
        if "cg_vs_dense_max_rel_diff" in results[t]:
            lines.append(f"  IFT naive vs IFT CG on the same seeds: max relative difference "
                         f"{results[t]['cg_vs_dense_max_rel_diff']:.2g} over "
                         f"{results[t]['cg_vs_dense_runs_compared']} runs (one gradient, two linear "
                         "solvers).")
    cmds = [results[t].get("command") for t in tasks if results[t].get("command")]
    if cmds:
        lines += ["", "Commands: " + "; ".join(f"`{c}`" for c in cmds)]
    return "\n".join(lines) + "\n"


def published_name(task: str, preset: str) -> str:
    """``table1_<task>`` for the reproduction preset, ``table1_<task>_<preset>`` for the others."""
    return f"table1_{task}" if preset == "table1" else f"table1_{task}_{preset}"


def publish_combined(results_dir: str | os.PathLike) -> Path:
    """Write ``table1.md`` (all tasks) into ``results_dir`` from its ``table1_<task>.json`` files."""
    results_dir = Path(results_dir)
    found = {t: json.loads((results_dir / f"table1_{t}.json").read_text()) for t in TASKS
             if (results_dir / f"table1_{t}.json").is_file()}
    path = results_dir / "table1.md"
    path.write_text(combined_markdown(found))
    return path


def _handler(args: argparse.Namespace) -> int:
    try:
        config_args = dict(task=args.task, runs=args.runs, out=Path(args.out), seed=args.seed,
                           preset=args.preset, methods=args.methods, iters=args.iters, cmu_path=args.cmu_path,
                           overrides={"window": args.window, "batch": args.batch}, publish=args.publish,
                           jobs=args.jobs, address=args.address)
        payload = run(**config_args, command=_command_line(args), train=not args.report_only)
    except FileNotFoundError as err:  # the data file: a runtime failure (exit 1) with where we looked
        raise BadFileError(str(err)) from err
    print(markdown(payload))
    return 0


def _command_line(args: argparse.Namespace) -> str:
    parts = ["diffmpc table1", f"--task {args.task}", f"--preset {args.preset}", f"--runs {args.runs}",
             f"--seed {args.seed}"]
    if args.report_only:
        parts.append("--report-only")
    for flag in ("iters", "window", "batch"):
        if getattr(args, flag) is not None:
            parts.append(f"--{flag} {getattr(args, flag)}")
    if args.methods:
        parts.append("--methods " + " ".join(args.methods))
    parts.append(f"--out {args.out}")
    if args.publish:
        parts.append(f"--publish {args.publish}")
    return " ".join(parts)


def register(subparsers: Any) -> None:
    """Add the ``table1`` subcommand."""
    p = subparsers.add_parser("table1", help="neural-ODE Table 1 (VdP, spiral, CMU walking)",
                              description=__doc__.splitlines()[0])
    p.add_argument("--task", choices=TASKS, required=True)
    p.add_argument("--runs", type=int, default=3, help="independent runs per method (paper: 20 / 20 / 10)")
    p.add_argument("--out", required=True, help="output folder (results.json, table1_<task>.md, runs/)")
    p.add_argument("--seed", type=int, default=0, help="seed of run 0 (run r uses seed + r)")
    p.add_argument("--preset", choices=(*PRESETS, *DEPRECATED_PRESETS), default="quick",
                   help="tiny (CI), quick (demo), table1 (the reproduction); 'paper' is a deprecated alias")
    p.add_argument("--methods", nargs="+", choices=list(METHODS), default=None)
    p.add_argument("--iters", type=int, default=None, help="override the preset's training iterations")
    p.add_argument("--window", type=int, default=None, help="override the preset's window length (steps)")
    p.add_argument("--batch", type=int, default=None, help="override the preset's windows per iteration")
    p.add_argument("--cmu-path", default=None, help="mocap35.mat (sha256-checked; default $DIFFMPC_CMU_PATH "
                   f"or {CMU_DEFAULT_PATH})")
    p.add_argument("--publish", default=None, help="also write table1_<task>.{json,md} into this folder "
                   "(benchmarks/results for the committed copies)")
    p.add_argument("--report-only", action="store_true", help="train nothing; summarise the finished runs")
    add_sweep_arguments(p, "(method, run) pairs in parallel (one CPU each) on a local Ray")
    p.set_defaults(handler=_handler)
