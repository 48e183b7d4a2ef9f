# shellcheck shell=bash
# Shell helpers shared by bench/run.sh, bench/streams.sh and bench/realistic.sh (sourced, not run; they call the
# script's `log` and add what they start to its PIDS).

wait_for() { # wait_for LOGFILE TEXT PID: at most 15 s until TEXT appears in LOGFILE
    local file="$1" text="$2" pid="$3"
    for _ in $(seq 300); do
        grep -q "$text" "$file" 2>/dev/null && return 0
        if ! kill -0 "$pid" 2>/dev/null; then
            echo "bench: process $pid exited before it was ready; its log ($file):" >&2
            cat "$file" >&2
            return 1
        fi
        sleep 0.05
    done
    echo "bench: timed out waiting for '$text' in $file" >&2
    return 1
}

ensure_tools() { # ensure_tools COMMAND:PACKAGE...: installs (apt-get) the packages whose command is missing
    local missing=() tool SUDO=""
    for tool in "$@"; do
        command -v "${tool%%:*}" >/dev/null 2>&1 || [ -x "/usr/sbin/${tool%%:*}" ] || missing+=("${tool#*:}")
    done
    if [ "${#missing[@]}" -gt 0 ]; then
        log "installing ${missing[*]} with apt-get"
        [ "$(id -u)" = 0 ] || SUDO="sudo"
        $SUDO apt-get update
        DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y --no-install-recommends "${missing[@]}"
    fi
}

start_nginx() { # start_nginx DIR PORT: nginx ($NGINX) with DIR/conf/nginx.conf, until it answers on PORT; sets
    # NGINX_PID and adds it to PIDS (the script stops everything in PIDS on exit)
    "$NGINX" -t -q -p "$1/" -c conf/nginx.conf -e logs/error.log
    "$NGINX" -p "$1/" -c conf/nginx.conf -e logs/error.log >"$1/logs/stdout.log" 2>&1 &
    NGINX_PID=$!
    PIDS+=("$NGINX_PID")
    for _ in $(seq 200); do
        curl -s -o /dev/null --max-time 1 "http://127.0.0.1:$2/" && return 0
        kill -0 "$NGINX_PID" 2>/dev/null || { cat "$1/logs/error.log" >&2; return 1; }
        sleep 0.05
    done
    echo "bench: nginx in $1 did not come up" >&2
    return 1
}

start_proxy() { # start_proxy CONFIG PORT LOG [ARG...]: $PROXY_BIN with CONFIG on 127.0.0.1:PORT (and any further
    # arguments), its stderr appended to LOG, until it logs that it listens; sets STARTED_PID and adds it to PIDS
    local config="$1" port="$2" logfile="$3"
    shift 3
    "$PROXY_BIN" --config "$config" --listen "127.0.0.1:$port" "$@" 2>>"$logfile" &
    STARTED_PID=$!
    PIDS+=("$STARTED_PID")
    wait_for "$logfile" "listening on 127.0.0.1:$port" "$STARTED_PID"
}
