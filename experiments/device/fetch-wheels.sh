#!/usr/bin/env bash
# Here, with network: what a lent many-core machine needs for experiments/device/scaling.sh,
# into .whl/ (git-ignored; the device call carries it):
#     experiments/device/fetch-wheels.sh [PYTHON_VERSION (3.12)] [DIR (.whl)]
#   * the wheels of the dependencies that machine's Python lacks (binary only, for its
#     version and x86-64 Linux);
#   * repo.git: this commit's commits and trees without file contents (a blob-less shallow
#     clone, ~200 KB), so that git there can tell which commit the copied tree is and
#     whether it differs (the call copies the tree without .git).  Commit first.
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${1:-3.12}
DIR=${2:-.whl}
rm -rf "$DIR" && mkdir -p "$DIR"
python3 -m pip download -q --only-binary=:all: --python-version "$PY" \
    --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux_2_28_x86_64 \
    -d "$DIR" "cffi>=1.17" pycparser "pyperf>=2.8" "liburing==2026.3.30" "setuptools>=77" wheel \
    "rloop==0.5.0"
git clone -q --bare --depth 1 --filter=blob:none \
    -u "git -c uploadpack.allowFilter=true upload-pack" "file://$PWD" "$DIR/repo.git"
git --git-dir="$DIR/repo.git" remote remove origin   # nothing to fetch from there
[ -z "$(git status --porcelain -- . ':!results')" ] || echo "warning: uncommitted changes here" >&2
ls -1 "$DIR"; du -sh "$DIR"
