# vmpod — see README.md. Every target installs what it needs first.
SHELL := /bin/bash
CARGO ?= cargo
BUILD := build
GUEST := $(BUILD)/guest
MUSL := x86_64-unknown-linux-musl
VMPOD := target/release/vmpod
AGENT := target/$(MUSL)/release/vmpod-agent

.PHONY: all deps build agent guest guest-kernel initramfs tools run test test-unit bench lint fmt clean

all: build

deps:
	@scripts/install-deps.sh

build: deps
	$(CARGO) build --release -p vmpod

agent: deps
	$(CARGO) build --release -p vmpod-agent --target $(MUSL)

guest-kernel: deps
	guest-kernel/build.sh $(GUEST)

initramfs: agent
	scripts/build-initramfs.sh $(GUEST)

guest: guest-kernel initramfs

# Helper binaries the QEMU backend and tests need (built from crates.io).
tools: deps
	scripts/install-tools.sh $(BUILD)/tools

# The CRI daemon in the foreground with the default socket, state dir and
# config (/etc/vmpod/config.toml if present). Extra flags: make run SERVE_ARGS="--log-level debug".
run: build
	@[ "$$(id -u)" -eq 0 ] || { echo "make run: the daemon needs root (socket in /run/vmpod, state in /var/lib/vmpod); try: sudo make run" >&2; exit 1; }
	install -d -m 0755 /run/vmpod
	install -d -m 0711 /var/lib/vmpod
	exec $(VMPOD) serve --socket /run/vmpod/vmpod.sock --state-dir /var/lib/vmpod $(SERVE_ARGS)

test: deps guest tools
	$(CARGO) build -p vmpod
	$(CARGO) test --workspace --no-fail-fast -- --test-threads=2

test-unit: deps
	$(CARGO) test --workspace --lib --bins

bench: build guest tools
	scripts/bench.sh

lint:
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --workspace --all-targets -- -D warnings

fmt:
	$(CARGO) fmt --all

clean:
	$(CARGO) clean
	rm -rf $(BUILD)
