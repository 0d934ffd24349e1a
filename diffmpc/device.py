"""``--device``: one place that turns a user's device string into a ``torch.device`` or a clear error.

The library itself takes no ``device=`` argument: every layer (argmin/root, the MPC layer, DARE, odeint)
computes on the device of its inputs and parameters. Code that *creates* tensors — trainers, evaluation
rollouts, experiments — takes ``device=`` and the CLI passes ``--device`` through :func:`resolve_device`.
"""

from __future__ import annotations

from typing import Any

import torch

from .errors import BadArgumentError

__all__ = ["resolve_device", "add_device_argument"]


def resolve_device(spec: str | torch.device | None) -> torch.device:
    """``None``/``"cpu"`` → CPU; ``"cuda"``, ``"cuda:1"``, ... → that GPU, if this torch build sees it."""
    if spec is None:
        return torch.device("cpu")
    try:
        device = torch.device(spec)
    except (RuntimeError, TypeError):
        raise BadArgumentError(f"--device {spec!r} is not a torch device (use cpu, cuda or cuda:N)") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise BadArgumentError(f"--device {spec}: no CUDA device is visible (torch {torch.__version__}, "
                                   f"CUDA build: {torch.version.cuda or 'no'}); use --device cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise BadArgumentError(f"--device {spec}: {torch.cuda.device_count()} CUDA device(s) visible")
    elif device.type != "cpu" and device.type != "mps":
        raise BadArgumentError(f"--device {spec}: unsupported device type {device.type!r}")
    return device


def add_device_argument(parser: Any) -> None:
    """Add ``--device`` (default cpu) to a subcommand that trains or evaluates in batches."""
    parser.add_argument("--device", default="cpu",
                        help="where models, data and batched solves live: cpu (default), cuda, cuda:N")
