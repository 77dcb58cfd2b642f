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

# Peer, same run: runc on the host running the same busybox `true`
# (create+start+wait = `runc run`, network namespace shared as in a pod).
RUNC_JSON="$WORK/runc.json"
if command -v runc >/dev/null 2>&1 && [ -x /bin/busybox ]; then
  echo ">> peer: runc run of busybox true on the host ($CONTAINERS_N runs)"
  B="$WORK/bundle"; mkdir -p "$B/rootfs/bin"
  cp /bin/busybox "$B/rootfs/bin/"; ln -s busybox "$B/rootfs/bin/true"
  (cd "$B" && runc spec)
  python3 - "$B/config.json" <<'PY'
import json, sys
c = json.load(open(sys.argv[1]))
c["process"].update(terminal=False, args=["true"])
c["root"]["readonly"] = True
c["linux"]["namespaces"] = [n for n in c["linux"]["namespaces"] if n["type"] != "network"]
json.dump(c, open(sys.argv[1], "w"))
PY
  python3 - "$B" "$CONTAINERS_N" "$RUNC_JSON" <<'PY'
import json, subprocess, sys, time
bundle, n, out = sys.argv[1], int(sys.argv[2]), sys.argv[3]
subprocess.run(["runc", "run", "--bundle", bundle, "vmpod-bench-warm"], check=True)
t = []
for i in range(n):
    s = time.monotonic()
    subprocess.run(["runc", "run", "--bundle", bundle, f"vmpod-bench-{i}"], check=True)
    t.append((time.monotonic() - s) * 1e3)
t.sort()
at = lambda q: t[round((len(t) - 1) * q)]
json.dump({"n": n, "median_ms": at(0.5), "p10_ms": at(0.1), "p90_ms": at(0.9), "min_ms": t[0], "max_ms": t[-1]}, open(out, "w"))
PY
else
  echo ">> peer skipped: runc or /bin/busybox missing"
fi

ACCEL=$(sed 's/\x1b\[[0-9;]*m//g' "$WORK/vm.log" | grep -o 'accel=[A-Za-z]*' | head -1 | cut -d= -f2 || true)

python3 - "$WORK/bench.json" "${ACCEL:-unknown}" "$RUNC_JSON" <<'PY'
import json, platform, subprocess, sys, os
r = json.load(open(sys.argv[1]))
peer = json.load(open(sys.argv[3])) if os.path.exists(sys.argv[3]) else None
cpu = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), "?")
out = {
    "benchmark": "agent",
    "machine": {"uname": " ".join(platform.uname()), "nproc": os.cpu_count(), "cpu": cpu},
    "guest": {"hypervisor": "qemu", "accel": sys.argv[2], "vcpus": 1, "memory_mib": 512,
              "note": "TCG guest: guest code is emulated; compare ratios, not absolute times"},
    "results": r,
    "peer": {"runc_run_true_on_host": peer} if peer else None,
    "ratio_vs_runc_median": (r["container_create_start_wait_true"]["median_ms"] / peer["median_ms"]) if peer else None,
}
json.dump(out, open("bench/results/agent.json", "w"), indent=2)
print(f"{'metric':40} {'n':>4} {'median':>10} {'p10':>10} {'p90':>10} {'min':>10} {'max':>10}")
for k, label in [("health_rpc", "health RPC round trip (ms)"),
                 ("container_create_start_wait_true", "create+start+wait `true` (ms)")]:
    s = r[k]
    print(f"{label:40} {s['n']:>4} {s['median_ms']:>10.3f} {s['p10_ms']:>10.3f} {s['p90_ms']:>10.3f} {s['min_ms']:>10.3f} {s['max_ms']:>10.3f}")
if peer:
    s = peer
    print(f"{'peer: runc run `true` on the host (ms)':40} {s['n']:>4} {s['median_ms']:>10.3f} {s['p10_ms']:>10.3f} {s['p90_ms']:>10.3f} {s['min_ms']:>10.3f} {s['max_ms']:>10.3f}")
    print(f"ratio vmpod-in-VM / runc-on-host (median): {out['ratio_vs_runc_median']:.2f}x")
print(f"(guest accel: {sys.argv[2]}; runc includes its own process start-up; results in bench/results/agent.json)")
PY
