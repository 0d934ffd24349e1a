"""Side-by-side benchmarks (ours vs anchors). Each module has ``main(argv)`` and writes
``benchmarks/results/<name>.json`` + ``<name>.md`` through :func:`benchmarks.common.write_table`."""
