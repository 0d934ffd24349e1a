# diffmpc — every target creates .venv and installs the project on first use.
# Override the pins with `make test CONSTRAINTS=my-constraints.txt` (e.g. a CUDA torch build).
PYTHON ?= python3
VENV ?= .venv
CONSTRAINTS ?= constraints.txt
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-dev
OUT ?= runs

.PHONY: demo test test-all bench figures bench-venv lint docs clean

$(STAMP): pyproject.toml $(CONSTRAINTS)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --disable-pip-version-check -q -c $(CONSTRAINTS) -e '.[dev]'
	touch $(STAMP)

# The cart-pole pipeline, quick preset: expert data, IfO + BC training, evaluation, side-by-side video.
demo: $(STAMP)
	$(PY) -m diffmpc demo --out $(OUT)/demo

test: $(STAMP)
	$(PY) -m pytest -q

test-all: $(STAMP)
	$(PY) -m pytest -q -m ""

# Every benchmark in its quick mode, each in its own process; exits 2 (running nothing) when an anchor is
# missing and 1 when a benchmark fails. The docs render their tables from the results JSON (make docs).
bench: $(STAMP)
	$(PY) -m benchmarks.run_all

# Every file under docs/figures from its command (long: ~1.5 h on 2 cores; see benchmarks/figures.py).
figures: $(STAMP)
	$(PY) -m benchmarks.figures

# mpc.pytorch (`mpc`) pins numpy<2: it lives in its own environment, used only by the MPC benchmark.
BENCH_VENV ?= .venv-bench
bench-venv:
	test -x $(BENCH_VENV)/bin/python || $(PYTHON) -m venv $(BENCH_VENV)
	$(BENCH_VENV)/bin/python -m pip install --disable-pip-version-check -q -c $(CONSTRAINTS) -e '.[bench]'

# The documentation site (docs/, mkdocs.yml) into site/; --strict: broken links, missing docstrings and
# missing results files fail the build.
DOCS_STAMP := $(VENV)/.installed-docs
$(DOCS_STAMP): $(STAMP)
	$(PY) -m pip install --disable-pip-version-check -q -c $(CONSTRAINTS) -e '.[dev,docs]'
	touch $(DOCS_STAMP)

docs: $(DOCS_STAMP)
	NO_MKDOCS_2_WARNING=1 $(PY) -m mkdocs build --strict --clean

lint: $(STAMP)
	$(VENV)/bin/ruff check .

clean:
	rm -rf $(VENV) $(BENCH_VENV) build site *.egg-info
