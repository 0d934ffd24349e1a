"""The documentation: every results placeholder renders from its committed JSON (numbers equal to the
JSON's), the site's pages are all in the nav, public API has docstrings, and — where mkdocs is installed
(the ``docs`` extra) — ``mkdocs build --strict`` passes."""

from __future__ import annotations

import importlib.util
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"


def _hooks():
    spec = importlib.util.spec_from_file_location("docs_hooks", DOCS / "_tools" / "hooks.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _pages() -> list[Path]:
    return [p for p in DOCS.rglob("*.md") if "_tools" not in p.parts and "figures" not in p.parts]


def test_every_results_placeholder_renders_a_table():
    hooks = _hooks()
    names = [m.group(1) for p in _pages() for m in hooks.PLACEHOLDER.finditer(p.read_text())]
    assert {"kepler", "table1", "table2", "lqr_imitation", "bench:ode_backward"} <= set(names)
    for name in names:
        md = hooks.render(name)
        if name == "cli":  # the command's --help, generated from the parser
            assert "usage: diffmpc" in md and "### `diffmpc table2`" in md
            continue
        assert md.count("\n|") >= 2 and "Generated from `" in md, name


def test_generated_table2_carries_the_json_numbers():
    hooks = _hooks()
    data = json.loads((DOCS / "figures" / "table2_results.json").read_text())
    md = hooks.render("table2")
    for policy in ("expert", "bc", "mpc_ift"):
        for variance in ("low", "high"):
            assert f"{data['table'][policy][variance]['mean']:.2f}" in md


def test_generated_table1_carries_the_json_numbers():
    hooks = _hooks()
    md = hooks.render("table1")
    for task in ("vdp", "spiral", "cmu"):
        data = json.loads((ROOT / "benchmarks" / "results" / f"table1_{task}.json").read_text())
        for stats in data["table"].values():  # every finished method's mean (a job may have none yet)
            if stats["n"]:
                assert f"{stats['mean']:.3g}" in md
        assert f"{data['paper_ift_cg']['mean']} ± {data['paper_ift_cg']['se']}" in md
    cmu = json.loads((ROOT / "benchmarks" / "results" / "table1_cmu.json").read_text())
    for value in cmu.get("calibration", {}).values():
        assert f"{value:.2f}" in md


def test_unknown_placeholder_and_missing_file_fail():
    hooks = _hooks()
    with pytest.raises(hooks.ResultsError, match="no results table"):
        hooks.render_page('{{ results_table("no_such_table") }}\n')
    with pytest.raises(hooks.ResultsError, match="missing"):
        hooks.render("bench:no_such_benchmark")


def test_every_page_is_in_the_nav():
    nav = (ROOT / "mkdocs.yml").read_text()
    in_nav = set(re.findall(r":\s*([\w/]+\.md)\s*$", nav, re.M))
    pages = {p.relative_to(DOCS).as_posix() for p in _pages()}
    assert pages == in_nav, f"add to mkdocs.yml nav: {pages - in_nav}; nav without page: {in_nav - pages}"


def test_public_api_has_docstrings():
    pytest.importorskip("griffe")
    assert _hooks().missing_docstrings() == []


@pytest.mark.skipif(importlib.util.find_spec("mkdocs") is None,
                    reason="mkdocs not installed (pip install -e '.[docs]'; `make docs` does)")
def test_mkdocs_build_strict(tmp_path):
    cmd = [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path / "site")]
    run = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
