"""Training hygiene shared by the trainers: atomic checkpoints, resume, Ctrl-C safety, progress bars.

A checkpoint is one ``torch.save`` dict of plain data written atomically and loaded with ``weights_only=True``
plus structure checks (:mod:`diffmpc.io`), so a crash, Ctrl-C or SIGTERM mid-write never leaves a truncated
checkpoint and loading one never runs code. Trainers keep *all* their state in it — model and optimiser state
dicts, the random generator's state, the iteration and the loss history — so that ``--resume`` continues
bit-for-bit where an uninterrupted run would be (CPU, same thread count).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from diffmpc.io import CheckpointError, load_checkpoint, save_checkpoint

__all__ = ["save_checkpoint", "load_checkpoint", "CheckpointError", "quiet_convergence_warnings"]


@contextlib.contextmanager
def quiet_convergence_warnings() -> Iterator[None]:
    """Trainers log the converged fraction themselves; silence the per-solve ConvergenceWarning."""
    import warnings

    from diffmpc import ConvergenceWarning

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        yield
