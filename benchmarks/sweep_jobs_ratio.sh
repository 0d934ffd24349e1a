#!/bin/bash
# Wall time of a 4-run lqr-imitation sweep with --jobs 1 (in-process) vs --jobs 2 (local Ray), in alternating
# rounds, with the load average before and after each (docs/sweeps.md). Usage: bash benchmarks/sweep_jobs_ratio.sh
set -u
PY=${PY:-.venv/bin/python}
OUT=${OUT:-runs/sweep_ratio}
mkdir -p "$OUT"
for round in 1 2; do
  for j in 1 2; do
    rm -rf "$OUT/jobs$j"
    $PY -c "import os; print('load before', os.getloadavg())"
    s=$(date +%s.%N)
    OMP_NUM_THREADS=1 $PY -m diffmpc lqr-imitation --out "$OUT/jobs$j" --iterations 300 --inits 5 \
      --damping 1 0.1 --modes cg lyapunov --no-progress --jobs $j > "$OUT.jobs$j.log" 2>&1
    e=$(date +%s.%N)
    $PY -c "import os; print('round $round jobs $j wall', $e - $s, 'load after', os.getloadavg())"
  done
done
