"""Backward diagnostics delivered by value: one immutable :class:`BackwardInfo` per backward call,
appended to every active :func:`record_backward` list (a process-wide stack: autograd may run a backward
on another thread, e.g. for CUDA tensors)."""

from __future__ import annotations

import itertools
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from .krylov import SolveInfo

_ids = itertools.count(1)
_lock = threading.Lock()
_active: list[list[BackwardInfo]] = []


def next_call_id() -> int:
    """A process-unique id that ties a forward info to the records of its backward calls."""
    return next(_ids)


@dataclass(frozen=True)
class BackwardInfo:
    """What one backward pass of one implicit layer did (immutable; delivered by :func:`record_backward`).

    Attributes:
        layer: ``"argmin"``, ``"root"``, ``"dare"`` or ``"odeint"``.
        call_id: the ``call_id`` of the forward info (:class:`~diffmpc.ImplicitInfo`, ``OdeInfo``) whose
            output this backward differentiated; a layer output backpropagated twice gives two records.
        strategy: the backward strategy that ran (``repr`` of the object, or the front end's name).
        solves: the adjoint linear solves (one for argmin/root/dare; one per step, in step order, for odeint;
            empty for closed-form backwards). Each :class:`~diffmpc.linalg.SolveInfo` is per sample.
        notes: events worth knowing (negative curvature and a MINRES re-solve, ...).
        root_iterations: odeint ``backward="adjoint"`` only: root-solver iterations of the backward state
            reconstruction, summed over steps (max over samples).
    """

    layer: str
    call_id: int
    strategy: str
    solves: tuple[SolveInfo, ...] = ()
    notes: tuple[str, ...] = ()
    root_iterations: int = 0

    @property
    def converged(self) -> bool:
        """Whether every sample of every solve met its documented test."""
        return all(bool(s.converged.all()) for s in self.solves)

    @property
    def iterations(self) -> int:
        """Krylov iterations summed over the solves (max over samples within each solve)."""
        return sum(int(s.iterations.max()) for s in self.solves if s.iterations.numel())

    @property
    def solve(self) -> SolveInfo | None:
        """The single solve of an argmin/root/dare backward (None for closed forms and odeint)."""
        return self.solves[0] if len(self.solves) == 1 else None


@contextmanager
def record_backward() -> Iterator[list[BackwardInfo]]:
    """Collect a :class:`BackwardInfo` for every implicit-layer backward run inside the block::

        with diffmpc.record_backward() as records:
            loss.backward()
        assert all(r.converged for r in records)

    Like ``warnings.catch_warnings(record=True)``: the list is filled while the block runs; nested blocks
    each receive every record.
    """
    records: list[BackwardInfo] = []
    with _lock:
        _active.append(records)
    try:
        yield records
    finally:
        with _lock:
            _active[:] = [r for r in _active if r is not records]


def emit(record: BackwardInfo) -> None:
    with _lock:
        targets = list(_active)
    for records in targets:
        records.append(record)
