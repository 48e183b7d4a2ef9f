#!/usr/bin/env bash
# A guided tour of azure-proxy: two mock Azure OpenAI instances, the proxy in front of them, and a few curl
# requests. Everything runs on 127.0.0.1 and is stopped when the script exits.
#
#   bash scripts/demo.sh            # proxy on 127.0.0.1:8000
#   DEMO_PORT=9000 bash scripts/demo.sh                 # another port for the proxy
#   DEMO_MOCK_PORTS="19001 19002" bash scripts/demo.sh  # other ports for the two mock instances
#   DEMO_NO_WAIT=1 bash scripts/demo.sh                 # on a terminal, do not wait for Enter before stopping
set -euo pipefail

cd "$(dirname "$0")/.."

PORT="${DEMO_PORT:-8000}"
PROXY="http://127.0.0.1:${PORT}"
read -r EAST_PORT WEST_PORT <<<"${DEMO_MOCK_PORTS:-18001 18002}"
CHAT_PATH="/openai/deployments/gpt-4o/chat/completions?api-version=2024-06-01"
DEMO_DIR="target/demo"
CONFIG="${DEMO_DIR}/azure_instances.json"
PIDS=()

step() { printf '\n\033[1m==> %s\033[0m\n' "$*"; }
note() { printf '    %s\n' "$@"; }

cleanup() {
    for pid in "${PIDS[@]}"; do
        kill "$pid" 2>/dev/null || true
    done
    wait 2>/dev/null || true
}
trap cleanup EXIT

# wait_for LOGFILE TEXT PID: waits (at most 15 s) until TEXT appears in LOGFILE.
wait_for() {
    local log="$1" text="$2" pid="$3"
    for _ in $(seq 150); do
        grep -q "$text" "$log" 2>/dev/null && return 0
        if ! kill -0 "$pid" 2>/dev/null; then
            echo "error: process exited before it was ready; its log ($log):" >&2
            cat "$log" >&2
            if grep -q "in use" "$log"; then
                echo "hint: a port is busy; set DEMO_PORT / DEMO_MOCK_PORTS to use others" >&2
            fi
            return 1
        fi
        sleep 0.1
    done
    echo "error: timed out waiting for '$text' in $log" >&2
    return 1
}

step "Building the proxy and the mock instance (release)"
cargo build --release --bin azure-proxy --example mock_azure
mkdir -p "$DEMO_DIR"

step "Starting two mock Azure OpenAI instances"
note "eastus on 127.0.0.1:${EAST_PORT} (key east-secret), westus on 127.0.0.1:${WEST_PORT} (key west-secret)." \
    "Each answers 'Hello from <name>' and streams with 150 ms between events."
for spec in "eastus:${EAST_PORT}:east-secret" "westus:${WEST_PORT}:west-secret"; do
    IFS=: read -r name port key <<<"$spec"
    target/release/examples/mock_azure --listen "127.0.0.1:${port}" --key "$key" --name "$name" \
        --event-delay-ms 150 >"${DEMO_DIR}/mock-${name}.log" 2>&1 &
    PIDS+=($!)
    wait_for "${DEMO_DIR}/mock-${name}.log" "listening on" "$!"
done

step "Writing ${CONFIG}"
cat >"$CONFIG" <<EOF
{
  "instances": [
    {"endpoint": "http://127.0.0.1:${EAST_PORT}", "api_key": "east-secret", "name": "eastus"},
    {"endpoint": "http://127.0.0.1:${WEST_PORT}", "api_key": "west-secret", "name": "westus"}
  ],
  "client_keys": [{"name": "demo", "key": "demo-key"}]
}
EOF
cat "$CONFIG"
note "Clients use the key 'demo-key' (named 'demo' in the access log and metrics); the proxy swaps in each" \
    "instance's own key."

step "Starting azure-proxy on ${PROXY}"
target/release/azure-proxy --config "$CONFIG" --listen "127.0.0.1:${PORT}" 2>"${DEMO_DIR}/proxy.log" &
PIDS+=($!)
wait_for "${DEMO_DIR}/proxy.log" "listening on 127.0.0.1:${PORT}" "$!"
note "Ready. Its log is in ${DEMO_DIR}/proxy.log."

# run CMD: prints the command exactly as it is run (so that it can be pasted into another terminal while the
# demo is up), then runs it.
run() {
    printf '    $ %s\n' "$1"
    eval "$1"
}
BODY='{"messages": [{"role": "user", "content": "Say hello"}]}'
CURL="curl -sS '${PROXY}${CHAT_PATH}' -H 'api-key: demo-key' -H 'content-type: application/json'"

step "1. A plain chat completion"
run "${CURL} -d '${BODY}'"
echo
note "Run it again and the other instance answers: requests go round robin."
run "${CURL} -d '${BODY}'"
echo

step "2. A streamed chat completion (\"stream\": true)"
note "curl -N (no buffering): the events appear one by one, as the instance sends them."
run "curl -sSN '${PROXY}${CHAT_PATH}' -H 'api-key: demo-key' -H 'content-type: application/json' -d '{\"stream\": true, \"messages\": [{\"role\": \"user\", \"content\": \"Say hello\"}]}'"

step "3. The v1 API, as the plain OpenAI clients call it"
note "The key goes as Authorization: Bearer, the deployment as the model field."
run "curl -sS '${PROXY}/openai/v1/chat/completions' -H 'Authorization: Bearer demo-key' -H 'content-type: application/json' -d '{\"model\": \"gpt-4o\", \"messages\": [{\"role\": \"user\", \"content\": \"Say hello\"}]}'"
echo

step "4. A wrong client key"
note "The proxy rejects it itself with 401; no instance is contacted."
run "curl -sS '${PROXY}${CHAT_PATH}' -H 'api-key: wrong-key' -H 'content-type: application/json' -d '${BODY}' -w '\\nHTTP status: %{http_code}\\n'"

step "What the proxy logged (one access line per request)"
cat "${DEMO_DIR}/proxy.log"

if [ -t 0 ] && [ -z "${DEMO_NO_WAIT:-}" ]; then
    step "The proxy and the mock instances stay up"
    note "Paste any command above (the lines starting with \$) into another terminal." \
        "Press Enter here to stop them."
    read -r _
fi

step "Done: stopping the proxy and the mock instances"
