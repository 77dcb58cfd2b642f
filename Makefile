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

run: build
	@mkdir -p /run/vmpod /var/lib/vmpod
	$(VMPOD) serve

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
