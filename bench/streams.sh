#!/usr/bin/env bash
# Concurrent SSE streams, side by side: direct to the upstream, nginx (proxy_buffering off) and azure-proxy with its
# default configuration, all on 127.0.0.1. See bench/README.md ("Concurrent streams"). Writes
# bench/results/streams-latest.{md,json} and prints the table. Run by `make bench` (after the load figures) and
# alone by `make bench-streams`.
#
# Knobs (environment): BENCH_STREAM_NS ("500 1000 2000": streams ramped over BENCH_STREAMS_RAMP_S, 1 s),
# BENCH_STREAMS_BURST (2000 started at once; empty: none), BENCH_STREAMS_10K (0; 1 adds BENCH_STREAMS_BIG_N, default
# 10,000, ramped, with the
# proxy's workers and max_connections raised to fit), BENCH_STREAMS_SETTLE (60 s), BENCH_STREAMS_EVENTS (20),
# BENCH_STREAMS_DELAY_MS (500), BENCH_STREAMS_TIMEOUT (120 s per stream), BENCH_STREAMS_PORT_BASE (23200),
# BENCH_PROXY_BIN / BENCH_UPSTREAM_BIN (use these binaries instead of building).
set -euo pipefail

cd "$(dirname "$0")/.."
ROOT=$PWD

NS="${BENCH_STREAM_NS:-500 1000 2000}"
BURST="${BENCH_STREAMS_BURST-2000}"
TENK="${BENCH_STREAMS_10K:-0}"
BIG_N="${BENCH_STREAMS_BIG_N:-10000}"
SETTLE="${BENCH_STREAMS_SETTLE:-60}"
EVENTS="${BENCH_STREAMS_EVENTS:-20}"
DELAY_MS="${BENCH_STREAMS_DELAY_MS:-500}"
RAMP_S="${BENCH_STREAMS_RAMP_S:-1}"
TIMEOUT="${BENCH_STREAMS_TIMEOUT:-120}"
PORT_BASE="${BENCH_STREAMS_PORT_BASE:-23200}"
COMMAND="${BENCH_COMMAND:-bash bench/streams.sh}"

CLIENT_KEY="bench-client-key"
WORK="$ROOT/target/bench/streams"
RESULTS="$ROOT/bench/results"
PROXY_BIN="${BENCH_PROXY_BIN:-$ROOT/target/release/azure-proxy}"
UPSTREAM_BIN="${BENCH_UPSTREAM_BIN:-$ROOT/target/release/examples/sse_upstream}"
PY="${PYTHON:-python3}"

for v in SETTLE EVENTS DELAY_MS TIMEOUT PORT_BASE TENK BIG_N; do
    [[ "${!v}" =~ ^[0-9]+$ ]] || { echo "bench: BENCH_STREAMS_$v must be a whole number, got '${!v}'" >&2; exit 2; }
done
for n in $NS $BURST; do
    [[ "$n" =~ ^[1-9][0-9]*$ ]] || { echo "bench: stream counts must be positive numbers, got '$n'" >&2; exit 2; }
done
[[ "$RAMP_S" =~ ^[0-9]+(\.[0-9]+)?$ ]] || { echo "bench: BENCH_STREAMS_RAMP_S must be a number" >&2; exit 2; }

log() { printf '\033[1m[bench-streams %s]\033[0m %s\n' "$(date +%H:%M:%S)" "$*" >&2; }
# shellcheck source=bench/lib.sh
. "$ROOT/bench/lib.sh"

# ------------------------------------------------------------------------------------------------------------
# Everything started here is stopped on exit, on failure and on Ctrl-C.
# ------------------------------------------------------------------------------------------------------------
PIDS=()
stop_pid() { # stop_pid PID: TERM, up to 3 s, then KILL; forgets it
    local pid="$1" keep=() p
    kill -TERM "$pid" 2>/dev/null || true
    for _ in $(seq 30); do
        kill -0 "$pid" 2>/dev/null || break
        sleep 0.1
    done
    kill -KILL "$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
    for p in "${PIDS[@]}"; do
        [ "$p" = "$pid" ] || keep+=("$p")
    done
    PIDS=("${keep[@]}")
}
cleanup() {
    local pid
    for pid in "${PIDS[@]}"; do
        stop_pid "$pid"
    done
}
trap cleanup EXIT
trap 'log "interrupted"; exit 130' INT TERM

# ------------------------------------------------------------------------------------------------------------
# Tools and builds.
# ------------------------------------------------------------------------------------------------------------
ensure_tools nginx:nginx curl:curl python3:python3
NGINX="$(command -v nginx || echo /usr/sbin/nginx)"

[ -n "${BENCH_PROXY_BIN:-}" ] || cargo build --release --bin azure-proxy
[ -n "${BENCH_UPSTREAM_BIN:-}" ] || cargo build --release --example sse_upstream
for bin in "$PROXY_BIN" "$UPSTREAM_BIN"; do
    [ -x "$bin" ] || { echo "bench: $bin is not an executable" >&2; exit 2; }
done

# Every stream is an fd at the client, and two at a proxy (client + upstream); 10,000 streams through a proxy
# need more than the usual 20,000 or 1,024. Root may raise the hard limit; others get what the hard limit allows.
ulimit -n 65536 2>/dev/null || ulimit -n "$(ulimit -Hn)"
HARD_NOFILE="$(ulimit -Hn)"
[ "$HARD_NOFILE" = unlimited ] && HARD_NOFILE=1048576
log "open-files limit $(ulimit -n) (inherited by every process started here)"

rm -rf "$WORK"
mkdir -p "$WORK" "$RESULTS"

BASE="$("$PY" bench/stream_probe.py free-base "$PORT_BASE" 8)"
UP1=$BASE UP2=$((BASE + 1)) UP3=$((BASE + 2)) # sse_upstream, three "instances"
NGX_PORT=$((BASE + 3))
PROXY_PORT=$((BASE + 4))
log "ports ${BASE}-$((BASE + 7)) on 127.0.0.1"

backlog_of() { # backlog_of PORT: the listen backlog the kernel holds for 127.0.0.1:PORT (ss Send-Q)
    ss -Hltn "sport = :$1" 2>/dev/null | awk 'NR == 1 {print $3}'
}

# ------------------------------------------------------------------------------------------------------------
# Upstream: one sse_upstream process on three ports, for the whole run.
# ------------------------------------------------------------------------------------------------------------
"$UPSTREAM_BIN" --listen "127.0.0.1:$UP1" --listen "127.0.0.1:$UP2" --listen "127.0.0.1:$UP3" \
    --events "$EVENTS" --event-delay-ms "$DELAY_MS" >"$WORK/upstream.log" 2>&1 &
UP_PID=$!
PIDS+=("$UP_PID")
wait_for "$WORK/upstream.log" "listening on http://127.0.0.1:$UP3" "$UP_PID"
log "sse_upstream on $UP1 $UP2 $UP3: $EVENTS events ${DELAY_MS} ms apart"

# ------------------------------------------------------------------------------------------------------------
# nginx: reverse proxy with proxy_buffering off, sized per scenario (each stream is two connections in a worker).
# ------------------------------------------------------------------------------------------------------------
NGX_DIR="$WORK/nginx"
mkdir -p "$NGX_DIR/conf" "$NGX_DIR/logs" "$NGX_DIR/tmp"
# nginx_conf N: worker_connections sized for N streams in one worker (the kernel may hand any worker most of a
# burst): 2N + 1024. Not a flat 32768: nginx allocates and touches its connection and event arrays at start,
# so an oversized worker_connections shows up as idle RSS.
nginx_conf() {
    cat >"$NGX_DIR/conf/nginx.conf" <<EOF
worker_processes auto;
daemon off;
pid logs/nginx.pid;
error_log logs/error.log warn;
worker_rlimit_nofile $(( 4 * $1 + 4096 < HARD_NOFILE ? 4 * $1 + 4096 : HARD_NOFILE ));
events { worker_connections $((2 * $1 + 1024)); }
http {
    client_body_temp_path tmp/body; proxy_temp_path tmp/proxy; fastcgi_temp_path tmp/fastcgi;
    uwsgi_temp_path tmp/uwsgi; scgi_temp_path tmp/scgi;
    access_log logs/access.log;
    keepalive_timeout 300s;
    upstream azure {
        server 127.0.0.1:$UP1;
        server 127.0.0.1:$UP2;
        server 127.0.0.1:$UP3;
        keepalive 64;
    }
    server {
        listen 127.0.0.1:$NGX_PORT backlog=4096;
        location / {
            proxy_pass http://azure;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_set_header api-key "bench-instance-key";
            proxy_buffering off;
            proxy_read_timeout 300s;
        }
    }
}
EOF
    "$NGINX" -t -q -p "$NGX_DIR/" -c conf/nginx.conf -e logs/error.log
}

# ------------------------------------------------------------------------------------------------------------
# azure-proxy: the default configuration (listen address, the three instances, one client key). For 10,000
# streams (more than the default pool bound of 4,096) only the two bounds that would refuse them are raised:
# workers (a stream holds a worker) and max_connections (default 8192).
# ------------------------------------------------------------------------------------------------------------
instances() {
    cat <<EOF
  "instances": [
    {"endpoint": "http://127.0.0.1:$UP1", "api_key": "bench-instance-key-1", "name": "up1"},
    {"endpoint": "http://127.0.0.1:$UP2", "api_key": "bench-instance-key-2", "name": "up2"},
    {"endpoint": "http://127.0.0.1:$UP3", "api_key": "bench-instance-key-3", "name": "up3"}
  ],
  "client_keys": ["$CLIENT_KEY"]
EOF
}
printf '{\n%s\n}\n' "$(instances)" >"$WORK/proxy-default.json"

# ------------------------------------------------------------------------------------------------------------
# Scenarios: per scenario a fresh nginx and a fresh azure-proxy, then direct, nginx, azure-proxy one after the
# other, then the settle readings, then both are stopped.
# ------------------------------------------------------------------------------------------------------------
SCENARIOS=()
for n in $NS; do SCENARIOS+=("ramp:$n"); done
[ -n "$BURST" ] && SCENARIOS+=("burst:$BURST")
[ "$TENK" = 1 ] && SCENARIOS+=("ramp:$BIG_N")

RUN_FILES=()
declare -A BACKLOG=()
for sc in "${SCENARIOS[@]}"; do
    kind="${sc%%:*}" n="${sc#*:}" ramp="$RAMP_S"
    [ "$kind" = burst ] && ramp=0
    name="$kind-$n"
    config="$WORK/proxy-default.json"
    if [ "$n" -gt 4000 ]; then
        config="$WORK/proxy-$n.json"
        printf '{\n%s,\n  "workers": %d,\n  "max_connections": %d\n}\n' "$(instances)" "$n" $((n + 1024)) >"$config"
    fi
    if [ $((2 * n + 1024)) -gt "$HARD_NOFILE" ]; then
        log "warning: $n streams through a proxy need ~$((2 * n + 1024)) descriptors in it; the limit here is $HARD_NOFILE"
    fi
    log "$name: $n streams, $( [ "$kind" = burst ] && echo "all at once" || echo "over ${ramp} s"), direct / nginx / azure-proxy ($(basename "$config"))"
    nginx_conf "$n"
    start_nginx "$NGX_DIR" "$NGX_PORT"
    NGX_PID=$NGINX_PID
    start_proxy "$config" "$PROXY_PORT" "$WORK/proxy.log"
    PROXY_PID=$STARTED_PID
    sleep 1 # both idle before their idle RSS is read
    BACKLOG[direct]="$(backlog_of "$UP1")" BACKLOG[nginx]="$(backlog_of "$NGX_PORT")"
    BACKLOG[proxy]="$(backlog_of "$PROXY_PORT")"
    files=()
    for t in direct nginx proxy; do
        case "$t" in
            direct) addr="127.0.0.1:$UP1" pid="$UP_PID" up=() ;;
            nginx) addr="127.0.0.1:$NGX_PORT" pid="$NGX_PID" up=(--upstream-pids "$UP_PID") ;;
            proxy) addr="127.0.0.1:$PROXY_PORT" pid="$PROXY_PID" up=(--upstream-pids "$UP_PID") ;;
        esac
        out="$WORK/$name-$t.json"
        "$PY" bench/streams.py run --target "$addr" --name "$t" --scenario "$name" --key "$CLIENT_KEY" --n "$n" \
            --ramp-s "$ramp" --events "$EVENTS" --event-delay-ms "$DELAY_MS" --timeout "$TIMEOUT" \
            --pids "$pid" "${up[@]}" --out "$out"
        files+=("$out")
    done
    if [ "$SETTLE" -gt 0 ]; then
        log "$name: RSS and threads ${SETTLE} s after each run"
        "$PY" bench/streams.py settle "${files[@]}" --settle "$SETTLE"
    fi
    RUN_FILES+=("${files[@]}")
    stop_pid "$PROXY_PID"
    stop_pid "$NGX_PID"
done
cleanup

GIT_COMMIT="$(git rev-parse --short HEAD 2>/dev/null || echo unknown)"
GIT_DIRTY=false
[ -n "$(git status --porcelain --untracked-files=no 2>/dev/null)" ] && GIT_DIRTY=true
"$PY" - "$WORK/meta.json" <<EOF
import json, os, platform, sys
meta = {
    "date": "$(date -u +%Y-%m-%dT%H:%M:%SZ)", "nproc": os.cpu_count(), "kernel": platform.release(),
    "command": "$COMMAND (BENCH_STREAM_NS='$NS' BENCH_STREAMS_BURST='$BURST' BENCH_STREAMS_10K=$TENK BENCH_STREAMS_BIG_N=$BIG_N BENCH_STREAMS_SETTLE=$SETTLE)",
    "git_commit": "$GIT_COMMIT", "git_dirty": "$GIT_DIRTY" == "true",
    "ramp_s": $RAMP_S, "events": $EVENTS, "event_delay_ms": $DELAY_MS, "settle_s": $SETTLE, "timeout_s": $TIMEOUT,
    "open_files_limit": $(ulimit -n), "somaxconn": int(open("/proc/sys/net/core/somaxconn").read()),
    "listen_backlog": {"direct": "${BACKLOG[direct]:-?}", "nginx": "${BACKLOG[nginx]:-?}", "proxy": "${BACKLOG[proxy]:-?}"},
    "proxy_config": "default configuration (listen, 3 instances, 1 client key: up to 4096 workers started on demand, queue 256, max_connections 8192; for more than 4,000 streams workers = N and max_connections = N + 1024)",
    "nginx_config": "worker_processes auto, proxy_buffering off, proxy_http_version 1.1, upstream keepalive 64, worker_connections 2N+1024, worker_rlimit_nofile 4N+4096, listen backlog=4096, access log on",
    "nginx": "$("$NGINX" -v 2>&1 | head -1)",
}
json.dump(meta, open(sys.argv[1], "w"), indent=2)
EOF
log "all processes stopped; writing bench/results/streams-latest.md and streams-latest.json"
echo
"$PY" bench/streams.py report "${RUN_FILES[@]}" --meta "$WORK/meta.json" --md "$RESULTS/streams-latest.md" \
    --json "$RESULTS/streams-latest.json"
