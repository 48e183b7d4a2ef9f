# Shell helpers shared by bench/run.sh and bench/streams.sh (sourced, not run; they call the script's `log`).

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
