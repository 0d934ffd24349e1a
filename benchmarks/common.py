"""Shared helpers for benchmarks: provenance, convergence counting, timing, peak memory, JSON + markdown.

Every benchmark starts with ``run = Run.start("benchmarks.<name>", argv)`` and hands ``run`` to
:func:`write_table`, so each results JSON records how it was made (:meth:`Run.provenance`): the exact
command, the git commit and whether the tree was dirty, torch / numpy versions, thread settings, and the
machine's load average measured before and after (the machine may be shared: the load is measured, never
assumed). Non-converged solves are counted with :class:`ConvergenceCounter`, never silenced without a count.
"""

from __future__ import annotations

import ctypes
import gc
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch

RESULTS = Path(__file__).resolve().parent / "results"
ROOT = RESULTS.parent.parent
THREAD_VARS = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")


def machine() -> dict[str, Any]:
    """What the numbers were measured on (goes into every JSON)."""
    import numpy

    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "numpy": numpy.__version__,
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "thread_env": {k: os.environ.get(k) for k in THREAD_VARS},
        "cuda": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
    }


def git_state(root: Path = ROOT) -> dict[str, Any]:
    """``{"commit": sha, "dirty": bool, "dirty_files": [...]}`` of the checkout the code ran from.

    Changes under ``benchmarks/results/`` and ``docs/`` (the outputs themselves) do not count as dirty."""
    def git(*args: str) -> str:
        return subprocess.run(["git", "-C", str(root), *args], capture_output=True, text=True,
                              check=True).stdout

    try:
        commit = git("rev-parse", "HEAD").strip()
        changed = [line[3:] for line in git("status", "--porcelain", "--untracked-files=no").splitlines()]
    except (OSError, subprocess.CalledProcessError):
        return {"commit": None, "dirty": None, "dirty_files": []}
    code = [f for f in changed if not f.startswith(("benchmarks/results/", "docs/"))]
    return {"commit": commit, "dirty": bool(code), "dirty_files": code}


@dataclass
class Run:
    """Provenance of one benchmark invocation; :meth:`provenance` goes into the results JSON."""

    module: str
    argv: list[str]
    started: str
    t0: float
    load_before: tuple[float, float, float]
    git: dict[str, Any]

    @classmethod
    def start(cls, module: str, argv: Sequence[str] | None = None) -> Run:
        argv = list(sys.argv[1:] if argv is None else argv)
        return cls(module=module, argv=argv, started=datetime.now(timezone.utc).isoformat(timespec="seconds"),
                   t0=time.perf_counter(), load_before=os.getloadavg(), git=git_state())

    @property
    def command(self) -> str:
        env = " ".join(f"{k}={os.environ[k]}" for k in THREAD_VARS if k in os.environ)
        script = self.module.endswith(".py")  # a script path rather than a module name
        cmd = shlex.join(["python", *([] if script else ["-m"]), self.module, *self.argv])
        return f"{env} {cmd}" if env else cmd

    def provenance(self) -> dict[str, Any]:
        return {
            "command": self.command,
            "git_commit": self.git["commit"],
            "git_dirty": self.git["dirty"],
            "git_dirty_files": self.git["dirty_files"],
            "started_utc": self.started,
            "wall_seconds": round(time.perf_counter() - self.t0, 2),
            # 1/5/15-minute load averages; on a shared machine absolute times scale with the load
            "loadavg_before": [round(v, 2) for v in self.load_before],
            "loadavg_after": [round(v, 2) for v in os.getloadavg()],
            "cpu_count": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
        }


class ConvergenceCounter:
    """Counts :class:`diffmpc.ConvergenceWarning` s instead of silencing them.

    ``with counter.count("forward"):`` records every ConvergenceWarning raised inside under that key (other
    warnings are shown as usual); ``counter.totals`` maps key → number of warnings, ``counter.messages``
    keeps the first few messages per key so a results file shows what failed.
    """

    def __init__(self, keep: int = 3) -> None:
        self.totals: dict[str, int] = {}
        self.messages: dict[str, list[str]] = {}
        self.keep = keep

    @contextmanager
    def count(self, key: str) -> Iterator[None]:
        from diffmpc import ConvergenceWarning

        caught: list[warnings.WarningMessage] = []
        try:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always", ConvergenceWarning)
                yield
        finally:
            # outside catch_warnings: inside it, showwarning would append to `caught` itself
            self.totals.setdefault(key, 0)
            for w in list(caught):
                if issubclass(w.category, ConvergenceWarning):
                    self.totals[key] += 1
                    msgs = self.messages.setdefault(key, [])
                    if len(msgs) < self.keep:
                        msgs.append(str(w.message)[:300])
                else:
                    warnings.showwarning(w.message, w.category, w.filename, w.lineno)

    def total(self, key: str) -> int:
        return self.totals.get(key, 0)


def timeit(fn: Callable[[], Any], repeat: int = 5, warmup: int = 1) -> dict[str, float]:
    """Median / min wall time of ``fn()`` in seconds over ``repeat`` runs (after ``warmup`` runs)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeat):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return {"median_s": statistics.median(times), "min_s": min(times)}


def _status_kb(field: str) -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise KeyError(field)


def peak_memory(fn: Callable[[], Any]) -> int:
    """Peak extra memory (bytes) while running ``fn()``.

    On GPU: the CUDA caching allocator's peak above the starting allocation. On CPU (Linux): the process's
    peak resident set (VmHWM) above its resident set at the start, after returning freed heap memory to the
    OS (``malloc_trim``) and resetting the high-water mark (``/proc/self/clear_refs``) — so every byte the
    computation touches at its worst moment is counted, whatever allocated it.
    """
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        fn()
        return int(torch.cuda.max_memory_allocated() - base)
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass
    with open("/proc/self/clear_refs", "w") as fh:
        fh.write("5")
    base = _status_kb("VmRSS")
    fn()
    return max(_status_kb("VmHWM") - base, 0) * 1024


def write_table(
    name: str,
    rows: Sequence[dict[str, Any]],
    meta: dict[str, Any],
    columns: Sequence[str],
    title: str = "",
    notes: str = "",
    run: Run | None = None,
) -> Path:
    """Write ``results/<name>.json`` (rows + meta + machine + provenance) and ``results/<name>.md``.

    ``run`` (from :meth:`Run.start` at the top of the benchmark) supplies the command, git commit and load
    before/after; without it the provenance is taken now from ``sys.argv`` (load before = unknown).
    Both files are written atomically (temp file + rename), so an interrupted run never leaves half a file.
    """
    RESULTS.mkdir(parents=True, exist_ok=True)
    prov = run.provenance() if run is not None else {
        **Run.start(f"benchmarks.{name}").provenance(), "loadavg_before": None, "wall_seconds": None}
    payload = {"name": name, "provenance": prov, "meta": meta, "machine": machine(), "rows": list(rows)}
    _atomic_write(RESULTS / f"{name}.json", json.dumps(payload, indent=2, default=str) + "\n")
    lines = [f"### {title or name}", ""]
    if notes:
        lines += [notes, ""]
    load = prov["loadavg_before"]
    lines += [f"Command: `{prov['command']}` at commit `{(prov['git_commit'] or '?')[:10]}`"
              + (" (dirty tree)" if prov["git_dirty"] else "")
              + f"; load average (1 min) before/after: {load[0] if load else '?'} / "
              + f"{prov['loadavg_after'][0]}"
              + f" on {prov['cpu_count']} CPUs.", ""]
    lines.append("| " + " | ".join(columns) + " |")
    lines.append("|" + "|".join("---" for _ in columns) + "|")
    for r in rows:
        lines.append("| " + " | ".join(_fmt(r.get(c, "")) for c in columns) + " |")
    path = RESULTS / f"{name}.md"
    _atomic_write(path, "\n".join(lines) + "\n")
    return path


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def _fmt(v: Any) -> str:
    if v is None:
        return ""
    if isinstance(v, float):
        return f"{v:.3g}"
    return str(v)
