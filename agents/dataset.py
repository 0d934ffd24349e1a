"""Expert datasets, states only: the paper's cart-pole dataset (Sec. 3.2) or any env's, from any expert.

File format ``diffmpc.expert_dataset`` version 2: a NumPy ``.npz`` archive (no pickles) holding

============================  ===============================================================================
``states``                    float64 ``(N, T+1, n)`` states ``x_0 … x_T`` (the training view): the env's
                              ``info["state"]`` where it gives one (our envs: exact), else the observation
``diagnostic_actions``        float64 ``(N, T, m)`` the expert's controls — *not* part of the training view
``episode_costs``             float64 ``(N,)`` Σ_t cost per trajectory (``info["cost"]``, else ``-reward``)
``meta``                      a JSON string: format, version, env id and spec, state and action dims n and
                              m, episodes N, steps T, start variance, seed (trajectory i uses env/expert seed
                              ``seed + i``), the expert's description, and the SHA-256 of ``states``
============================  ===============================================================================

Version 1 files (cart-pole only: n = 4, m = 1, no dims in the metadata) still load.

:func:`load_dataset` checks all of it and raises :class:`DatasetError` with the reason; ``expect={...}``
also checks metadata entries (e.g. ``{"episodes": 100, "seed": 0}``). Generation checkpoints the finished
trajectories atomically to ``<path>.partial.npz`` and resumes from there.
"""

from __future__ import annotations

import hashlib
import json
import os
import zipfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from diffmpc._checks import check_int
from diffmpc.errors import BadFileError
from diffmpc.io import atomic_write

from .expert import ExpertConfig, make_env, run_episode, sampling_expert

__all__ = ["ExpertDataset", "DatasetError", "generate_dataset", "load_dataset", "save_dataset",
           "FORMAT", "VERSION"]

FORMAT = "diffmpc.expert_dataset"
VERSION = 2
READABLE_VERSIONS = (1, 2)


class DatasetError(BadFileError):
    """A dataset file is missing, corrupt, of another format/version, or does not match what was expected."""


@dataclass(frozen=True)
class ExpertDataset:
    """States-only expert trajectories (``states``) plus diagnostics and metadata."""

    states: np.ndarray
    diagnostic_actions: np.ndarray
    episode_costs: np.ndarray
    meta: dict[str, Any]

    @property
    def episodes(self) -> int:
        return int(self.states.shape[0])

    @property
    def steps(self) -> int:
        return int(self.states.shape[1] - 1)

    @property
    def state_dim(self) -> int:
        return int(self.states.shape[-1])

    def transitions(self) -> tuple[np.ndarray, np.ndarray]:
        """State pairs ``(x_t, x_{t+1})``, each ``(N·T, n)``: the imitation-from-observation view."""
        return self.states[:, :-1].reshape(-1, self.states.shape[-1]), \
            self.states[:, 1:].reshape(-1, self.states.shape[-1])


def _sha256(a: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(a, dtype=np.float64).tobytes()).hexdigest()


def save_dataset(path: str | os.PathLike, data: ExpertDataset) -> Path:
    """Write ``data`` atomically (temporary file + rename) in format version 2."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if data.states.ndim != 3 or data.diagnostic_actions.ndim != 3:
        raise ValueError(f"states must be (N, T+1, n) and actions (N, T, m), got {data.states.shape} and "
                         f"{data.diagnostic_actions.shape}")
    meta = dict(data.meta, format=FORMAT, version=VERSION, episodes=data.episodes, steps=data.steps,
                state_dim=data.state_dim, action_dim=int(data.diagnostic_actions.shape[-1]),
                states_sha256=_sha256(data.states))
    def write(fh: Any) -> None:
        np.savez_compressed(fh, states=data.states.astype(np.float64),
                            diagnostic_actions=data.diagnostic_actions.astype(np.float64),
                            episode_costs=data.episode_costs.astype(np.float64),
                            meta=np.array(json.dumps(meta, sort_keys=True)))

    return atomic_write(path, write, binary=True)


def load_dataset(path: str | os.PathLike, expect: dict[str, Any] | None = None) -> ExpertDataset:
    """Load and validate a dataset file; ``expect`` entries must equal the stored metadata."""
    path = Path(path)
    if not path.is_file():
        raise DatasetError(f"dataset file {path} does not exist; create it with `diffmpc dataset --out ...`")
    try:
        with np.load(path, allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
    except (zipfile.BadZipFile, OSError, ValueError, EOFError, KeyError) as err:
        raise DatasetError(f"{path} is not a readable .npz dataset (corrupt or truncated?): {err}") from err
    missing = {"states", "diagnostic_actions", "episode_costs", "meta"} - set(arrays)
    if missing:
        raise DatasetError(f"{path} lacks the field(s) {sorted(missing)}; not a {FORMAT} file")
    try:
        meta = json.loads(str(arrays["meta"]))
    except json.JSONDecodeError as err:
        raise DatasetError(f"{path}: the metadata is not valid JSON ({err})") from err
    if meta.get("format") != FORMAT:
        raise DatasetError(f"{path} has format {meta.get('format')!r}, expected {FORMAT!r}")
    if meta.get("version") not in READABLE_VERSIONS:
        raise DatasetError(f"{path} is format version {meta.get('version')}; this code reads "
                           f"{READABLE_VERSIONS}")
    if meta["version"] == 1:  # version 1 held the cart-pole only and did not record its dims
        meta = dict(meta, state_dim=4, action_dim=1)
    states, actions, costs = arrays["states"], arrays["diagnostic_actions"], arrays["episode_costs"]
    n, t, sd, ad = (meta.get(k) for k in ("episodes", "steps", "state_dim", "action_dim"))
    if not all(isinstance(v, int) and v >= 0 for v in (n, t, sd, ad)):
        raise DatasetError(f"{path}: the metadata lacks valid episodes/steps/state_dim/action_dim, got "
                           f"{(n, t, sd, ad)}")
    for name, arr, want in (("states", states, (n, t + 1, sd)), ("diagnostic_actions", actions, (n, t, ad)),
                            ("episode_costs", costs, (n,))):
        if arr.shape != want:
            raise DatasetError(f"{path}: {name} has shape {arr.shape} but the metadata (episodes={n}, "
                               f"steps={t}, state_dim={sd}, action_dim={ad}) says {want}")
    if _sha256(states) != meta.get("states_sha256"):
        raise DatasetError(f"{path}: the states do not match their stored SHA-256 (corrupt file)")
    if not np.all(np.isfinite(states)):  # a matching hash says the file is as written, not that it is sane
        bad = np.argwhere(~np.isfinite(states))[0].tolist()
        raise DatasetError(f"{path}: the states contain NaN or inf (first at episode {bad[0]}, step "
                           f"{bad[1]}); regenerate the dataset")
    for key, want in (expect or {}).items():
        if meta.get(key) != want:
            raise DatasetError(f"{path}: metadata {key}={meta.get(key)!r} but {want!r} was expected "
                               "(regenerate the dataset with the intended settings)")
    return ExpertDataset(states, actions, costs, meta)


def _describe(expert: Any, config: ExpertConfig | None) -> dict[str, Any]:
    if config is not None:
        return asdict(config)
    cfg = getattr(expert, "config", None)
    if cfg is not None and hasattr(cfg, "__dataclass_fields__"):
        return asdict(cfg)
    return {"policy": type(expert).__qualname__, "module": type(expert).__module__}


def _spec_json(env: Any) -> str | None:
    spec = getattr(env, "spec", None)
    try:
        return spec.to_json() if spec is not None else None
    except Exception:  # noqa: BLE001 - a spec with callables cannot be serialised; the id is recorded anyway
        return None


def generate_dataset(path: str | os.PathLike, episodes: int = 100, seed: int = 0,
                     start_variance: float | None = None, config: ExpertConfig | None = None,
                     progress: bool = True, resume: bool = True, env_id: str | None = None,
                     expert: Any = None, env: Any = None, max_steps: int | None = None,
                     expert_spec: str | None = None) -> ExpertDataset:
    """Roll ``episodes`` expert trajectories (trajectory i: env and expert seed ``seed + i``) and save them.

    ``env`` is an env instance, else ``gymnasium.make(env_id)`` (default: the cart-pole swing-up with
    ``start_variance``, default 0.04). ``expert`` is any policy (an :class:`agents.MPCPolicy` on your model,
    or a callable ``obs -> action``); the default is the cart-pole sampling expert with ``config`` (cart-pole
    only). ``expert_spec`` names the expert in the metadata (the command line's ``--expert module:function``),
    so that a resume with another expert is refused. Episodes must all have the same length (``max_steps``
    cuts them).

    Each finished trajectory is checkpointed to ``<path>.partial.npz``; an interrupted run resumes there if
    its settings match (otherwise it raises rather than mixing datasets).
    """
    from tqdm import tqdm

    import envs

    check_int("episodes", episodes, 1)
    own_env = env is None
    if own_env:
        env = make_env(env_id, start_variance)
    env_id = env.spec.id if getattr(env, "spec", None) is not None else env_id
    if expert is None:
        if env_id != envs.CARTPOLE_ID:
            raise ValueError(f"there is no default expert for {env_id}; pass expert= (an agents.MPCPolicy on "
                             "your model of the env, or any callable obs -> action)")
        config = config or ExpertConfig()
        expert = sampling_expert(config)
    if start_variance is None and env_id == envs.CARTPOLE_ID:
        start_variance = 0.04
    meta = {"env_id": env_id, "env_spec": _spec_json(env), "start_variance": start_variance, "seed": seed,
            "expert": _describe(expert, config) | ({"spec": expert_spec} if expert_spec else {}),
            "max_steps": max_steps}
    path = Path(path)
    partial = path.with_name(path.name + ".partial.npz")
    states, actions, costs = [], [], []
    if resume and partial.is_file():
        old = load_dataset(partial)
        mismatch = {k: (old.meta.get(k), v) for k, v in meta.items() if old.meta.get(k) != v}
        if mismatch:
            raise DatasetError(f"{partial} was made with other settings {mismatch}; delete it or pass "
                               "--no-resume")
        planned = old.meta.get("episodes_planned")
        if (planned is not None and planned != episodes) or old.episodes > episodes:
            raise DatasetError(f"{partial} is an interrupted run of {planned or 'more'} episodes "
                               f"({old.episodes} done), not episodes={episodes}; rerun with the same "
                               "--episodes to finish it, or pass --no-resume")
        states, actions, costs = list(old.states), list(old.diagnostic_actions), list(old.episode_costs)
    partial_meta = dict(meta, episodes_planned=episodes)  # the partial file's own setting, checked above
    bar = tqdm(range(len(states), episodes), desc="dataset trajectories", disable=not progress,
               initial=len(states), total=episodes)
    for i in bar:
        res = run_episode(env, expert, seed + i, max_steps=max_steps)
        if states and res["states"].shape != states[0].shape:
            raise DatasetError(f"trajectory {i} has {len(res['states']) - 1} steps and state shape "
                               f"{res['states'].shape[1:]}, trajectory 0 {len(states[0]) - 1} steps: a "
                               "dataset needs fixed-length episodes (pass max_steps, or use an env without "
                               "early termination)")
        states.append(res["states"])
        actions.append(res["actions"])
        costs.append(res["cost"])
        bar.set_postfix(mean_cost=f"{np.mean(costs):.2f}")
        save_dataset(partial, ExpertDataset(np.stack(states), np.stack(actions), np.asarray(costs),
                                            partial_meta))
    if own_env:
        env.close()
    data = ExpertDataset(np.stack(states), np.stack(actions), np.asarray(costs), meta)
    save_dataset(path, data)
    partial.unlink(missing_ok=True)
    return load_dataset(path)
