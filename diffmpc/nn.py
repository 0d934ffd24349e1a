r"""Small learnable dynamics and cost modules for the MPC layer (paper Sec. 3: learned h(·; θ_h), c(·; θ_c)).

All modules are batched over a leading dimension and dtype/device agnostic (they follow their parameters).

* :class:`AngleFeatures` — ``φ(x)``: angles embedded as ``(sin, cos)`` so that learned models are 2π-periodic.
* :class:`MLPDynamics` — residual neural dynamics ``x_{t+1} = x_t + σ ⊙ f_θ(φ(x_t), u_t) + μ`` (optional
  features and input/output normalisation fitted from data).
* :class:`QuadraticCost` — ``½ (x − x̄)ᵀ Q (x − x̄) + ½ uᵀ R u + qᵀx + rᵀu`` with Q, R ⪰ 0 by construction.
* :class:`TargetStateCost` — state-only ``Σ_i w_i (φ_i(x) − φ̄_i)²`` with a learnable target φ̄ (and weights).
* :class:`SaturatingCost` — PILCO's ``1 − exp(−½ (φ(x) − φ̄)ᵀ W (φ(x) − φ̄))`` with a learnable target φ̄
  on optional features φ (e.g. the cart-pole's pole-tip position).
* :class:`ODEFunc` — the neural vector field ``h(x; θ)`` of the neural-ODE experiments (Table 1).

Costs that take only ``x`` are evaluated by :class:`diffmpc.MPC` at the *next* state of each step.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor, nn
from torch.nn import functional as F

__all__ = ["AngleFeatures", "MLPDynamics", "QuadraticCost", "TargetStateCost", "SaturatingCost", "ODEFunc"]


def _check_last(x: Tensor, n: int, what: str) -> None:
    if x.shape[-1] != n:
        raise ValueError(f"{what} must have last dimension {n}, got shape {tuple(x.shape)}")


def _learnable_or_buffer(module: nn.Module, name: str, value: Tensor, learn: bool) -> None:
    """Store ``value`` on ``module`` as a learnable parameter, or as a buffer (moves with ``.to()``, saved in
    the state dict, no gradient)."""
    if learn:
        setattr(module, name, nn.Parameter(value))
    else:
        module.register_buffer(name, value)


def _inv_softplus(y: Tensor) -> Tensor:
    return y + torch.log(-torch.expm1(-y))


class AngleFeatures(nn.Module):
    r"""``φ(x)``: the state with each angle ``x_i`` (``i ∈ angle_dims``) replaced by ``(sin x_i, cos x_i)``.

    Output order: the non-angle entries in their order, then ``sin`` and ``cos`` of each angle. A learned
    model on φ is 2π-periodic in the angles, so a pole that swung up clockwise and one that swung up
    anticlockwise (θ = π vs θ = −π) are the same state — which a model on raw θ would have to learn.
    """

    def __init__(self, state_dim: int, angle_dims: Sequence[int] = ()) -> None:
        super().__init__()
        angles = sorted({int(i) % state_dim for i in angle_dims}) if state_dim > 0 else []
        if state_dim < 1 or len(angles) != len(tuple(angle_dims)):
            raise ValueError(f"angle_dims {tuple(angle_dims)} must be distinct indices of a state of size "
                             f"{state_dim}")
        self.state_dim = state_dim
        self.angle_dims = tuple(angles)
        self.plain_dims = tuple(i for i in range(state_dim) if i not in angles)
        self.out_dim = state_dim + len(angles)

    def forward(self, x: Tensor) -> Tensor:
        _check_last(x, self.state_dim, "state x")
        if not self.angle_dims:
            return x
        th = x[..., list(self.angle_dims)]
        return torch.cat([x[..., list(self.plain_dims)], torch.sin(th), torch.cos(th)], dim=-1)


class MLPDynamics(nn.Module):
    r"""Residual MLP dynamics ``h(x, u) = x + μ + σ ⊙ f_θ((φ(x) − m_φ)/s_φ, (u − m_u)/s_u)``, batched
    ``(B, n), (B, m) -> (B, n)``.

    ``φ`` is an optional feature map (e.g. :class:`AngleFeatures`; default identity). The normalisation
    buffers (input mean/scale, output offset μ and scale σ of the increment ``x' − x``) default to 0 / 1;
    :meth:`fit_normalization` sets them from data, so the network learns O(1) targets even when the state
    entries differ by orders of magnitude (cart-pole: Δx ~ 0.1 m but Δθ̇ ~ 5 rad/s).
    The residual form starts near ``x + μ`` (the last layer is initialised at ``out_scale`` times PyTorch's
    default), which keeps early MPC problems well posed. Smooth activations (tanh, softplus, ...)
    are needed for meaningful Hessians in the IFT backward; ReLU has zero curvature almost everywhere.
    """

    def __init__(self, state_dim: int, action_dim: int, hidden: Sequence[int] = (64, 64),
                 activation: Callable[[], nn.Module] = nn.Tanh, out_scale: float = 0.1,
                 features: nn.Module | None = None) -> None:
        super().__init__()
        if state_dim < 1 or action_dim < 1:
            raise ValueError("state_dim and action_dim must be positive")
        self.state_dim, self.action_dim = state_dim, action_dim
        self.features = features
        feat_dim = int(getattr(features, "out_dim", state_dim)) if features is not None else state_dim
        sizes = [feat_dim + action_dim, *hidden, state_dim]
        layers: list[nn.Module] = []
        for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:], strict=True)):
            layers.append(nn.Linear(a, b))
            if i < len(sizes) - 2:
                layers.append(activation())
        self.net = nn.Sequential(*layers)
        with torch.no_grad():
            last = self.net[-1]
            last.weight.mul_(out_scale)
            last.bias.mul_(out_scale)
        self.register_buffer("in_mean", torch.zeros(feat_dim + action_dim))
        self.register_buffer("in_scale", torch.ones(feat_dim + action_dim))
        self.register_buffer("out_mean", torch.zeros(state_dim))
        self.register_buffer("out_scale", torch.ones(state_dim))

    def _inputs(self, x: Tensor, u: Tensor) -> Tensor:
        phi = self.features(x) if self.features is not None else x
        return torch.cat([phi, u], dim=-1)

    @torch.no_grad()
    def fit_normalization(self, x: Tensor, u: Tensor, x_next: Tensor, min_scale: float = 1e-6) -> None:
        """Set the input and increment normalisation from transitions ``(x, u, x')`` (each ``(N, ·)``)."""
        inp = self._inputs(x, u)
        delta = x_next - x
        self.in_mean.copy_(inp.mean(0))
        self.in_scale.copy_(inp.std(0).clamp_min(min_scale))
        self.out_mean.copy_(delta.mean(0))
        self.out_scale.copy_(delta.std(0).clamp_min(min_scale))

    def forward(self, x: Tensor, u: Tensor) -> Tensor:
        _check_last(x, self.state_dim, "state x")
        _check_last(u, self.action_dim, "action u")
        z = (self._inputs(x, u) - self.in_mean) / self.in_scale
        return x + self.out_mean + self.out_scale * self.net(z)


def _psd(raw: Tensor, diag: bool) -> Tensor:
    """Diagonal case: softplus(raw) on the diagonal. Full case: L Lᵀ with L = tril(raw), positive diagonal."""
    if diag:
        return torch.diag_embed(F.softplus(raw))
    L = torch.tril(raw, -1) + torch.diag_embed(F.softplus(torch.diagonal(raw)))
    return L @ L.transpose(-1, -2)


def _raw_from(M: Tensor, diag: bool) -> Tensor:
    if diag:
        d = torch.diagonal(M) if M.ndim == 2 else M
        if not bool((d > 0).all()):
            raise ValueError("a diagonal weight must be strictly positive")
        return _inv_softplus(d)
    L = torch.linalg.cholesky(M)
    return torch.tril(L, -1) + torch.diag_embed(_inv_softplus(torch.diagonal(L)))


class QuadraticCost(nn.Module):
    r"""Stage cost ``c(x, u) = ½ (x − x̄)ᵀ Q (x − x̄) + ½ uᵀ R u + qᵀ x + rᵀ u``.

    Q and R are parametrised to stay positive (semi)definite while learning: ``diag=True`` uses
    ``softplus`` weights, otherwise a Cholesky factor with a softplus diagonal. ``learn`` selects which of
    ``"Q", "R", "target", "q", "r"`` are ``nn.Parameter``s (the others are buffers).
    """

    def __init__(self, Q: Tensor, R: Tensor, target: Tensor | None = None, q: Tensor | None = None,
                 r: Tensor | None = None, diag: bool = True,
                 learn: Sequence[str] = ("Q", "R", "target")) -> None:
        super().__init__()
        Q, R = torch.as_tensor(Q), torch.as_tensor(R)
        if Q.ndim == 1:
            Q = torch.diag(Q)
        if R.ndim == 1:
            R = torch.diag(R)
        n, m = Q.shape[0], R.shape[0]
        if Q.shape != (n, n) or R.shape != (m, m):
            raise ValueError(f"Q must be (n, n) and R (m, m), got {tuple(Q.shape)} and {tuple(R.shape)}")
        unknown = set(learn) - {"Q", "R", "target", "q", "r"}
        if unknown:
            raise ValueError(f"unknown learnable entries {sorted(unknown)}")
        self.state_dim, self.action_dim, self.diag = n, m, diag
        values = {
            "Q_raw": _raw_from(Q, diag), "R_raw": _raw_from(R, diag),
            "target": torch.zeros(n, dtype=Q.dtype) if target is None else torch.as_tensor(target).to(Q),
            "q": torch.zeros(n, dtype=Q.dtype) if q is None else torch.as_tensor(q).to(Q),
            "r": torch.zeros(m, dtype=Q.dtype) if r is None else torch.as_tensor(r).to(Q),
        }
        names = {"Q_raw": "Q", "R_raw": "R", "target": "target", "q": "q", "r": "r"}
        for key, value in values.items():
            if names[key] in learn:
                setattr(self, key, nn.Parameter(value.clone()))
            else:
                self.register_buffer(key, value.clone())

    @property
    def Q(self) -> Tensor:
        return _psd(self.Q_raw, self.diag)

    @property
    def R(self) -> Tensor:
        return _psd(self.R_raw, self.diag)

    def forward(self, x: Tensor, u: Tensor) -> Tensor:
        _check_last(x, self.state_dim, "state x")
        _check_last(u, self.action_dim, "action u")
        dx = x - self.target
        if self.diag:
            quad = (F.softplus(self.Q_raw) * dx * dx).sum(-1) + (F.softplus(self.R_raw) * u * u).sum(-1)
        else:
            quad = (dx @ self.Q * dx).sum(-1) + (u @ self.R * u).sum(-1)
        return 0.5 * quad + x @ self.q + u @ self.r


class TargetStateCost(nn.Module):
    r"""State-only cost ``c(x) = Σ_i w_i (φ_i(x) − φ̄_i)²`` with a learnable target φ̄ (and weights).

    ``φ`` is an optional feature map (default identity: ``φ̄`` is a target *state*); with
    :class:`AngleFeatures` the target of an angle is a point ``(sin, cos)`` and the cost is 2π-periodic.
    ``w = softplus(w_raw)`` stays positive; ``learn_weights=False`` keeps the weights fixed.
    ``normalize_weights=True`` uses ``w = k·softmax(w_raw)`` instead (k = len(w)): the weights keep summing
    to k, which removes the scale invariance of the argmin (c and 2c have the same minimiser) that would
    otherwise let learning drift the cost's scale and, with it, the meaning of absolute solver tolerances.
    Being state-only, :class:`diffmpc.MPC` evaluates it at the next state of every step.
    """

    def __init__(self, target: Tensor, weights: Tensor | None = None, learn_weights: bool = False,
                 features: nn.Module | Callable[[Tensor], Tensor] | None = None,
                 normalize_weights: bool = False) -> None:
        super().__init__()
        target = torch.as_tensor(target)
        if target.ndim != 1:
            raise ValueError(f"target must be a vector (k,), got shape {tuple(target.shape)}")
        w = torch.ones_like(target) if weights is None else torch.as_tensor(weights).to(target)
        if w.shape != target.shape or not bool((w > 0).all()):
            raise ValueError("weights must be positive and shaped like target")
        self.features = features
        self.normalize_weights = normalize_weights
        self.target = nn.Parameter(target.clone())
        _learnable_or_buffer(self, "w_raw", torch.log(w) if normalize_weights else _inv_softplus(w),
                             learn_weights)

    @property
    def weights(self) -> Tensor:
        if self.normalize_weights:
            return self.w_raw.numel() * torch.softmax(self.w_raw, 0)
        return F.softplus(self.w_raw)

    def forward(self, x: Tensor) -> Tensor:
        phi = self.features(x) if self.features is not None else x
        _check_last(phi, self.target.shape[0], "features φ(x)" if self.features is not None else "state x")
        d = phi - self.target
        return (self.weights * d * d).sum(-1)


class SaturatingCost(nn.Module):
    r"""PILCO saturating cost ``c(x) = 1 − exp(−½ (φ(x) − φ̄)ᵀ W (φ(x) − φ̄))`` with learnable target φ̄.

    ``features`` maps states ``(..., n)`` to features ``(..., k)`` (default identity, k = n); for the
    cart-pole, the pole-tip position ``(x + l sinθ, −l cosθ)`` with ``W = I / w²`` is PILCO's cost.
    ``W = diag(1 / width²)``; ``learn_width=True`` also learns the widths (through a softplus).
    """

    def __init__(self, target: Tensor, width: float | Tensor = 1.0,
                 features: Callable[[Tensor], Tensor] | None = None, learn_width: bool = False) -> None:
        super().__init__()
        target = torch.as_tensor(target)
        if target.ndim != 1:
            raise ValueError(f"target must be a feature vector (k,), got shape {tuple(target.shape)}")
        width_t = torch.as_tensor(width, dtype=target.dtype).expand_as(target).clone()
        if not bool((width_t > 0).all()):
            raise ValueError("width must be positive")
        self.features = features
        self.target = nn.Parameter(target.clone())
        _learnable_or_buffer(self, "width_raw", _inv_softplus(width_t), learn_width)

    @property
    def width(self) -> Tensor:
        return F.softplus(self.width_raw)

    def forward(self, x: Tensor) -> Tensor:
        phi = self.features(x) if self.features is not None else x
        _check_last(phi, self.target.shape[0], "features φ(x)")
        d = (phi - self.target) / self.width
        return 1.0 - torch.exp(-0.5 * (d * d).sum(-1))


class ODEFunc(nn.Module):
    """The neural vector field ``h(x; θ)``: MLP ``D → hidden → hidden → D`` with tanh, autonomous."""

    def __init__(self, dim: int, hidden: int = 30):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(dim, hidden), nn.Tanh(), nn.Linear(hidden, hidden), nn.Tanh(),
                                 nn.Linear(hidden, dim))

    def forward(self, t: Tensor | float, y: Tensor) -> Tensor:
        return self.net(y)
