#!/usr/bin/env bash
# make static-check: prove that the static binary runs with nothing around it, as in the `scratch` image.
#
# 1. Builds target/x86_64-unknown-linux-musl/release/azure-proxy (make static) and the mock Azure instance
#    (cargo: only if missing or out of date).
# 2. Checks that the binary is static (file, ldd).
# 3. Starts the mock instance on 127.0.0.1 (outside the test root).
# 4. Makes an empty directory holding only the binary, a config (pointing at the mock) and a CA bundle, and runs
#    the binary from it with an empty environment (env -i; only the instance key, read through api_key_env):
#    as root, chroot'ed into that directory as uid 10001 (the image's user); otherwise cd'ed into it.
#    The root has no /dev, /proc, /etc/hosts or /etc/resolv.conf: the config uses 127.0.0.1, so no DNS.
# 5. GET /healthz and one chat completion through the proxy: both must answer 200.
# 6. SIGTERM: the proxy must exit 0. Everything is stopped and removed on exit (trap).
set -euo pipefail
cd "$(dirname "$0")/.."

MUSL_BIN=target/x86_64-unknown-linux-musl/release/azure-proxy
MOCK_BIN=target/release/examples/mock_azure
CA_FILE=/etc/ssl/certs/ca-certificates.crt
INSTANCE_KEY=static-check-instance-key
CLIENT_KEY=static-check-client-key

ROOT=""
PIDS=()
cleanup() {
    for pid in "${PIDS[@]}"; do
        kill "$pid" 2>/dev/null || true
    done
    wait 2>/dev/null || true
    [ -n "$ROOT" ] && rm -rf "$ROOT"
}
trap cleanup EXIT

fail() { echo "static-check: FAIL: $*" >&2; exit 1; }
ok() { echo "static-check: ok: $*"; }

# alive PID: running (an exited child that is not yet reaped is a zombie, which kill -0 still finds).
alive() {
    local stat
    stat=$(ps -o stat= -p "$1" 2>/dev/null) && [ "${stat:0:1}" != Z ]
}

# wait_for FILE REGEX PID: until REGEX appears in FILE (at most 10 s), or fail if PID is gone.
wait_for() {
    for _ in $(seq 100); do
        grep -Eq "$2" "$1" 2>/dev/null && return 0
        alive "$3" || { cat "$1" >&2; fail "process exited before printing /$2/"; }
        sleep 0.1
    done
    cat "$1" >&2
    fail "timed out waiting for /$2/ in $1"
}

# Always through cargo: it builds what is missing or older than the sources, and is a no-op otherwise (a stale
# binary would check yesterday's code).
make --no-print-directory static
cargo build --release --example mock_azure
[ -r "$CA_FILE" ] || fail "$CA_FILE not found (apt-get install ca-certificates)"

# --- static? ---------------------------------------------------------------------------------------------------
file_out=$(file -b "$MUSL_BIN")
echo "file: $file_out"
case "$file_out" in
    *"statically linked"* | *"static-pie linked"*) ok "file says static" ;;
    *) fail "file does not say static" ;;
esac
# glibc's ldd says "not a dynamic executable" for static binaries and "statically linked" for static-pie ones.
ldd_out=$(ldd "$MUSL_BIN" 2>&1 || true)
echo "ldd: $(echo "$ldd_out" | tr -s '\t\n' '  ')"
case "$ldd_out" in
    *"not a dynamic executable"* | *"statically linked"*) ok "ldd finds no shared library" ;;
    *) fail "ldd lists shared libraries" ;;
esac

ROOT=$(mktemp -d /tmp/azure-proxy-static-check.XXXXXX)
LOGS=$ROOT.logs # outside the root, so that the root holds only the three files
mkdir -p "$LOGS"
trap 'cleanup; rm -rf "$LOGS"' EXIT

# --- the mock instance, outside the root ----------------------------------------------------------------------
"$MOCK_BIN" --listen 127.0.0.1:0 --key "$INSTANCE_KEY" --name static-mock --event-delay-ms 0 >"$LOGS/mock.log" 2>&1 &
PIDS+=($!)
wait_for "$LOGS/mock.log" 'listening on http://127\.0\.0\.1:[0-9]+' "$!"
MOCK_URL=$(grep -Eo 'http://127\.0\.0\.1:[0-9]+' "$LOGS/mock.log" | head -1)
ok "mock instance on $MOCK_URL"

# --- the root: binary, config, CA bundle, nothing else --------------------------------------------------------
install -m 0755 "$MUSL_BIN" "$ROOT/azure-proxy"
install -D -m 0644 "$CA_FILE" "$ROOT/etc/ssl/certs/ca-certificates.crt"
cat >"$ROOT/azure_instances.json" <<JSON
{
  "instances": [{"endpoint": "$MOCK_URL", "api_key_env": "STATIC_CHECK_INSTANCE_KEY", "name": "static-mock"}],
  "client_keys": ["$CLIENT_KEY"]
}
JSON
chmod 0644 "$ROOT/azure_instances.json"
chmod 0755 "$ROOT" # mktemp makes it 0700; uid 10001 must be able to enter it
echo "root $ROOT:"
(cd "$ROOT" && find . -mindepth 1 | sort | sed 's/^/    /')

# The only variable the proxy gets: the instance key, read through api_key_env.
RUN_ENV=(env -i "STATIC_CHECK_INSTANCE_KEY=$INSTANCE_KEY")
ARGS=(--config ./azure_instances.json --listen 127.0.0.1:0) # port 0: the proxy logs the port it got
CHROOT=$(command -v chroot || true)
if [ "$(id -u)" = 0 ] && [ -n "$CHROOT" ] \
    && "${RUN_ENV[@]}" "$CHROOT" --userspec=10001:10001 "$ROOT" /azure-proxy --version >/dev/null 2>&1; then
    MODE="chroot $ROOT as uid 10001"
    # chroot changes the working directory to the new root, so ./azure_instances.json is /azure_instances.json.
    "${RUN_ENV[@]}" "$CHROOT" --userspec=10001:10001 "$ROOT" /azure-proxy "${ARGS[@]}" 2>"$LOGS/proxy.log" &
else
    MODE="cd $ROOT (no chroot: not root, or chroot failed)"
    (cd "$ROOT" && exec "${RUN_ENV[@]}" ./azure-proxy "${ARGS[@]}") 2>"$LOGS/proxy.log" &
fi
PROXY_PID=$!
PIDS+=($PROXY_PID)
echo "running: env -i STATIC_CHECK_INSTANCE_KEY=... /azure-proxy ${ARGS[*]}  [$MODE]"
wait_for "$LOGS/proxy.log" 'listening on 127\.0\.0\.1:[0-9]+' "$PROXY_PID"
PROXY_URL=http://$(grep -Eo 'listening on 127\.0\.0\.1:[0-9]+' "$LOGS/proxy.log" | head -1 | cut -d' ' -f3)
ok "proxy listening on $PROXY_URL"

# --- requests ---------------------------------------------------------------------------------------------------
status=$(curl -sS -o /dev/null -w '%{http_code}' --max-time 10 "$PROXY_URL/healthz")
[ "$status" = 200 ] || fail "GET /healthz answered $status"
ok "GET /healthz -> 200"

body=$(curl -sS --max-time 10 -w '\n%{http_code}' \
    "$PROXY_URL/openai/deployments/gpt-4o/chat/completions?api-version=2024-06-01" \
    -H "api-key: $CLIENT_KEY" -H 'content-type: application/json' \
    -d '{"messages": [{"role": "user", "content": "Say hello"}]}')
status=${body##*$'\n'}
body=${body%$'\n'*}
echo "response: $body"
[ "$status" = 200 ] || { cat "$LOGS/proxy.log" >&2; fail "chat completion answered $status"; }
case "$body" in *"Hello from static-mock"*) ;; *) fail "unexpected body" ;; esac
ok "POST chat/completions -> 200 from the mock, through the proxy"

# --- stop -------------------------------------------------------------------------------------------------------
kill -TERM "$PROXY_PID"
for _ in $(seq 350); do # drain_seconds (30) + margin, as TimeoutStopSec in the systemd unit
    alive "$PROXY_PID" || break
    sleep 0.1
done
alive "$PROXY_PID" && fail "proxy still running 35 s after SIGTERM"
rc=0
wait "$PROXY_PID" || rc=$?
echo "proxy log:"
sed 's/^/    /' "$LOGS/proxy.log"
[ "$rc" = 0 ] || fail "proxy exited with $rc after SIGTERM"
ok "SIGTERM -> exit 0"

echo "static-check: PASS: $MUSL_BIN ($(stat -c %s "$MUSL_BIN") bytes) runs alone in $MODE"
