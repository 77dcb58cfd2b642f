#!/usr/bin/env bash
# Build the guest initramfs images into $1 (default build/guest):
#   initramfs.cpio.gz       product: the agent as /init, nothing else
#   initramfs-test.cpio.gz  + a busybox container rootfs at /containers/busybox
#   initramfs-debug.cpio.gz + busybox in the guest root (console shell), and
#                           the busybox container rootfs as in -test
# Expects the static agent (make agent) in target/x86_64-unknown-linux-musl/release.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-build/guest}
AGENT=${AGENT:-target/x86_64-unknown-linux-musl/release/vmpod-agent}
BUSYBOX=${BUSYBOX:-/bin/busybox}
CARGO=${CARGO:-cargo}

[ -x "$AGENT" ] || { echo "build-initramfs: $AGENT missing: run 'make agent'" >&2; exit 1; }
if readelf -l "$AGENT" | grep -q "program interpreter"; then
  echo "build-initramfs: $AGENT is not statically linked" >&2; exit 1
fi
mkdir -p "$OUT"
echo ">> building vmpod-rootfs-builder"
$CARGO build -q --release -p vmpod-rootfs-builder
B=target/release/vmpod-rootfs-builder
echo ">> initramfs (product)"
$B --agent "$AGENT" -o "$OUT/initramfs.cpio.gz"
if [ -x "$BUSYBOX" ]; then
  echo ">> initramfs-test (busybox container rootfs)"
  $B --agent "$AGENT" --busybox "$BUSYBOX" --busybox-container busybox -o "$OUT/initramfs-test.cpio.gz"
  echo ">> initramfs-debug (busybox in the guest root)"
  $B --agent "$AGENT" --busybox "$BUSYBOX" --debug --busybox-container busybox -o "$OUT/initramfs-debug.cpio.gz"
else
  echo "build-initramfs: $BUSYBOX missing (Debian busybox-static): no test/debug images" >&2
fi
