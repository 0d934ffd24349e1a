"""The exception families of diffmpc: one type per kind of failure, each message naming the offending input.

==========================  ================  ==========================================================
family                      also an instance  raised when
==========================  ================  ==========================================================
:class:`BadArgumentError`   ``ValueError``    an argument, option or config field is out of its domain
                                              (NaN tolerance, negative ``max_iter``, wrong shape, ...)
:class:`BadFileError`       ``ValueError``    a file we read (dataset, checkpoint, results, cache) is
                                              missing, corrupt, unsafe (would run code) or was written
                                              for other settings / other data
:class:`RunDirError`        ``RuntimeError``  an output directory cannot be used: another process holds
                                              its lock, it holds work that would be overwritten, or it
                                              is not writable
:class:`ConvergenceError`   ``RuntimeError``  a solve did not converge (under ``strict=True``; otherwise
                                              :class:`ConvergenceWarning` with the residuals)
==========================  ================  ==========================================================

All four derive from :class:`DiffmpcError`, so ``except DiffmpcError`` catches every diffmpc failure, while
``except ValueError`` keeps working for the input errors (the ``ValueError`` subclasses are what Python users
expect for bad values). This module imports nothing from the package: everything may import it.
"""

from __future__ import annotations

__all__ = [
    "DiffmpcError",
    "BadArgumentError",
    "BadFileError",
    "RunDirError",
    "ConvergenceError",
    "ConvergenceWarning",
]


class DiffmpcError(Exception):
    """Base class of every error diffmpc raises on purpose."""


class BadArgumentError(DiffmpcError, ValueError):
    """An argument, option or config field is invalid; the message names it, its value and what is allowed."""


class BadFileError(DiffmpcError, ValueError):
    """A file we read is missing, corrupt, unsafe to load, or was written for other settings or other data."""


class RunDirError(DiffmpcError, RuntimeError):
    """An output directory is locked by another run, holds work that would be lost, or is not writable."""


class ConvergenceError(DiffmpcError, RuntimeError):
    """A solve did not converge; raised instead of :class:`ConvergenceWarning` under ``strict=True``."""


class ConvergenceWarning(UserWarning):
    """A forward solve did not reach a stationary point, or a backward linear solve did not converge."""
