#!/usr/bin/env bash
# Here, after the device call: its runs into results/ (then `parallelnet experiment index`
# and commit them with their meta.json; the device's logs and machine facts go beside
# each run as device.log and device-machine.txt).
#     experiments/device/unpack.sh FILES_AT
set -euo pipefail
FROM=$1
cd "$(dirname "$0")/../.."
tmp=$(mktemp -d)
tar xzf "$FROM/results.tgz" -C "$tmp"
for run in "$tmp"/*/; do
    name=$(basename "$run")
    [ -e "results/$name" ] && { echo "results/$name exists: left alone" >&2; continue; }
    cp -r "$run" "results/$name"
    [ -f "$FROM/device.log" ] && cp "$FROM/device.log" "results/$name/device.log"
    [ -f "$FROM/machine.txt" ] && cp "$FROM/machine.txt" "results/$name/device-machine.txt"
    echo "results/$name"
done
rm -rf "$tmp"
