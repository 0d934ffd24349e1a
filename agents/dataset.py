"""The expert dataset of the paper (Sec. 3.2): cart-pole trajectories of the RS expert, states only.

File format ``diffmpc.expert_dataset`` version 1: a NumPy ``.npz`` archive (no pickles) holding

============================  ===============================================================================
``states``                    float64 ``(N, T+1, 4)`` exact states ``x_0 … x_T`` (the training view)
``diagnostic_actions``        float64 ``(N, T, 1)`` the expert's controls — *not* part of the training view
``episode_costs``             float64 ``(N,)`` Σ_t ``info["cost"]`` per trajectory
``meta``                      a JSON string: format, version, env id, episodes N, steps T, start variance,
                              seed (trajectory i uses env/expert seed ``seed + i``), the expert's config, and
                              the SHA-256 of ``states`` (corruption check)
============================  ===============================================================================

:func:`load_dataset` checks all of it and raises :class:`DatasetError` with the reason; ``expect={...}``
also checks metadata entries (e.g. ``{"episodes": 100, "seed": 0}``). Generation checkpoints the finished
trajectories atomically to ``<path>.partial.npz`` and resumes from there.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import zipfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from diffmpc.errors import BadFileError

from .expert import ExpertConfig, SamplingExpert, make_env, run_episode

__all__ = ["ExpertDataset", "DatasetError", "generate_dataset", "load_dataset", "save_dataset",
           "FORMAT", "VERSION"]

FORMAT = "diffmpc.expert_dataset"
VERSION = 1


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

    def transitions(self) -> tuple[np.ndarray, np.ndarray]:
        """State pairs ``(x_t, x_{t+1})``, each ``(N·T, 4)``: the imitation-from-observation view."""
        return self.states[:, :-1].reshape(-1, self.states.shape[-1]), \
            self.states[:, 1:].reshape(-1, self.states.shape[-1])


def _sha256(a: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(a, dtype=np.float64).tobytes()).hexdigest()


def save_dataset(path: str | os.PathLike, data: ExpertDataset) -> Path:
    """Write ``data`` atomically (temporary file + rename) in format version 1."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    meta = dict(data.meta, format=FORMAT, version=VERSION, episodes=data.episodes, steps=data.steps,
                states_sha256=_sha256(data.states))
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            np.savez_compressed(fh, states=data.states.astype(np.float64),
                                diagnostic_actions=data.diagnostic_actions.astype(np.float64),
                                episode_costs=data.episode_costs.astype(np.float64),
                                meta=np.array(json.dumps(meta, sort_keys=True)))
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


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
    if meta.get("version") != VERSION:
        raise DatasetError(f"{path} is format version {meta.get('version')}; this code reads {VERSION}")
    states, actions, costs = arrays["states"], arrays["diagnostic_actions"], arrays["episode_costs"]
    n, t = meta.get("episodes"), meta.get("steps")
    if states.shape != (n, t + 1, 4) or actions.shape[:2] != (n, t) or costs.shape != (n,):
        raise DatasetError(f"{path}: array shapes states {states.shape}, actions {actions.shape}, costs "
                           f"{costs.shape} do not match the metadata (episodes={n}, steps={t})")
    if _sha256(states) != meta.get("states_sha256"):
        raise DatasetError(f"{path}: the states do not match their stored SHA-256 (corrupt file)")
    for key, want in (expect or {}).items():
        if meta.get(key) != want:
            raise DatasetError(f"{path}: metadata {key}={meta.get(key)!r} but {want!r} was expected "
                               "(regenerate the dataset with the intended settings)")
    return ExpertDataset(states, actions, costs, meta)


def generate_dataset(path: str | os.PathLike, episodes: int = 100, seed: int = 0,
                     start_variance: float = 0.04, config: ExpertConfig | None = None,
                     progress: bool = True, resume: bool = True, env_id: str | None = None) -> ExpertDataset:
    """Roll ``episodes`` expert trajectories (trajectory i: env and expert seed ``seed + i``) and save them.

    Each finished trajectory is checkpointed to ``<path>.partial.npz``; an interrupted run resumes there if
    its settings match (otherwise it raises rather than mixing datasets).
    """
    from tqdm import tqdm

    import envs

    if episodes < 1:
        raise ValueError(f"episodes must be >= 1, got {episodes}")
    config = config or ExpertConfig()
    env_id = env_id or envs.CARTPOLE_ID
    meta = {"env_id": env_id, "start_variance": start_variance, "seed": seed, "expert": asdict(config)}
    path = Path(path)
    partial = path.with_name(path.name + ".partial.npz")
    states, actions, costs = [], [], []
    if resume and partial.is_file():
        old = load_dataset(partial)
        mismatch = {k: (old.meta.get(k), v) for k, v in meta.items() if old.meta.get(k) != v}
        if mismatch:
            raise DatasetError(f"{partial} was made with other settings {mismatch}; delete it or pass "
                               "--no-resume")
        states, actions, costs = list(old.states), list(old.diagnostic_actions), list(old.episode_costs)
    env = make_env(start_variance, env_id)
    expert = SamplingExpert(config)
    bar = tqdm(range(len(states), episodes), desc="dataset trajectories", disable=not progress,
               initial=len(states), total=episodes)
    for i in bar:
        res = run_episode(env, expert, seed + i)
        states.append(res["states"])
        actions.append(res["actions"])
        costs.append(res["cost"])
        bar.set_postfix(mean_cost=f"{np.mean(costs):.2f}")
        save_dataset(partial, ExpertDataset(np.stack(states), np.stack(actions), np.asarray(costs), meta))
    env.close()
    data = ExpertDataset(np.stack(states), np.stack(actions), np.asarray(costs), meta)
    save_dataset(path, data)
    partial.unlink(missing_ok=True)
    return load_dataset(path)
