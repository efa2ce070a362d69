#!/usr/bin/env bash
# The scaling experiment on a lent many-core machine, in one call (no network there).
#
#   here:    experiments/device/fetch-wheels.sh 3.12        # wheels into .whl/
#   device:  run(command="bash experiments/device/scaling.sh", carry=[".whl"], timeout_s=560)
#   here:    copy files_at/results/<dir> into results/ and commit it with its meta.json
#
# It builds a venv over the machine's own site-packages (uvloop, matplotlib, numpy are
# there), installs the carried wheels and this tree (compiling the cffi extensions), lists
# the backends, and runs `parallelnet experiment scaling --preset standard` with a backend
# set and durations sized to finish within the budget (SCALING_BUDGET_S, default 420 s:
# the device's per-call limit is 600 s, and the install takes about a minute).
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
BACKENDS=${SCALING_BACKENDS:-'["epoll","uring","native","native-uring","uvloop","asyncio"]'}
timeout "${SCALING_BUDGET_S:-420}" "$VENV/bin/parallelnet" experiment scaling --preset standard \
    --allow-dirty --out "$OUT/results" --set "backends=$BACKENDS" --set reps=2 \
    --set duration=1.5 --set warmup=0.5 2>&1 | tee "$OUT/results/scaling.log"
