#!/usr/bin/env bash
# vsock: the QEMU backend's guest vsock served by our own vhost-user
# back-end vs the peer vhost-device-vsock (when built), same kernel and
# QEMU/TCG guest, interleaved runs: connect time, 64-byte echo round trip,
# echo throughput, back-end RSS/PSS. Median and spread of BENCH_RUNS
# (default 5). Writes bench/results/vsock.json. Needs build/guest/vmlinux
# (make guest-kernel) and target/release/vmpod (make build; VMPOD_BIN
# overrides); the peer is skipped (said so) when vhost-device-vsock is
# missing: `cargo install --locked vhost-device-vsock --version 0.3.0
# --root build/tools` adds it.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build -q -p vmpod-tests --bin bench_vsock
if [ -z "${VMPOD_BIN:-}" ] && [ -x target/release/vmpod ]; then
  export VMPOD_BIN=target/release/vmpod
fi
exec target/debug/bench_vsock "$@"
