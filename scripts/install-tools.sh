#!/usr/bin/env bash
# Helper binaries the QEMU backend needs, built from crates.io into ROOT/bin.
# Usage: scripts/install-tools.sh [ROOT]   (default: build/tools)
#
#   virtiofsd   vhost-user virtio-fs backend (needs Debian's libcap-ng-dev
#               and libseccomp-dev: install-deps.sh)
#
# (vsock needs no helper: `vmpod vm vhost-user-vsock` serves it.)
#
# Only what is missing (or at another version) is built. Idempotent.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT="${1:-build/tools}"
mkdir -p "$ROOT"
ROOT="$(cd "$ROOT" && pwd)"

VIRTIOFSD_VERSION=1.14.0

have() { # name version
  local bin="$ROOT/bin/$1"
  [ -x "$bin" ] || return 1
  "$bin" --version 2>/dev/null | grep -q "$2"
}

install_crate() { # crate version
  echo ">> cargo install $1 $2 into $ROOT (this compiles; progress below)"
  cargo install --locked --root "$ROOT" --version "$2" "$1"
}

if have virtiofsd "$VIRTIOFSD_VERSION"; then
  echo "install-tools: virtiofsd $VIRTIOFSD_VERSION present"
else
  for p in libcap-ng-dev libseccomp-dev; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" \
      || { echo "install-tools: $p missing: run scripts/install-deps.sh" >&2; exit 1; }
  done
  install_crate virtiofsd "$VIRTIOFSD_VERSION"
fi

echo "install-tools: ok ($ROOT/bin: $(ls "$ROOT/bin" | tr '\n' ' '))"
