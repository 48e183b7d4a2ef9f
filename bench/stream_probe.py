#!/usr/bin/env python3
"""Measurements for bench/run.sh that wrk cannot make (Python 3 stdlib only, loopback only).

  stream_probe.py free-base START COUNT           first port >= START with COUNT free ports (steps of COUNT)
  stream_probe.py stream ...                      time to first / last SSE event, direct vs through the proxy
  stream_probe.py streams ...                     proxy RSS with N slow streams open at once
  stream_probe.py startup ...                     process start -> first served GET /healthz, in ms
  stream_probe.py rss PID                         VmRSS / VmHWM of a process, KiB

Every subcommand prints one JSON object on stdout. Every loop is bounded (counts and deadlines).
"""

import argparse
import json
import os
import selectors
import signal
import socket
import statistics
import subprocess
import sys
import time

CHAT_PATH = "/openai/deployments/gpt-4o/chat/completions?api-version=2024-06-01"
STREAM_BODY = b'{"stream":true,"messages":[{"role":"user","content":"hi"}]}'


def die(msg):
    print(f"stream_probe: {msg}", file=sys.stderr)
    sys.exit(1)


def split_addr(addr):
    host, port = addr.rsplit(":", 1)
    if host not in ("127.0.0.1", "localhost"):
        die(f"refusing a non-loopback address: {addr}")
    return host, int(port)


def stream_request(addr, key):
    host, port = split_addr(addr)
    return (
        f"POST {CHAT_PATH} HTTP/1.1\r\nHost: {host}:{port}\r\napi-key: {key}\r\n"
        f"Content-Type: application/json\r\nAccept: text/event-stream\r\n"
        f"Content-Length: {len(STREAM_BODY)}\r\nConnection: close\r\n\r\n"
    ).encode() + STREAM_BODY


def proc_status(pid):
    """{'VmRSS': KiB, 'VmHWM': KiB} from /proc/PID/status."""
    out = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            name, _, rest = line.partition(":")
            if name in ("VmRSS", "VmHWM"):
                out[name] = int(rest.split()[0])
    return out


# --------------------------------------------------------------------------------------------------------
# One streamed request, timed.
# --------------------------------------------------------------------------------------------------------

class ChunkedEvents:
    """Incremental HTTP/1.1 response reader: head, then chunked (or close-delimited) body split into SSE
    events. feed() returns the number of complete `data:` events the new bytes finished."""

    def __init__(self):
        self.buf = bytearray()
        self.status = None
        self.chunked = False
        self.body = bytearray()  # de-chunked bytes not yet split into events
        self.chunk_left = None  # bytes left in the current chunk (+2 for its CRLF), None = expecting a size line
        self.done = False
        self.events = 0

    def feed(self, data):
        self.buf += data
        if self.status is None:
            end = self.buf.find(b"\r\n\r\n")
            if end < 0:
                return 0
            head = bytes(self.buf[:end]).decode("latin-1").split("\r\n")
            del self.buf[: end + 4]
            self.status = int(head[0].split(" ")[1])
            for line in head[1:]:
                name, _, value = line.partition(":")
                if name.strip().lower() == "transfer-encoding" and "chunked" in value.lower():
                    self.chunked = True
        if self.chunked:
            self._dechunk()
        else:
            self.body += self.buf
            self.buf.clear()
        return self._split_events()

    def _dechunk(self):
        while not self.done:
            if self.chunk_left is None:
                eol = self.buf.find(b"\r\n")
                if eol < 0:
                    return
                size = int(bytes(self.buf[:eol]).split(b";")[0].strip() or b"0", 16)
                del self.buf[: eol + 2]
                if size == 0:
                    self.done = True
                    return
                self.chunk_left = size + 2
            take = min(self.chunk_left, len(self.buf))
            if take == 0:
                return
            piece = bytes(self.buf[:take])
            del self.buf[:take]
            self.chunk_left -= take
            # Drop the CRLF that ends the chunk (it may arrive split over two reads).
            data_part = piece[: max(0, len(piece) - max(0, 2 - self.chunk_left))]
            self.body += data_part
            if self.chunk_left == 0:
                self.chunk_left = None

    def _split_events(self):
        n = 0
        while True:
            end = self.body.find(b"\n\n")
            if end < 0:
                return n
            event = bytes(self.body[:end])
            del self.body[: end + 2]
            if any(line.startswith(b"data:") for line in event.split(b"\n")):
                self.events += 1
                n += 1


def timed_stream(addr, key, timeout):
    """(ms to first data event, ms to last data event, events, status). The clock starts before connect."""
    host, port = split_addr(addr)
    req = stream_request(addr, key)
    t0 = time.perf_counter()
    deadline = t0 + timeout
    first = last = None
    parser = ChunkedEvents()
    with socket.create_connection((host, port), timeout=timeout) as s:
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        s.sendall(req)
        while not parser.done and time.perf_counter() < deadline:
            s.settimeout(max(0.01, deadline - time.perf_counter()))
            data = s.recv(65536)
            now = time.perf_counter()
            if not data:
                break
            if parser.feed(data):
                if first is None:
                    first = now
                last = now
    if first is None:
        return None, None, parser.events, parser.status
    return (first - t0) * 1e3, (last - t0) * 1e3, parser.events, parser.status


def cmd_stream(a):
    targets = [("direct", a.direct, a.direct_key), ("proxy", a.proxy, a.proxy_key)]
    # One untimed request each first: the proxy's pool then holds a connection to the mock, as in service.
    for _, addr, key in targets:
        timed_stream(addr, key, a.timeout)
    samples = {name: {"first_ms": [], "last_ms": [], "bad": []} for name, _, _ in targets}
    for rep in range(a.reps):
        for name, addr, key in targets:  # interleaved: direct, proxy, direct, proxy, ...
            first, last, events, status = timed_stream(addr, key, a.timeout)
            if status != 200 or first is None or events != a.events:
                samples[name]["bad"].append({"rep": rep, "status": status, "events": events})
                continue
            samples[name]["first_ms"].append(first)
            samples[name]["last_ms"].append(last)
    out = {"reps": a.reps, "events_expected": a.events}
    for name, s in samples.items():
        out[name] = {
            "first_event_ms_median": statistics.median(s["first_ms"]) if s["first_ms"] else None,
            "last_event_ms_median": statistics.median(s["last_ms"]) if s["last_ms"] else None,
            "first_event_ms": [round(x, 3) for x in s["first_ms"]],
            "last_event_ms": [round(x, 3) for x in s["last_ms"]],
            "failed": s["bad"],
        }
    d, p = out["direct"], out["proxy"]
    for k in ("first_event_ms_median", "last_event_ms_median"):
        added = None
        if d[k] is not None and p[k] is not None:
            added = p[k] - d[k]
        out["added_" + k.replace("_median", "")] = added
    print(json.dumps(out))


# --------------------------------------------------------------------------------------------------------
# N slow streams open at once.
# --------------------------------------------------------------------------------------------------------

def cmd_streams(a):
    host, port = split_addr(a.proxy)
    req = stream_request(a.proxy, a.key)
    before = proc_status(a.pid)
    socks = []
    sel = selectors.DefaultSelector()
    got_first = 0
    failed = 0
    t0 = time.perf_counter()
    try:
        for i in range(a.n):
            s = socket.create_connection((host, port), timeout=5)
            s.sendall(req)
            s.setblocking(False)
            socks.append(s)
            sel.register(s, selectors.EVENT_READ, data={"i": i, "buf": bytearray(), "seen": False})
        deadline = time.perf_counter() + a.timeout
        pending = a.n
        while pending and time.perf_counter() < deadline:
            for key, _ in sel.select(timeout=0.5):
                st = key.data
                try:
                    data = key.fileobj.recv(65536)
                except BlockingIOError:
                    continue
                except OSError:
                    data = b""
                if not data:
                    failed += 1
                    pending -= 1
                    sel.unregister(key.fileobj)
                    continue
                if len(st["buf"]) < 65536:
                    st["buf"] += data
                if b"data:" in st["buf"] and st["buf"].startswith(b"HTTP/1.1 200"):
                    got_first += 1
                    pending -= 1
                    # Leave the rest unread: the stream stays open, the proxy keeps relaying into our buffer.
                    sel.unregister(key.fileobj)
        all_first_s = time.perf_counter() - t0
        during = proc_status(a.pid)
    finally:
        for s in socks:
            s.close()
        sel.close()
    print(json.dumps({
        "streams": a.n,
        "with_first_event": got_first,
        "failed": failed,
        "seconds_until_all_first_events": round(all_first_s, 3),
        "rss_before_kib": before.get("VmRSS"),
        "rss_kib": during.get("VmRSS"),
        "hwm_kib": during.get("VmHWM"),
    }))


# --------------------------------------------------------------------------------------------------------
# Process start -> first served request.
# --------------------------------------------------------------------------------------------------------

def healthz_ok(host, port):
    """True if GET /healthz answered 200; False if the port is not open yet (or not answering yet)."""
    try:
        with socket.create_connection((host, port), timeout=1) as s:
            s.sendall(f"GET /healthz HTTP/1.1\r\nHost: {host}:{port}\r\nConnection: close\r\n\r\n".encode())
            data = b""
            while b"\r\n" not in data and len(data) < 4096:
                chunk = s.recv(4096)
                if not chunk:
                    break
                data += chunk
            return data.startswith(b"HTTP/1.1 200") or data.startswith(b"HTTP/1.0 200")
    except (ConnectionRefusedError, ConnectionResetError, socket.timeout):
        return False


def cmd_startup(a):
    results, errors = [], []
    for rep in range(a.reps):
        port = a.port + rep  # a fresh port each time: no TIME_WAIT surprises from the previous run
        addr = f"127.0.0.1:{port}"
        with open(a.log, "ab") as log:
            t0 = time.perf_counter()
            proc = subprocess.Popen([a.binary, "--config", a.config, "--listen", addr], stdout=subprocess.DEVNULL,
                                    stderr=log)
        try:
            deadline = t0 + a.timeout
            ok = False
            while time.perf_counter() < deadline:
                if healthz_ok("127.0.0.1", port):
                    ok = True
                    break
                if proc.poll() is not None:
                    break
                time.sleep(0.0002)
            if ok:
                results.append((time.perf_counter() - t0) * 1e3)
            else:
                errors.append({"rep": rep, "exit_code": proc.poll()})
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=3)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=3)
    print(json.dumps({
        "reps": a.reps,
        "ms": [round(x, 3) for x in results],
        "ms_median": statistics.median(results) if results else None,
        "failed": errors,
    }))


# --------------------------------------------------------------------------------------------------------

def cmd_free_base(a):
    for attempt in range(a.tries):
        base = a.start + attempt * a.count
        free = True
        for port in range(base, base + a.count):
            with socket.socket() as s:
                try:
                    s.bind(("127.0.0.1", port))
                except OSError:
                    free = False
                    break
        if free:
            print(base)
            return
    die(f"no {a.count} free consecutive ports found from {a.start} ({a.tries} tries)")


def main():
    # SIGTERM from run.sh's cleanup: unwind through the finally blocks (stops any proxy we started).
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)

    f = sub.add_parser("free-base")
    f.add_argument("start", type=int)
    f.add_argument("count", type=int)
    f.add_argument("--tries", type=int, default=20)

    s = sub.add_parser("stream")
    s.add_argument("--direct", required=True)
    s.add_argument("--direct-key", required=True)
    s.add_argument("--proxy", required=True)
    s.add_argument("--proxy-key", required=True)
    s.add_argument("--reps", type=int, default=10)
    s.add_argument("--events", type=int, default=20)
    s.add_argument("--timeout", type=float, default=30)

    m = sub.add_parser("streams")
    m.add_argument("--proxy", required=True)
    m.add_argument("--key", required=True)
    m.add_argument("--pid", type=int, required=True)
    m.add_argument("--n", type=int, default=256)
    m.add_argument("--timeout", type=float, default=60)

    u = sub.add_parser("startup")
    u.add_argument("--binary", required=True)
    u.add_argument("--config", required=True)
    u.add_argument("--port", type=int, required=True, help="first port; rep i uses port+i")
    u.add_argument("--reps", type=int, default=5)
    u.add_argument("--timeout", type=float, default=5)
    u.add_argument("--log", default=os.devnull)

    r = sub.add_parser("rss")
    r.add_argument("pid", type=int)

    a = p.parse_args()
    if a.cmd == "free-base":
        cmd_free_base(a)
    elif a.cmd == "stream":
        cmd_stream(a)
    elif a.cmd == "streams":
        cmd_streams(a)
    elif a.cmd == "startup":
        cmd_startup(a)
    elif a.cmd == "rss":
        st = proc_status(a.pid)
        print(json.dumps({"rss_kib": st.get("VmRSS"), "hwm_kib": st.get("VmHWM")}))


if __name__ == "__main__":
    main()
