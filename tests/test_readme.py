"""The README stays small and its quickstart runs: the python block is executed and its printed output must
match the output block printed under it (the one number that depends on floating-point round-off, the
stationarity residual, is checked against a bound instead)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"


def _quickstart() -> tuple[str, str]:
    text = README.read_text()
    section = text[text.index("## Quickstart"):]
    section = section[: section.index("\n## ", 4)]
    blocks = re.findall(r"```(\w*)\n(.*?)```", section, re.S)
    code = next(body for lang, body in blocks if lang == "python")
    output = next(body for lang, body in blocks if lang == "")
    return code, output


def test_readme_is_small():
    assert README.stat().st_size <= 12 * 1024, "README.md must stay <= 12 KB: move detail into docs/ pages"
    assert "<!-- section" not in README.read_text()


def test_readme_quickstart_runs_and_prints_what_the_readme_says(tmp_path):
    code, expected = _quickstart()
    script = tmp_path / "quickstart.py"
    script.write_text(code)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    run = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, env=env, cwd=tmp_path,
                         timeout=300)
    assert run.returncode == 0, run.stderr
    got, want = run.stdout.strip().splitlines(), expected.strip().splitlines()
    assert len(got) == len(want), (got, want)
    residual = re.compile(r"max ‖∇f\(y\*\)‖ = (\S+),")
    for g, w in zip(got, want, strict=True):
        if residual.match(w):
            assert float(residual.match(g).group(1)) < 1e-8, g
            g, w = residual.sub("", g), residual.sub("", w)
        assert g == w, f"README quickstart output is stale:\n got: {g}\nwant: {w}"
