#!/usr/bin/env bash
# Image pull + unpack benchmark: vmpod's image store vs containerd (if
# installed), same ~50 MB multi-layer image from a loopback docker-registry,
# median of 5. Writes bench/results/images.json.
set -euo pipefail
cd "$(dirname "$0")/.."
RUNS="${RUNS:-5}"
cargo build --release -q -p vmpod-images --example bench_images
target="${CARGO_TARGET_DIR:-target}"
exec "$target/release/examples/bench_images" --runs "$RUNS" --out bench/results/images.json
