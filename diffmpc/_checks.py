"""Small argument checks shared by the library, the agents and the CLI: each raises
:class:`~diffmpc.errors.BadArgumentError` with a message naming the argument, its value and what is allowed.

Kept apart from the numerical code on purpose (one line at each call site, no logic mixed into solvers).
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Iterable
from typing import Any

from .errors import BadArgumentError

__all__ = ["check_int", "check_real", "check_choice", "check_fields", "check_implicit_options",
           "check_solver_output", "check_has_curvature"]


def check_int(name: str, value: Any, minimum: int = 1, allow_none: bool = False) -> None:
    """``value`` is an integer (not a bool) and ``>= minimum``."""
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
        raise BadArgumentError(f"{name} must be an integer >= {minimum}, got {value!r}")


def check_real(
    name: str,
    value: Any,
    minimum: float | None = None,
    strict: bool = False,
    maximum: float | None = None,
    allow_none: bool = False,
) -> None:
    """``value`` is a finite real number, ``> minimum`` (``strict``) or ``>= minimum``, and ``<= maximum``."""
    if value is None and allow_none:
        return
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise BadArgumentError(f"{name} must be a finite number, got {value!r}") from None
    if isinstance(value, bool) or not math.isfinite(v):
        raise BadArgumentError(f"{name} must be a finite number, got {value!r}")
    if minimum is not None and (v <= minimum if strict else v < minimum):
        raise BadArgumentError(f"{name} must be {'>' if strict else '>='} {minimum}, got {value!r}")
    if maximum is not None and v > maximum:
        raise BadArgumentError(f"{name} must be <= {maximum}, got {value!r}")


def check_choice(name: str, value: Any, choices: Iterable[Any]) -> None:
    choices = tuple(choices)
    if value not in choices:
        raise BadArgumentError(f"{name} must be one of {choices}, got {value!r}")


def check_fields(
    obj: Any,
    ints: Iterable[str] = (),
    nonneg_ints: Iterable[str] = (),
    positive: Iterable[str] = (),
    nonneg: Iterable[str] = (),
    finite: Iterable[str] = (),
) -> None:
    """Validate a config object's fields by kind: ``ints`` >= 1, ``nonneg_ints`` >= 0, ``positive`` reals > 0,
    ``nonneg`` reals >= 0, ``finite`` any finite real. Messages read ``Config.field must be ...``."""
    cls = type(obj).__name__
    for k in ints:
        check_int(f"{cls}.{k}", getattr(obj, k), 1)
    for k in nonneg_ints:
        check_int(f"{cls}.{k}", getattr(obj, k), 0)
    for k in positive:
        check_real(f"{cls}.{k}", getattr(obj, k), 0.0, strict=True)
    for k in nonneg:
        check_real(f"{cls}.{k}", getattr(obj, k), 0.0)
    for k in finite:
        check_real(f"{cls}.{k}", getattr(obj, k))


# ------------------------------------------------------------------------------------------ implicit layers
def check_implicit_options(
    tol: Any = None, backward_tol: Any = None, backward_max_iter: Any = None, damping: Any = 0.0
) -> None:
    """The numeric options shared by :func:`diffmpc.argmin`, :func:`diffmpc.root`, MPC and odeint."""
    check_real("tol", tol, 0.0, strict=True, allow_none=True)
    check_real("backward_tol", backward_tol, 0.0, strict=True, allow_none=True)
    check_int("backward_max_iter", backward_max_iter, 1, allow_none=True)
    check_real("damping", damping)
    if float(damping) < 0:
        raise BadArgumentError(f"damping must be >= 0, got {damping!r}: the backward solves "
                               "(H + damping·I) w = v, and a negative shift changes the gradient (and can "
                               "make H indefinite)")


def check_solver_output(y: Any, y0: Any, kind: str = "solver") -> Any:
    """A black-box solver's answer must be a tensor shaped exactly like ``y0`` (no silent reshape)."""
    import torch

    try:
        y_t = torch.as_tensor(y, dtype=y0.dtype, device=y0.device)
    except (TypeError, ValueError, RuntimeError) as err:
        raise BadArgumentError(f"the black-box {kind} returned {type(y).__name__}, not a tensor: "
                               f"{err}") from err
    if tuple(y_t.shape) != tuple(y0.shape):
        raise BadArgumentError(f"the black-box {kind} returned shape {tuple(y_t.shape)}; it must return y "
                               f"shaped like y0 {tuple(y0.shape)}")
    return y_t


def check_has_curvature(fun: Any, y: Any) -> None:
    """Raise unless ∇_y fun depends on y: a linear (or y-independent) objective has no Hessian to invert."""
    import torch

    with torch.enable_grad():
        yr = y.detach().requires_grad_()
        (g,) = torch.autograd.grad(fun(yr).sum(), yr, create_graph=True, allow_unused=True)
    if g is None or not g.requires_grad:
        raise BadArgumentError("f has no curvature in y (its gradient does not depend on y): a linear or "
                               "constant objective has no minimiser and no Hessian for the implicit-function-"
                               "theorem backward; add a quadratic term or bounds")
