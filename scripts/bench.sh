#!/usr/bin/env bash
# Runs every benchmark (bench/bench-*.sh); each prints a table and writes
# bench/results/<name>.json with the machine it ran on.
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p bench/results
shopt -s nullglob
for b in bench/bench-*.sh; do
  echo "== $b"
  "$b"
done
