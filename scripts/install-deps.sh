#!/usr/bin/env bash
# Install what vmpod needs on Debian 12, only what is missing. Idempotent.
# Usage: scripts/install-deps.sh [extra-package ...]
set -euo pipefail

PKGS=(
  # build
  build-essential pkg-config protobuf-compiler cpio zstd gzip xz-utils
  # guest kernel build (Debian's 6.1 sources)
  linux-source-6.1 flex bison bc libelf-dev libssl-dev
  # VMs: QEMU backend, test guests
  qemu-system-x86 busybox-static iproute2
  # built-in VMM probes: ping the guest over virtio-net/TAP
  iputils-ping
  # virtiofsd build
  libcap-ng-dev libseccomp-dev
  # tests: local OCI registry (and openssl for its TLS test CA), CNI plugins
  docker-registry openssl containernetworking-plugins
  "$@"
)

missing=()
for p in "${PKGS[@]}"; do
  if ! dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed"; then
    missing+=("$p")
  fi
done

if ((${#missing[@]})); then
  echo ">> apt-get install ${missing[*]}"
  SUDO=""
  [ "$(id -u)" -eq 0 ] || SUDO=sudo
  export DEBIAN_FRONTEND=noninteractive
  $SUDO apt-get update -q
  $SUDO apt-get install -y -q --no-install-recommends "${missing[@]}"
fi

# The packaged docker-registry starts a system service on :5000; tests run
# their own instances on random loopback ports, so keep the system one off.
if command -v systemctl >/dev/null 2>&1 && systemctl is-active --quiet docker-registry 2>/dev/null; then
  systemctl stop docker-registry || true
  systemctl disable docker-registry >/dev/null 2>&1 || true
fi

if command -v rustup >/dev/null 2>&1; then
  rustup target list --installed | grep -q x86_64-unknown-linux-musl \
    || rustup target add x86_64-unknown-linux-musl
fi
