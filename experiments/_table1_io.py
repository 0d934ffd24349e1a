"""Minimal safe file I/O for Table 1 until :mod:`diffmpc.io` (issue 14) lands; same names and signatures.

Atomic writes (temp file + ``os.replace``), ``torch.load(weights_only=True)`` with structure checks, and an
``expect`` mapping that must equal the stored entries (the config key).
"""

from __future__ import annotations

import json
import os
import pickle
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import IO, Any

import torch


class CheckpointError(ValueError):
    """A checkpoint / run file is missing, unreadable, unsafe to load, malformed, or from another config."""


def atomic_write(path: str | os.PathLike, write: Callable[[IO[Any]], None], binary: bool = False) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb" if binary else "w") as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def _jsonable(o: Any) -> Any:
    if hasattr(o, "tolist"):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def write_json(path: str | os.PathLike, obj: Any) -> Path:
    def write(fh: IO[str]) -> None:
        json.dump(obj, fh, indent=2, default=_jsonable)
        fh.write("\n")

    return atomic_write(path, write)


def save_checkpoint(path: str | os.PathLike, state: dict[str, Any]) -> Path:
    return atomic_write(path, lambda fh: torch.save(state, fh), binary=True)


def load_checkpoint(path: str | os.PathLike, expect: Mapping[str, Any] | None = None,
                    schema: Mapping[str, Any] | None = None) -> dict[str, Any]:
    path = Path(path)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        raise CheckpointError(f"{path} is not a safe checkpoint (it holds Python objects other than tensors and "
                              f"plain data; refused before constructing them): {err}") from err
    except Exception as err:  # noqa: BLE001 - torch raises many types for a corrupt file
        raise CheckpointError(f"{path} is not a readable checkpoint (corrupt or truncated?): {err}") from err
    if not isinstance(state, dict):
        raise CheckpointError(f"{path} holds a {type(state).__name__}, not a checkpoint dict")
    for key, spec in (schema or {}).items():
        if key not in state:
            raise CheckpointError(f"{path} lacks the entry {key!r}; not a checkpoint of this kind")
        value = state[key]
        if isinstance(spec, tuple) and all(s is None or isinstance(s, int) for s in spec):
            ok = isinstance(value, torch.Tensor) and value.dim() == len(spec)
        else:
            spec = (int, float) if spec is float else spec
            ok = isinstance(value, spec) and not (spec is int and isinstance(value, bool))
        if not ok:
            raise CheckpointError(f"{path}: entry {key!r} has the wrong type {type(value).__name__}")
    for key, want in (expect or {}).items():
        if state.get(key) != want:
            raise CheckpointError(f"{path} was written with {key}={state.get(key)!r}, not {want!r}; delete it or "
                                  "use the settings it was written with")
    return state


def check_state_dict(module: torch.nn.Module, state: Any, what: str, path: str | os.PathLike) -> None:
    if not isinstance(state, Mapping):
        raise CheckpointError(f"{path}: {what} should be a state dict, got {type(state).__name__}")
    own = module.state_dict()
    if set(own) != set(state):
        raise CheckpointError(f"{path}: {what} does not fit the model (keys differ)")
    for k, t in own.items():
        v = state[k]
        if not isinstance(v, torch.Tensor) or v.shape != t.shape:
            raise CheckpointError(f"{path}: {what}[{k!r}] does not have the model's shape {tuple(t.shape)}")
