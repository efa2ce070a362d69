#!/usr/bin/env bash
# The scaling and balance experiments on a lent many-core machine, in one call (no network).
#
#   here:    experiments/device/fetch-wheels.sh 3.12        # wheels into .whl/
#   device:  run(command="bash experiments/device/scaling.sh", carry=[".whl"], timeout_s=580)
#   here:    copy files_at/results/<dir> into results/ and commit them with their meta.json
#
# It builds a venv over the machine's own site-packages (uvloop, matplotlib, numpy are
# there), installs the carried wheels and this tree (compiling the cffi extensions), lists
# the backends, then runs, each within its budget (the device's per-call limit is 600 s and
# the install takes about a minute):
#   * scaling, server-bound (GET /work/200): epoll and native, threads and processes,
#     shared and reuseport, 1..N workers (SCALING_BUDGET_S, default 200 s);
#   * balance: the accept race under skewed server-bound load at two utilisations
#     (BALANCE_BUDGET_S, default 200 s).
# Two repetitions each: the summaries print ranges, not intervals (experiments/analysis.py);
# scipy is not needed (a series for the t quantile stands in when it is absent).
set -euo pipefail
cd "$(dirname "$0")/../.."
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT/results"
VENV=/tmp/pn-venv
PY=${PYTHON:-python3}
"$PY" -m venv --system-site-packages "$VENV"
"$VENV/bin/pip" install -q --no-index --find-links .whl "cffi>=1.17" pycparser "pyperf>=2.8" \
    "liburing==2026.3.30" "setuptools>=77" wheel
"$VENV/bin/pip" install -q --no-index --find-links .whl rloop || echo "rloop wheel missing: skipped"
"$VENV/bin/pip" install -q --no-index --find-links .whl --no-build-isolation --no-deps -e .
{ nproc; lscpu | head -20; "$VENV/bin/parallelnet" backends; } > "$OUT/results/machine.txt" 2>&1 || true
BACKENDS=${SCALING_BACKENDS:-'["epoll","native"]'}
timeout "${SCALING_BUDGET_S:-200}" "$VENV/bin/parallelnet" experiment scaling --preset standard \
    --allow-dirty --out "$OUT/results" --set "backends=$BACKENDS" --set reps=2 \
    --set duration=1.0 --set warmup=0.3 2>&1 | tee "$OUT/results/scaling.log" || true
timeout "${BALANCE_BUDGET_S:-200}" "$VENV/bin/parallelnet" experiment balance --preset standard \
    --allow-dirty --out "$OUT/results" \
    --set 'configs=["epoll/process/shared","epoll/process/reuseport","epoll/process/dispatch","native/thread/shared"]' \
    --set 'loads=[0.5,0.85]' --set reps=2 --set duration=2.0 --set warmup=0.5 \
    --set long_connections=64 --set heavy_connections=8 --set churn_slots=128 \
    2>&1 | tee "$OUT/results/balance.log" || true
