#!/usr/bin/env bash
# azure-proxy benchmark (`make bench`): throughput and latency against nginx, SSE latency, memory, size and
# start-up time, all on 127.0.0.1. See bench/README.md. Writes bench/results/latest.{md,json}, prints the table.
#
# Knobs (environment): BENCH_DURATION (s per wrk run, 5), BENCH_ROUNDS (3), BENCH_CONNS ("1 16 64"),
# BENCH_WARMUP (s per target before each concurrency, 1), BENCH_PORT_BASE (23100), BENCH_UPSTREAM_WORKERS (auto),
# BENCH_STREAM_REPS (10), BENCH_STREAMS (256), BENCH_STARTUP_REPS (5), BENCH_STATIC_REBUILD (0),
# BENCH_PROXY_BIN / BENCH_MOCK_BIN (benchmark these binaries instead of building target/release/...),
# BENCH_SCENARIOS ("load realistic streams": "load" is everything above, "realistic" the HTTPS-by-name comparison of
# bench/realistic.sh (root only; the same BENCH_DURATION/ROUNDS/CONNS/WARMUP, its own BENCH_RATES etc.), "streams"
# the concurrent streams of bench/streams.sh with its own BENCH_STREAM* knobs).
set -euo pipefail

cd "$(dirname "$0")/.."
ROOT=$PWD

SCENARIOS="${BENCH_SCENARIOS:-load realistic streams}"
for s in $SCENARIOS; do
    [[ "$s" =~ ^(load|realistic|streams)$ ]] ||
        { echo "bench: BENCH_SCENARIOS lists load, realistic and/or streams, got '$s'" >&2; exit 2; }
done
has_scenario() { [[ " $SCENARIOS " == *" $1 "* ]]; }
# realistic.sh needs root (a DNS server on port 53, a mount namespace): without it that part is skipped, loudly.
run_realistic() {
    if [ "$(id -u)" != 0 ]; then
        echo "bench: skipping the realistic mode (bench/realistic.sh needs root)" >&2
        return 0
    fi
    BENCH_COMMAND="${BENCH_COMMAND:-bash bench/run.sh}" bash bench/realistic.sh
}
if ! has_scenario load; then
    # No load part: bench/results/latest.{md,json} (the load figures) stay as they are.
    [ -n "${SCENARIOS// /}" ] || { echo "bench: BENCH_SCENARIOS is empty" >&2; exit 2; }
    if has_scenario realistic; then run_realistic; fi
    if has_scenario streams; then exec bash bench/streams.sh; fi
    exit 0
fi

DURATION="${BENCH_DURATION:-5}"
ROUNDS="${BENCH_ROUNDS:-3}"
CONNS="${BENCH_CONNS:-1 16 64}"
WARMUP="${BENCH_WARMUP:-1}"
PORT_BASE="${BENCH_PORT_BASE:-23100}"
UPSTREAM_WORKERS="${BENCH_UPSTREAM_WORKERS:-auto}"
STREAM_REPS="${BENCH_STREAM_REPS:-10}"
STREAM_EVENTS=20
STREAM_DELAY_MS=50
N_STREAMS="${BENCH_STREAMS:-256}"
SLOW_DELAY_MS=1000
SLOW_EVENTS=600 # 10 minutes of events at 1 s: the streams stay open until the probe closes them
STARTUP_REPS="${BENCH_STARTUP_REPS:-5}"
STATIC_REBUILD="${BENCH_STATIC_REBUILD:-0}"
COMMAND="${BENCH_COMMAND:-bash bench/run.sh}"

CLIENT_KEY="bench-client-key"
MOCK_KEY="bench-mock-key"
CHAT_PATH="/openai/deployments/gpt-4o/chat/completions?api-version=2024-06-01"
WORK="$ROOT/target/bench"
RESULTS="$ROOT/bench/results"
PROXY_BIN="${BENCH_PROXY_BIN:-$ROOT/target/release/azure-proxy}"
MOCK_BIN="${BENCH_MOCK_BIN:-$ROOT/target/release/examples/mock_azure}"
STATIC_BIN="$ROOT/target/x86_64-unknown-linux-musl/release/azure-proxy"
PY="${PYTHON:-python3}"

for v in DURATION ROUNDS WARMUP PORT_BASE STREAM_REPS N_STREAMS STARTUP_REPS; do
    [[ "${!v}" =~ ^[0-9]+$ ]] || { echo "bench: BENCH_$v must be a whole number, got '${!v}'" >&2; exit 2; }
done
for c in $CONNS; do
    [[ "$c" =~ ^[1-9][0-9]*$ ]] || { echo "bench: BENCH_CONNS must list positive numbers, got '$CONNS'" >&2; exit 2; }
done

log() { printf '\033[1m[bench %s]\033[0m %s\n' "$(date +%H:%M:%S)" "$*" >&2; }
# shellcheck source=bench/lib.sh
. "$ROOT/bench/lib.sh"

# ------------------------------------------------------------------------------------------------------------
# Everything started here is stopped on exit, on failure and on Ctrl-C.
# ------------------------------------------------------------------------------------------------------------
PIDS=()
cleanup() {
    local pid
    for pid in "${PIDS[@]}"; do
        kill -TERM "$pid" 2>/dev/null || true
    done
    for _ in $(seq 30); do
        local alive=0
        for pid in "${PIDS[@]}"; do
            kill -0 "$pid" 2>/dev/null && alive=1
        done
        [ "$alive" = 0 ] && break
        sleep 0.1
    done
    for pid in "${PIDS[@]}"; do
        kill -KILL "$pid" 2>/dev/null || true
    done
    PIDS=()
}
trap cleanup EXIT
trap 'log "interrupted"; exit 130' INT TERM

# ------------------------------------------------------------------------------------------------------------
# Tools: wrk and nginx from Debian's packages (installed if missing), python3, curl.
# ------------------------------------------------------------------------------------------------------------
ensure_tools wrk:wrk nginx:nginx curl:curl python3:python3
NGINX="$(command -v nginx || echo /usr/sbin/nginx)"

# ------------------------------------------------------------------------------------------------------------
# Builds.
# ------------------------------------------------------------------------------------------------------------
if [ -z "${BENCH_PROXY_BIN:-}" ]; then
    log "building (release)"
    cargo build --release
fi
if [ -z "${BENCH_MOCK_BIN:-}" ]; then
    cargo build --release --example mock_azure
fi
for bin in "$PROXY_BIN" "$MOCK_BIN"; do
    [ -x "$bin" ] || { echo "bench: $bin is not an executable" >&2; exit 2; }
done

if [ "$STATIC_REBUILD" = 1 ] || [ ! -f "$STATIC_BIN" ]; then
    if command -v musl-gcc >/dev/null && rustup target list --installed 2>/dev/null | grep -qx x86_64-unknown-linux-musl
    then
        log "building the static binary (make static)"
        make --no-print-directory static >&2 || log "make static failed: static size will be n/a"
    else
        log "no musl toolchain (musl-gcc + rustup target x86_64-unknown-linux-musl): static size will be n/a"
    fi
fi

rm -rf "$WORK"
mkdir -p "$WORK" "$RESULTS"

# ------------------------------------------------------------------------------------------------------------
# Ports: 16 + STARTUP_REPS consecutive free ports on 127.0.0.1.
# ------------------------------------------------------------------------------------------------------------
NPORTS=$((16 + STARTUP_REPS))
BASE="$("$PY" bench/stream_probe.py free-base "$PORT_BASE" "$NPORTS")"
UP1=$BASE UP2=$((BASE + 1)) UP3=$((BASE + 2)) # upstream nginx, three "instances"
NGX_PORT=$((BASE + 3))                        # nginx reverse proxy
PROXY_PORT=$((BASE + 4))                      # azure-proxy over the three upstream ports
MOCK_PORT=$((BASE + 5))                       # mock instance, 20 events 50 ms apart
SPROXY_PORT=$((BASE + 6))                     # azure-proxy over that mock
SLOW1=$((BASE + 7)) SLOW2=$((BASE + 8)) SLOW3=$((BASE + 9)) # mock instances, 1 event per second
MPROXY_PORT=$((BASE + 10))                    # azure-proxy over the slow mocks (256 streams)
STARTUP_PORT=$((BASE + 16))                   # start-up probe: one fresh port per repetition
log "ports ${BASE}-$((BASE + NPORTS - 1)) on 127.0.0.1"

# expect_200 URL KEY: one POST must answer 200 (a misconfigured target must not be benchmarked as "fast").
expect_200() {
    local code
    code="$(curl -sS -o "$WORK/check.body" -w '%{http_code}' --max-time 5 -H "api-key: $2" \
        -H 'content-type: application/json' -d '{"messages":[{"role":"user","content":"hi"}]}' "$1")" || true
    if [ "$code" != 200 ]; then
        echo "bench: $1 answered '$code' instead of 200:" >&2
        cat "$WORK/check.body" >&2 || true
        return 1
    fi
}

# ------------------------------------------------------------------------------------------------------------
# Upstream: one nginx process, three server blocks, a fixed ~600-byte chat completion.
# ------------------------------------------------------------------------------------------------------------
BODY='{"id":"chatcmpl-bench0000000000000000000001","object":"chat.completion","created":1730000000,"model":"gpt-4o-2024-08-06","system_fingerprint":"fp_bench","prompt_filter_results":[{"prompt_index":0,"content_filter_results":{"hate":{"filtered":false,"severity":"safe"},"violence":{"filtered":false,"severity":"safe"}}}],"choices":[{"index":0,"finish_reason":"stop","logprobs":null,"message":{"role":"assistant","content":"Hello! How can I help you today?"},"content_filter_results":{"hate":{"filtered":false,"severity":"safe"}}}],"usage":{"prompt_tokens":9,"completion_tokens":21,"total_tokens":30}}'

nginx_prefix() { # nginx_prefix DIR: the directories nginx needs under its prefix
    mkdir -p "$1/conf" "$1/logs" "$1/tmp"
}
nginx_common() { # directives shared by both nginx configs; $1 = worker_processes
    cat <<EOF
worker_processes $1;
daemon off;
pid logs/nginx.pid;
error_log logs/error.log warn;
worker_rlimit_nofile 16384;
events { worker_connections 8192; }
EOF
}
temp_paths() {
    echo "    client_body_temp_path tmp/body; proxy_temp_path tmp/proxy; fastcgi_temp_path tmp/fastcgi;"
    echo "    uwsgi_temp_path tmp/uwsgi; scgi_temp_path tmp/scgi;"
}

UP_DIR="$WORK/nginx-upstream"
nginx_prefix "$UP_DIR"
{
    nginx_common "$UPSTREAM_WORKERS"
    echo "http {"
    temp_paths
    echo "    access_log off;"
    echo "    keepalive_timeout 300s;"
    echo "    keepalive_requests 1000000;"
    echo "    default_type application/json;"
    for p in $UP1 $UP2 $UP3; do
        echo "    server { listen 127.0.0.1:$p backlog=4096; location / { return 200 '$BODY'; } }"
    done
    echo "}"
} >"$UP_DIR/conf/nginx.conf"

NGX_DIR="$WORK/nginx-proxy"
nginx_prefix "$NGX_DIR"
{
    nginx_common auto
    cat <<EOF
http {
$(temp_paths)
    access_log logs/access.log;
    keepalive_timeout 300s;
    keepalive_requests 1000000;
    upstream azure {
        server 127.0.0.1:$UP1;
        server 127.0.0.1:$UP2;
        server 127.0.0.1:$UP3;
        keepalive 64;
        keepalive_requests 1000000;
    }
    server {
        listen 127.0.0.1:$NGX_PORT backlog=4096;
        location / {
            proxy_pass http://azure;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_set_header api-key "bench-instance-key";
        }
    }
}
EOF
} >"$NGX_DIR/conf/nginx.conf"

log "starting the upstream nginx (worker_processes $UPSTREAM_WORKERS) on $UP1 $UP2 $UP3"
start_nginx "$UP_DIR" "$UP1"
UP_PID=$NGINX_PID
log "starting the nginx reverse proxy on $NGX_PORT"
start_nginx "$NGX_DIR" "$NGX_PORT"
NGX_PID=$NGINX_PID

# ------------------------------------------------------------------------------------------------------------
# azure-proxy over the three upstream ports.
# ------------------------------------------------------------------------------------------------------------
cat >"$WORK/load.json" <<EOF
{
  "instances": [
    {"endpoint": "http://127.0.0.1:$UP1", "api_key": "bench-instance-key-1", "name": "up1"},
    {"endpoint": "http://127.0.0.1:$UP2", "api_key": "bench-instance-key-2", "name": "up2"},
    {"endpoint": "http://127.0.0.1:$UP3", "api_key": "bench-instance-key-3", "name": "up3"}
  ],
  "client_keys": ["$CLIENT_KEY"]
}
EOF
PROXY_LOG="$WORK/proxy-load.log"
log "starting azure-proxy on $PROXY_PORT"
start_proxy "$WORK/load.json" "$PROXY_PORT" "$PROXY_LOG"
PROXY_PID=$STARTED_PID
sleep 0.5
IDLE_RSS_KIB="$(awk '/^VmRSS:/ {print $2}' "/proc/$PROXY_PID/status")"
log "azure-proxy idle RSS: ${IDLE_RSS_KIB} KiB"

declare -A URL=(
    [direct]="http://127.0.0.1:$UP1$CHAT_PATH"
    [nginx]="http://127.0.0.1:$NGX_PORT$CHAT_PATH"
    [proxy]="http://127.0.0.1:$PROXY_PORT$CHAT_PATH"
)
declare -A SERVER_PID=([direct]="" [nginx]="$NGX_PID" [proxy]="$PROXY_PID")
declare -A SERVER_LOG=([direct]="" [nginx]="$NGX_DIR/logs/access.log" [proxy]="$PROXY_LOG")
for t in direct nginx proxy; do
    expect_200 "${URL[$t]}" "$CLIENT_KEY"
done
UPSTREAM_BODY_BYTES="$(wc -c <"$WORK/check.body")"

# ------------------------------------------------------------------------------------------------------------
# Load: wrk, interleaved rounds.
# ------------------------------------------------------------------------------------------------------------
CLK_TCK="$(getconf CLK_TCK)"
# cpu_ticks PID: "pid ticks" lines, utime + stime of PID and of its children (nginx master + workers).
cpu_ticks() {
    local p
    [ -n "$1" ] || return 0
    for p in $1 $(cat /proc/"$1"/task/*/children 2>/dev/null || true); do
        [ -r "/proc/$p/stat" ] && awk -v p="$p" '{print p, $14 + $15}' "/proc/$p/stat"
    done
    return 0
}
# cpu_cores BEFORE AFTER SECONDS: "total busiest" cores used between two cpu_ticks snapshots (busiest = the
# busiest single process, e.g. one nginx worker: near 1.0 means that worker was saturated).
cpu_cores() {
    awk -v hz="$CLK_TCK" -v d="$3" 'NR == FNR { t0[$1] = $2; next }
        { x = ($2 - t0[$1]) / hz / d; tot += x; if (x > mx) mx = x }
        END { printf "%.3f %.3f\n", tot, mx }' "$1" "$2"
}

# run_wrk TARGET CONNS SECONDS OUTFILE: one wrk run; writes "upstream_cores server_cores" to OUTFILE.cpu.
run_wrk() {
    local target="$1" conns="$2" secs="$3" out="$4" threads=2
    [ "$conns" -lt 2 ] && threads=1
    cpu_ticks "$UP_PID" >"$out.up0"
    cpu_ticks "${SERVER_PID[$target]}" >"$out.srv0"
    BENCH_CLIENT_KEY="$CLIENT_KEY" wrk -t"$threads" -c"$conns" -d"${secs}s" --latency -s bench/post.lua \
        "${URL[$target]}" >"$out" 2>&1 || { echo "bench: wrk failed:" >&2; cat "$out" >&2; return 1; }
    cpu_ticks "$UP_PID" >"$out.up1"
    cpu_ticks "${SERVER_PID[$target]}" >"$out.srv1"
    echo "$(cpu_cores "$out.up0" "$out.up1" "$secs") $(cpu_cores "$out.srv0" "$out.srv1" "$secs")" >"$out.cpu"
    rm -f "$out.up0" "$out.up1" "$out.srv0" "$out.srv1"
}

# The per-request logs (azure-proxy's stderr, nginx's access log) are kept per run only: count the
# warnings, then empty them (both are opened with O_APPEND, so truncation is safe).
server_warnings() {
    local f="${SERVER_LOG[$1]}"
    [ -n "$f" ] || { echo 0; return; }
    grep -c -E ' (WARN|ERROR) ' "$f" 2>/dev/null || true
}
reset_log() {
    local f="${SERVER_LOG[$1]}"
    [ -n "$f" ] && : >"$f"
    return 0
}

: >"$WORK/wrk.jsonl"
PEAK_RSS_KIB=""
nconns=$(wc -w <<<"$CONNS")
log "load: connections {$CONNS} × $ROUNDS round(s) × {direct, nginx, azure-proxy} × ${DURATION}s" \
    "(about $(((DURATION * ROUNDS * 3 + WARMUP * 3) * nconns)) s)"
for c in $CONNS; do
    if [ "$c" = 64 ]; then
        # Reset the proxy's VmHWM so that it is the peak under this load (Linux: clear_refs 5).
        echo 5 >"/proc/$PROXY_PID/clear_refs" 2>/dev/null || log "cannot reset VmHWM; peak RSS covers the whole run"
    fi
    if [ "$WARMUP" -gt 0 ]; then
        for t in direct nginx proxy; do
            run_wrk "$t" "$c" "$WARMUP" "$WORK/warmup-$t-c$c.txt"
            reset_log "$t"
        done
    fi
    for r in $(seq "$ROUNDS"); do
        for t in direct nginx proxy; do
            out="$WORK/wrk-$t-c$c-r$r.txt"
            run_wrk "$t" "$c" "$DURATION" "$out"
            read -r up_cores up_busiest srv_cores _ <"$out.cpu"
            warnings="$(server_warnings "$t")"
            reset_log "$t"
            line="$("$PY" bench/report.py wrk "$out" --target "$t" --conns "$c" --round "$r" \
                --upstream-cpu "$up_cores" --upstream-busiest "$up_busiest" --server-cpu "$srv_cores")"
            echo "$line" | "$PY" -c 'import json,sys; r=json.load(sys.stdin); r["server_log_warnings"]=int(sys.argv[1]); print(json.dumps(r))' \
                "${warnings:-0}" >>"$WORK/wrk.jsonl"
            "$PY" - "$line" <<'EOF' >&2
import json, sys
r = json.loads(sys.argv[1])
print(f"    c={r['conns']:<3} round {r['round']} {r['target']:<6} {r['rps']:>10.0f} req/s  p50 {r['p50_us']:>8.0f} us"
      f"  p99 {r['p99_us']:>8.0f} us  errors {r['errors']}  upstream cpu {r['upstream_cpu_cores']:.2f}"
      f" (busiest process {r['upstream_busiest_process_cores']:.2f})  server cpu {r['server_cpu_cores']:.2f}")
EOF
        done
    done
    if [ "$c" = 64 ]; then
        PEAK_RSS_KIB="$(awk '/^VmHWM:/ {print $2}' "/proc/$PROXY_PID/status")"
        log "azure-proxy peak RSS under 64 connections: ${PEAK_RSS_KIB} KiB"
    fi
done
AFTER_LOAD_RSS_KIB="$(awk '/^VmRSS:/ {print $2}' "/proc/$PROXY_PID/status")"

# ------------------------------------------------------------------------------------------------------------
# Streaming: 20 events 50 ms apart, direct to the mock vs through azure-proxy.
# ------------------------------------------------------------------------------------------------------------
start_mock() { # start_mock PORT NAME DELAY_MS EVENTS
    "$MOCK_BIN" --listen "127.0.0.1:$1" --key "$MOCK_KEY" --name "$2" --event-delay-ms "$3" --events "$4" \
        >"$WORK/mock-$2.log" 2>&1 &
    PIDS+=($!)
    wait_for "$WORK/mock-$2.log" "listening on" "$!"
}

log "streaming: $STREAM_EVENTS events ${STREAM_DELAY_MS} ms apart, $STREAM_REPS requests each, direct vs azure-proxy"
start_mock "$MOCK_PORT" stream "$STREAM_DELAY_MS" "$STREAM_EVENTS"
cat >"$WORK/stream.json.cfg" <<EOF
{"instances": [{"endpoint": "http://127.0.0.1:$MOCK_PORT", "api_key": "$MOCK_KEY", "name": "stream"}],
 "client_keys": ["$CLIENT_KEY"]}
EOF
start_proxy "$WORK/stream.json.cfg" "$SPROXY_PORT" "$WORK/proxy-stream.log"
"$PY" bench/stream_probe.py stream --direct "127.0.0.1:$MOCK_PORT" --direct-key "$MOCK_KEY" \
    --proxy "127.0.0.1:$SPROXY_PORT" --proxy-key "$CLIENT_KEY" --reps "$STREAM_REPS" --events "$STREAM_EVENTS" \
    >"$WORK/stream.json"

# ------------------------------------------------------------------------------------------------------------
# 256 slow streams open at once through a proxy with as many workers.
# ------------------------------------------------------------------------------------------------------------
log "memory: $N_STREAMS slow streams (1 event/s) through azure-proxy --workers $N_STREAMS"
start_mock "$SLOW1" slow1 "$SLOW_DELAY_MS" "$SLOW_EVENTS"
start_mock "$SLOW2" slow2 "$SLOW_DELAY_MS" "$SLOW_EVENTS"
start_mock "$SLOW3" slow3 "$SLOW_DELAY_MS" "$SLOW_EVENTS"
cat >"$WORK/streams.json.cfg" <<EOF
{"instances": [{"endpoint": "http://127.0.0.1:$SLOW1", "api_key": "$MOCK_KEY", "name": "slow1"},
               {"endpoint": "http://127.0.0.1:$SLOW2", "api_key": "$MOCK_KEY", "name": "slow2"},
               {"endpoint": "http://127.0.0.1:$SLOW3", "api_key": "$MOCK_KEY", "name": "slow3"}],
 "client_keys": ["$CLIENT_KEY"]}
EOF
start_proxy "$WORK/streams.json.cfg" "$MPROXY_PORT" "$WORK/proxy-streams.log" --workers "$N_STREAMS"
"$PY" bench/stream_probe.py streams --proxy "127.0.0.1:$MPROXY_PORT" --key "$CLIENT_KEY" --pid "$STARTED_PID" \
    --n "$N_STREAMS" >"$WORK/streams.json"

# ------------------------------------------------------------------------------------------------------------
# Start-up: process start -> first served GET /healthz.
# ------------------------------------------------------------------------------------------------------------
log "start-up: $STARTUP_REPS starts"
"$PY" bench/stream_probe.py startup --binary "$PROXY_BIN" --config "$WORK/load.json" --port "$STARTUP_PORT" \
    --reps "$STARTUP_REPS" --log "$WORK/proxy-startup.log" >"$WORK/startup.json"

# ------------------------------------------------------------------------------------------------------------
# Sizes, machine, report.
# ------------------------------------------------------------------------------------------------------------
STATIC_BYTES=null STATIC_MTIME=null
if [ -f "$STATIC_BIN" ]; then
    STATIC_BYTES="$(stat -c %s "$STATIC_BIN")"
    STATIC_MTIME="\"$(date -u -d "@$(stat -c %Y "$STATIC_BIN")" +%Y-%m-%dT%H:%M:%SZ)\""
fi
cat >"$WORK/memory.json" <<EOF
{"idle_rss_kib": ${IDLE_RSS_KIB:-null}, "peak_rss_64_kib": ${PEAK_RSS_KIB:-null},
 "rss_after_load_kib": ${AFTER_LOAD_RSS_KIB:-null},
 "static_binary_bytes": $STATIC_BYTES, "static_binary_mtime": $STATIC_MTIME,
 "release_binary_bytes": $(stat -c %s "$PROXY_BIN")}
EOF

GIT_COMMIT="$(git rev-parse --short HEAD 2>/dev/null || echo unknown)"
GIT_DIRTY=false
[ -n "$(git status --porcelain --untracked-files=no 2>/dev/null)" ] && GIT_DIRTY=true
"$PY" - "$WORK/meta.json" <<EOF
import json, os, platform, sys
cpu = "unknown"
with open("/proc/cpuinfo") as f:
    for line in f:
        if line.startswith("model name"):
            cpu = line.split(":", 1)[1].strip()
            break
meta = {
    "date": "$(date -u +%Y-%m-%dT%H:%M:%SZ)",
    "nproc": os.cpu_count(),
    "cpu_model": cpu,
    "kernel": platform.release(),
    "hostname": platform.node(),
    "command": "$COMMAND (BENCH_DURATION=$DURATION BENCH_ROUNDS=$ROUNDS BENCH_CONNS='$CONNS' BENCH_WARMUP=$WARMUP)",
    "duration_s": $DURATION,
    "rounds": $ROUNDS,
    "warmup_s": $WARMUP,
    "connections": [int(c) for c in "$CONNS".split()],
    "upstream_workers": "$UPSTREAM_WORKERS",
    "upstream_body_bytes": $UPSTREAM_BODY_BYTES,
    "stream_events": $STREAM_EVENTS,
    "stream_delay_ms": $STREAM_DELAY_MS,
    "streams_workers": $N_STREAMS,
    "proxy_binary": "$PROXY_BIN",
    "mock_binary": "$MOCK_BIN",
    "ports_base": $BASE,
    "git_commit": "$GIT_COMMIT",
    "git_dirty": $( [ "$GIT_DIRTY" = true ] && echo True || echo False ),
    "wrk": "$(wrk --version 2>&1 | head -1 | cut -c1-40)",
    "nginx": "$("$NGINX" -v 2>&1 | head -1)",
}
json.dump(meta, open(sys.argv[1], "w"), indent=2)
EOF

cleanup
if has_scenario realistic; then
    # After the load processes are gone, before the streams; its report is bench/results/realistic-latest.md.
    log "realistic mode (bench/realistic.sh): HTTPS upstreams by name, nginx side by side"
    BENCH_PROXY_BIN="$PROXY_BIN" run_realistic >/dev/null
fi
streams_args=()
if has_scenario streams; then
    # After the load processes are gone, so that the two parts never share the cores. The binaries just built.
    log "concurrent streams (bench/streams.sh)"
    BENCH_PROXY_BIN="$PROXY_BIN" bash bench/streams.sh >/dev/null
    streams_args=(--streams-md "$RESULTS/streams-latest.md" --streams-json "$RESULTS/streams-latest.json")
fi
log "all processes stopped; writing bench/results/latest.md and latest.json"
echo
"$PY" bench/report.py assemble "$WORK" --md "$RESULTS/latest.md" --json "$RESULTS/latest.json" "${streams_args[@]}"
