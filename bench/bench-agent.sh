#!/usr/bin/env bash
# Agent benchmark: health RPC round trip (median of 100) and container
# create+start+wait of `true` (median of 10) inside one already-booted
# microVM (QEMU backend; TCG on hosts whose KVM cannot run guest userspace,
# so absolute numbers are emulation-bound). Prints a table and writes
# bench/results/agent.json.
set -euo pipefail
cd "$(dirname "$0")/.."
VMPOD=${VMPOD:-target/release/vmpod}
KERNEL=build/guest/vmlinux
INITRD=build/guest/initramfs-test.cpio.gz
HEALTH_N=${HEALTH_N:-100}
CONTAINERS_N=${CONTAINERS_N:-10}
for f in "$VMPOD" "$KERNEL" "$INITRD"; do
  [ -e "$f" ] || { echo "bench-agent: $f missing (make build guest)" >&2; exit 1; }
done
mkdir -p bench/results
WORK=$(mktemp -d /tmp/vmpod-bench-agent.XXXXXX)
VM_PID=""
cleanup() {
  if [ -n "$VM_PID" ] && kill -0 "$VM_PID" 2>/dev/null; then
    kill -TERM "$VM_PID" 2>/dev/null || true
    wait "$VM_PID" 2>/dev/null || true
  fi
  rm -rf "$WORK"
}
trap cleanup EXIT

echo ">> booting the agent VM (qemu, accel auto)"
"$VMPOD" vm run --hypervisor qemu --accel auto --kernel "$KERNEL" --initrd "$INITRD" \
  --cmdline "console=ttyS0 quiet" --memory-mib 512 --vsock-uds "$WORK/vsock" \
  --console-log "$WORK/console.log" --exit-json "$WORK/exit.json" >"$WORK/vm.log" 2>&1 &
VM_PID=$!
"$VMPOD" agent-ctl --uds "$WORK/vsock" --wait-ready 120 check >/dev/null
echo ">> measuring ($HEALTH_N health RPCs, $CONTAINERS_N containers)"
"$VMPOD" agent-ctl --uds "$WORK/vsock" --timeout 120 bench --health "$HEALTH_N" --containers "$CONTAINERS_N" >"$WORK/bench.json"
ACCEL=$(sed 's/\x1b\[[0-9;]*m//g' "$WORK/vm.log" | grep -o 'accel=[A-Za-z]*' | head -1 | cut -d= -f2 || true)

python3 - "$WORK/bench.json" "${ACCEL:-unknown}" <<'PY'
import json, platform, subprocess, sys, os
r = json.load(open(sys.argv[1]))
cpu = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), "?")
out = {
    "benchmark": "agent",
    "machine": {"uname": " ".join(platform.uname()), "nproc": os.cpu_count(), "cpu": cpu},
    "guest": {"hypervisor": "qemu", "accel": sys.argv[2], "vcpus": 1, "memory_mib": 512,
              "note": "TCG guest: guest code is emulated; compare ratios, not absolute times"},
    "results": r,
}
json.dump(out, open("bench/results/agent.json", "w"), indent=2)
print(f"{'metric':40} {'n':>4} {'median':>10} {'p10':>10} {'p90':>10} {'min':>10} {'max':>10}")
for k, label in [("health_rpc", "health RPC round trip (ms)"),
                 ("container_create_start_wait_true", "create+start+wait `true` (ms)")]:
    s = r[k]
    print(f"{label:40} {s['n']:>4} {s['median_ms']:>10.3f} {s['p10_ms']:>10.3f} {s['p90_ms']:>10.3f} {s['min_ms']:>10.3f} {s['max_ms']:>10.3f}")
print(f"(guest accel: {sys.argv[2]}; results in bench/results/agent.json)")
PY
