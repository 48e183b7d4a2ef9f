# azure-proxy: common tasks. `make help` lists them.

CONFIG ?= azure_instances.json
MUSL_TARGET := x86_64-unknown-linux-musl
VENV := target/venv
PYTHON ?= python3

.PHONY: help build static test e2e run demo bench fmt lint clean

help:
	@echo "make build    release build: target/release/azure-proxy"
	@echo "make static   fully static binary (musl): target/$(MUSL_TARGET)/release/azure-proxy"
	@echo "make test     cargo test, then the end-to-end test with the openai Python SDK"
	@echo "make e2e      only the end-to-end test"
	@echo "make run      run the proxy with CONFIG=$(CONFIG)"
	@echo "make demo     a guided tour with two mock instances and curl (scripts/demo.sh)"
	@echo "make bench    benchmark vs nginx: req/s, latency, SSE, memory, start-up -> bench/results/latest.md"
	@echo "make fmt      check formatting;  make lint: clippy with warnings as errors"
	@echo "make clean    remove target/"

build:
	cargo build --release

static:
	@rustup target list --installed | grep -qx '$(MUSL_TARGET)' || { \
		echo "The musl target is missing. Install it with: rustup target add $(MUSL_TARGET)"; exit 1; }
	@command -v musl-gcc >/dev/null || { \
		echo "musl-gcc is missing (ring compiles C code). On Debian/Ubuntu: apt-get install musl-tools"; exit 1; }
	cargo build --release --target $(MUSL_TARGET)
	ls -l target/$(MUSL_TARGET)/release/azure-proxy

test:
	cargo test
	$(MAKE) --no-print-directory e2e

# The openai SDK lives in a venv under target/, created on first use.
$(VENV)/.openai-installed:
	test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --disable-pip-version-check openai
	touch $@

e2e: $(VENV)/.openai-installed
	cargo build --bin azure-proxy --example mock_azure
	$(VENV)/bin/python tests/e2e/openai_sdk_test.py

run:
	cargo run --release -- --config $(CONFIG)

demo:
	bash scripts/demo.sh

# Knobs: BENCH_DURATION (s, default 5), BENCH_ROUNDS (3), BENCH_CONNS ("1 16 64"); see bench/README.md.
bench:
	BENCH_COMMAND="make bench" bash bench/run.sh

fmt:
	cargo fmt --all -- --check

lint:
	cargo clippy --all-targets -- -D warnings

clean:
	cargo clean
