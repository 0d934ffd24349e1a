"""Safe, loss-free files and jobs: atomic writes, safe checkpoint loading, run-directory locks, SIGTERM.

Everything that writes results or checkpoints goes through here, so the guarantees hold everywhere:

* **Atomic writes** (:func:`atomic_write`, :func:`write_results`, :func:`save_checkpoint`): a temporary file
  in the target directory, flushed and ``fsync``-ed, then ``os.replace``-d over the target (atomic on
  POSIX). A crash, Ctrl-C or SIGTERM mid-write leaves the old file or the new one, never a truncated one.
* **Files are untrusted** (:func:`load_checkpoint`): ``torch.load(weights_only=True)`` only — a pickle that
  would construct arbitrary objects (a ``__reduce__`` payload) is refused *before* anything in it runs — then
  the structure is validated (a dict with the expected keys, types and tensor shapes), and every ``expect``
  entry (config, seed, dataset hash, ...) must equal the stored one. Checkpoints therefore hold plain data
  only: tensors, dicts, lists, tuples, str, int, float, bool, None (:func:`save_checkpoint` checks that).
* **One writer per run directory** (:func:`run_lock`): an ``flock`` on ``<out>/.diffmpc.lock``; a second
  process gets :class:`~diffmpc.errors.RunDirError` naming the holder's pid. The kernel drops the lock when
  its holder dies, so a crashed run never leaves a stale lock behind.
* **SIGTERM is Ctrl-C** (:func:`sigterm_as_interrupt`): what ``timeout``, schedulers and cluster managers send
  raises :class:`Terminated` (a ``KeyboardInterrupt``), so every ``except KeyboardInterrupt`` that saves a
  checkpoint also runs on SIGTERM.

This module sits at the bottom of the package (it imports only :mod:`diffmpc.errors`, torch and the
standard library), so the library, the agents and the CLI can all use it.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import pickle
import signal
import tempfile
import threading
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import IO, Any

import torch

from .errors import BadFileError, RunDirError

__all__ = [
    "CheckpointError",
    "Terminated",
    "atomic_write",
    "write_results",
    "write_json",
    "json_default",
    "save_checkpoint",
    "load_checkpoint",
    "check_state_dict",
    "file_sha256",
    "run_lock",
    "sigterm_as_interrupt",
    "ensure_writable",
    "refuse_overwrite",
]

LOCK_NAME = ".diffmpc.lock"


class CheckpointError(BadFileError):
    """A checkpoint is missing, unreadable, unsafe to load, malformed, or was written by other settings."""


class Terminated(KeyboardInterrupt):
    """SIGTERM (or another terminating signal) delivered as an interrupt; ``signum`` says which."""

    def __init__(self, signum: int = signal.SIGTERM) -> None:
        super().__init__(f"received {signal.Signals(signum).name}")
        self.signum = signum


# --------------------------------------------------------------------------------------------- atomic writes
def atomic_write(path: str | os.PathLike, write: Callable[[IO[Any]], None], binary: bool = False) -> Path:
    """Call ``write(fh)`` on a temporary file next to ``path``, fsync it, then rename it over ``path``.

    The file gets the mode an ordinary ``open(path, "w")`` would give (``0o666`` less the umask), not
    ``mkstemp``'s private ``0o600``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb" if binary else "w") as fh:
            write(fh)
            fh.flush()
            os.fchmod(fh.fileno(), 0o666 & ~_umask())
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def _umask() -> int:
    mask = os.umask(0o022)  # reading the umask means setting it; restore at once
    os.umask(mask)
    return mask


def json_default(o: Any) -> Any:
    """``json.dump(default=...)`` hook: tensors/arrays via ``tolist``, paths as strings."""
    if hasattr(o, "tolist"):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def write_json(path: str | os.PathLike, obj: Any) -> Path:
    """Write ``obj`` as indented JSON to ``path`` atomically (tensors/arrays via ``tolist``)."""

    def write(fh: IO[str]) -> None:
        json.dump(obj, fh, indent=2, default=json_default)
        fh.write("\n")

    return atomic_write(path, write)


def write_results(out: str | os.PathLike, results: dict[str, Any], name: str = "results.json") -> Path:
    """Write ``results`` as JSON to ``out/name`` atomically (temp file + rename): never half-written."""
    return write_json(Path(out) / name, results)


def file_sha256(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    """SHA-256 hex digest of a file's bytes (identity of a dataset or checkpoint)."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()


# --------------------------------------------------------------------------------------------- checkpoints
_PLAIN = (str, int, float, bool, type(None), torch.Tensor, torch.dtype, torch.device, torch.Size)


def _plain_path(obj: Any, where: str = "state") -> str | None:
    """Where ``obj`` holds something ``torch.load(weights_only=True)`` would refuse (None if nowhere)."""
    if isinstance(obj, _PLAIN):
        return None
    if isinstance(obj, Mapping):
        for k, v in obj.items():
            if not isinstance(k, (str, int)):
                return f"{where} key {k!r}"
            bad = _plain_path(v, f"{where}[{k!r}]")
            if bad:
                return bad
        return None
    if isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            bad = _plain_path(v, f"{where}[{i}]")
            if bad:
                return bad
        return None
    return f"{where} ({type(obj).__name__})"


def save_checkpoint(path: str | os.PathLike, state: dict[str, Any]) -> Path:
    """Write ``state`` with ``torch.save`` to ``path`` atomically.

    ``state`` must be plain data (tensors, dicts, lists, tuples, str/int/float/bool/None), so that it loads
    back with ``weights_only=True``; anything else (a dataclass, a numpy array, a generator object) is refused
    here, when it is still the writer's bug and not a reader's surprise.
    """
    bad = _plain_path(state)
    if bad:
        raise TypeError(f"checkpoint {path}: {bad} is not plain data (tensors, dict, list, str, numbers); "
                        "store configs as dicts and generator states as tensors")
    return atomic_write(path, lambda fh: torch.save(state, fh), binary=True)


Schema = Mapping[str, "type | tuple[type, ...] | tuple[int | None, ...]"]


def load_checkpoint(
    path: str | os.PathLike,
    expect: Mapping[str, Any] | None = None,
    schema: Mapping[str, Any] | None = None,
    error: type[BadFileError] = CheckpointError,
) -> dict[str, Any]:
    """Load a checkpoint without running any code in it and validate it.

    Args:
        path: the ``.pt`` file.
        expect: entries that must equal the stored ones (``kind``, ``config``, ``seed``, data hashes, ...).
        schema: required keys and what they hold: a type (or tuple of types), or — for a tensor — a shape
            tuple whose ``None`` entries match any size, e.g. ``{"iteration": int, "weights": (None, 4)}``.
        error: the :class:`BadFileError` subclass to raise (default :class:`CheckpointError`).

    Raises:
        BadFileError: (of class ``error``) if the file is missing, unreadable, would need to construct
            arbitrary Python objects (the unpickler stops before constructing them), is not a dict, lacks a
            key, holds the wrong type or shape, or differs from ``expect``; the message names the file and
            the offending entry.
    """
    path = Path(path)
    if not path.is_file():
        raise error(f"no checkpoint at {path}; run without --resume to start fresh")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        detail = next((ln.strip() for ln in str(err).splitlines() if "GLOBAL" in ln or "global" in ln), "")
        if not detail:  # not a refused object, just garbage
            raise error(f"{path} is not a readable checkpoint (corrupt or truncated?): {err}") from err
        raise error(f"{path} is not a safe checkpoint: it holds Python objects other than tensors and plain "
                    f"data, whose unpickling could run code; refused before constructing them. {detail}"
                    .rstrip()) from err
    except Exception as err:  # noqa: BLE001 - torch raises many types for a corrupt file
        raise error(f"{path} is not a readable checkpoint (corrupt or truncated?): {err}") from err
    if not isinstance(state, dict):
        raise error(f"{path} holds a {type(state).__name__}, not a checkpoint dict")
    for key, spec in (schema or {}).items():
        if key not in state:
            raise error(f"{path} lacks the entry {key!r}; not a checkpoint of this kind")
        _check_entry(path, key, state[key], spec, error)
    for key, want in (expect or {}).items():
        have = state.get(key)
        if have != want:
            raise error(f"{path} was written with {key}={_short(have)}, not {_short(want)}"
                        f"{_diff(have, want)}; use another --out, --overwrite or the same settings to resume")
    return state


def _check_entry(path: Path, key: str, value: Any, spec: Any, error: type[BadFileError]) -> None:
    if isinstance(spec, tuple) and all(s is None or isinstance(s, int) for s in spec):
        if not isinstance(value, torch.Tensor):
            raise error(f"{path}: entry {key!r} should be a tensor, got {type(value).__name__}")
        shape = tuple(value.shape)
        if len(shape) != len(spec) or any(s is not None and s != n for s, n in zip(spec, shape, strict=True)):
            want = tuple("*" if s is None else s for s in spec)
            raise error(f"{path}: entry {key!r} has shape {tuple(value.shape)}, expected {want}")
        return
    if spec is float:
        spec = (int, float)
    if not isinstance(value, spec) or (spec is int and isinstance(value, bool)):
        names = spec.__name__ if isinstance(spec, type) else "/".join(t.__name__ for t in spec)
        raise error(f"{path}: entry {key!r} should be {names}, got {type(value).__name__}")


def _short(v: Any, n: int = 120) -> str:
    s = repr(v)
    return s if len(s) <= n else s[: n - 3] + "..."


def _diff(have: Any, want: Any) -> str:
    """For two dicts, name the keys whose values differ (the useful part of a config mismatch)."""
    if not (isinstance(have, dict) and isinstance(want, dict)):
        return ""
    keys = sorted(k for k in set(have) | set(want) if have.get(k, "<absent>") != want.get(k, "<absent>"))
    shown = ", ".join(f"{k}: {_short(have.get(k, '<absent>'), 40)} vs {_short(want.get(k, '<absent>'), 40)}"
                      for k in keys[:6])
    return f" (differs in {shown}{', ...' if len(keys) > 6 else ''})"


def check_state_dict(
    module: torch.nn.Module, state: Any, what: str, path: str | os.PathLike,
    error: type[BadFileError] = CheckpointError,
) -> None:
    """Check that ``state`` is a state dict for ``module`` (same keys, tensor shapes) before loading it."""
    if not isinstance(state, Mapping):
        raise error(f"{path}: {what} should be a state dict, got {type(state).__name__}")
    own = module.state_dict()
    missing, extra = sorted(set(own) - set(state)), sorted(set(state) - set(own))
    if missing or extra:
        raise error(f"{path}: {what} does not fit the model (missing {missing[:4]}, unexpected {extra[:4]}); "
                    "written by another architecture?")
    for k, t in own.items():
        v = state[k]
        if not isinstance(v, torch.Tensor) or v.shape != t.shape:
            got = tuple(v.shape) if isinstance(v, torch.Tensor) else type(v).__name__
            raise error(f"{path}: {what}[{k!r}] has shape {got}, the model expects {tuple(t.shape)}")
        if not torch.isfinite(v).all() and v.is_floating_point():
            raise error(f"{path}: {what}[{k!r}] holds NaN or inf")


# ------------------------------------------------------------------------------------------ run directories
_held_locks: dict[Path, list[Any]] = {}  # path -> [file object, depth]; re-entrant within one process
_locks_guard = threading.Lock()


@contextlib.contextmanager
def run_lock(out: str | os.PathLike) -> Iterator[Path]:
    """Hold an exclusive lock on the run directory ``out`` (created if needed) for the ``with`` block.

    A second process asking for the same directory gets :class:`RunDirError` at once (no waiting) naming the
    pid that holds it. Re-entrant within one process. Where ``fcntl`` is missing (Windows) no lock is taken.
    """
    out = Path(out)
    ensure_writable(out)
    key = out.resolve()
    with _locks_guard:
        held = _held_locks.get(key)
        if held is not None:
            held[1] += 1
    if held is not None:
        try:
            yield out
        finally:
            with _locks_guard:
                held[1] -= 1
        return
    try:
        import fcntl
    except ImportError:  # pragma: no cover - non-POSIX
        yield out
        return
    fh = open(key / LOCK_NAME, "a+")  # noqa: SIM115 - closed in finally
    try:
        try:
            fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            fh.seek(0)
            holder = fh.read().strip() or "unknown"
            raise RunDirError(f"{out} is in use by another diffmpc run (pid {holder}); wait for it to finish "
                              "or choose another --out") from None
        fh.seek(0)
        fh.truncate()
        fh.write(f"{os.getpid()}\n")
        fh.flush()
        with _locks_guard:
            _held_locks[key] = [fh, 1]
        try:
            yield out
        finally:
            with _locks_guard:
                _held_locks.pop(key, None)
            fcntl.flock(fh.fileno(), fcntl.LOCK_UN)
    finally:
        fh.close()


def ensure_writable(out: str | os.PathLike) -> Path:
    """Create ``out`` if needed and check a file can be written there, before any long job starts."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise RunDirError(f"--out {out} exists and is not a directory")
    try:
        out.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(dir=out, prefix=".write-probe.")
        os.close(fd)
        os.unlink(probe)
    except OSError as err:
        raise RunDirError(f"--out {out} is not writable: {err.strerror or err}") from err
    return out


def refuse_overwrite(path: str | os.PathLike, resume: bool, overwrite: bool) -> None:
    """Refuse to start a fresh run over an existing checkpoint ``path`` unless resuming or overwriting."""
    path = Path(path)
    if path.exists() and not resume and not overwrite:
        raise RunDirError(f"{path} already holds a checkpoint; pass --resume to continue it or --overwrite "
                          "to discard it (or choose another --out)")


@contextlib.contextmanager
def sigterm_as_interrupt(signals: tuple[int, ...] = (signal.SIGTERM,)) -> Iterator[None]:
    """Deliver SIGTERM as :class:`Terminated` (a ``KeyboardInterrupt``) inside the ``with`` block.

    Trainers already roll back to their last complete iteration and save on ``KeyboardInterrupt``; with this,
    ``timeout``, ``kill`` and cluster schedulers get the same treatment as Ctrl-C. Outside the main thread
    (where Python cannot install handlers) this does nothing. The previous handlers are restored on exit.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum: int, frame: Any) -> None:
        raise Terminated(signum)

    previous = {s: signal.signal(s, handler) for s in signals}
    try:
        yield
    finally:
        for s, h in previous.items():
            signal.signal(s, h)
