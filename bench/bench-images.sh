#!/usr/bin/env bash
# Image pull + unpack benchmark, like for like: one CRI PullImage RPC to
# `vmpod serve` and to containerd's CRI plugin (if installed), each on its
# own temp socket and state, same ~50 MB multi-layer image from a loopback
# docker-registry, same tonic client, median and spread of 5 runs each.
# Writes bench/results/images.json.
set -euo pipefail
cd "$(dirname "$0")/.."
RUNS="${RUNS:-5}"
cargo build --release -q -p vmpod
cargo build --release -q -p vmpod-images --example bench_images
target="${CARGO_TARGET_DIR:-target}"
exec "$target/release/examples/bench_images" --runs "$RUNS" \
    --vmpod "$target/release/vmpod" --out bench/results/images.json
