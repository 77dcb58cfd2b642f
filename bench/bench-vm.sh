#!/usr/bin/env bash
# VM start-up and memory: built-in VMM vs `qemu -enable-kvm` on the same
# kernel (ratio), QEMU/TCG to the init marker, RSS/PSS of each VMM with the
# guest idle. Median and spread of BENCH_RUNS (default 5) runs.
# Writes bench/results/vm.json. Needs build/guest/vmlinux (make guest-kernel),
# target/release/vmpod (make build; VMPOD_BIN overrides) and the QEMU
# helpers (make tools).
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build -q -p vmpod-tests --bin bench_vm
# The product as shipped: the release build (make bench builds it first).
if [ -z "${VMPOD_BIN:-}" ] && [ -x target/release/vmpod ]; then
  export VMPOD_BIN=target/release/vmpod
fi
exec target/debug/bench_vm "$@"
