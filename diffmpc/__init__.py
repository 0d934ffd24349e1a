"""diffmpc: differentiable implicit layers and differentiable control for PyTorch.

The core is :func:`argmin` / :func:`root`: solve with any forward solver, differentiate with the implicit
function theorem and matrix-free conjugate gradient (Look et al., *Differentiable Implicit Layers*).
"""

from . import backward, linalg, solvers
from .backward import CG, GMRES, MINRES, Dense, NormalCG, Unroll
from .implicit import (
    ARGMIN_BACKWARDS,
    ROOT_BACKWARDS,
    BackwardInfo,
    ConvergenceError,
    ConvergenceWarning,
    ImplicitInfo,
    argmin,
    record_backward,
    root,
)

__version__ = "0.1.0"

# Application layers are imported on first use (keeps `import diffmpc` light and independent of them).
_LAZY = {
    "dare": "lqr",
    "dlqr": "lqr",
    "MPC": "mpc",
    "odeint": "ode",
}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module 'diffmpc' has no attribute {name!r}")


__all__ = [
    "argmin",
    "root",
    "ImplicitInfo",
    "BackwardInfo",
    "record_backward",
    "backward",
    "CG",
    "NormalCG",
    "MINRES",
    "GMRES",
    "Dense",
    "Unroll",
    "ConvergenceWarning",
    "ConvergenceError",
    "ARGMIN_BACKWARDS",
    "ROOT_BACKWARDS",
    "linalg",
    "solvers",
    "__version__",
    "dare",
    "dlqr",
    "MPC",
    "odeint",
]
