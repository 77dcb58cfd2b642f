#!/usr/bin/env bash
# Build vmpod's guest kernel from Debian's linux-source-6.1.
#
# Usage: guest-kernel/build.sh OUTDIR
#
#   OUTDIR/vmlinux       uncompressed ELF (what both VMMs boot)
#   OUTDIR/bzImage       compressed image (optional use)
#   OUTDIR/kernel.config the resolved .config
#   OUTDIR/kernel.key    cache key of the build in OUTDIR
#
# Steps: unpack the sources once into build/kernel/ (cached per source version
# and patch set), apply guest-kernel/patches/*.patch, `make allnoconfig`,
# merge microvm.fragment, `make olddefconfig`, check that every option of the
# fragment came out as requested (fails listing the mismatches), then build
# with -j$(nproc). Nothing is rebuilt when the fragment, the patches and the
# source package version are unchanged.
#
# Disk: only what an x86_64 microVM build can reach is unpacked (other
# architectures, the rst/yaml documentation and the C sources of large driver
# trees we never enable are skipped; their Kconfig files stay), and the source
# and object trees (~700 MB) are deleted once vmlinux is installed,
# unless KEEP_KERNEL_TREE=1 keeps them for quick rebuilds.
#
# Environment: KERNEL_SRC_TARBALL (default /usr/src/linux-source-6.1.tar.xz),
# KERNEL_WORK (default <repo>/build/kernel), JOBS (default nproc), FORCE=1,
# KEEP_KERNEL_TREE=1.
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO="$(cd "$HERE/.." && pwd)"
OUTDIR="${1:?usage: guest-kernel/build.sh OUTDIR}"
mkdir -p "$OUTDIR"
OUTDIR="$(cd "$OUTDIR" && pwd)"

TARBALL="${KERNEL_SRC_TARBALL:-/usr/src/linux-source-6.1.tar.xz}"
WORK="${KERNEL_WORK:-$REPO/build/kernel}"
JOBS="${JOBS:-$(nproc)}"
FRAGMENT="$HERE/microvm.fragment"
BASE_CONFIG=allnoconfig

log() { printf '[guest-kernel] %s\n' "$*" >&2; }
die() { printf '[guest-kernel] error: %s\n' "$*" >&2; exit 1; }

[ -r "$TARBALL" ] || die "kernel sources not found at $TARBALL (install Debian's linux-source-6.1: scripts/install-deps.sh)"
[ -r "$FRAGMENT" ] || die "config fragment missing: $FRAGMENT"
for tool in make gcc flex bison bc perl xz patch sha256sum; do
  command -v "$tool" >/dev/null || die "'$tool' not found (run scripts/install-deps.sh)"
done

# Source package version: from dpkg when the tarball is Debian's, else the
# tarball's own size+mtime.
SRC_VERSION="$(dpkg-query -S "$TARBALL" >/dev/null 2>&1 \
  && dpkg-query -W -f='${Version}' "$(dpkg-query -S "$TARBALL" | cut -d: -f1)" 2>/dev/null \
  || stat -c '%s-%Y' "$TARBALL")"

shopt -s nullglob
PATCHES=("$HERE"/patches/*.patch)
shopt -u nullglob

# Keys: the source tree depends on version + patches; the build also on the
# fragment and the base config.
SRC_KEY="$({ echo "src=$SRC_VERSION"; for p in "${PATCHES[@]}"; do basename "$p"; cat "$p"; done; } | sha256sum | cut -c1-16)"
BUILD_KEY="$({ echo "src=$SRC_KEY base=$BASE_CONFIG"; cat "$FRAGMENT"; } | sha256sum | cut -c1-64)"

if [ "${FORCE:-0}" != 1 ] && [ -f "$OUTDIR/vmlinux" ] && [ "$(cat "$OUTDIR/kernel.key" 2>/dev/null)" = "$BUILD_KEY" ]; then
  log "up to date: $OUTDIR/vmlinux (key ${BUILD_KEY:0:16}, linux-source $SRC_VERSION)"
  exit 0
fi

mkdir -p "$WORK"
# One build at a time per work dir (other make targets may call us too).
exec 9>"$WORK/.lock"
if ! flock -n 9; then
  log "another kernel build is running; waiting for it"
  flock 9
  if [ -f "$OUTDIR/vmlinux" ] && [ "$(cat "$OUTDIR/kernel.key" 2>/dev/null)" = "$BUILD_KEY" ]; then
    log "up to date: $OUTDIR/vmlinux (built by the other run)"
    exit 0
  fi
fi

SRC="$WORK/src-$SRC_KEY"
OBJ="$WORK/obj-$SRC_KEY"

# 1. Sources (unpacked + patched once per SRC_KEY).
if [ ! -f "$SRC/.vmpod-ready" ]; then
  rm -rf "$SRC" "$SRC.tmp"
  mkdir -p "$SRC.tmp"
  # Unpacked sources + objects take ~700 MB; say so plainly rather than let
  # tar fail file by file.
  avail_mb="$(df -Pm "$WORK" | awk 'NR==2 {print $4}')"
  if [ -n "$avail_mb" ] && [ "$avail_mb" -lt 1024 ]; then
    die "only ${avail_mb} MB free under $WORK; the kernel build needs ~1 GB (KERNEL_WORK=DIR builds elsewhere)"
  fi
  log "unpacking $TARBALL (linux-source $SRC_VERSION) ..."
  # Patterns match the member names in the tarball (linux-source-6.1/...).
  excludes=(--wildcards)
  for arch in alpha arc arm arm64 csky hexagon ia64 loongarch m68k microblaze mips nios2 \
              openrisc parisc powerpc riscv s390 sh sparc um xtensa; do
    for ext in c h S dts dtsi; do excludes+=(--exclude="*/arch/$arch/*.$ext"); done
  done
  for ext in rst yaml txt svg dot; do excludes+=(--exclude="*/Documentation/*.$ext"); done
  for dir in drivers/gpu drivers/media drivers/staging drivers/net/ethernet drivers/net/wireless \
             drivers/infiniband drivers/scsi drivers/usb drivers/iio sound; do
    excludes+=(--exclude="*/$dir/*.[ch]")
  done
  tar -xJf "$TARBALL" -C "$SRC.tmp" --strip-components=1 "${excludes[@]}"
  log "unpacked: $(du -sh "$SRC.tmp" | cut -f1)"
  for p in "${PATCHES[@]}"; do
    log "applying $(basename "$p")"
    patch -d "$SRC.tmp" -p1 --quiet --forward < "$p" || die "patch $(basename "$p") does not apply"
  done
  touch "$SRC.tmp/.vmpod-ready"
  mv "$SRC.tmp" "$SRC"
  # Old trees and object dirs of other keys are dead weight (~1.5 GB each).
  for old in "$WORK"/src-* "$WORK"/obj-*; do
    case "$old" in "$SRC"|"$OBJ") ;; *) rm -rf "$old" ;; esac
  done
else
  log "sources cached: $SRC"
fi

# 2. Configuration.
mkdir -p "$OBJ"
MAKE=(make -C "$SRC" O="$OBJ" ARCH=x86_64 -j"$JOBS")
log "configuring: $BASE_CONFIG + $(basename "$FRAGMENT")"
"${MAKE[@]}" -s "$BASE_CONFIG" >/dev/null
(cd "$OBJ" && "$SRC/scripts/kconfig/merge_config.sh" -m -O "$OBJ" "$OBJ/.config" "$FRAGMENT" >"$OBJ/merge.log" 2>&1) \
  || { cat "$OBJ/merge.log" >&2; die "merge_config.sh failed"; }
"${MAKE[@]}" -s olddefconfig >/dev/null

# 3. Every fragment option must have come out as requested.
mismatches=()
while IFS= read -r line; do
  line="${line%%#*}"
  line="$(echo "$line" | tr -d '[:space:]')"
  [ -n "$line" ] || continue
  opt="${line%%=*}"
  want="${line#*=}"
  got="$(grep -E "^${opt}=" "$OBJ/.config" | head -n1 | cut -d= -f2- || true)"
  if [ "$want" = n ]; then
    [ -z "$got" ] || [ "$got" = n ] || mismatches+=("$opt: wanted n, got $got")
  elif [ "$got" != "$want" ]; then
    mismatches+=("$opt: wanted $want, got ${got:-unset}")
  fi
done < "$FRAGMENT"
if ((${#mismatches[@]})); then
  printf '[guest-kernel]   %s\n' "${mismatches[@]}" >&2
  die "${#mismatches[@]} fragment option(s) did not take effect (missing dependency?); fix microvm.fragment"
fi
log "config verified: all $(grep -cE '^CONFIG_' "$FRAGMENT") fragment options as requested"

# 4. Build, with a progress line every 15 s (make's output goes to build.log).
log "building vmlinux + bzImage with -j$JOBS (log: $OBJ/build.log) ..."
start=$(date +%s)
set +e
(
  "${MAKE[@]}" vmlinux bzImage >"$OBJ/build.log" 2>&1
  echo $? >"$OBJ/build.rc"
) &
builder=$!
trap 'kill $builder 2>/dev/null; pkill -P $builder 2>/dev/null' INT TERM
while kill -0 "$builder" 2>/dev/null; do
  sleep 15
  if kill -0 "$builder" 2>/dev/null; then
    n=$(grep -cE '^\s+(CC|AS|AR|LD)\b' "$OBJ/build.log" 2>/dev/null || echo 0)
    last=$(grep -E '^\s+(CC|AS|LD)\b' "$OBJ/build.log" 2>/dev/null | tail -n1 | awk '{print $2}')
    log "  ... $(( $(date +%s) - start ))s, $n steps done (last: ${last:-starting})"
  fi
done
wait "$builder"
set -e
trap - INT TERM
rc="$(cat "$OBJ/build.rc" 2>/dev/null || echo 1)"
if [ "$rc" != 0 ]; then
  grep -E 'error|Error' "$OBJ/build.log" | head -n 20 >&2 || true
  tail -n 20 "$OBJ/build.log" >&2
  die "kernel build failed (exit $rc); full log: $OBJ/build.log"
fi
log "built in $(( $(date +%s) - start ))s"

# 5. Install atomically.
install -m 0644 "$OBJ/vmlinux" "$OUTDIR/vmlinux.tmp" && mv "$OUTDIR/vmlinux.tmp" "$OUTDIR/vmlinux"
install -m 0644 "$OBJ/arch/x86/boot/bzImage" "$OUTDIR/bzImage.tmp" && mv "$OUTDIR/bzImage.tmp" "$OUTDIR/bzImage"
install -m 0644 "$OBJ/.config" "$OUTDIR/kernel.config"
echo "$BUILD_KEY" > "$OUTDIR/kernel.key"
log "done: $OUTDIR/vmlinux ($(du -h "$OUTDIR/vmlinux" | cut -f1)), $OUTDIR/bzImage"

# 6. The trees are only needed to rebuild; a changed fragment rebuilds nearly
# everything anyway, so by default they go (CI hosts share a small disk).
if [ "${KEEP_KERNEL_TREE:-0}" != 1 ]; then
  freed="$(du -sh "$SRC" "$OBJ" 2>/dev/null | awk '{print $1}' | paste -sd+)" || freed="?"
  rm -rf "$SRC" "$OBJ"
  log "removed the source and object trees ($freed; KEEP_KERNEL_TREE=1 keeps them)"
fi
