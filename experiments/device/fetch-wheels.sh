#!/usr/bin/env bash
# Download (here, with network) the wheels a lent 16-core machine lacks, for its Python:
#     experiments/device/fetch-wheels.sh [3.12]
# into .whl/ (git-ignored), which the device call then carries (see scaling.sh).
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${1:-3.12}
rm -rf .whl && mkdir -p .whl
python3 -m pip download -q --only-binary=:all: --python-version "$PY" \
    --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux_2_28_x86_64 \
    -d .whl "cffi>=1.17" pycparser "pyperf>=2.8" "liburing==2026.3.30" "setuptools>=77" wheel rloop
ls -1 .whl
