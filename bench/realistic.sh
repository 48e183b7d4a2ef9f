#!/usr/bin/env bash
# The realistic benchmark (`make bench-realistic`): azure-proxy and nginx side by side in front of HTTPS upstreams
# that are reached by host name through a DNS server this script starts, as real Azure endpoints are. See
# bench/README.md ("Realistic mode"). Writes bench/results/realistic-latest.{md,json} and prints the Markdown.
#
# Needs root: the DNS server binds 127.53.0.x:53 (glibc only asks port 53), and everything under test runs in a
# private mount namespace whose /etc/resolv.conf, /etc/hosts and /etc/nsswitch.conf are bind-mounted so that the
# upstream names (azure-{a,b,c}.bench) are known only to that server.
#
# Knobs (environment): BENCH_DURATION (s per wrk run, 5), BENCH_ROUNDS (3), BENCH_CONNS ("1 16 64"), BENCH_WARMUP
# (s per target before each concurrency, 1), BENCH_COUNT_DURATION (s of the extra run per target and concurrency
# that perf stat counts, 3), BENCH_RATES (open loop, req/s: "1000 5000 10000"), BENCH_OPEN_DURATION (s per oha run,
# 8), BENCH_WAIT_QUIET (s to wait for the machine to be under 10 % busy before measuring, 0), BENCH_PROFILE (1:
# perf record azure-proxy during one extra run at BENCH_PROFILE_CONNS (16) connections, top symbols in the report; builds a release
# binary with symbols unless BENCH_PROXY_BIN is given), BENCH_OPEN_CONNS (oha connections, 32), BENCH_OPEN_SKIP (s at the start of each oha run left out of its
# percentiles: connection set-up, 1), BENCH_PERF (auto; 0: strace -f -c instead), BENCH_QUICK (1: a smoke
# run of about 40 s), BENCH_PORT_BASE (23300), BENCH_PROXY_BIN (benchmark this binary instead of building).
set -euo pipefail

cd "$(dirname "$0")/.."
ROOT=$PWD

if [ "${BENCH_QUICK:-0}" = 1 ]; then
    : "${BENCH_DURATION:=2}" "${BENCH_ROUNDS:=1}" "${BENCH_CONNS:=16}" "${BENCH_WARMUP:=1}"
    : "${BENCH_COUNT_DURATION:=2}" "${BENCH_RATES:=1000}" "${BENCH_OPEN_DURATION:=3}"
fi
DURATION="${BENCH_DURATION:-5}"
ROUNDS="${BENCH_ROUNDS:-3}"
CONNS="${BENCH_CONNS:-1 16 64}"
WARMUP="${BENCH_WARMUP:-1}"
COUNT_DURATION="${BENCH_COUNT_DURATION:-3}"
RATES="${BENCH_RATES:-1000 5000 10000}"
OPEN_DURATION="${BENCH_OPEN_DURATION:-8}"
OPEN_CONNS="${BENCH_OPEN_CONNS:-32}"
OPEN_SKIP="${BENCH_OPEN_SKIP:-1}"
PERF_MODE="${BENCH_PERF:-auto}"
WAIT_QUIET="${BENCH_WAIT_QUIET:-0}"
PROFILE="${BENCH_PROFILE:-0}"
PROFILE_CONNS="${BENCH_PROFILE_CONNS:-16}"
# Extra fields for the proxy's configuration, as JSON object members (e.g. '"keepalive_linger_ms": 0'): for
# trying a setting; the report says which were used.
PROXY_SETTINGS="${BENCH_PROXY_SETTINGS:-}"
PORT_BASE="${BENCH_PORT_BASE:-23300}"
COMMAND="${BENCH_COMMAND:-bash bench/realistic.sh}"

TARGET_DIR="${CARGO_TARGET_DIR:-$ROOT/target}"
PROXY_BIN="${BENCH_PROXY_BIN:-$TARGET_DIR/release/azure-proxy}"
WORK="$TARGET_DIR/bench-realistic"
RESULTS="$ROOT/bench/results"
PY="${PYTHON:-python3}"
CLIENT_KEY="bench-client-key"
CHAT_PATH="/openai/deployments/gpt-4o/chat/completions?api-version=2024-06-01"
REQUEST_BODY='{"messages":[{"role":"user","content":"hi"}]}'
NAMES=(azure-a.bench azure-b.bench azure-c.bench)

for v in DURATION ROUNDS WARMUP COUNT_DURATION OPEN_DURATION OPEN_CONNS OPEN_SKIP PORT_BASE WAIT_QUIET PROFILE PROFILE_CONNS; do
    [[ "${!v}" =~ ^[0-9]+$ ]] || { echo "bench: BENCH_$v must be a whole number, got '${!v}'" >&2; exit 2; }
done
for n in $CONNS $RATES; do
    [[ "$n" =~ ^[1-9][0-9]*$ ]] || { echo "bench: BENCH_CONNS and BENCH_RATES list positive numbers" >&2; exit 2; }
done
[[ "$PERF_MODE" =~ ^(auto|0)$ ]] || { echo "bench: BENCH_PERF is auto or 0, got '$PERF_MODE'" >&2; exit 2; }

log() { printf '\033[1m[bench-realistic %s]\033[0m %s\n' "$(date +%H:%M:%S)" "$*" >&2; }
# shellcheck source=bench/lib.sh
. "$ROOT/bench/lib.sh"

# ------------------------------------------------------------------------------------------------------------
# Outside the namespace (where the real resolver works): tools, builds, then re-run this script in the namespace.
# ------------------------------------------------------------------------------------------------------------
if [ -z "${BENCH_IN_NAMESPACE:-}" ]; then
    [ "$(id -u)" = 0 ] || { echo "bench: the realistic mode needs root (DNS on port 53, mount namespace)" >&2; exit 2; }
    ensure_tools wrk:wrk nginx:nginx curl:curl python3:python3 openssl:openssl unshare:util-linux strace:strace
    if [ "$PERF_MODE" = auto ] && ! command -v perf >/dev/null; then
        ensure_tools perf:linux-perf || log "no perf: syscalls counted with strace -f -c, context switches from /proc"
    fi
    if ! command -v oha >/dev/null; then
        log "installing oha (open-loop load generator) with cargo install; this takes a few minutes, once"
        cargo install oha --locked
    fi
    if [ -z "${BENCH_PROXY_BIN:-}" ] && [ "$PROFILE" = 1 ]; then
        # The release profile strips symbols; a profile needs them. Same optimisation, own target directory.
        log "building (release, with symbols for the profile)"
        CARGO_PROFILE_RELEASE_STRIP=false CARGO_PROFILE_RELEASE_DEBUG=line-tables-only \
            cargo build --release --bin azure-proxy --target-dir "$TARGET_DIR/bench-symbols"
        PROXY_BIN="$TARGET_DIR/bench-symbols/release/azure-proxy"
    elif [ -z "${BENCH_PROXY_BIN:-}" ]; then
        log "building (release)"
        cargo build --release --bin azure-proxy
    fi
    [ -x "$PROXY_BIN" ] || { echo "bench: $PROXY_BIN is not an executable" >&2; exit 2; }
    rm -rf "$WORK"
    mkdir -p "$WORK" "$RESULTS"
    export BENCH_IN_NAMESPACE=1 BENCH_DURATION="$DURATION" BENCH_ROUNDS="$ROUNDS" BENCH_CONNS="$CONNS"
    export BENCH_WARMUP="$WARMUP" BENCH_COUNT_DURATION="$COUNT_DURATION" BENCH_RATES="$RATES"
    export BENCH_OPEN_DURATION="$OPEN_DURATION" BENCH_OPEN_CONNS="$OPEN_CONNS" BENCH_OPEN_SKIP="$OPEN_SKIP"
    export BENCH_PROXY_BIN="$PROXY_BIN"
    exec unshare --mount --propagation private -- bash "$0"
fi

# ------------------------------------------------------------------------------------------------------------
# Inside the namespace. Everything started here is stopped on exit, on failure and on Ctrl-C; the namespace
# (and its bind mounts) goes away with its last process.
# ------------------------------------------------------------------------------------------------------------
PIDS=()
cleanup() {
    local pid
    for pid in "${PIDS[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
    for _ in $(seq 30); do
        local alive=0
        for pid in "${PIDS[@]}"; do kill -0 "$pid" 2>/dev/null && alive=1; done
        [ "$alive" = 0 ] && break
        sleep 0.1
    done
    for pid in "${PIDS[@]}"; do kill -KILL "$pid" 2>/dev/null || true; done
    PIDS=()
}
trap cleanup EXIT
trap 'log "interrupted"; exit 130' INT TERM

PERF=0
if [ "$PERF_MODE" = auto ] && command -v perf >/dev/null &&
    perf stat -e raw_syscalls:sys_enter,context-switches -o /dev/null -- true 2>/dev/null; then
    PERF=1
fi

# ------------------------------------------------------------------------------------------------------------
# Ports, DNS server, name resolution in this namespace.
# ------------------------------------------------------------------------------------------------------------
BASE="$("$PY" bench/stream_probe.py free-base "$PORT_BASE" 5)"
UP_PORTS=("$BASE" $((BASE + 1)) $((BASE + 2))) # the upstream's three "instances", one per name
NGX_PORT=$((BASE + 3))
PROXY_PORT=$((BASE + 4))
log "ports ${BASE}-$((BASE + 4)) on 127.0.0.1"

DNS_LOG="$WORK/dns-queries.log"
: >"$DNS_LOG"
"$PY" bench/dns_server.py --log "$DNS_LOG" \
    --names "$(printf '%s=127.0.0.1,' "${NAMES[@]}" | sed 's/,$//')" >"$WORK/dns.log" 2>&1 &
DNS_PID=$!
PIDS+=("$DNS_PID")
wait_for "$WORK/dns.log" "dns_server listening on" "$DNS_PID"
DNS_IP="$(sed -n 's/^dns_server listening on //p' "$WORK/dns.log")"
printf 'nameserver %s\noptions attempts:1 timeout:1\n' "$DNS_IP" >"$WORK/resolv.conf"
printf '127.0.0.1 localhost\n::1 localhost\n' >"$WORK/hosts"
printf 'hosts: files dns\n' >"$WORK/nsswitch.conf"
for f in resolv.conf hosts nsswitch.conf; do
    mount --bind "$WORK/$f" "/etc/$f"
done
[ -S /var/run/nscd/socket ] && log "WARNING: nscd is running; glibc may answer from its cache, not from $DNS_IP"
getent ahostsv4 "${NAMES[0]}" | grep -q '^127\.0\.0\.1 ' || {
    echo "bench: ${NAMES[0]} does not resolve through the DNS server on $DNS_IP; its log:" >&2
    tail -n 20 "$WORK/dns.log" "$DNS_LOG" >&2
    exit 1
}
log "DNS server on $DNS_IP:53 answers ${NAMES[*]} (the only resolver in this mount namespace)"
dns_queries() { wc -l <"$DNS_LOG"; }

# ------------------------------------------------------------------------------------------------------------
# A private CA and a certificate for the three names, made fresh for every run.
# ------------------------------------------------------------------------------------------------------------
TLS="$WORK/tls"
mkdir -p "$TLS"
{
    openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -days 2 -subj "/CN=bench CA" \
        -addext "basicConstraints=critical,CA:TRUE" -addext "keyUsage=critical,keyCertSign,cRLSign" \
        -keyout "$TLS/ca-key.pem" -out "$TLS/ca.pem"
    openssl req -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -subj "/CN=${NAMES[0]}" \
        -keyout "$TLS/server-key.pem" -out "$TLS/server.csr"
    printf 'basicConstraints=critical,CA:FALSE\nkeyUsage=critical,digitalSignature\nextendedKeyUsage=serverAuth\n' \
        >"$TLS/ext.cnf"
    echo "subjectAltName=$(printf 'DNS:%s,' "${NAMES[@]}")IP:127.0.0.1" >>"$TLS/ext.cnf"
    openssl x509 -req -in "$TLS/server.csr" -CA "$TLS/ca.pem" -CAkey "$TLS/ca-key.pem" -CAcreateserial -days 2 \
        -extfile "$TLS/ext.cnf" -out "$TLS/server-cert.pem"
} >"$WORK/openssl.log" 2>&1 || { echo "bench: making the CA failed:" >&2; cat "$WORK/openssl.log" >&2; exit 1; }

# ------------------------------------------------------------------------------------------------------------
# The HTTPS upstream: one nginx, three TLS server blocks with the same ~600-byte chat completion as bench/run.sh.
# Its first request on each connection is logged with $ssl_session_reused: that log counts the TLS handshakes
# (full or resumed) the servers under test make.
# ------------------------------------------------------------------------------------------------------------
BODY='{"id":"chatcmpl-bench0000000000000000000001","object":"chat.completion","created":1730000000,"model":"gpt-4o-2024-08-06","system_fingerprint":"fp_bench","prompt_filter_results":[{"prompt_index":0,"content_filter_results":{"hate":{"filtered":false,"severity":"safe"},"violence":{"filtered":false,"severity":"safe"}}}],"choices":[{"index":0,"finish_reason":"stop","logprobs":null,"message":{"role":"assistant","content":"Hello! How can I help you today?"},"content_filter_results":{"hate":{"filtered":false,"severity":"safe"}}}],"usage":{"prompt_tokens":9,"completion_tokens":21,"total_tokens":30}}'
NGINX="$(command -v nginx || echo /usr/sbin/nginx)"
nginx_head() { # the top of both nginx configs
    cat <<EOF
worker_processes auto;
daemon off;
pid logs/nginx.pid;
error_log logs/error.log warn;
worker_rlimit_nofile 16384;
events { worker_connections 8192; }
http {
    client_body_temp_path tmp/body; proxy_temp_path tmp/proxy; fastcgi_temp_path tmp/fastcgi;
    uwsgi_temp_path tmp/uwsgi; scgi_temp_path tmp/scgi;
    keepalive_timeout 300s;
    keepalive_requests 1000000;
EOF
}

UP_DIR="$WORK/nginx-upstream"
mkdir -p "$UP_DIR/conf" "$UP_DIR/logs" "$UP_DIR/tmp"
{
    nginx_head
    cat <<EOF
    default_type application/json;
    ssl_certificate $TLS/server-cert.pem;
    ssl_certificate_key $TLS/server-key.pem;
    ssl_protocols TLSv1.2 TLSv1.3;
    ssl_session_cache shared:bench:10m;
    ssl_session_timeout 1h;
    map \$connection_requests \$first_on_connection { 1 1; default 0; }
    log_format handshake '\$ssl_session_reused \$ssl_protocol \$server_port';
    access_log logs/handshakes.log handshake if=\$first_on_connection;
EOF
    for p in "${UP_PORTS[@]}"; do
        echo "    server { listen 127.0.0.1:$p ssl backlog=4096; location / { return 200 '$BODY'; } }"
    done
    echo "}"
} >"$UP_DIR/conf/nginx.conf"
HS_LOG="$UP_DIR/logs/handshakes.log"

# nginx as the reverse proxy. Its upstream block names the hosts, so nginx resolves them once, at start, through
# the same DNS server (nginx 1.22 cannot re-resolve the servers of an upstream block; `resolver` + a variable in
# proxy_pass would re-resolve, but then there is no upstream block and so no upstream keep-alive).
# proxy_ssl_name: nginx sends one name per upstream block; the certificate holds all three.
NGX_DIR="$WORK/nginx-proxy"
mkdir -p "$NGX_DIR/conf" "$NGX_DIR/logs" "$NGX_DIR/tmp"
{
    nginx_head
    cat <<EOF
    access_log logs/access.log;
    upstream azure {
        server ${NAMES[0]}:${UP_PORTS[0]};
        server ${NAMES[1]}:${UP_PORTS[1]};
        server ${NAMES[2]}:${UP_PORTS[2]};
        keepalive 64;
        keepalive_requests 1000000;
        keepalive_timeout 300s;
    }
    server {
        listen 127.0.0.1:$NGX_PORT backlog=4096;
        location / {
            proxy_pass https://azure;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_set_header api-key "bench-instance-key";
            proxy_ssl_session_reuse on;
            proxy_ssl_protocols TLSv1.2 TLSv1.3;
            proxy_ssl_verify on;
            proxy_ssl_trusted_certificate $TLS/ca.pem;
            proxy_ssl_server_name on;
            proxy_ssl_name ${NAMES[0]};
        }
    }
}
EOF
} >"$NGX_DIR/conf/nginx.conf"

log "starting the HTTPS upstream (nginx) on ${UP_PORTS[*]}"
start_nginx "$UP_DIR" "${UP_PORTS[0]}"
UP_PID=$NGINX_PID
q0=$(dns_queries)
log "starting the nginx reverse proxy on $NGX_PORT"
start_nginx "$NGX_DIR" "$NGX_PORT"
NGX_PID=$NGINX_PID
NGINX_START_QUERIES=$(($(dns_queries) - q0))

cat >"$WORK/proxy.json" <<EOF
{
  "instances": [
    {"endpoint": "https://${NAMES[0]}:${UP_PORTS[0]}", "api_key": "bench-instance-key-1", "name": "a"},
    {"endpoint": "https://${NAMES[1]}:${UP_PORTS[1]}", "api_key": "bench-instance-key-2", "name": "b"},
    {"endpoint": "https://${NAMES[2]}:${UP_PORTS[2]}", "api_key": "bench-instance-key-3", "name": "c"}
  ],
  "client_keys": ["$CLIENT_KEY"],
  "ca_bundle": "$TLS/ca.pem"${PROXY_SETTINGS:+,
  $PROXY_SETTINGS}
}
EOF
PROXY_LOG="$WORK/proxy.log"
log "starting azure-proxy on $PROXY_PORT (default settings${PROXY_SETTINGS:+ and $PROXY_SETTINGS}, ca_bundle = the bench CA)"
start_proxy "$WORK/proxy.json" "$PROXY_PORT" "$PROXY_LOG"
PROXY_PID=$STARTED_PID

declare -A URL=(
    [direct]="https://${NAMES[0]}:${UP_PORTS[0]}$CHAT_PATH"
    [nginx]="http://127.0.0.1:$NGX_PORT$CHAT_PATH"
    [proxy]="http://127.0.0.1:$PROXY_PORT$CHAT_PATH"
)
declare -A SERVER_PID=([nginx]="$NGX_PID" [proxy]="$PROXY_PID")
declare -A SERVER_LOG=([nginx]="$NGX_DIR/logs/access.log" [proxy]="$PROXY_LOG")

# expect_200 TARGET: three POSTs (one per instance behind a proxy) must each answer 200, with the CA checked.
expect_200() {
    local code i
    for i in 1 2 3; do
        code="$(curl -sS -o "$WORK/check.body" -w '%{http_code}' --max-time 5 --cacert "$TLS/ca.pem" \
            -H "api-key: $CLIENT_KEY" -H 'content-type: application/json' -d "$REQUEST_BODY" "${URL[$1]}")" || true
        if [ "$code" != 200 ]; then
            echo "bench: $1 (${URL[$1]}) answered '$code' instead of 200 (request $i):" >&2
            cat "$WORK/check.body" >&2 || true
            [ -n "${SERVER_LOG[$1]:-}" ] && { echo "--- last lines of ${SERVER_LOG[$1]}:" >&2; tail -n 20 "${SERVER_LOG[$1]}" >&2; }
            echo "--- last lines of the upstream's error log:" >&2
            tail -n 20 "$UP_DIR/logs/error.log" >&2
            return 1
        fi
    done
}
for t in direct nginx proxy; do expect_200 "$t"; done
log "all three targets answer 200 over HTTPS by name; nginx made $NGINX_START_QUERIES DNS queries at start"

# ------------------------------------------------------------------------------------------------------------
# Counters read before and after each run.
# ------------------------------------------------------------------------------------------------------------
CLK_TCK="$(getconf CLK_TCK)"
server_pids() { # server_pids PID: PID and its children (nginx: master and workers)
    echo "$1" "$(cat /proc/"$1"/task/*/children 2>/dev/null || true)"
}
cpu_ticks() { # cpu_ticks PID: utime + stime of PID (all its threads, also those that exited) and its children
    local p sum=0
    for p in $(server_pids "$1"); do
        [ -r "/proc/$p/stat" ] && sum=$((sum + $(awk '{print $14 + $15}' "/proc/$p/stat")))
    done
    echo "$sum"
}
threads() { # threads PID: threads of PID and its children
    local p sum=0
    for p in $(server_pids "$1"); do
        sum=$((sum + $(awk '/^Threads:/ {print $2}' "/proc/$p/status" 2>/dev/null || echo 0)))
    done
    echo "$sum"
}
handshakes() { # "full resumed" TLS handshakes seen by the upstream so far
    awk '{ if ($1 == "r") r++; else f++ } END { printf "%d %d\n", f, r }' "$HS_LOG" 2>/dev/null || echo "0 0"
}
# The servers' per-request logs grow by a line per request: count the warnings of each run, then empty them
# (both are opened with O_APPEND, so truncation is safe).
log_warnings() {
    local n
    n=$(grep -c -E 'WARN|ERROR|\[(error|crit|alert|emerg)\]' "$1" 2>/dev/null || true)
    : >"$1"
    echo "${n:-0}"
}

# run_wrk TARGET CONNS SECONDS OUT: one wrk run.
run_wrk() {
    local threads=2
    [ "$2" -lt 2 ] && threads=1
    BENCH_CLIENT_KEY="$CLIENT_KEY" wrk -t"$threads" -c"$2" -d"${3}s" --latency -s bench/post.lua "${URL[$1]}" \
        >"$4" 2>&1 || { echo "bench: wrk failed:" >&2; cat "$4" >&2; return 1; }
}

# measure TARGET CONNS ROUND: one measured wrk run with every counter around it; appends to closed.jsonl.
measure() {
    local t="$1" c="$2" r="$3" out="$WORK/wrk-$1-c$2-r$3.txt"
    local ticks0 ticks1 up0 up1 dns0 dns1 hs0 hs1 thr0 thr1
    ticks0=$(cpu_ticks "${SERVER_PID[$t]}"); up0=$(cpu_ticks "$UP_PID"); dns0=$(dns_queries); hs0=$(handshakes)
    thr0=$(threads "${SERVER_PID[$t]}")
    run_wrk "$t" "$c" "$DURATION" "$out"
    ticks1=$(cpu_ticks "${SERVER_PID[$t]}"); up1=$(cpu_ticks "$UP_PID"); dns1=$(dns_queries); hs1=$(handshakes)
    thr1=$(threads "${SERVER_PID[$t]}")
    "$PY" bench/realistic.py closed "$out" --target "$t" --conns "$c" --round "$r" --clk-tck "$CLK_TCK" \
        --cpu-ticks $((ticks1 - ticks0)) --upstream-cpu-ticks $((up1 - up0)) --dns-queries $((dns1 - dns0)) \
        --handshakes "$hs0" "$hs1" --threads "$thr0" "$thr1" --warnings "$(log_warnings "${SERVER_LOG[$t]}")" \
        >>"$WORK/closed.jsonl"
    tail -n 1 "$WORK/closed.jsonl" | "$PY" bench/realistic.py show-closed >&2
}

# count TARGET CONNS: a separate wrk run with perf stat (or strace) attached, so that the measured rounds carry no
# tracing overhead. Appends syscalls and context switches per request to counts.jsonl.
count() {
    local t="$1" c="$2" pids out="$WORK/count-$1-c$2"
    pids="$(server_pids "${SERVER_PID[$t]}" | tr -s ' \n' ',' | sed 's/,$//')"
    if [ "$PERF" = 1 ]; then
        perf stat -x, -e raw_syscalls:sys_enter,context-switches -p "$pids" -o "$out.perf" &
    else
        local p_args=() p
        for p in ${pids//,/ }; do p_args+=(-p "$p"); done
        strace -f -c -o "$out.strace" "${p_args[@]}" 2>/dev/null &
    fi
    local tracer=$!
    PIDS+=("$tracer")
    sleep 0.5 # attached (neither tool says when); the idle half second adds a few syscalls at most
    run_wrk "$t" "$c" "$COUNT_DURATION" "$out.wrk"
    kill -INT "$tracer"
    wait "$tracer" || true
    "$PY" bench/realistic.py count "$out" --target "$t" --conns "$c" --tool "$([ "$PERF" = 1 ] && echo perf || echo strace)" \
        >>"$WORK/counts.jsonl"
    log_warnings "${SERVER_LOG[$t]}" >/dev/null
}

# The machine is shared with whatever else runs on it: how busy it was just before the measurements, with every
# server here idle, goes into the report (anything well above a few % shows up as noise, mostly in p99).
cpu_busy_pct() { # busy share of all cores over one second, from /proc/stat
    local a b
    a=$(awk '/^cpu / {print $2+$3+$4+$7+$8+$9, $5+$6}' /proc/stat); sleep 1
    b=$(awk '/^cpu / {print $2+$3+$4+$7+$8+$9, $5+$6}' /proc/stat)
    echo "$a $b" | awk '{ busy = $3 - $1; idle = $4 - $2; printf "%.0f\n", 100 * busy / (busy + idle) }'
}
BUSY_BEFORE=$(cpu_busy_pct)
waited=0
while [ "$BUSY_BEFORE" -gt 10 ] && [ "$waited" -lt "$WAIT_QUIET" ]; do
    [ "$waited" = 0 ] && log "machine ${BUSY_BEFORE}% busy: waiting up to ${WAIT_QUIET} s for it to quieten"
    BUSY_BEFORE=$(cpu_busy_pct)
    waited=$((waited + 1))
done
log "machine before the measurements: ${BUSY_BEFORE}% of all cores (everything here idle)"
[ "$BUSY_BEFORE" -gt 10 ] && log "WARNING: something else is using the CPU; expect noisy figures (see top)"

# ------------------------------------------------------------------------------------------------------------
# Closed loop: wrk at each concurrency, proxy and nginx interleaved, then one counted run each.
# ------------------------------------------------------------------------------------------------------------
: >"$WORK/closed.jsonl"
: >"$WORK/counts.jsonl"
for t in nginx proxy; do log_warnings "${SERVER_LOG[$t]}" >/dev/null; done
for c in $CONNS; do
    if [ "$WARMUP" -gt 0 ]; then
        log "c=$c: ${WARMUP} s warm-up each"
        for t in proxy nginx; do run_wrk "$t" "$c" "$WARMUP" "$WORK/warmup-$t-c$c.txt"; done
    fi
    for r in $(seq "$ROUNDS"); do
        for t in proxy nginx; do measure "$t" "$c" "$r"; done
    done
    if [ "$PERF" = 1 ]; then log "c=$c: perf stat runs (${COUNT_DURATION} s each)"
    else log "c=$c: strace -f -c runs (${COUNT_DURATION} s each; perf is not available)"; fi
    for t in proxy nginx; do count "$t" "$c"; done
    if [ "$PROFILE" = 1 ] && [ "$PERF" = 1 ] && [ "$c" = "$PROFILE_CONNS" ]; then
        log "c=$c: perf record of azure-proxy (${COUNT_DURATION} s)"
        perf record -g -o "$WORK/perf.data" -p "$PROXY_PID" 2>"$WORK/perf-record.log" &
        recorder=$!
        PIDS+=("$recorder")
        sleep 0.5
        run_wrk proxy "$c" "$COUNT_DURATION" "$WORK/profile-wrk.txt"
        kill -INT "$recorder"
        wait "$recorder" || true
        perf report -i "$WORK/perf.data" --no-children --sort dso,sym --stdio 2>/dev/null |
            grep -v '^#' | grep -E '^ +[0-9.]+%' | head -n 15 >"$WORK/profile-top.txt" || true
        log_warnings "$PROXY_LOG" >/dev/null
    fi
done

# ------------------------------------------------------------------------------------------------------------
# Open loop: oha at fixed rates with latency correction; direct (to the upstream over HTTPS), nginx, proxy.
# ------------------------------------------------------------------------------------------------------------
: >"$WORK/open.jsonl"
for rate in $RATES; do
    for t in direct nginx proxy; do
        out="$WORK/oha-$t-q$rate.json"
        ticks0=0
        [ "$t" != direct ] && ticks0=$(cpu_ticks "${SERVER_PID[$t]}")
        rm -f "$out.db"
        oha -z "${OPEN_DURATION}s" -q "$rate" -c "$OPEN_CONNS" --latency-correction --no-tui --output-format json \
            --db-url "$out.db" --cacert "$TLS/ca.pem" -m POST -H "api-key: $CLIENT_KEY" -H 'content-type: application/json' \
            -d "$REQUEST_BODY" "${URL[$t]}" >"$out" 2>"$out.err" ||
            { echo "bench: oha failed:" >&2; cat "$out.err" >&2; exit 1; }
        ticks=0
        [ "$t" != direct ] && ticks=$(($(cpu_ticks "${SERVER_PID[$t]}") - ticks0))
        "$PY" bench/realistic.py open "$out" --db "$out.db" --skip-s "$OPEN_SKIP" --target "$t" --rate "$rate" \
            --cpu-ticks "$ticks" --clk-tck "$CLK_TCK" >>"$WORK/open.jsonl"
        [ -n "${BENCH_KEEP_DB:-}" ] || rm -f "$out.db"
        tail -n 1 "$WORK/open.jsonl" | "$PY" bench/realistic.py show-open >&2
        [ "$t" != direct ] && log_warnings "${SERVER_LOG[$t]}" >/dev/null
    done
done

# ------------------------------------------------------------------------------------------------------------
# Machine, settings, report.
# ------------------------------------------------------------------------------------------------------------
"$PY" - "$WORK/meta.json" <<EOF
import json, os, platform, sys
cpu = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), "unknown")
json.dump({
    "date": "$(date -u +%Y-%m-%dT%H:%M:%SZ)",
    "nproc": os.cpu_count(), "cpu_model": cpu, "kernel": platform.release(),
    "command": "$COMMAND (BENCH_DURATION=$DURATION BENCH_ROUNDS=$ROUNDS BENCH_CONNS='$CONNS' BENCH_WARMUP=$WARMUP "
               "BENCH_COUNT_DURATION=$COUNT_DURATION BENCH_RATES='$RATES' BENCH_OPEN_DURATION=$OPEN_DURATION "
               "BENCH_OPEN_CONNS=$OPEN_CONNS BENCH_OPEN_SKIP=$OPEN_SKIP)",
    "duration_s": $DURATION, "rounds": $ROUNDS, "warmup_s": $WARMUP, "count_duration_s": $COUNT_DURATION,
    "open_duration_s": $OPEN_DURATION, "open_conns": $OPEN_CONNS, "open_skip_s": $OPEN_SKIP,
    "counter": "$([ "$PERF" = 1 ] && echo "perf stat -e raw_syscalls:sys_enter,context-switches" || echo "strace -f -c")",
    "cpu_busy_before_pct": $BUSY_BEFORE, "cpu_busy_after_pct": $(cpu_busy_pct),
    "waited_for_quiet_s": $waited, "profile": $([ "$PROFILE" = 1 ] && echo True || echo False), "profile_conns": $PROFILE_CONNS,
    "dns_server": "$DNS_IP:53", "names": "${NAMES[*]}", "nginx_start_dns_queries": $NGINX_START_QUERIES,
    "proxy_binary": "$PROXY_BIN", "proxy_settings": os.environ.get("BENCH_PROXY_SETTINGS", ""),
    "git_commit": "$(git rev-parse --short HEAD 2>/dev/null || echo unknown)",
    "git_dirty": $([ -n "$(git status --porcelain --untracked-files=no 2>/dev/null)" ] && echo True || echo False),
    "wrk": "$(wrk --version 2>&1 | head -1 | cut -c1-40)",
    "oha": "$(oha --version 2>&1 | head -1)",
    "nginx": "$("$NGINX" -v 2>&1 | head -1)",
    "perf": "$(perf --version 2>/dev/null || echo none)",
}, open(sys.argv[1], "w"), indent=2)
EOF
cleanup
log "all processes stopped; writing bench/results/realistic-latest.md and .json"
echo
"$PY" bench/realistic.py assemble "$WORK" --md "$RESULTS/realistic-latest.md" --json "$RESULTS/realistic-latest.json"
