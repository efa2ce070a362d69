#!/usr/bin/env bash
# The many-core experiments (scaling, balance, scaling without service time, then herd
# while time is left) on a lent
# 16-core machine, in one call, with no network there.
#
#   here:    experiments/device/fetch-wheels.sh 3.12    # wheels + the commit's git metadata into .whl/
#   device:  run(command="bash experiments/device/scaling.sh", carry=[".whl"], timeout_s=595,
#                kind="nvidia-h100-x1")
#   here:    experiments/device/unpack.sh FILES_AT      # the runs into results/, then commit them
#
# What it relies on there (KINDS.md of the device tool, checked again by the first lines
# of machine.txt): a Firecracker VM with a real Linux kernel (io_uring works; the gVisor
# kind would not do: its kernel is an emulation, so its network stack and scheduler are
# not Linux's), 16 CPUs, gcc, and `python3` = Python 3.12 of a virtual environment that
# already holds uvloop, numpy, scipy and matplotlib.  So the carried wheels are installed
# into that interpreter's own environment (a new venv made from it would not see them),
# and this tree is installed editable (the cffi extensions compile there).
#
# Provenance: the call copies the working tree without .git, so fetch-wheels.sh also
# carries the commit's trees (a blob-less shallow clone, .whl/repo.git, ~200 KB).  With
# GIT_DIR pointing at it, `git status` hashes the copied files against the commit, so
# each run's meta.json records the commit and whether the tree matched it - the same
# check as a run here.  Without git there, the runs say commit null (not trusted as
# pinned runs).
#
# Time: everything runs under one deadline (DEVICE_BUDGET_S, default 550 s of the call's
# 600): the install takes about a minute, each experiment gets at most its own budget and
# what is left; one stopped by its timeout ends as `interrupted` with what it measured
# (framework.py: SIGTERM is handled).  The results leave as one tarball (the call returns
# at most 8 files).
set -uo pipefail
cd "$(dirname "$0")/../.."
T0=$(date +%s)
TOTAL=${DEVICE_BUDGET_S:-550}
OUT=${OUT:-/tmp/out}
WHEELS=${WHEELS:-.whl}
PY=${PYTHON:-python3}
RES=${RESULTS_DIR:-/tmp/pn-results}
mkdir -p "$OUT" "$RES"
exec > >(tee -a "$OUT/device.log") 2>&1

left() { echo $(( TOTAL - ($(date +%s) - T0) )); }
say() { echo "[$(( $(date +%s) - T0 ))s] $*"; }

# --- the commit this tree is (see Provenance above) ---
if [ -d "$WHEELS/repo.git" ] && command -v git >/dev/null; then
    export GIT_DIR="$PWD/$WHEELS/repo.git" GIT_WORK_TREE="$PWD"
    git read-tree HEAD && say "commit $(git rev-parse HEAD); differs from it:" \
        && git status --porcelain --untracked-files=normal -- . ':!results' | head -20
else
    say "no git metadata (git or $WHEELS/repo.git missing): the runs will record commit null"
fi

# --- install (into python3's own environment) ---
say "installing into $($PY -c 'import sys; print(sys.prefix, sys.version.split()[0])')"
"$PY" -m pip install -q --no-index --find-links "$WHEELS" "cffi>=1.17" pycparser "pyperf>=2.8" \
    "liburing==2026.3.30" "setuptools>=77" wheel || { say "wheel install failed"; exit 2; }
"$PY" -m pip install -q --no-index --find-links "$WHEELS" "rloop==0.5.0" || say "rloop missing: skipped"
"$PY" -m pip install -q --no-index --no-build-isolation --no-deps -e . \
    || { say "project install failed"; exit 3; }
PN=$("$PY" -c 'import os, sys; print(os.path.join(os.path.dirname(sys.executable), "parallelnet"))')
{
    date -u; uname -a; cat /proc/cmdline; nproc; lscpu; lscpu -e
    echo "io_uring_disabled: $(cat /proc/sys/kernel/io_uring_disabled 2>/dev/null)"
    "$PN" backends
} > "$OUT/machine.txt" 2>&1
head -3 "$OUT/machine.txt"; grep -E "^(CPU\(s\)|Model name|Thread|Core|Socket)" "$OUT/machine.txt"
"$PN" backends 2>&1 | tail -12

# run NAME BUDGET_S ARGS...: one experiment (standard preset, overridden by ARGS) within
# min(BUDGET_S, what is left less 20 s for packing); skipped under 45 s.
run() {
    local name=$1 budget=$2; shift 2
    local b; b=$(( $(left) - 20 )); [ "$b" -gt "$budget" ] && b=$budget
    if [ "$b" -lt 45 ]; then say "$name skipped: ${b}s left"; return; fi
    NRUN=$(( ${NRUN:-0} + 1 )); local log="$OUT/$NRUN-$name.log"
    say "$name: up to ${b}s"
    timeout -k 15 "$b" "$PN" experiment "$name" --preset standard --allow-dirty --out "$RES" "$@" \
        > "$log" 2>&1
    say "$name ended rc=$?"; tail -25 "$log"
}

# claim 3: workers 1..8 (the server's half of the CPUs), threads and processes, the shared
# socket and SO_REUSEPORT; epoll (the GIL-bound Python loop), uring (its C core waits and
# reaps with the GIL released) and native (C, the ceiling).  ~49 points a repetition.
run scaling "${SCALING_BUDGET_S:-290}" --set 'backends=["epoll","uring","native"]' \
    --set reps=3 --set duration=1.0 --set warmup=0.3

# claim 2 with the design's own mechanism, 8 workers: skewed long-lived connections + churn.
run balance "${BALANCE_BUDGET_S:-100}" \
    --set 'configs=["epoll/process/shared","epoll/process/reuseport","epoll/process/dispatch","native/thread/shared"]' \
    --set 'loads=[0.5,0.85]' --set reps=3 --set duration=2.0 --set warmup=0.5 \
    --set long_connections=64 --set heavy_connections=8 --set churn_slots=128 \
    --set 'aa="epoll/process/shared/load=0.85"'

# the multiplexing itself under the GIL: no service time (GET /work/0), so the loop's own
# cost per request is what threads contend for (a Python handler's 200 µs spin holds the
# GIL, so thread mode cannot scale above one CPU whatever the backend); SO_REUSEPORT only,
# so that no accept race decides the split.  uring-direct: one cffi call (one GIL
# release) per action instead of one per batch (docs/uring.md, "One call per batch").
run scaling "${SCALING0_BUDGET_S:-130}" \
    --set 'backends=["epoll","uring","uring-direct=uring:--uring-calls direct","native"]' \
    --set 'strategies=["reuseport"]' --set service_us=0 --set 'aa="epoll/process/reuseport/w=1"' \
    --set reps=2 --set duration=1.0 --set warmup=0.3

# the herd with its workers spread over the server CPUs (what two CPUs cannot show).
run herd "${HERD_BUDGET_S:-120}" --set 'backends=["epoll"]' --set 'modes=["process"]' \
    --set 'placements=["spread"]' --set 'strategies=["shared","exclusive","reuseport"]' \
    --set 'workers=[1,2,4,8]' --set 'rates=[3000,9000]' --set reps=2 --set duration=1.0 \
    --set 'aa="epoll/process/shared/spread/rate=3000/n=4"'

tar czf "$OUT/results.tgz" -C "$RES" . && say "packed: $(tar tzf "$OUT/results.tgz" | grep -c meta.json) runs"
ls -la "$OUT"
