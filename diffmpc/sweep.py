"""Sweeps: many independent runs, each in its own resumable run directory, on Ray or in this process.

``run_sweep(tasks, run_fn, out_dir, jobs=N, address=None)`` runs ``run_fn(config, ctx)`` once per
:class:`Task` ``(name, config)`` and returns a :class:`SweepResult`. The guarantees:

* **Idempotent, resumable run directories.** Task ``name`` owns ``out_dir/name/``. Its ``run.json`` records
  the full config and its hash (SHA-256 of the canonical JSON): written with status ``started`` before the
  run, replaced atomically by ``finished`` + the run's results (or ``failed`` + the traceback) after it. A
  finished run whose config hash matches is skipped; a directory written for another config (or holding
  files without a ``run.json``) is refused with :class:`~diffmpc.errors.RunDirError` before anything runs,
  never mixed. Whatever ``run_fn`` checkpoints under ``ctx.dir`` therefore belongs to this exact config, so
  an interrupted run resumes from its own checkpoints.
* **Backends.** With Ray installed (``pip install 'diffmpc[ray]'``) the runs are Ray tasks of one CPU each:
  a private local Ray instance with ``jobs`` CPUs by default, or an existing cluster with ``address``
  (``"auto"``, ``"ray://host:10001"``; ``out_dir`` must then be a filesystem every node sees). ``jobs=1``
  without ``address`` runs in this process (Ray would only add its start-up time). Without Ray the same call
  runs every task sequentially in this process after a one-line hint.
* **Failures are per run.** An exception in ``run_fn`` (or a crashed Ray worker) marks that run ``failed``
  with its traceback (``run.json`` and ``error.txt``, printed once) and the sweep goes on.
* **Ctrl-C / SIGTERM** cancel the outstanding runs (Ray tasks are force-cancelled), then ``aggregate`` is
  called on the finished runs and the interrupt is re-raised. Finished runs stay intact (their
  ``run.json`` is only ever replaced atomically); an interrupted run has no ``finished`` record and reruns.
* **Progress**: one tqdm bar over runs; ``ctx.log(loss=...)`` (or :func:`report`) from inside a run shows
  that run's last logged metrics beside the bar. A run's stdout/stderr go to ``out_dir/name/log.txt``.

This module imports no gymnasium and nothing above the library; Ray and tqdm are imported lazily.
"""

from __future__ import annotations

import contextlib
import contextvars
import hashlib
import json
import math
import os
import sys
import time
import traceback
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import BadArgumentError, RunDirError
from .io import json_default, run_lock, sigterm_as_interrupt, write_json

__all__ = [
    "Task",
    "RunContext",
    "SweepResult",
    "run_sweep",
    "report",
    "config_hash",
    "load_finished",
    "ray_available",
    "add_sweep_arguments",
    "RUN_FILE",
]

RUN_FILE = "run.json"  # the run's record: config + hash + status (+ results or traceback)
PROGRESS_FILE = "progress.json"  # last metrics logged by a running run (what the driver shows)
ERROR_FILE = "error.txt"
LOG_FILE = "log.txt"
_LOG_INTERVAL_S = 1.0  # a running run rewrites progress.json at most this often


# --------------------------------------------------------------------------------------------- tasks
@dataclass(frozen=True)
class Task:
    """One run of a sweep: ``name`` is its run directory under ``out_dir``; ``config`` (JSON-serialisable)
    is everything the run depends on and is what its results and checkpoints are keyed on."""

    name: str
    config: Mapping[str, Any]


def config_hash(config: Mapping[str, Any]) -> str:
    """SHA-256 of the canonical JSON of ``config`` (sorted keys, no whitespace): the run's identity."""
    try:
        text = json.dumps(config, sort_keys=True, separators=(",", ":"), allow_nan=True)
    except TypeError as err:
        raise BadArgumentError(f"a sweep task's config must be JSON-serialisable: {err}") from None
    return hashlib.sha256(text.encode()).hexdigest()


def _check_tasks(tasks: Iterable[Task]) -> list[Task]:
    tasks = list(tasks)
    seen: set[str] = set()
    for t in tasks:
        if not isinstance(t, Task):
            raise BadArgumentError(f"sweep tasks must be Task(name, config), got {type(t).__name__}")
        if not t.name or t.name in (".", "..") or "/" in t.name or os.sep in t.name or t.name.startswith("."):
            raise BadArgumentError(f"task name {t.name!r} is not a plain directory name")
        if t.name in seen:
            raise BadArgumentError(f"two sweep tasks are named {t.name!r}; names must be unique")
        seen.add(t.name)
        config_hash(t.config)  # JSON-serialisable, or a clear error now rather than in a worker
    return tasks


# --------------------------------------------------------------------------------------------- in a run
_CURRENT: contextvars.ContextVar[RunContext | None] = contextvars.ContextVar("sweep_run", default=None)


@dataclass
class RunContext:
    """What ``run_fn(config, ctx)`` gets besides its config: its directory and a metrics logger."""

    name: str
    dir: Path
    config: dict[str, Any]
    _last_write: float = field(default=-math.inf, repr=False)
    _metrics: dict[str, Any] = field(default_factory=dict, repr=False)
    _on_log: Callable[[str, dict[str, Any]], None] | None = field(default=None, repr=False)

    def log(self, **metrics: Any) -> None:
        """Record the run's latest metrics (e.g. ``step=12, loss=0.3``); shown beside the sweep's bar."""
        self._metrics = {k: _plain(v) for k, v in metrics.items()}
        if self._on_log is not None:
            self._on_log(self.name, self._metrics)
        now = time.monotonic()
        if now - self._last_write >= _LOG_INTERVAL_S:
            self.flush()
            self._last_write = now

    def flush(self) -> None:
        """Write the latest metrics to ``progress.json`` now (``log`` writes at most once a second)."""
        if self._metrics:
            with contextlib.suppress(OSError):
                write_json(self.dir / PROGRESS_FILE, self._metrics)


def report(**metrics: Any) -> None:
    """Log metrics to the sweep run executing in this context (no-op outside a sweep): lets a trainer
    report its loss without knowing whether it runs inside a sweep."""
    ctx = _CURRENT.get()
    if ctx is not None:
        ctx.log(**metrics)


def _plain(v: Any) -> Any:
    if hasattr(v, "item") and getattr(v, "ndim", 1) == 0:
        return v.item()  # documented host sync: a logged scalar
    return v


# --------------------------------------------------------------------------------------------- results
@dataclass
class SweepResult:
    """What a sweep did. ``finished`` holds the results of every finished task (this sweep's and earlier
    ones'), ``failed`` the traceback of each failed run, ``cancelled`` the runs an interrupt stopped."""

    out_dir: Path
    backend: str
    finished: dict[str, Any] = field(default_factory=dict)
    ran: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)
    cancelled: list[str] = field(default_factory=list)
    aggregate: Any = None
    wall_s: float = 0.0
    interrupted: bool = False

    def summary(self) -> str:
        """One line: finished (run now / resumed), failed and cancelled runs, backend and wall time."""
        parts = [f"{len(self.finished)} finished ({len(self.ran)} run now, {len(self.skipped)} resumed)"]
        if self.failed:
            parts.append(f"{len(self.failed)} failed: {', '.join(self.failed)}")
        if self.cancelled:
            parts.append(f"{len(self.cancelled)} cancelled")
        return f"sweep [{self.backend}] in {self.wall_s:.1f} s: " + "; ".join(parts)


def _read_record(run_dir: Path) -> dict[str, Any] | None:
    path = run_dir / RUN_FILE
    if not path.is_file():
        return None
    try:
        rec = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise RunDirError(f"{path} is unreadable ({err}); move the run directory away to rerun it") from None
    if not isinstance(rec, dict) or not isinstance(rec.get("config_hash"), str):
        raise RunDirError(f"{path} is not a sweep run record; move the run directory away to rerun it")
    return rec


def _prepare(task: Task, out_dir: Path) -> dict[str, Any] | None:
    """The finished record of ``task`` if it has one; None if it must run. Refuses a foreign directory."""
    run_dir = out_dir / task.name
    rec = _read_record(run_dir)
    want = config_hash(task.config)
    if rec is None:
        if run_dir.is_dir() and any(run_dir.iterdir()):
            raise RunDirError(f"{run_dir} holds files but no {RUN_FILE}: not a run of this sweep; move it "
                              "away or choose another --out")
        return None
    if rec["config_hash"] != want:
        diff = _config_diff(rec.get("config", {}), dict(task.config))
        raise RunDirError(f"{run_dir} was written for another config ({diff}); results and checkpoints of "
                          "different configs are never mixed: choose another --out or move it away")
    return rec if rec.get("status") == "finished" else None


def _config_diff(old: Mapping[str, Any], new: Mapping[str, Any]) -> str:
    keys = sorted(set(old) | set(new))
    diffs = [f"{k}: {old.get(k, '<unset>')!r} -> {new.get(k, '<unset>')!r}" for k in keys
             if old.get(k, "<unset>") != new.get(k, "<unset>")]
    return "; ".join(diffs[:4]) + (" ..." if len(diffs) > 4 else "") or "same keys, other values"


def load_finished(out_dir: str | os.PathLike, tasks: Iterable[Task]) -> dict[str, Any]:
    """Results of the finished runs of ``tasks`` under ``out_dir`` (config hash checked), by task name."""
    out_dir = Path(out_dir)
    done = {}
    for t in tasks:
        rec = _read_record(out_dir / t.name)
        if rec and rec.get("status") == "finished" and rec["config_hash"] == config_hash(t.config):
            done[t.name] = rec.get("results")
    return done


# --------------------------------------------------------------------------------------------- one run
def _execute(run_fn: Callable[[dict[str, Any], RunContext], Any], task: Task, out_dir: str,
             threads: int | None = None, on_log: Callable[[str, dict[str, Any]], None] | None = None,
             ) -> dict[str, Any]:
    """Run one task (in this process or in a Ray worker) and write its record. Never raises for a failing
    ``run_fn``: returns ``{"status": "failed", "traceback": ...}`` instead (KeyboardInterrupt propagates)."""
    run_dir = Path(out_dir) / task.name
    run_dir.mkdir(parents=True, exist_ok=True)
    config = json.loads(json.dumps(dict(task.config)))  # a private, plain copy
    base = {"name": task.name, "config": config, "config_hash": config_hash(task.config)}
    write_json(run_dir / RUN_FILE, {**base, "status": "started", "pid": os.getpid()})
    with contextlib.suppress(FileNotFoundError):
        (run_dir / ERROR_FILE).unlink()
    if threads:
        import torch

        torch.set_num_threads(threads)
    ctx = RunContext(task.name, run_dir, config, _on_log=on_log)
    token = _CURRENT.set(ctx)
    t0 = time.perf_counter()
    try:
        with open(run_dir / LOG_FILE, "a") as log, contextlib.redirect_stdout(log), \
                contextlib.redirect_stderr(log):
            results = run_fn(config, ctx)
        json.dumps(results, default=json_default)  # fail here, as this run's error, if not serialisable
        rec = {**base, "status": "finished", "wall_s": time.perf_counter() - t0, "results": results}
    except KeyboardInterrupt:
        raise
    except BaseException:  # noqa: BLE001 - any failure of the run (also SystemExit) is this run's failure
        tb = traceback.format_exc()
        (run_dir / ERROR_FILE).write_text(tb)
        rec = {**base, "status": "failed", "wall_s": time.perf_counter() - t0, "traceback": tb}
    finally:
        _CURRENT.reset(token)
        ctx.flush()
    write_json(run_dir / RUN_FILE, rec)
    return rec


# --------------------------------------------------------------------------------------------- the sweep
def ray_available() -> bool:
    """Whether Ray can be imported (``pip install 'diffmpc[ray]'``)."""
    try:
        import ray  # noqa: F401
    except ImportError:
        return False
    return True


def run_sweep(
    tasks: Iterable[Task],
    run_fn: Callable[[dict[str, Any], RunContext], Any],
    out_dir: str | os.PathLike,
    jobs: int = 1,
    address: str | None = None,
    aggregate: Callable[[SweepResult], Any] | None = None,
    progress: bool = True,
    desc: str = "runs",
    backend: str = "auto",
    gpus_per_run: float = 0.0,
) -> SweepResult:
    """Run every task of the sweep once (see the module docstring for the guarantees).

    Args:
        tasks: the runs, ``Task(name, config)``; names are run directories under ``out_dir``.
        run_fn: ``run_fn(config, ctx) -> results`` (JSON-serialisable). Runs in a Ray worker, so it must be
            picklable (a module-level function); it writes any checkpoint under ``ctx.dir`` and may call
            ``ctx.log(loss=...)``.
        jobs: concurrent runs (one CPU, one torch thread each) on a local Ray; ignored with ``address``.
        address: an existing Ray cluster (``"auto"``, ``"ray://host:port"``) instead of a local one.
        aggregate: called with the :class:`SweepResult` (``finished`` holds the results of every finished
            task, ``failed`` the tracebacks) at the end — also after an interrupt — its value is returned as
            ``SweepResult.aggregate``: rebuild the sweep's table here.
        backend: ``"auto"`` (Ray when installed and ``jobs > 1`` or ``address``), ``"ray"`` or
            ``"sequential"``.
        gpus_per_run: GPUs each Ray task requests (e.g. ``1 / jobs`` to share one GPU between the runs);
            Ray then sets ``CUDA_VISIBLE_DEVICES`` for the task.

    Raises:
        RunDirError: a run directory belongs to another config (checked before anything runs), or another
            process is running a sweep in ``out_dir``.
        KeyboardInterrupt: re-raised after Ctrl-C / SIGTERM, once the outstanding runs are cancelled and
            ``aggregate`` has been called on the finished ones.
    """
    if not isinstance(jobs, int) or jobs < 1:
        raise BadArgumentError(f"jobs must be a positive integer, got {jobs!r}")
    if backend not in ("auto", "ray", "sequential"):
        raise BadArgumentError(f"backend must be 'auto', 'ray' or 'sequential', got {backend!r}")
    tasks = _check_tasks(tasks)
    out_dir = Path(out_dir)
    use_ray = backend == "ray" or (backend == "auto" and (jobs > 1 or address is not None))
    if use_ray and not ray_available():
        if backend == "ray":
            raise BadArgumentError("backend='ray' needs Ray: pip install 'diffmpc[ray]'")
        print(f"Ray is not installed: running the {len(tasks)} runs one after another in this process "
              "(pip install 'diffmpc[ray]' for --jobs/--address)", file=sys.stderr)
        use_ray = False
    result = SweepResult(out_dir, "ray" if use_ray else "sequential")
    t0 = time.perf_counter()
    with run_lock(out_dir), sigterm_as_interrupt():
        pending = []
        for t in tasks:  # every directory is checked before anything runs: a refusal wastes no work
            rec = _prepare(t, out_dir)
            if rec is None:
                pending.append(t)
            else:
                result.finished[t.name] = rec.get("results")
                result.skipped.append(t.name)
        bar = _bar(len(tasks), len(result.skipped), desc, progress)
        try:
            if use_ray:
                _run_ray(pending, run_fn, out_dir, jobs, address, result, bar, gpus_per_run)
            else:
                _run_here(pending, run_fn, out_dir, result, bar)
        except KeyboardInterrupt:
            result.interrupted = True
            for t in pending:  # runs that ended before the interrupt but were not collected yet
                if t.name not in result.finished and t.name not in result.failed:
                    with contextlib.suppress(RunDirError):
                        rec = _read_record(out_dir / t.name)
                        if rec and rec.get("status") in ("finished", "failed") \
                                and rec["config_hash"] == config_hash(t.config):
                            _record(result, bar, rec)
            done = set(result.finished) | set(result.failed)
            result.cancelled = [t.name for t in pending if t.name not in done]
            raise
        finally:
            bar.close()
            result.wall_s = time.perf_counter() - t0
            if aggregate is not None:
                result.aggregate = aggregate(result)
            print(result.summary(), file=sys.stderr)
    return result


def _bar(total: int, initial: int, desc: str, progress: bool) -> Any:
    from tqdm import tqdm

    return tqdm(total=total, initial=initial, desc=desc, unit="run", disable=not progress,
                dynamic_ncols=True, file=sys.stderr)


def _show(bar: Any, name: str, metrics: Mapping[str, Any]) -> None:
    items = [f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in list(metrics.items())[:3]]
    bar.set_postfix_str(f"{name}: {' '.join(items)}", refresh=True)


def _record(result: SweepResult, bar: Any, rec: Mapping[str, Any]) -> None:
    name = rec["name"]
    if rec["status"] == "finished":
        result.finished[name] = rec.get("results")
        result.ran.append(name)
    else:
        result.failed[name] = rec.get("traceback", "")
        where = result.out_dir / name / ERROR_FILE
        bar.write(f"run {name} failed (the sweep goes on; traceback in {where}):\n"
                  f"{rec.get('traceback', '').rstrip()}", file=sys.stderr)
    bar.update(1)


def _run_here(tasks: list[Task], run_fn: Callable, out_dir: Path, result: SweepResult, bar: Any) -> None:
    def on_log(name: str, metrics: dict[str, Any]) -> None:  # in this process: show each loss at once
        _show(bar, name, metrics)

    for t in tasks:
        _record(result, bar, _execute(run_fn, t, str(out_dir), on_log=on_log))


@contextlib.contextmanager
def _ray_session(jobs: int, address: str | None) -> Iterator[Any]:
    """A Ray connection: the given cluster, or a private local instance with ``jobs`` CPUs (shut down after).
    Local workers see this process's ``sys.path`` (so ``run_fn`` may live in a script or test module)."""
    import ray

    if ray.is_initialized():  # the caller manages Ray itself
        yield ray
        return
    env = os.environ.get("PYTHONPATH")
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in sys.path if p)
    if address is None:
        # Ray's memory monitor kills *our* workers when the machine runs low on memory, whoever uses it; on a
        # private local instance leave that to the kernel (set RAY_memory_monitor_refresh_ms to re-enable).
        os.environ.setdefault("RAY_memory_monitor_refresh_ms", "0")
    try:
        kwargs: dict[str, Any] = {"log_to_driver": False, "include_dashboard": False,
                                  "configure_logging": True, "logging_level": "warning"}
        if address is None:
            ray.init(address="local", num_cpus=jobs, **kwargs)
        else:
            kwargs.pop("include_dashboard")
            ray.init(address=address, **kwargs)
    finally:
        if env is None:
            os.environ.pop("PYTHONPATH", None)
        else:
            os.environ["PYTHONPATH"] = env
    try:
        with sigterm_as_interrupt():  # ray.init installs its own SIGTERM handler (exit): ours goes on top
            yield ray
    finally:
        ray.shutdown()


def _run_ray(tasks: list[Task], run_fn: Callable, out_dir: Path, jobs: int, address: str | None,
             result: SweepResult, bar: Any, gpus_per_run: float = 0.0) -> None:
    if not tasks:
        return
    with _ray_session(jobs, address) as ray:
        # Exceptions of run_fn never reach Ray (_execute returns them); retries are for lost workers only.
        remote = ray.remote(num_cpus=1, num_gpus=gpus_per_run, max_retries=1)(_execute)
        refs = {remote.remote(run_fn, t, str(out_dir), 1): t for t in tasks}
        seen_progress: dict[str, float] = {}
        try:
            while refs:
                done, _ = ray.wait(list(refs), num_returns=1, timeout=1.0)
                for ref in done:
                    task = refs.pop(ref)
                    try:
                        rec = ray.get(ref)
                    except Exception as err:  # noqa: BLE001 - a crashed worker is this run's failure
                        tb = f"{type(err).__name__}: {err}"
                        rec = {"name": task.name, "config": dict(task.config), "status": "failed",
                               "config_hash": config_hash(task.config), "traceback": tb}
                        with contextlib.suppress(OSError):
                            (out_dir / task.name).mkdir(parents=True, exist_ok=True)
                            (out_dir / task.name / ERROR_FILE).write_text(tb)
                    _ensure_record(out_dir, rec)
                    _record(result, bar, rec)
                _poll_progress(out_dir, refs.values(), seen_progress, bar)
        except KeyboardInterrupt:
            for ref in refs:
                with contextlib.suppress(Exception):
                    ray.cancel(ref, force=True)
            raise


def _ensure_record(out_dir: Path, rec: Mapping[str, Any]) -> None:
    """The worker wrote ``run.json``; on a cluster without a shared filesystem the driver writes it."""
    path = out_dir / rec["name"] / RUN_FILE
    with contextlib.suppress(OSError, ValueError):
        if json.loads(path.read_text()).get("status") == rec["status"]:
            return
    write_json(path, dict(rec))


def _poll_progress(out_dir: Path, running: Iterable[Task], seen: dict[str, float], bar: Any) -> None:
    newest: tuple[float, str, dict] | None = None
    for t in running:
        path = out_dir / t.name / PROGRESS_FILE
        with contextlib.suppress(OSError, ValueError):
            mtime = path.stat().st_mtime
            if mtime > seen.get(t.name, 0.0) and (newest is None or mtime > newest[0]):
                newest = (mtime, t.name, json.loads(path.read_text()))
    if newest is not None:
        seen[newest[1]] = newest[0]
        _show(bar, newest[1], newest[2])


# --------------------------------------------------------------------------------------------- CLI options
def add_sweep_arguments(parser: Any, jobs_help: str = "runs in parallel (one CPU each), local Ray") -> None:
    """``--jobs N`` and ``--address ADDR`` for a command that runs its runs through :func:`run_sweep`."""
    parser.add_argument("--jobs", type=_positive_int, default=1, help=f"{jobs_help} (default 1: in-process)")
    parser.add_argument("--address", default=None,
                        help="run on an existing Ray cluster: auto | ray://HOST:PORT (needs diffmpc[ray]; "
                             "--out must be on a filesystem every node sees)")


def _positive_int(text: str) -> int:
    import argparse

    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value
