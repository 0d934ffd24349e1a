"""Run every benchmark in quick mode (``make bench``); each writes benchmarks/results/<name>.{json,md}."""

from __future__ import annotations

import importlib
import sys

BENCHMARKS = (
    "benchmarks.implicit_backward",
    "benchmarks.dare_backward",
    "benchmarks.mpc_layer",
    "benchmarks.expert_latency",
    "benchmarks.ode_backward",
)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    for name in BENCHMARKS:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as err:
            print(f"skip {name}: {err}")
            continue
        print(f"== {name}", flush=True)
        module.main(argv)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
