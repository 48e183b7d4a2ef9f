"""Shared pieces of the stress and soak drivers (Python 3 stdlib only, loopback only).

Processes: every process started goes through `Procs`, which stops them all (TERM, then KILL) on exit, on an
exception, on SIGINT/SIGTERM/SIGHUP and when the global watchdog (SIGALRM) fires.

HTTP: a minimal HTTP/1.1 client over raw sockets (Content-Length, chunked and close-delimited bodies), with a
deadline on every read, so that no client operation can block forever.
"""

import ipaddress
import json
import os
import resource
import signal
import socket
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROXY_BIN = os.environ.get("STRESS_PROXY_BIN", os.path.join(ROOT, "target/release/azure-proxy"))
MOCK_BIN = os.environ.get("STRESS_MOCK_BIN", os.path.join(ROOT, "target/release/examples/mock_azure"))
WORK = os.path.join(ROOT, "target/stress")
RESULTS = os.path.join(ROOT, "stress/results")

CHAT_PATH = "/openai/deployments/gpt-4o/chat/completions?api-version=2024-06-01"
PLAIN_BODY = b'{"messages":[{"role":"user","content":"hi"}]}'
STREAM_BODY = b'{"stream":true,"messages":[{"role":"user","content":"hi"}]}'
GOOD_KEY = "stress-good-key"
BAD_KEY = "stress-wrong-key"
MOCK_KEY = "stress-mock-key"


def log(msg):
    print(f"\033[1m[stress {time.strftime('%H:%M:%S')}]\033[0m {msg}", file=sys.stderr, flush=True)


class Watchdog(BaseException):
    """Raised in the main thread when the whole run exceeds its time budget."""


def install_signal_handlers(budget_s):
    """SIGINT/SIGTERM/SIGHUP unwind through `finally` blocks (which stop our processes); SIGALRM after
    `budget_s` seconds aborts the run the same way."""

    def stop(signum, _frame):
        raise SystemExit(128 + signum)

    def alarm(_signum, _frame):
        raise Watchdog(f"time budget of {budget_s} s exceeded")

    for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(s, stop)
    signal.signal(signal.SIGALRM, alarm)
    signal.alarm(int(budget_s))


def raise_fd_limit(want=65536):
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = want if hard == resource.RLIM_INFINITY else min(want, hard)
    if soft < target:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def check_loopback(host):
    if not ipaddress.ip_address(host) in ipaddress.ip_network("127.0.0.0/8"):
        raise SystemExit(f"refusing a non-loopback address: {host}")


# ------------------------------------------------------------------------------------------------------------
# Ports and processes
# ------------------------------------------------------------------------------------------------------------

def free_base(start, count):
    """First port >= start with `count` free consecutive ports: bench/stream_probe.py's helper."""
    out = subprocess.run(
        [sys.executable, os.path.join(ROOT, "bench/stream_probe.py"), "free-base", str(start), str(count)],
        capture_output=True, text=True, timeout=30, check=True,
    )
    return int(out.stdout.strip())


class Procs:
    """Every process we start; `stop_all` is idempotent and is called from `finally` and atexit."""

    def __init__(self):
        self.procs = []

    def start(self, argv, log_path, env=None):
        logf = open(log_path, "wb")
        p = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=logf, stderr=subprocess.STDOUT, env=env)
        logf.close()
        self.procs.append(p)
        return p

    def stop(self, p, grace=5.0):
        if p.poll() is None:
            p.terminate()
            try:
                p.wait(timeout=grace)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(timeout=5)
        if p in self.procs:
            self.procs.remove(p)

    def stop_all(self):
        for p in list(self.procs):
            try:
                self.stop(p, grace=3.0)
            except Exception as e:  # keep stopping the others
                log(f"could not stop pid {p.pid}: {e}")


def wait_for_line(p, log_path, needle, timeout=20.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with open(log_path, "rb") as f:
                if needle.encode() in f.read():
                    return
        except FileNotFoundError:
            pass
        if p.poll() is not None:
            raise RuntimeError(f"process exited with {p.returncode} before '{needle}'; see {log_path}")
        time.sleep(0.05)
    raise RuntimeError(f"no '{needle}' within {timeout} s; see {log_path}")


def start_mocks(procs, ports, workdir, event_delay_ms=100, events=None):
    addrs = []
    for i, port in enumerate(ports):
        name = f"mock{i + 1}"
        argv = [MOCK_BIN, "--listen", f"127.0.0.1:{port}", "--key", MOCK_KEY, "--name", name,
                "--event-delay-ms", str(event_delay_ms)]
        if events:
            argv += ["--events", str(events)]
        path = os.path.join(workdir, f"{name}.log")
        p = procs.start(argv, path)
        wait_for_line(p, path, "listening on")
        addrs.append(f"127.0.0.1:{port}")
    return addrs


def proxy_config(mock_addrs, **extra):
    cfg = {
        "instances": [{"endpoint": f"http://{a}", "api_key": MOCK_KEY, "name": f"mock{i + 1}"}
                      for i, a in enumerate(mock_addrs)],
        "client_keys": [GOOD_KEY],
    }
    cfg.update(extra)
    return cfg


def start_proxy(procs, workdir, name, port, cfg, fd_limit=None, rust_log="info"):
    cfg_path = os.path.join(workdir, f"{name}.json")
    with open(cfg_path, "w") as f:
        json.dump(cfg, f, indent=1)
    argv = [PROXY_BIN, "--config", cfg_path, "--listen", f"127.0.0.1:{port}"]
    if fd_limit:
        # `ulimit -n` in bash sets soft and hard, so the proxy cannot raise it; `exec` keeps the pid.
        argv = ["bash", "-c", f'ulimit -n {int(fd_limit)} && exec "$0" "$@"'] + argv
    env = dict(os.environ, RUST_LOG=rust_log)
    log_path = os.path.join(workdir, f"{name}.log")
    p = procs.start(argv, log_path, env=env)
    wait_ready(p, f"127.0.0.1:{port}", log_path)
    return p, log_path


def wait_ready(p, addr, log_path, timeout=20.0):
    """Until GET /healthz answers 200 (the `listening on` log line is not there below RUST_LOG=info)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if p.poll() is not None:
            raise RuntimeError(f"proxy exited with {p.returncode} at start; see {log_path}")
        try:
            if one_shot(addr, request("GET", "/healthz", close=True), 2.0)[0].status == 200:
                return
        except HttpError:
            pass
        time.sleep(0.05)
    raise RuntimeError(f"proxy not ready within {timeout} s; see {log_path}")


# ------------------------------------------------------------------------------------------------------------
# /proc
# ------------------------------------------------------------------------------------------------------------

def proc_status(pid):
    out = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            name, _, rest = line.partition(":")
            if name in ("VmRSS", "VmHWM", "Threads"):
                out[name] = int(rest.split()[0])
    return out


def rss_kib(pid):
    return proc_status(pid)["VmRSS"]


def threads(pid):
    return proc_status(pid)["Threads"]


def fd_count(pid):
    return len(os.listdir(f"/proc/{pid}/fd"))


def socket_fds(pid, listen_port):
    """(client, other) TCP sockets held by the process: client = local port is the listening port (and not the
    listener itself), other = everything else (upstream connections, the listener)."""
    inodes = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            link = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if link.startswith("socket:["):
            inodes.add(link[8:-1])
    client = other = 0
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(table) as f:
                next(f)
                for line in f:
                    cols = line.split()
                    if cols[9] not in inodes:
                        continue
                    port = int(cols[1].rsplit(":", 1)[1], 16)
                    if port == listen_port and cols[3] != "0A":
                        client += 1
                    else:
                        other += 1
        except FileNotFoundError:
            pass
    return client, other


def mib(kib):
    return f"{kib / 1024:.1f} MiB"


# ------------------------------------------------------------------------------------------------------------
# HTTP client
# ------------------------------------------------------------------------------------------------------------

class HttpError(Exception):
    """kind: timeout | eof (closed before a complete answer) | reset | proto | connect"""

    def __init__(self, kind, detail=""):
        super().__init__(f"{kind}: {detail}" if detail else kind)
        self.kind = kind


def request(method, target, headers=(), body=b"", close=False, host="127.0.0.1"):
    lines = [f"{method} {target} HTTP/1.1", f"Host: {host}"]
    lines += [f"{k}: {v}" for k, v in headers]
    if body and not any(k.lower() in ("content-length", "transfer-encoding") for k, _ in headers):
        lines.append(f"Content-Length: {len(body)}")
    if close:
        lines.append("Connection: close")
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


def chat(key=GOOD_KEY, stream=False, close=False, xff=None, extra=()):
    headers = [("Content-Type", "application/json")]
    if key is not None:
        headers.append(("api-key", key))
    if stream:
        headers.append(("Accept", "text/event-stream"))
    if xff:
        headers.append(("X-Forwarded-For", xff))
    headers += list(extra)
    return request("POST", CHAT_PATH, headers, STREAM_BODY if stream else PLAIN_BODY, close=close)


def bad_key_get(xff=None, close=False, key=BAD_KEY):
    """A body-less request with a wrong key: 401 and the connection stays usable (no unread body)."""
    headers = [("api-key", key)]
    if xff:
        headers.append(("X-Forwarded-For", xff))
    return request("GET", "/openai/deployments/gpt-4o/models?api-version=2024-06-01", headers, close=close)


class Response:
    def __init__(self, status, headers, body, close):
        self.status, self.headers, self.body, self.close = status, headers, body, close


class Reader:
    def __init__(self, sock, deadline):
        self.sock, self.deadline, self.buf = sock, deadline, bytearray()

    def fill(self):
        left = self.deadline - time.monotonic()
        if left <= 0:
            raise HttpError("timeout")
        self.sock.settimeout(left)
        try:
            data = self.sock.recv(65536)
        except socket.timeout:
            raise HttpError("timeout") from None
        except ConnectionResetError:
            raise HttpError("reset") from None
        except OSError as e:
            raise HttpError("reset", str(e)) from None
        if not data:
            raise HttpError("eof")
        self.buf += data

    def until(self, sep, limit=1 << 20):
        while True:
            i = self.buf.find(sep)
            if i >= 0:
                out = bytes(self.buf[:i])
                del self.buf[: i + len(sep)]
                return out
            if len(self.buf) > limit:
                raise HttpError("proto", "line too long")
            self.fill()

    def exact(self, n):
        while len(self.buf) < n:
            self.fill()
        out = bytes(self.buf[:n])
        del self.buf[:n]
        return out

    def to_eof(self):
        while True:
            try:
                self.fill()
            except HttpError as e:
                if e.kind == "eof":
                    out = bytes(self.buf)
                    self.buf.clear()
                    return out
                raise


def read_response(sock, deadline, head_only=False):
    r = Reader(sock, deadline)
    while True:
        head = r.until(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        parts = lines[0].split(" ", 2)
        if len(parts) < 2 or not parts[0].startswith("HTTP/1.") or not parts[1].isdigit():
            raise HttpError("proto", f"bad status line {lines[0][:80]!r}")
        status = int(parts[1])
        headers = {}
        for line in lines[1:]:
            k, _, v = line.partition(":")
            headers[k.strip().lower()] = v.strip()
        if status != 100:
            break
    close = "close" in headers.get("connection", "").lower() or parts[0] == "HTTP/1.0"
    if head_only:
        return Response(status, headers, b"", close)
    if "chunked" in headers.get("transfer-encoding", "").lower():
        body = bytearray()
        while True:
            size = int(r.until(b"\r\n").split(b";")[0].strip() or b"x", 16)
            if size == 0:
                while r.until(b"\r\n"):  # trailers
                    pass
                break
            body += r.exact(size)
            if r.exact(2) != b"\r\n":
                raise HttpError("proto", "bad chunk end")
        body = bytes(body)
    elif "content-length" in headers:
        body = r.exact(int(headers["content-length"]))
    else:
        body = r.to_eof()
        close = True
    if r.buf:
        raise HttpError("proto", f"{len(r.buf)} unexpected bytes after the response")
    return Response(status, headers, body, close)


def connect(addr, timeout=5.0, src=None):
    host, port = addr.rsplit(":", 1)
    check_loopback(host)
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        if src:
            check_loopback(src)
            s.bind((src, 0))
        s.settimeout(timeout)
        s.connect((host, int(port)))
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    except ConnectionRefusedError:
        s.close()
        raise HttpError("connect", "refused") from None
    except socket.timeout:
        s.close()
        raise HttpError("connect", "timeout") from None
    except OSError as e:
        s.close()
        raise HttpError("connect", str(e)) from None
    return s


def send(sock, data, deadline):
    sock.settimeout(max(0.001, deadline - time.monotonic()))
    try:
        sock.sendall(data)
    except socket.timeout:
        raise HttpError("timeout", "send") from None
    except OSError as e:
        raise HttpError("reset", f"send: {e}") from None


def one_shot(addr, data, timeout=5.0, src=None):
    """Fresh connection, one request, the whole response, close. Returns (Response, seconds)."""
    t0 = time.monotonic()
    deadline = t0 + timeout
    s = connect(addr, timeout, src)
    try:
        send(s, data, deadline)
        resp = read_response(s, deadline)
        return resp, time.monotonic() - t0
    finally:
        s.close()


def md_table(rows):
    out = ["| case | what happens | figure | result |", "|---|---|---|---|"]
    for r in rows:
        cells = [str(r[k]).replace("|", "\\|").replace("\n", " ") for k in ("case", "what", "figure")]
        cells.append("pass" if r["ok"] else "**FAIL**")
        out.append("| " + " | ".join(cells) + " |")
    return "\n".join(out)
