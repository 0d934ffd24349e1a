"""Per-sample reductions on batches ``(B, *S)``: every problem in the leading dimension is independent."""

from __future__ import annotations

import torch
from torch import Tensor


def dot(a: Tensor, b: Tensor) -> Tensor:
    """Per-sample inner product of two ``(B, *S)`` batches -> ``(B,)``."""
    return (a * b).reshape(a.shape[0], a[0].numel() if a.shape[0] else 0).sum(1)


def norm(a: Tensor) -> Tensor:
    """Per-sample Euclidean norm of a ``(B, *S)`` batch -> ``(B,)``."""
    return dot(a, a).clamp_min(0).sqrt()


def col(s: Tensor, like: Tensor) -> Tensor:
    """Reshape a per-sample scalar ``(B,)`` to broadcast against ``(B, *S)``."""
    return s.view(-1, *([1] * (like.ndim - 1)))


def default_max_iter(b: Tensor, max_iter: int | None) -> int:
    """Iteration cap of a Krylov solve: in exact arithmetic CG/MINRES finish in D steps; allow 2D for
    round-off, at least 10 and at most 1000 (huge D)."""
    if max_iter is not None:
        return int(max_iter)
    per_sample = b[0].numel() if b.shape[0] else 0  # an empty batch (B = 0) has nothing to iterate on
    return max(10, min(2 * per_sample, 1000))


def describe_failing(mask: Tensor, values: Tensor, limit: int = 8) -> str:
    """``"2 of 5 samples [#1: 0.3, #4: 2]"`` — which samples fail and their numbers, for messages."""
    idx = torch.nonzero(mask).flatten().tolist()
    shown = ", ".join(f"#{i}: {values[i].item():.3g}" for i in idx[:limit])
    more = f" (+{len(idx) - limit} more)" if len(idx) > limit else ""
    return f"{len(idx)} of {mask.numel()} samples [{shown}{more}]"
