#!/usr/bin/env bash
# VM start-up and memory: built-in VMM vs `qemu -enable-kvm` on the same
# kernel (ratio), QEMU/TCG to the init marker, RSS/PSS of each VMM with the
# guest idle. Median and spread of BENCH_RUNS (default 5) runs.
# Writes bench/results/vm.json. Needs build/guest/vmlinux (make guest-kernel),
# target/release/vmpod (make build) and the QEMU helpers (make tools).
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build -q -p vmpod-tests --bin bench_vm
exec target/debug/bench_vm "$@"
