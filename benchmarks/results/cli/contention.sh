#!/bin/sh
# thinking-pixel train (default preset) beside a one-core busy loop, two checkouts alternated:
#   SPIN     a checkout of 1ac4c9f: OpenMP's own wait policy (libgomp: spin 300000 times, then sleep)
#   PASSIVE  a checkout of c766d3d: the command sets OMP_WAIT_POLICY=PASSIVE unless it is set
# Each needs the CPU extension built in place (python setup.py build_ext --inplace) and benchmarks/cli_timing.py.
# In PASSIVE, GOMP_SPINCOUNT=300000 puts OpenMP's default spinning back (the same code, spinning).
# Usage: PYTHON=.venv/bin/python sh benchmarks/results/cli/contention.sh SPIN PASSIVE OUT_DIR [SECONDS] [ROUNDS]
set -e
SPIN=$(realpath "$1") PASSIVE=$(realpath "$2") OUT=$(realpath "$3") SECS=${4:-90} ROUNDS=${5:-2}
PY=${PYTHON:-python}
run() {  # checkout, label, arguments
  (cd "$1" && PYTHONPATH="$1" $PY -m benchmarks.cli_timing contention --seconds "$SECS" \
      --output "$OUT/$2_r$round.json" $3)
}
for round in $(seq "$ROUNDS"); do
  run "$SPIN" spin_threads_default "--threads 0 --policies unset"
  run "$PASSIVE" passive_threads_default "--threads 0 --policies unset"
  run "$PASSIVE" passive_checkout_spincount_300000 "--threads 0 --policies GOMP_SPINCOUNT=300000"
  run "$SPIN" spin_threads_1 "--threads 1 --policies unset"
  run "$PASSIVE" passive_threads_1 "--threads 1 --policies unset"
done
