"""Training hygiene shared by the trainers: atomic checkpoints, resume, Ctrl-C safety, progress bars.

A checkpoint is one ``torch.save`` dict written to a temporary file in the target directory and renamed
over the old one (``os.replace`` is atomic on POSIX), so a crash or Ctrl-C mid-write never leaves a
truncated checkpoint. Trainers keep *all* their state in it — model and optimiser state dicts, the random
generator's state, the iteration and the loss history — so that ``--resume`` continues bit-for-bit where an
uninterrupted run would be (CPU, same thread count).
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

__all__ = ["save_checkpoint", "load_checkpoint", "CheckpointError", "quiet_convergence_warnings"]


class CheckpointError(RuntimeError):
    """A checkpoint is missing, unreadable, or was written by another configuration."""


def save_checkpoint(path: str | os.PathLike, state: dict[str, Any]) -> Path:
    """Write ``state`` to ``path`` atomically (temporary file in the same directory + rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            torch.save(state, fh)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def load_checkpoint(path: str | os.PathLike, expect: dict[str, Any] | None = None) -> dict[str, Any]:
    """Load a checkpoint; every ``expect`` entry must equal the stored one (e.g. the config), else raise."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"no checkpoint at {path}; run without --resume to start fresh")
    try:
        state = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as err:  # noqa: BLE001 - torch raises many types for a corrupt file
        raise CheckpointError(f"{path} is not a readable checkpoint: {err}") from err
    for key, want in (expect or {}).items():
        if state.get(key) != want:
            raise CheckpointError(
                f"{path} was written with {key}={state.get(key)!r}, not {want!r}; use "
                "another --out or the same settings to resume"
            )
    return state


@contextlib.contextmanager
def quiet_convergence_warnings() -> Iterator[None]:
    """Trainers log the converged fraction themselves; silence the per-solve ConvergenceWarning."""
    import warnings

    from diffmpc import ConvergenceWarning

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        yield
