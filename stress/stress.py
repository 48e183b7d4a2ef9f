#!/usr/bin/env python3
"""`make stress`: hostile-client cases against the release proxy in front of mock Azure instances.

  1 slowloris   2,000 slow-head + 2,000 idle keep-alive connections; 20 real requests meanwhile; timeouts; RSS
  2 heads       endless head, 10,000 headers, 100 KiB request line, huge Content-Length, huge chunk size; RSS
  3 fds         proxy under `ulimit -n 256`, 400 connections: 503 / refused / hung; serves again afterwards
  4 ips         100,000 client IPs with bad keys (X-Forwarded-For, then real 127.x.y.z source addresses)

Python 3 stdlib only; 127.0.0.0/8 only. Every loop is bounded in count and time, a watchdog bounds the run,
and every process started is stopped at the end, also on failure or Ctrl-C. Prints a Markdown table and
writes stress/results/latest.{md,json}. Exit status 1 when any check fails. See stress/README.md.
"""

import argparse
import collections
import errno
import json
import os
import platform
import selectors
import socket
import statistics
import subprocess
import sys
import threading
import time

sys.dont_write_bytecode = True  # no __pycache__ in the tree
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import (  # noqa: E402
    CHAT_PATH, GOOD_KEY, RESULTS, WORK, HttpError, Procs, bad_key_get, chat, connect, fd_count, free_base,
    install_signal_handlers, log, md_table, mib, one_shot, proc_status, proxy_config, raise_fd_limit,
    read_response, request, rss_kib, send, socket_fds, start_mocks, start_proxy, threads,
)


def env_int(name, default):
    v = os.environ.get(name, "")
    return int(v) if v.strip() else default


N_SLOW = env_int("STRESS_SLOW", 2000)
N_IDLE = env_int("STRESS_IDLE", 2000)
HEAD_MS = env_int("STRESS_HEAD_TIMEOUT_MS", 10000)
IDLE_MS = env_int("STRESS_IDLE_TIMEOUT_MS", 15000)
HEAD_REPS = env_int("STRESS_HEAD_REPS", 200)
FD_LIMIT = env_int("STRESS_FD_LIMIT", 256)
FD_CONNS = env_int("STRESS_FD_CONNS", 400)
N_IPS = env_int("STRESS_IPS", 100000)
IP_BUDGET_S = env_int("STRESS_IP_BUDGET_S", 100)
PORT_START = env_int("STRESS_PORT_BASE", 24100)


class Case:
    """Collects the table rows of one case and owns its proxy."""

    def __init__(self, run, name):
        self.run, self.name = run, name

    def row(self, what, figure, ok, **data):
        self.run.rows.append({"case": self.name, "what": what, "figure": figure, "ok": bool(ok), "data": data})
        log(f"{'ok  ' if ok else 'FAIL'} {self.name}: {what}: {figure}")


class Run:
    def __init__(self):
        self.rows = []
        self.procs = Procs()
        base = free_base(PORT_START, 8)
        self.ports = iter(range(base, base + 8))
        self.mocks = []

    def port(self):
        return next(self.ports)


def proxy_alive_row(case, p, log_path, addr):
    alive = p.poll() is None
    health = None
    if alive:
        try:
            health = one_shot(addr, request("GET", "/healthz", close=True), 3.0)[0].status
        except HttpError as e:
            health = e.kind
    with open(log_path, "rb") as f:
        text = f.read()
    panics = text.count(b"panicked")
    ok = alive and health == 200 and panics == 0
    case.row("proxy still running at the end", f"alive={alive}, /healthz={health}, panics in log={panics}", ok)
    return ok


def good_request_row(case, addr, what, src=None, xff=None, tries=3):
    """A real completion through to a mock; a few tries 0.2 s apart (the front may pause accepts 100 ms)."""
    last = None
    for _ in range(tries):
        try:
            r, dt = one_shot(addr, chat(close=True, xff=xff), 5.0, src=src)
            last = f"{r.status} in {dt * 1000:.0f} ms"
            if r.status == 200 and b'"choices"' in r.body:
                case.row(what, last, True)
                return True
        except HttpError as e:
            last = e.kind
        time.sleep(0.2)
    case.row(what, f"last answer: {last}", False)
    return False


def quantiles(values):
    if not values:
        return {}
    v = sorted(values)
    return {"n": len(v), "min": v[0], "p50": v[len(v) // 2], "max": v[-1]}


# ============================================================================================================
# 1. Slowloris + idle keep-alive connections
# ============================================================================================================

SLOW_HEAD = (f"POST {CHAT_PATH} HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: ").encode() + b"a" * 64


class Tracked:
    __slots__ = ("sock", "kind", "t_ref", "next_due", "pos", "closed_at", "status", "how")

    def __init__(self, sock, kind, t_ref):
        self.sock, self.kind, self.t_ref = sock, kind, t_ref
        self.next_due, self.pos = t_ref + 2.0, 1
        self.closed_at, self.status, self.how = None, None, None


def slow_loop(entries, stop_at, state):
    """One thread owns every slow and idle socket: sends the slowloris bytes (one per socket every 2 s) and
    notes when the server answers or closes each one. Bounded by `stop_at`."""
    sel = selectors.DefaultSelector()
    for e in entries:
        e.sock.setblocking(False)
        sel.register(e.sock, selectors.EVENT_READ, e)
    due = collections.deque(sorted((e for e in entries if e.kind == "slow"), key=lambda e: e.next_due))
    open_count = len(entries)
    state["started"] = time.monotonic()

    def close(e, now, how, data=b""):
        nonlocal open_count
        e.closed_at, e.how = now, how
        if data.startswith(b"HTTP/1.1 "):
            e.status = int(data[9:12])
        sel.unregister(e.sock)
        e.sock.close()
        open_count -= 1

    while open_count > 0 and time.monotonic() < stop_at:
        now = time.monotonic()
        timeout = 0.2 if not due else max(0.0, min(0.2, due[0].next_due - now))
        for key, _ in sel.select(timeout):
            e = key.data
            if e.closed_at is not None:
                continue
            now = time.monotonic()
            try:
                data = e.sock.recv(4096)
            except BlockingIOError:
                continue
            except OSError:
                close(e, now, "reset")
                continue
            close(e, now, "answer" if data else "eof", data)
        now = time.monotonic()
        while due and due[0].next_due <= now:
            e = due.popleft()
            if e.closed_at is not None:
                continue
            b = SLOW_HEAD[e.pos:e.pos + 1] or b"a"
            try:
                e.sock.send(b)
            except BlockingIOError:
                pass
            except OSError:
                close(e, now, "reset-on-send")
                continue
            e.pos += 1
            e.next_due += 2.0
            due.append(e)
        state["open"] = open_count
    for e in entries:
        if e.closed_at is None:
            sel.unregister(e.sock)
            e.sock.close()
    state["open"] = open_count


def case_slowloris(run):
    case = Case(run, "1 slowloris")
    port = run.port()
    addr = f"127.0.0.1:{port}"
    cfg = proxy_config(run.mocks, head_timeout_ms=HEAD_MS, idle_timeout_ms=IDLE_MS, max_connections=5000)
    p, log_path = start_proxy(run.procs, WORK, "case1-proxy", port, cfg)
    try:
        for _ in range(5):
            one_shot(addr, chat(close=True), 5.0)
        before = proc_status(p.pid)
        fds_before = fd_count(p.pid)

        # 2,000 idle keep-alive connections: one successful request each, then silence.
        t_phase = time.monotonic()
        idle, fails, lock = [], collections.Counter(), threading.Lock()

        def opener(n):
            for _ in range(n):
                if time.monotonic() > t_phase + 60:
                    return
                try:
                    s = connect(addr, 5.0)
                except HttpError as e:
                    with lock:
                        fails[e.kind] += 1
                    continue
                try:
                    dl = time.monotonic() + 10
                    send(s, chat(), dl)
                    r = read_response(s, dl)
                    if r.status == 200 and not r.close:
                        with lock:
                            idle.append(Tracked(s, "idle", time.monotonic()))
                        continue
                    with lock:
                        fails[f"status {r.status}"] += 1
                except HttpError as e:
                    with lock:
                        fails[e.kind] += 1
                s.close()

        workers = [threading.Thread(target=opener, args=(N_IDLE // 8 + (i < N_IDLE % 8),), daemon=True)
                   for i in range(8)]
        for t in workers:
            t.start()
        for t in workers:
            t.join(timeout=max(1.0, t_phase + 65 - time.monotonic()))
        t_idle = time.monotonic() - t_phase

        # 2,000 slowloris connections: the first byte now, then one byte every 2 s (in the loop thread).
        t_phase = time.monotonic()
        slow, slow_fail = [], collections.Counter()
        for _ in range(N_SLOW):
            if time.monotonic() > t_phase + 30:
                break
            try:
                s = connect(addr, 5.0)
                s.send(SLOW_HEAD[:1])
                slow.append(Tracked(s, "slow", time.monotonic()))
            except (HttpError, OSError) as e:
                slow_fail[getattr(e, "kind", type(e).__name__)] += 1
        t_slow = time.monotonic() - t_phase

        entries = idle + slow
        stop_at = time.monotonic() + max(HEAD_MS, IDLE_MS) / 1000 + 8
        state = {"open": len(entries)}
        loop = threading.Thread(target=slow_loop, args=(entries, stop_at, state), daemon=True)
        loop.start()
        time.sleep(0.3)
        fds_open = fd_count(p.pid)
        during = proc_status(p.pid)
        case.row(
            f"open {N_IDLE:,} idle keep-alive (1 request each) + {N_SLOW:,} slowloris connections",
            f"{len(idle):,} + {len(slow):,} open in {t_idle:.1f} s + {t_slow:.1f} s; proxy fds {fds_before} → "
            f"{fds_open}" + (f"; failures {dict(fails)} {dict(slow_fail)}" if fails or slow_fail else ""),
            len(idle) == N_IDLE and len(slow) == N_SLOW and fds_open >= N_IDLE + N_SLOW,
            idle_s=t_idle, slow_s=t_slow, fds_before=fds_before, fds_open=fds_open,
        )

        # 20 real requests in sequence, alternately on a fresh connection and on one kept-alive connection.
        lat, statuses, rss_peak = [], collections.Counter(), during["VmRSS"]
        ka = None
        for i in range(20):
            t0 = time.monotonic()
            dl = t0 + 5.0
            try:
                if i % 2 == 0:
                    r, _ = one_shot(addr, chat(close=True), 5.0)
                else:
                    if ka is None:
                        ka = connect(addr, 5.0)
                    send(ka, chat(), dl)
                    r = read_response(ka, dl)
                    if r.close:
                        ka.close()
                        ka = None
                statuses[r.status] += 1
                lat.append(time.monotonic() - t0)
            except HttpError as e:
                statuses[e.kind] += 1
                lat.append(time.monotonic() - t0)
                if ka is not None:
                    ka.close()
                    ka = None
            rss_peak = max(rss_peak, rss_kib(p.pid))
            time.sleep(0.1)
        if ka is not None:
            ka.close()
        still_open = state["open"]
        threads_during = threads(p.pid)
        q = quantiles(lat)
        case.row(
            f"20 sequential requests while the {len(entries):,} slow/idle connections are open",
            f"statuses {dict(statuses)}; latency p50 {q['p50'] * 1000:.0f} ms, max {q['max'] * 1000:.0f} ms "
            f"(bound 1000 ms); slow/idle still open afterwards: {still_open:,}",
            statuses.get(200, 0) == 20 and q["max"] < 1.0 and still_open == len(entries),
            latencies_s=lat, still_open=still_open,
        )

        loop.join(timeout=max(1.0, stop_at + 5 - time.monotonic()))
        time.sleep(1.0)
        after = proc_status(p.pid)
        fds_after = fd_count(p.pid)
        clients_after, others_after = socket_fds(p.pid, port)

        for kind, limit_ms, expect_status in (("slow", HEAD_MS, 408), ("idle", IDLE_MS, None)):
            es = [e for e in entries if e.kind == kind]
            t = [e.closed_at - e.t_ref for e in es if e.closed_at is not None]
            lo, hi = limit_ms / 1000 - 0.5, limit_ms / 1000 + 2.0
            in_window = sum(1 for x in t if lo <= x <= hi)
            early = sum(1 for x in t if x < lo)
            never = len(es) - len(t)
            hows = collections.Counter(e.how for e in es)
            st = collections.Counter(e.status for e in es if e.status is not None)
            q = quantiles(t)
            label = "head_timeout" if kind == "slow" else "idle_timeout"
            fig = (f"{in_window:,}/{len(es):,} closed {lo:.1f}–{hi:.1f} s after "
                   f"{'their first byte' if kind == 'slow' else 'their response'} "
                   f"(min {q.get('min', 0):.2f} s, max {q.get('max', 0):.2f} s); early {early}, never {never}; "
                   f"answers {dict(st) or 'none (plain close)'}; how {dict(hows)}")
            ok = in_window == len(es) and len(es) > 0
            if expect_status:
                ok = ok and st.get(expect_status, 0) == len(es)
            case.row(f"{kind} connections closed by the proxy at {label}={limit_ms} ms"
                     + (" with 408" if expect_status else ""), fig, ok, close_s=q)

        case.row(
            "proxy RSS / threads: before, with all open, after they closed",
            f"RSS {mib(before['VmRSS'])} → {mib(max(during['VmRSS'], rss_peak))} → {mib(after['VmRSS'])} "
            f"(HWM {mib(after['VmHWM'])}); threads {before['Threads']} → {threads_during} → {after['Threads']}; "
            f"fds {fds_before} → {fds_open} → {fds_after} (after: {clients_after} client sockets, "
            f"{others_after} listener/upstream sockets); bound: RSS < 64 MiB, threads < before + 64 (workers start "
            f"for requests only: the {N_IDLE:,} idle ones' single requests, never for a slow or idle connection), "
            f"0 client sockets left",
            max(during["VmRSS"], rss_peak) < 64 * 1024 and threads_during < before["Threads"] + 64
            and after["Threads"] < before["Threads"] + 64 and clients_after == 0,
            before=before, during=during, peak_kib=rss_peak, after=after, fds_after=fds_after,
        )
        proxy_alive_row(case, p, log_path, addr)
    finally:
        run.procs.stop(p)


# ============================================================================================================
# 2. Huge heads
# ============================================================================================================

def push_and_listen(addr, payload, timeout=5.0, hold_after=False):
    """Sends `payload` while listening; stops sending as soon as an answer starts. Returns
    (status | 'eof' | 'reset' | 'timeout', seconds to the status line, bytes sent)."""
    t0 = time.monotonic()
    deadline = t0 + timeout
    s = connect(addr, timeout)
    s.setblocking(False)
    sel = selectors.DefaultSelector()
    sel.register(s, selectors.EVENT_READ | selectors.EVENT_WRITE)
    sent, got, writing = 0, bytearray(), True
    try:
        while time.monotonic() < deadline:
            for _, ev in sel.select(max(0.0, deadline - time.monotonic())):
                if ev & selectors.EVENT_READ:
                    try:
                        d = s.recv(65536)
                    except BlockingIOError:
                        d = None
                    except OSError:
                        return ("reset" if not got else _status(got)), time.monotonic() - t0, sent
                    if d == b"":
                        return (_status(got) if got else "eof"), time.monotonic() - t0, sent
                    if d:
                        got += d
                        if b"\r\n" in got:
                            return _status(got), time.monotonic() - t0, sent
                if writing and ev & selectors.EVENT_WRITE:
                    try:
                        sent += s.send(payload[sent:sent + 65536])
                    except BlockingIOError:
                        pass
                    except OSError:
                        writing = False
                    if sent >= len(payload):
                        writing = False
                    if not writing:
                        sel.modify(s, selectors.EVENT_READ)
        return "timeout", time.monotonic() - t0, sent
    finally:
        sel.close()
        s.close()


def _status(got):
    line = bytes(got).split(b"\r\n", 1)[0]
    parts = line.split(b" ")
    return int(parts[1]) if len(parts) > 1 and parts[0].startswith(b"HTTP/") and parts[1].isdigit() else "proto"


def huge_payloads():
    h = f"POST {CHAT_PATH} HTTP/1.1\r\nHost: 127.0.0.1\r\napi-key: {GOOD_KEY}\r\nContent-Type: application/json\r\n"
    line = b"X-Pad: " + b"a" * 1000 + b"\r\n"
    endless = h.encode() + line * (1024 * 1024 // len(line) + 1)
    many = h.encode() + b"".join(b"X-H%d: v\r\n" % i for i in range(10000)) + b"\r\n"
    long_line = b"GET /openai/" + b"a" * (100 * 1024) + b" HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"
    huge_cl = (h + "Content-Length: 100000000000\r\n\r\n").encode() + b'{"mess'
    huge_chunk = (h + "Transfer-Encoding: chunked\r\n\r\n").encode() + b"ffffffffffffffff\r\nabc"
    return [
        ("1 MiB of header bytes, no end of head", endless, lambda s: s == 431, "431"),
        ("10,000 header fields", many, lambda s: s == 431, "431"),
        ("100 KiB request line", long_line, lambda s: s == 414, "414"),
        ("Content-Length: 100000000000 + 6 bytes, then disconnect", huge_cl, lambda s: s == 413, "413"),
        ("chunk size ffffffffffffffff", huge_chunk, lambda s: isinstance(s, int) and 400 <= s < 500, "4xx"),
    ]


def case_heads(run):
    case = Case(run, "2 huge heads")
    port = run.port()
    addr = f"127.0.0.1:{port}"
    p, log_path = start_proxy(run.procs, WORK, "case2-proxy", port, proxy_config(run.mocks))
    try:
        for _ in range(5):
            one_shot(addr, chat(close=True), 5.0)
        before = proc_status(p.pid)
        payloads = huge_payloads()
        results = {name: (collections.Counter(), []) for name, *_ in payloads}
        rss_rounds = []
        t_start = time.monotonic()
        for _round in range(2):
            for i in range(HEAD_REPS):
                for name, data, _ok, _exp in payloads:
                    status, dt, _sent = push_and_listen(addr, data, 5.0)
                    results[name][0][status] += 1
                    results[name][1].append(dt)
            time.sleep(0.3)
            rss_rounds.append(rss_kib(p.pid))
        elapsed = time.monotonic() - t_start
        for name, _data, ok_fn, exp in payloads:
            st, lat = results[name]
            good = sum(n for s, n in st.items() if ok_fn(s))
            q = quantiles(lat)
            case.row(f"{name} → {exp}",
                     f"{good}/{2 * HEAD_REPS} {exp}; all answers {dict(st)}; time to status p50 "
                     f"{q['p50'] * 1000:.1f} ms, max {q['max'] * 1000:.1f} ms (bound 1000 ms)",
                     good == 2 * HEAD_REPS and q["max"] < 1.0, statuses={str(k): v for k, v in st.items()},
                     latency_s=q)
        after = proc_status(p.pid)
        grow_total = rss_rounds[1] - before["VmRSS"]
        grow_r2 = rss_rounds[1] - rss_rounds[0]
        case.row(f"RSS flat over 2 × {HEAD_REPS} of each ({elapsed:.0f} s)",
                 f"{mib(before['VmRSS'])} → {mib(rss_rounds[0])} (round 1) → {mib(rss_rounds[1])} (round 2); "
                 f"HWM {mib(after['VmHWM'])}; bound: round 2 adds ≤ 1 MiB, total ≤ 4 MiB",
                 grow_r2 <= 1024 and grow_total <= 4096, before=before, rounds_kib=rss_rounds, after=after)
        good_request_row(case, addr, "a normal completion afterwards → 200")
        proxy_alive_row(case, p, log_path, addr)
    finally:
        run.procs.stop(p)


# ============================================================================================================
# 3. Out of file descriptors
# ============================================================================================================

def case_fds(run):
    case = Case(run, "3 fd limit")
    port = run.port()
    addr = f"127.0.0.1:{port}"
    cfg = proxy_config(run.mocks, head_timeout_ms=60000, idle_timeout_ms=60000)
    p, log_path = start_proxy(run.procs, WORK, "case3-proxy", port, cfg, fd_limit=FD_LIMIT)
    conns = []
    try:
        with open(f"/proc/{p.pid}/limits") as f:
            lim = next((ln.split()[3:5] for ln in f if ln.startswith("Max open files")), ["?", "?"])
        one_shot(addr, chat(close=True), 5.0)
        fds0 = fd_count(p.pid)
        # Open FD_CONNS connections at once (non-blocking connects), each sending GET /healthz (keep-alive):
        # served ones get 200 and stay open, holding a proxy fd; once the proxy is out of descriptors the rest
        # must get 503 or be refused. Each connection gets 5 s from its connect() for an answer.
        health = request("GET", "/healthz")
        outcome, got, started = {}, {}, {}
        sel = selectors.DefaultSelector()
        for i in range(FD_CONNS):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.setblocking(False)
            started[i] = time.monotonic()
            err = s.connect_ex(("127.0.0.1", port))
            if err not in (0, errno.EINPROGRESS):
                outcome[i] = ("refused", os.strerror(err))
                s.close()
                continue
            conns.append((i, s, started[i]))
            got[i] = bytearray()
            sel.register(s, selectors.EVENT_WRITE, i)
        stop = time.monotonic() + 5.0
        pending = set(got)
        while pending and time.monotonic() < stop:
            for key, ev in sel.select(max(0.0, min(0.5, stop - time.monotonic()))):
                i, s = key.data, key.fileobj
                if i not in pending:
                    continue
                now = time.monotonic()
                if ev & selectors.EVENT_WRITE:
                    err = s.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
                    if err:
                        outcome[i] = ("refused", os.strerror(err))
                        pending.discard(i)
                        sel.unregister(s)
                        continue
                    try:
                        s.send(health)
                    except OSError as e:
                        outcome[i] = ("refused", str(e))
                        pending.discard(i)
                        sel.unregister(s)
                        continue
                    started[i] = (started[i], now)  # (connect start, connected)
                    sel.modify(s, selectors.EVENT_READ, i)
                    continue
                try:
                    d = s.recv(65536)
                except BlockingIOError:
                    continue
                except OSError:
                    d = None
                if d:
                    got[i] += d
                    if b"\r\n\r\n" in got[i]:
                        st = _status(got[i])
                        outcome[i] = (st, now - started[i][0])
                        pending.discard(i)
                        sel.unregister(s)
                else:
                    outcome[i] = ("refused", "reset" if d is None else "closed without an answer")
                    pending.discard(i)
                    sel.unregister(s)
        for i in pending:
            connected = isinstance(started[i], tuple)
            outcome[i] = ("hung" if connected else "hung (connect)", None)
        sel.close()
        counts = collections.Counter(v[0] for v in outcome.values())
        fds_full = fd_count(p.pid)
        refusal_lat = [v[1] for v in outcome.values() if v[0] == 503]
        with open(log_path, "rb") as f:
            text = f.read()
        fd_503 = text.count(b"out of file descriptors; answering")
        fd_pause = text.count(b"accept failed: Too many open files")
        known = (200, 503, "refused", "hung", "hung (connect)")
        case.row(
            f"proxy limit {lim[0]}/{lim[1]} fds; {FD_CONNS} connections at once, each sending GET /healthz",
            f"200 (served, held open): {counts.get(200, 0)}, 503: {counts.get(503, 0)}, refused/closed: "
            f"{counts.get('refused', 0)}, hung (no answer in 5 s): {counts.get('hung', 0)} connected + "
            f"{counts.get('hung (connect)', 0)} never accepted by the kernel"
            + (f", other: { {k: v for k, v in counts.items() if k not in known} }"
               if set(counts) - set(known) else "")
            + f"; 503 max {max(refusal_lat, default=0) * 1000:.0f} ms; proxy fds {fds0} → {fds_full}; "
            f"log: {fd_503}× 'out of file descriptors; answering … 503', {fd_pause}× 'accept failed: Too many "
            f"open files'",
            counts.get("hung", 0) + counts.get("hung (connect)", 0) == 0
            and counts.get(503, 0) + counts.get("refused", 0) > 0 and set(counts) <= {200, 503, "refused"},
            counts={str(k): v for k, v in counts.items()}, fds_before=fds0, fds_full=fds_full,
            log_503=fd_503, log_accept_failed=fd_pause,
        )
        # While every descriptor is taken: a completion on one of the held connections needs an upstream socket.
        held = [(i, s) for i, s, _ in conns if outcome.get(i, ("",))[0] == 200]
        if held:
            _i, s = held[0]
            s.setblocking(True)
            t0 = time.monotonic()
            try:
                send(s, chat(close=True), t0 + 10)
                r = read_response(s, t0 + 10)
                fig = f"{r.status} in {(time.monotonic() - t0) * 1000:.0f} ms"
                answered = True
            except HttpError as e:
                fig, answered = f"no answer: {e.kind} after {time.monotonic() - t0:.1f} s", False
            case.row("a completion on a held connection while out of fds (needs an upstream socket)",
                     fig + " (any answer is fine; hanging is not)", answered)
        for _i, s, _t in conns:
            s.close()
        conns = []
        time.sleep(1.0)
        fds_after = fd_count(p.pid)
        ok = good_request_row(case, addr, "after closing them all: a normal completion → 200 (not deaf)")
        if ok:
            r, _ = one_shot(addr, chat(close=True), 5.0)
        case.row("proxy fds after the connections closed", f"{fds0} → {fds_full} → {fds_after}",
                 fds_after <= fds0 + 5)
        proxy_alive_row(case, p, log_path, addr)
    finally:
        for _i, s, _t in conns:
            s.close()
        run.procs.stop(p)


# ============================================================================================================
# 4. 100,000 client IPs with bad keys
# ============================================================================================================

def flood(first, n, budget_s, job, n_threads, p, progress):
    """Runs job(k) for k in 0..n-1 over n_threads threads until done or budget_s is over. Samples the proxy's
    RSS every second. Returns (status counter, done count, seconds)."""
    counts, lock = collections.Counter(), threading.Lock()
    nxt = [first]
    t0 = time.monotonic()
    stop = t0 + budget_s

    def worker():
        local = collections.Counter()
        state = {}
        while time.monotonic() < stop:
            with lock:
                k = nxt[0]
                if k >= n:
                    break
                nxt[0] += 1
            local[job(k, state)] += 1
            if len(local) and sum(local.values()) % 500 == 0:
                with lock:
                    counts.update(local)
                local.clear()
        if state.get("sock"):
            state["sock"].close()
        with lock:
            counts.update(local)

    ts = [threading.Thread(target=worker, daemon=True) for _ in range(n_threads)]
    for t in ts:
        t.start()
    while any(t.is_alive() for t in ts) and time.monotonic() < stop + 15:
        time.sleep(1.0)
        with lock:
            progress.append((nxt[0], rss_kib(p.pid), time.monotonic() - t0))
    for t in ts:
        t.join(timeout=1.0)
    with lock:
        return counts, min(nxt[0], n) - first, time.monotonic() - t0


def xff_job(addr):
    def job(k, state):
        ip = f"10.{(k >> 16) & 255}.{(k >> 8) & 255}.{k & 255}"
        for attempt in range(2):
            s = state.get("sock")
            if s is None:
                try:
                    s = state["sock"] = connect(addr, 5.0)
                except HttpError as e:
                    return e.kind
            dl = time.monotonic() + 5.0
            try:
                send(s, bad_key_get(xff=ip), dl)
                r = read_response(s, dl)
            except HttpError as e:
                s.close()
                state["sock"] = None
                if e.kind in ("eof", "reset") and attempt == 0:
                    continue  # a kept-alive connection closed between requests: retry once on a new one
                return e.kind
            if r.close:
                s.close()
                state["sock"] = None
            return r.status
        return "eof"
    return job


def src_ip(k):
    k += 1 << 16  # 127.1.0.0 and up: never 127.0.0.x
    return f"127.{(k >> 16) & 255}.{(k >> 8) & 255}.{k & 255}"


def tcp_job(addr):
    req = bad_key_get(close=True)

    def job(k, _state):
        try:
            r, _ = one_shot(addr, req, 5.0, src=src_ip(k))
            return r.status
        except HttpError as e:
            return e.kind
    return job


def blocking_probe(addr, n, xff=None, src=None):
    """n bad keys then one good key from one client; returns the statuses."""
    out = []
    for _ in range(n):
        try:
            out.append(one_shot(addr, bad_key_get(xff=xff, close=True), 5.0, src=src)[0].status)
        except HttpError as e:
            out.append(e.kind)
    try:
        out.append(one_shot(addr, chat(close=True, xff=xff), 5.0, src=src)[0].status)
    except HttpError as e:
        out.append(e.kind)
    return out


def case_ips(run, mode):
    name = "4a many IPs (X-Forwarded-For)" if mode == "xff" else "4b many IPs (TCP source)"
    case = Case(run, name)
    port = run.port()
    addr = f"127.0.0.1:{port}"
    extra = dict(max_tracked_clients=10000, max_bad_keys=3, block_seconds=300)
    if mode == "xff":
        extra["trusted_proxies"] = ["127.0.0.1"]
    p, log_path = start_proxy(run.procs, WORK, f"case4{mode}-proxy", port, proxy_config(run.mocks, **extra),
                              rust_log="warn")
    try:
        one_shot(addr, chat(close=True), 5.0)
        # Blocking works before the flood: 3 bad keys, then the good key is refused.
        probe_kw = {"xff": "198.51.100.7"} if mode == "xff" else {"src": "127.0.0.77"}
        before_probe = blocking_probe(addr, 4, **probe_kw)
        rss0 = rss_kib(p.pid)
        progress = []
        job = xff_job(addr) if mode == "xff" else tcp_job(addr)
        # RSS once the table is full (10,000 distinct clients) vs at the end: bounded means no growth after.
        first = min(12000, N_IPS)
        counts, done, secs = flood(0, first, IP_BUDGET_S, job, 4, p, progress)
        at_full = rss_kib(p.pid)
        c2, d2, s2 = flood(first, N_IPS, max(1, IP_BUDGET_S - secs), job, 4, p, progress)
        counts.update(c2)
        done, secs = done + d2, secs + s2
        rss_end = rss_kib(p.pid)
        cut = "" if done >= N_IPS else f" — cut by the {IP_BUDGET_S} s budget, {N_IPS:,} wanted"
        case.row(
            f"{N_IPS:,} one-request clients with a bad key, "
            + ("one trusted peer 127.0.0.1, X-Forwarded-For 10.x.y.z, keep-alive"
               if mode == "xff" else "each from its own 127.x.y.z source address, keep-alive off")
            + "; max_tracked_clients 10000",
            f"{done:,} distinct IPs in {secs:.0f} s ({done / max(secs, 0.001):.0f}/s){cut}; answers "
            f"{dict(counts)}",
            done >= min(N_IPS, 20000) and counts.get(401, 0) == done,
            counts={str(k): v for k, v in counts.items()}, done=done, seconds=secs,
        )
        case.row(
            "proxy RSS bounded",
            f"{mib(rss0)} before → {mib(at_full)} after 12,000 IPs (table full) → {mib(rss_end)} at {done:,}; "
            f"bound: ≤ +1 MiB after the table is full, ≤ +16 MiB in all",
            rss_end - at_full <= 1024 and rss_end - rss0 <= 16 * 1024,
            rss_progress=progress[:: max(1, len(progress) // 40)],
        )
        exp_before = [401, 401, 401, 403, 403]
        after_probe = blocking_probe(addr, 4, **({"xff": "203.0.113.9"} if mode == "xff" else
                                                 {"src": "127.0.0.78"}))
        still_blocked = blocking_probe(addr, 0, **probe_kw)
        case.row(
            "blocking: a client with 4 bad keys then the good key, before / after the flood; the first "
            "client again after",
            f"before {before_probe}; after (table full) {after_probe}; first client after the flood "
            f"{still_blocked}",
            before_probe == exp_before and after_probe == exp_before and still_blocked == [403],
            note="with the table full of live entries, an unblocked client is forgotten to make room, so a new "
                 "offender is still blocked and blocks in force survive",
        )
        fresh = {"xff": "192.0.2.55"} if mode == "xff" else {"src": "127.250.0.1"}
        good_request_row(case, addr, f"a fresh client ({list(fresh.values())[0]}) with the good key → 200",
                         **fresh)
        proxy_alive_row(case, p, log_path, addr)
    finally:
        run.procs.stop(p)


# ============================================================================================================

CASES = {"1": case_slowloris, "2": case_heads, "3": case_fds,
         "4a": lambda r: case_ips(r, "xff"), "4b": lambda r: case_ips(r, "tcp")}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cases", default=os.environ.get("STRESS_CASES", "1,2,3,4a,4b"),
                    help="comma-separated subset of 1,2,3,4a,4b")
    ap.add_argument("--budget", type=int, default=env_int("STRESS_BUDGET_S", 600),
                    help="watchdog for the whole run, seconds")
    a = ap.parse_args()
    wanted = [c.strip() for c in a.cases.split(",") if c.strip()]
    for c in wanted:
        if c not in CASES:
            sys.exit(f"unknown case {c!r}; known: {', '.join(CASES)}")
    for b in ("PROXY_BIN", "MOCK_BIN"):
        path = getattr(sys.modules["common"], b)
        if not os.access(path, os.X_OK):
            sys.exit(f"missing {path}: run `make stress` (it builds it) or cargo build --release [--example "
                     "mock_azure]")
    os.makedirs(WORK, exist_ok=True)
    os.makedirs(RESULTS, exist_ok=True)
    nofile = raise_fd_limit()
    install_signal_handlers(a.budget)
    run = Run()
    started = time.time()
    error = None
    try:
        run.mocks = start_mocks(run.procs, [run.port() for _ in range(2)], WORK, event_delay_ms=5, events=6)
        for c in wanted:
            log(f"case {c}")
            t = time.monotonic()
            try:
                CASES[c](run)
            except (HttpError, RuntimeError, OSError) as e:
                run.rows.append({"case": c, "what": "case aborted", "figure": repr(e), "ok": False, "data": {}})
                log(f"FAIL case {c} aborted: {e!r}")
            log(f"case {c} took {time.monotonic() - t:.0f} s")
    except BaseException as e:  # watchdog, Ctrl-C: still write what we have
        error = repr(e)
        run.rows.append({"case": "run", "what": "run aborted", "figure": error, "ok": False, "data": {}})
    finally:
        run.procs.stop_all()
        signal_alarm_off()
    table = md_table(run.rows)
    failed = [r for r in run.rows if not r["ok"]]
    head = (f"# azure-proxy stress\n\n{time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime(started))} · "
            f"{os.cpu_count()} CPUs · kernel {platform.release()} · commit {git_rev()} · cases {','.join(wanted)} · "
            f"{time.time() - started:.0f} s · client fd limit {nofile}\n\n")
    md = head + table + f"\n\n{len(run.rows) - len(failed)}/{len(run.rows)} checks passed.\n"
    with open(os.path.join(RESULTS, "latest.md"), "w") as f:
        f.write(md)
    with open(os.path.join(RESULTS, "latest.json"), "w") as f:
        json.dump({"started": started, "cases": wanted, "rows": run.rows, "error": error,
                   "config": {"slow": N_SLOW, "idle": N_IDLE, "head_timeout_ms": HEAD_MS,
                              "idle_timeout_ms": IDLE_MS, "head_reps": HEAD_REPS, "fd_limit": FD_LIMIT,
                              "fd_conns": FD_CONNS, "ips": N_IPS}}, f, indent=1, default=str)
    print(md)
    sys.exit(1 if failed else 0)


def signal_alarm_off():
    import signal
    signal.alarm(0)


def git_rev():
    try:
        rev = subprocess.run(["git", "-C", os.path.dirname(WORK), "rev-parse", "--short", "HEAD"],
                             capture_output=True, text=True, timeout=5).stdout.strip()
        dirty = subprocess.run(["git", "-C", os.path.dirname(WORK), "status", "--porcelain", "--", "src"],
                               capture_output=True, text=True, timeout=5).stdout.strip()
        return rev + (" (src modified)" if dirty else "")
    except Exception:
        return "?"


if __name__ == "__main__":
    main()
