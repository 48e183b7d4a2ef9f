#!/usr/bin/env python3
"""`make soak`: SOAK_SECONDS (default 600) of moderate mixed load against the release proxy in front of three
mock Azure instances; checks that memory and descriptors stay flat and that every request is answered.

Traffic: SOAK_THREADS (8) client threads, SOAK_RATE (40) requests/s each: 60 % plain chat completions and
20 % streamed ones (SSE, 8 events 10 ms apart) on kept-alive connections, 20 % refused requests on fresh
connections (a wrong key from the thread's own 127.0.3.x address, which gets blocked for 5 s after 3; no
key; unknown path; absolute-form target; bad chunk size; 33 KB header; Content-Length with
Transfer-Encoding; 100 GB Content-Length), each with its expected status.

Python 3 stdlib only; 127.0.0.0/8 only; bounded loops; everything started is stopped at the end. Writes
stress/results/soak-latest.{md,json}; exit status 1 when a check fails.
"""

import argparse
import collections
import json
import os
import platform
import random
import statistics
import sys
import threading
import time

sys.dont_write_bytecode = True  # no __pycache__ in the tree
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import (  # noqa: E402
    CHAT_PATH, GOOD_KEY, RESULTS, WORK, HttpError, Procs, chat, connect, fd_count, free_base,
    install_signal_handlers, log, md_table, mib, one_shot, proc_status, proxy_config, raise_fd_limit,
    read_response, request, send, socket_fds, start_mocks, start_proxy,
)

STREAM_EVENTS = 8


def refused_kinds():
    big = request("GET", CHAT_PATH, [("api-key", GOOD_KEY), ("X-Big", "b" * 33000)])
    h = [("api-key", GOOD_KEY), ("Content-Type", "application/json")]
    return [
        # (name, request bytes, expected statuses, source address: None = 127.0.0.1, "own" = per thread)
        ("bad key", request("GET", CHAT_PATH, [("api-key", "wrong-key")], close=True), {401, 403}, "own"),
        ("no key", request("POST", CHAT_PATH, [("Content-Type", "application/json")], b"{}", close=True),
         {401}, None),
        ("unknown path", request("GET", "/v1/models", [("api-key", GOOD_KEY)], close=True), {404}, None),
        ("absolute-form target", request("GET", "http://example.com" + CHAT_PATH, h, close=True), {400}, None),
        ("bad chunk size", request("POST", CHAT_PATH, h + [("Transfer-Encoding", "chunked")], b"zz\r\n",
                                   close=True), {400}, None),
        ("33 KB header", big, {431}, None),
        ("Content-Length + Transfer-Encoding",
         request("POST", CHAT_PATH, h + [("Content-Length", "4"), ("Transfer-Encoding", "chunked")],
                 b"0\r\n\r\n", close=True), {400}, None),
        ("100 GB Content-Length", request("POST", CHAT_PATH, h + [("Content-Length", "100000000000")], close=True),
         {413}, None),
    ]


class Stats:
    def __init__(self):
        self.lock = threading.Lock()
        self.sent = collections.Counter()
        self.status = collections.defaultdict(collections.Counter)
        self.errors = collections.defaultdict(collections.Counter)
        self.unexpected = collections.defaultdict(collections.Counter)
        self.lat = collections.defaultdict(list)

    def add(self, kind, outcome, ok, dt):
        with self.lock:
            self.sent[kind] += 1
            if isinstance(outcome, int):
                self.status[kind][outcome] += 1
                if not ok:
                    self.unexpected[kind][outcome] += 1
            else:
                self.errors[kind][outcome] += 1
            if len(self.lat[kind]) < 200000:
                self.lat[kind].append(dt)


def client(tid, addr, stop, stats, rate, seed):
    rng = random.Random(seed + tid)
    refused = refused_kinds()
    own_src = f"127.0.3.{tid + 1}"
    ka = None
    t_next = time.monotonic()
    n = 0
    while not stop.is_set() and n < 10_000_000:
        n += 1
        now = time.monotonic()
        if t_next > now:
            stop.wait(t_next - now)
            if stop.is_set():
                break
        elif now - t_next > 1.0:
            t_next = now  # behind: do not burst
        t_next += 1.0 / rate
        r = rng.random()
        t0 = time.monotonic()
        if r < 0.8:
            kind = "plain completion" if r < 0.6 else "streamed completion"
            stream = kind.startswith("streamed")
            dl = t0 + 10.0
            try:
                if ka is None:
                    ka = connect(addr, 5.0)
                send(ka, chat(stream=stream), dl)
                resp = read_response(ka, dl)
                if resp.close:
                    ka.close()
                    ka = None
                if stream:
                    ok = (resp.status == 200 and resp.body.count(b"data: ") == STREAM_EVENTS
                          and resp.body.rstrip().endswith(b"data: [DONE]"))
                else:
                    ok = resp.status == 200 and b'"choices"' in resp.body
                outcome = resp.status if ok or resp.status != 200 else "200 with a wrong body"
                stats.add(kind, outcome, ok, time.monotonic() - t0)
            except HttpError as e:
                stats.add(kind, e.kind, False, time.monotonic() - t0)
                if ka is not None:
                    ka.close()
                    ka = None
        else:
            name, data, expected, src = refused[rng.randrange(len(refused))]
            try:
                resp, dt = one_shot(addr, data, 10.0, src=own_src if src == "own" else None)
                stats.add(name, resp.status, resp.status in expected, dt)
            except HttpError as e:
                stats.add(name, e.kind, False, time.monotonic() - t0)
    if ka is not None:
        ka.close()


def sample(pid, port, n=5, gap=1.0):
    """Medians of n samples `gap` apart: RSS KiB, fds, client sockets, threads."""
    rows = []
    for i in range(n):
        st = proc_status(pid)
        c, _o = socket_fds(pid, port)
        rows.append((st["VmRSS"], fd_count(pid), c, st["Threads"]))
        if i < n - 1:
            time.sleep(gap)
    return {k: statistics.median(r[j] for r in rows) for j, k in enumerate(("rss", "fds", "clients", "threads"))}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", type=int, default=int(os.environ.get("SOAK_SECONDS") or 600))
    ap.add_argument("--threads", type=int, default=int(os.environ.get("SOAK_THREADS") or 8))
    ap.add_argument("--rate", type=float, default=float(os.environ.get("SOAK_RATE") or 40),
                    help="requests/s per thread")
    ap.add_argument("--seed", type=int, default=int(os.environ.get("SOAK_SEED") or 1))
    a = ap.parse_args()
    if a.seconds < 20 or a.threads < 1 or a.threads > 64 or not 0 < a.rate <= 1000:
        sys.exit("soak: need --seconds >= 20, 1..64 threads, 0 < rate <= 1000")
    warm = min(30, a.seconds // 4)
    os.makedirs(WORK, exist_ok=True)
    os.makedirs(RESULTS, exist_ok=True)
    raise_fd_limit()
    install_signal_handlers(a.seconds + 180)
    procs = Procs()
    rows = []
    stats = Stats()
    stop = threading.Event()
    started = time.time()
    error = None
    series = []
    try:
        base = free_base(int(os.environ.get("SOAK_PORT_BASE") or 24600), 4)
        mocks = start_mocks(procs, [base, base + 1, base + 2], WORK, event_delay_ms=10, events=STREAM_EVENTS)
        port = base + 3
        addr = f"127.0.0.1:{port}"
        cfg = proxy_config(mocks, max_bad_keys=3, block_seconds=5)
        p, log_path = start_proxy(procs, WORK, "soak-proxy", port, cfg)
        log(f"soak: {a.seconds} s, {a.threads} threads × {a.rate:g} req/s, warm-up {warm} s; proxy pid {p.pid}")
        ts = [threading.Thread(target=client, args=(i, addr, stop, stats, a.rate, a.seed), daemon=True)
              for i in range(a.threads)]
        t0 = time.monotonic()
        for t in ts:
            t.start()
        end = t0 + a.seconds
        time.sleep(warm)
        at_warm = sample(p.pid, port)
        log(f"after warm-up: RSS {mib(at_warm['rss'])}, fds {at_warm['fds']}, sent {sum(stats.sent.values())}")
        while time.monotonic() < end - 6:
            time.sleep(min(10.0, max(0.0, end - 6 - time.monotonic())))
            st = proc_status(p.pid)
            with stats.lock:
                n = sum(stats.sent.values())
            series.append({"t": round(time.monotonic() - t0, 1), "rss": st["VmRSS"], "fds": fd_count(p.pid),
                           "sent": n})
            if p.poll() is not None:
                break
        at_end = sample(p.pid, port) if p.poll() is None else None
        stop.set()
        for t in ts:
            t.join(timeout=15)
        elapsed = time.monotonic() - t0
        stuck = sum(t.is_alive() for t in ts)
        time.sleep(1.0)
        idle = sample(p.pid, port, n=1) if p.poll() is None else None

        total = sum(stats.sent.values())
        answered = sum(sum(c.values()) for c in stats.status.values())
        errors = sum(sum(c.values()) for c in stats.errors.values())
        unexpected = sum(sum(c.values()) for c in stats.unexpected.values())
        rows.append({"case": "soak", "what": f"{a.threads} threads × {a.rate:g} req/s for {a.seconds} s, "
                     "3 mock instances", "figure": f"{total:,} requests in {elapsed:.0f} s "
                     f"({total / elapsed:.0f}/s); answered {answered:,}; socket errors/timeouts {errors}; "
                     f"unexpected status {unexpected}; client threads stuck {stuck}",
                     "ok": total > 0 and answered == total and errors == 0 and unexpected == 0 and stuck == 0,
                     "data": {}})
        for kind in sorted(stats.sent, key=lambda k: -stats.sent[k]):
            lat = sorted(stats.lat[kind])
            p50 = lat[len(lat) // 2] * 1000 if lat else 0
            p99 = lat[int(len(lat) * 0.99)] * 1000 if lat else 0
            fig = (f"sent {stats.sent[kind]:,}; statuses {dict(stats.status[kind])}"
                   + (f"; errors {dict(stats.errors[kind])}" if stats.errors[kind] else "")
                   + (f"; unexpected {dict(stats.unexpected[kind])}" if stats.unexpected[kind] else "")
                   + f"; p50 {p50:.1f} ms, p99 {p99:.1f} ms")
            rows.append({"case": "soak", "what": kind, "figure": fig,
                         "ok": not stats.errors[kind] and not stats.unexpected[kind], "data": {}})
        if at_end:
            grow = at_end["rss"] / at_warm["rss"] - 1
            rows.append({"case": "soak", "what": f"proxy RSS after {warm} s warm-up vs at the end (bound +10 %)",
                         "figure": f"{mib(at_warm['rss'])} → {mib(at_end['rss'])} ({grow * 100:+.1f} %); "
                         f"max during run {mib(max([s['rss'] for s in series] + [at_end['rss']]))}",
                         "ok": grow <= 0.10, "data": {"warm": at_warm, "end": at_end}})
            rows.append({"case": "soak", "what": "proxy fds at warm-up vs at the end (bound +5; medians of 5 samples)",
                         "figure": f"{at_warm['fds']:g} → {at_end['fds']:g} (client sockets {at_warm['clients']:g} → "
                         f"{at_end['clients']:g}; after the clients stopped: {idle['clients'] if idle else '?'} "
                         f"client sockets, {idle['fds'] if idle else '?'} fds); threads {at_warm['threads']:g} → "
                         f"{at_end['threads']:g}",
                         "ok": at_end["fds"] <= at_warm["fds"] + 5 and idle is not None and idle["clients"] == 0,
                         "data": {}})
        alive = p.poll() is None
        with open(log_path, "rb") as f:
            text = f.read()
        panics = text.count(b"panicked")
        errs = text.count(b" ERROR ")
        rows.append({"case": "soak", "what": "proxy alive at the end, log clean",
                     "figure": f"alive={alive}, panics={panics}, ERROR lines={errs}, "
                     f"WARN lines={text.count(b' WARN ')}, blocks={text.count(b'blocked for')}",
                     "ok": alive and panics == 0 and errs == 0, "data": {}})
    except BaseException as e:
        error = repr(e)
        rows.append({"case": "soak", "what": "run aborted", "figure": error, "ok": False, "data": {}})
    finally:
        stop.set()
        procs.stop_all()
        import signal
        signal.alarm(0)
    md = (f"# azure-proxy soak\n\n{time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime(started))} · "
          f"{os.cpu_count()} CPUs · kernel {platform.release()} · SOAK_SECONDS={a.seconds} · "
          f"{a.threads} threads × {a.rate:g} req/s\n\n" + md_table(rows)
          + f"\n\n{sum(r['ok'] for r in rows)}/{len(rows)} checks passed.\n")
    with open(os.path.join(RESULTS, "soak-latest.md"), "w") as f:
        f.write(md)
    with open(os.path.join(RESULTS, "soak-latest.json"), "w") as f:
        json.dump({"started": started, "seconds": a.seconds, "threads": a.threads, "rate": a.rate, "rows": rows,
                   "series": series, "error": error,
                   "sent": dict(stats.sent), "status": {k: dict(v) for k, v in stats.status.items()},
                   "errors": {k: dict(v) for k, v in stats.errors.items()}}, f, indent=1, default=str)
    print(md)
    sys.exit(0 if rows and all(r["ok"] for r in rows) else 1)


if __name__ == "__main__":
    main()
