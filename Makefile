# azure-proxy: common tasks. `make help` lists them.

CONFIG ?= azure_instances.json
MUSL_TARGET := x86_64-unknown-linux-musl
VENV := target/venv
PYTHON ?= python3

.PHONY: help build static test e2e run demo bench bench-streams bench-realistic fuzz fmt lint clean

help:
	@echo "make build    release build: target/release/azure-proxy"
	@echo "make static   fully static binary (musl): target/$(MUSL_TARGET)/release/azure-proxy"
	@echo "make static-check  prove the static binary runs alone: chroot with only binary, config, CA file"
	@echo "make test     cargo test, then the end-to-end test with the openai Python SDK"
	@echo "make e2e      only the end-to-end test"
	@echo "make run      run the proxy with CONFIG=$(CONFIG)"
	@echo "make demo     a guided tour with two mock instances and curl (scripts/demo.sh)"
	@echo "make bench    benchmark vs nginx: req/s, latency, SSE, memory, start-up -> bench/results/latest.md"
	@echo "make bench-streams  only the concurrent SSE streams vs nginx -> bench/results/streams-latest.md"
	@echo "make bench-realistic  HTTPS upstreams by host name via a local DNS server, nginx side by side (root)"
	@echo "               -> bench/results/realistic-latest.md (BENCH_QUICK=1: a smoke run of about 40 s)"
	@echo "make fuzz     cargo-fuzz every target for FUZZ_SECONDS (default 60) each; fails on a crash (fuzz/README.md)"
	@echo "make stress   hostile clients: slowloris, huge heads, fd exhaustion, 100k IPs -> stress/results/latest.md"
	@echo "make soak     SOAK_SECONDS=$(SOAK_SECONDS) s of mixed load: RSS, fds, every response accounted for"
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

# Builds what is missing or stale, then runs the static binary in an otherwise empty root (deploy/static-check.sh).
.PHONY: static-check
static-check:
	bash deploy/static-check.sh

test:
	cargo test
	$(MAKE) --no-print-directory e2e

# The openai SDK and LangChain's OpenAI integration live in a venv under target/, created on first use.
$(VENV)/.sdks-installed:
	test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --disable-pip-version-check openai langchain-openai
	touch $@

e2e: $(VENV)/.sdks-installed
	cargo build --bin azure-proxy --example mock_azure
	$(VENV)/bin/python tests/e2e/openai_sdk_test.py

run:
	cargo run --release -- --config $(CONFIG)

demo:
	bash scripts/demo.sh

# Knobs: BENCH_DURATION (s, default 5), BENCH_ROUNDS (3), BENCH_CONNS ("1 16 64"), BENCH_SCENARIOS ("load realistic
# streams"); see bench/README.md.
bench:
	BENCH_COMMAND="make bench" bash bench/run.sh

# Knobs: BENCH_STREAM_NS ("500 1000 2000"), BENCH_STREAMS_BURST (2000), BENCH_STREAMS_10K (0), BENCH_STREAMS_SETTLE (60).
bench-streams:
	BENCH_COMMAND="make bench-streams" bash bench/streams.sh

# About 4 minutes (needs root). Knobs: BENCH_DURATION/ROUNDS/CONNS/WARMUP as above, BENCH_RATES ("1000 5000 10000"),
# BENCH_OPEN_DURATION (8), BENCH_OPEN_CONNS (32), BENCH_COUNT_DURATION (3), BENCH_QUICK=1 (smoke run).
bench-realistic:
	BENCH_COMMAND="make bench-realistic" bash bench/realistic.sh

# Fuzzing with cargo-fuzz on stable Rust (RUSTC_BOOTSTRAP=1 lets it use -Zsanitizer=address). Each target starts from
# a scratch copy of its committed seeds under fuzz/target/ (ignored), so new corpus entries never dirty the tree.
# Knobs: FUZZ_SECONDS (per target), FUZZ_TARGETS, FUZZ_FLAGS (e.g. "-s none" to build without ASan), FUZZ_MAX_LEN.
FUZZ_SECONDS ?= 60
FUZZ_TARGETS ?= head chunked config client_ip target
FUZZ_FLAGS ?= --debug-assertions
# Above the 8 KiB head limit and the 4 KiB chunk-line limit, so that both are reachable.
FUZZ_MAX_LEN ?= 12288
FUZZ_RUN := $(CURDIR)/fuzz/target/make-fuzz

fuzz:
	@command -v cargo-fuzz >/dev/null || cargo install cargo-fuzz --locked
	@failed=""; summary=""; \
	for t in $(FUZZ_TARGETS); do \
		rm -rf "$(FUZZ_RUN)/$$t"; mkdir -p "$(FUZZ_RUN)/$$t/corpus"; \
		cp fuzz/corpus/$$t/* "$(FUZZ_RUN)/$$t/corpus/"; \
		echo "== fuzz $$t for $(FUZZ_SECONDS)s"; \
		{ ( cd fuzz && RUSTC_BOOTSTRAP=1 cargo fuzz run $(FUZZ_FLAGS) $$t "$(FUZZ_RUN)/$$t/corpus" -- \
			-max_total_time=$(FUZZ_SECONDS) -max_len=$(FUZZ_MAX_LEN) -print_final_stats=1 ) 2>&1; echo $$? >"$(FUZZ_RUN)/$$t/rc"; } \
			| tee "$(FUZZ_RUN)/$$t/log"; \
		rc=$$(cat "$(FUZZ_RUN)/$$t/rc"); \
		runs=$$(grep -o 'stat::number_of_executed_units: *[0-9]*' "$(FUZZ_RUN)/$$t/log" | grep -o '[0-9]*$$'); \
		if [ $$rc -ne 0 ]; then \
			failed="$$failed $$t"; \
			summary="$$summary\n  $$t: FAILED (exit $$rc), $${runs:-?} runs; input saved to $$(sed -n 's/.*Test unit written to //p' "$(FUZZ_RUN)/$$t/log" | head -n1)"; \
		else \
			summary="$$summary\n  $$t: ok, $${runs:-?} runs"; \
		fi; \
	done; \
	printf '%b\n' "== fuzz summary (logs in $(FUZZ_RUN)/<target>/log):$$summary"; \
	if [ -n "$$failed" ]; then \
		echo "Crashing inputs are in fuzz/artifacts/<target>/; reproduce with:"; \
		echo "  cd fuzz && RUSTC_BOOTSTRAP=1 cargo fuzz run $(FUZZ_FLAGS) <target> artifacts/<target>/<file>"; \
		exit 1; \
	fi

.PHONY: stress soak
# Knobs: STRESS_CASES (1,2,3,4a,4b), STRESS_SLOW, STRESS_IDLE, STRESS_IPS, ...; see stress/README.md.
stress:
	cargo build --release --bin azure-proxy --example mock_azure
	$(PYTHON) stress/stress.py

# Knobs: SOAK_SECONDS (600), SOAK_THREADS (8), SOAK_RATE (40 req/s per thread); see stress/README.md.
SOAK_SECONDS ?= 600
soak:
	cargo build --release --bin azure-proxy --example mock_azure
	SOAK_SECONDS=$(SOAK_SECONDS) $(PYTHON) stress/soak.py

fmt:
	cargo fmt --all -- --check

lint:
	cargo clippy --all-targets -- -D warnings

clean:
	cargo clean
