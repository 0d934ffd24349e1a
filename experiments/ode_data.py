"""Data for the neural-ODE Table 1: Van der Pol and spiral (generated), CMU walking (loaded by path).

* **Van der Pol** (paper footnote 1): ``ẍ = μ(1 − x²)ẋ − x`` with μ = 3 as the first-order system
  ``(x, v)' = (v, μ(1 − x²)v − x)`` from ``(2, 0)``, 320 observations Δt = 0.1 apart, split consecutively
  into train / validation / test. The footnote's 107 / 106 / 106 sums to 319; the test part gets the
  remaining point (107 / 106 / 107).
* **Spiral** (footnote 2): ``dx/dt = (x³) A`` with ``A = [[−1, 2], [−2, −0.1]]`` (cube elementwise, ``x`` a
  row vector — torchdiffeq's classic spiral demo with the paper's A) from ``(2, 0)``, 300 observations
  Δt = 0.1, split 100 / 50 / 150. The footnote writes a second derivative; we read it as this first-order
  system, as in the torchdiffeq example it comes from.
* **CMU walking** (subject 35, ODE2VAE preprocessing): ``mocap35.mat`` with ``Xtr`` (16, 300, 50),
  ``Xval`` (3, 300, 50), ``Xtest`` (4, 300, 50), Δt = 0.1; checked against its sha256.

Both ODEs are solved with ``scipy.integrate.solve_ivp`` (Radau, rtol 1e-10, atol 1e-12) and evaluated at
the observation times (dense output is not used: each time is an ``t_eval`` point).
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from scipy.integrate import solve_ivp

from diffmpc.errors import BadFileError
from diffmpc.io import file_sha256

__all__ = ["Series", "van_der_pol", "spiral", "load_cmu", "cmu_baselines", "CMU_SHA256",
           "CMU_DEFAULT_PATH", "make_task"]

CMU_SHA256 = "105484f138487f10209cce883d26e2e030d10a6df6f10159f4e6e253f9b03b8d"
# ``../shared/data/mocap35.mat`` beside the project root; ``$DIFFMPC_CMU_PATH`` overrides it (worktrees).
CMU_DEFAULT_PATH = Path(os.environ.get("DIFFMPC_CMU_PATH")
                        or Path(__file__).resolve().parents[1].parent / "shared" / "data" / "mocap35.mat")
SPIRAL_A = np.array([[-1.0, 2.0], [-2.0, -0.1]])


@dataclass(frozen=True)
class Series:
    """One observed trajectory ``x`` (N, D) at times ``t`` (N,), split consecutively into train/val/test."""

    name: str
    t: np.ndarray
    x: np.ndarray
    n_train: int
    n_val: int
    n_test: int

    def __post_init__(self):
        if self.n_train + self.n_val + self.n_test != len(self.t) or self.x.shape[0] != len(self.t):
            raise ValueError(f"{self.name}: split {self.n_train}/{self.n_val}/{self.n_test} does not match "
                             f"{len(self.t)} observations")

    @property
    def dt(self) -> float:
        return float(self.t[1] - self.t[0])


def _solve(rhs, x0, n: int, dt: float) -> tuple[np.ndarray, np.ndarray]:
    t = np.arange(n) * dt
    sol = solve_ivp(rhs, (0.0, t[-1]), np.asarray(x0, float), method="Radau", t_eval=t, rtol=1e-10,
                    atol=1e-12)
    if not sol.success:
        raise RuntimeError(f"solve_ivp failed: {sol.message}")
    return t, sol.y.T.copy()


def van_der_pol(mu: float = 3.0, dt: float = 0.1, n: int = 320, x0=(2.0, 0.0),
                split=(107, 106, 107)) -> Series:
    """Van der Pol oscillator, paper footnote 1 (μ = 3, Δt = 0.1, 320 points; 107/106/107, see module)."""
    t, x = _solve(lambda _, s: [s[1], mu * (1 - s[0] ** 2) * s[1] - s[0]], x0, n, dt)
    return Series(f"vdp(mu={mu:g})", t, x, *split)


def spiral(A: np.ndarray = SPIRAL_A, dt: float = 0.1, n: int = 300, x0=(2.0, 0.0),
           split=(100, 50, 150)) -> Series:
    """Cubic spiral ``dx/dt = (x³) A``, paper footnote 2 (Δt = 0.1, 300 points, 100/50/150)."""
    A = np.asarray(A, float)
    t, x = _solve(lambda _, s: (s**3) @ A, x0, n, dt)
    return Series("spiral", t, x, *split)


def load_cmu(path: str | Path | None = None, sha256: str | None = CMU_SHA256) -> dict[str, np.ndarray]:
    """Load the CMU walking data (``Xtr``, ``Xval``, ``Xtest``; each (n, 300, 50)) from ``mocap35.mat``.

    Raises ``FileNotFoundError`` with where it looked when the file is absent and ``BadFileError`` (a
    ``ValueError``) when its sha256 differs from ``sha256`` (pass ``sha256=None`` to skip the check, e.g.
    for synthetic test files) or its structure is wrong.
    """
    from scipy.io import loadmat

    path = Path(path) if path is not None else CMU_DEFAULT_PATH
    if not path.is_file():
        raise FileNotFoundError(f"CMU walking data not found at {path.resolve()} (expected the shared "
                                "mocap35.mat; pass --cmu-path)")
    if sha256 is not None:
        got = file_sha256(path)
        if got != sha256:
            raise BadFileError(f"{path}: sha256 {got} does not match the expected {sha256}; wrong or corrupt "
                             "file")
    mat = loadmat(str(path))
    out = {}
    for key in ("Xtr", "Xval", "Xtest"):
        if key not in mat:
            found = sorted(k for k in mat if not k.startswith("_"))
            raise BadFileError(f"{path}: key {key!r} missing (found {found})")
        arr = np.asarray(mat[key], dtype=np.float64)
        if arr.ndim != 3:
            raise BadFileError(f"{path}: {key} should be (sequences, frames, features), got {arr.shape}")
        out[key] = arr
    if len({a.shape[1:] for a in out.values()}) != 1:
        raise BadFileError(f"{path}: Xtr/Xval/Xtest frame shapes differ: {[a.shape for a in out.values()]}")
    return out


@functools.lru_cache(maxsize=4)
def make_task(name: str) -> Series:
    """The generated series of a Table 1 task (``"vdp"`` or ``"spiral"``); cached, treat as read-only."""
    if name == "vdp":
        return van_der_pol()
    if name == "spiral":
        return spiral()
    raise ValueError(f"unknown generated task {name!r}; choose 'vdp' or 'spiral' (cmu is loaded by load_cmu)")


def cmu_baselines(data: dict[str, np.ndarray], observed: int = 3) -> dict[str, float]:
    """Calibration baselines for the CMU test MSE (frames ``observed``..end, all dims, raw units).

    * ``mean frame (zeros)`` — the data are mean-centred, so predicting zeros is predicting the mean frame;
    * ``hold last observed frame`` — repeat frame ``observed − 1`` of each test walk;
    * ``nearest training walk`` — copy the training walk whose first ``observed`` frames are closest
      (squared distance) to the test walk's, frames ``observed``..end.
    A model worth reporting beats the first two; the third is what memorising the training set gives.
    """
    tr, te = np.asarray(data["Xtr"], float), np.asarray(data["Xtest"], float)
    target = te[:, observed:]
    dist = ((te[:, None, :observed] - tr[None, :, :observed]) ** 2).sum(axis=(2, 3))  # (test, train)
    nearest = tr[dist.argmin(axis=1), observed:]
    return {"mean frame (zeros)": float((target**2).mean()),
            "hold last observed frame": float(((target - te[:, observed - 1 : observed]) ** 2).mean()),
            "nearest training walk": float(((target - nearest) ** 2).mean())}
