"""The one table of default tolerances, by dtype.

``stationarity`` is the forward test ``‖∇f(y*)‖ ≤ tol`` (argmin) or ``‖F(y*)‖ ≤ tol`` (root, each
backward-Euler step): about eps^(2/3), loose enough that Newton reaches it in floating point.
``linear`` is the relative residual of the backward linear solve, ``‖v − Aw‖ ≤ tol·‖v‖``: tight in
float64 (gradients for gradcheck), about 100·eps in float32. Half precisions get 1e-2 for both.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Tolerances:
    stationarity: float
    linear: float


TABLE: dict[torch.dtype, Tolerances] = {
    torch.float64: Tolerances(stationarity=1e-9, linear=1e-10),
    torch.float32: Tolerances(stationarity=1e-4, linear=1e-5),
}
LOW_PRECISION = Tolerances(stationarity=1e-2, linear=1e-2)


def for_dtype(dtype: torch.dtype) -> Tolerances:
    return TABLE.get(dtype, LOW_PRECISION)


def stationarity_tol(dtype: torch.dtype, tol: float | None = None) -> float:
    """``tol`` if given, else the default forward (stationarity) tolerance of ``dtype``."""
    return for_dtype(dtype).stationarity if tol is None else float(tol)


def linear_tol(dtype: torch.dtype, tol: float | None = None) -> float:
    """``tol`` if given, else the default relative tolerance of a backward linear solve for ``dtype``."""
    return for_dtype(dtype).linear if tol is None else float(tol)
