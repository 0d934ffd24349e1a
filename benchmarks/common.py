"""Shared helpers for benchmarks: timing, peak memory, and JSON + markdown output."""

from __future__ import annotations

import ctypes
import gc
import json
import os
import platform
import statistics
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

RESULTS = Path(__file__).resolve().parent / "results"


def machine() -> dict[str, Any]:
    """What the numbers were measured on (goes into every JSON)."""
    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "cuda": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
    }


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
) -> Path:
    """Write ``results/<name>.json`` (rows + meta + machine) and ``results/<name>.md`` (a markdown table)."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    payload = {"name": name, "meta": meta, "machine": machine(), "rows": list(rows)}
    (RESULTS / f"{name}.json").write_text(json.dumps(payload, indent=2, default=str) + "\n")
    lines = [f"### {title or name}", ""]
    if notes:
        lines += [notes, ""]
    lines.append("| " + " | ".join(columns) + " |")
    lines.append("|" + "|".join("---" for _ in columns) + "|")
    for r in rows:
        lines.append("| " + " | ".join(_fmt(r.get(c, "")) for c in columns) + " |")
    path = RESULTS / f"{name}.md"
    path.write_text("\n".join(lines) + "\n")
    return path


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.3g}"
    return str(v)
