#!/usr/bin/env python3
"""Concurrent-streams load generator and report for bench/streams.sh (Python 3 stdlib only, loopback only).

  streams.py run --target ADDR --key KEY --n N --ramp-s S --events E --pids PID... --out FILE.json
      opens N streamed chat requests to ADDR, started evenly over S seconds (0: all at once), one thread, one
      epoll set; records per stream connect, status, first/last event, events, terminating chunk; samples the
      server processes (RSS, threads, CPU) while it runs; writes one JSON object (per-stream rows in FILE.rows)
  streams.py settle FILE.json... --settle S
      for each run file: waits until S seconds after that run ended, then records its servers' RSS and threads
  streams.py report FILE.json... --md OUT.md --json OUT.json
      the Markdown table and the JSON document of a whole streams run

Every time is measured from just before connect(). A stream is "completed" when it got 200, every event and the
terminating chunk; "refused" when it got any other status (503 when the proxy is at capacity); "broken" for
everything else (connect error, reset, EOF or timeout before the end).
"""

import argparse
import errno
import json
import os
import resource
import selectors
import signal
import socket
import sys
import time

sys.dont_write_bytecode = True  # no bench/__pycache__ from the import below
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from stream_probe import CHAT_PATH, STREAM_BODY, ChunkedEvents, split_addr  # noqa: E402

CLK_TCK = os.sysconf("SC_CLK_TCK")
SAMPLE_EVERY_S = 0.1
START_BATCH = 16


# --------------------------------------------------------------------------------------------------------
# /proc readings
# --------------------------------------------------------------------------------------------------------

def expand_pids(pids):
    """The given pids plus their children (nginx: master -> workers), each once."""
    out = []
    for pid in pids:
        if pid not in out:
            out.append(pid)
        try:
            for task in os.listdir(f"/proc/{pid}/task"):
                with open(f"/proc/{pid}/task/{task}/children") as f:
                    out.extend(int(c) for c in f.read().split() if int(c) not in out)
        except OSError:
            pass
    return out


def status_sum(pids):
    """Sum over pids of VmRSS, VmHWM (KiB) and Threads from /proc/PID/status (gone processes count 0)."""
    tot = {"VmRSS": 0, "VmHWM": 0, "Threads": 0}
    for pid in pids:
        try:
            with open(f"/proc/{pid}/status") as f:
                for line in f:
                    name, _, rest = line.partition(":")
                    if name in tot:
                        tot[name] += int(rest.split()[0])
        except OSError:
            pass
    return tot


def cpu_seconds(pids):
    """utime + stime of pids (all their threads), seconds."""
    ticks = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            ticks += int(fields[11]) + int(fields[12])  # fields 14 and 15 of stat(5), after pid and (comm)
        except (OSError, IndexError, ValueError):
            pass
    return ticks / CLK_TCK


def reset_hwm(pids):
    """VmHWM := VmRSS (Linux clear_refs 5), so that the peak is this run's. False if not permitted."""
    ok = True
    for pid in pids:
        try:
            with open(f"/proc/{pid}/clear_refs", "w") as f:
                f.write("5")
        except OSError:
            ok = False
    return ok


def listen_counters():
    """TcpExt ListenOverflows and ListenDrops (system-wide, this network namespace)."""
    try:
        with open("/proc/net/netstat") as f:
            lines = f.read().splitlines()
    except OSError:
        return {}
    for names, values in zip(lines[::2], lines[1::2]):
        if names.startswith("TcpExt:"):
            kv = dict(zip(names.split()[1:], (int(v) for v in values.split()[1:])))
            return {k: kv.get(k) for k in ("ListenOverflows", "ListenDrops")}
    return {}


# --------------------------------------------------------------------------------------------------------
# The load generator
# --------------------------------------------------------------------------------------------------------

class Stream:
    __slots__ = ("i", "sock", "sched", "start", "connected", "status_at", "first", "last", "status", "events",
                 "done", "error", "parser", "finished")

    def __init__(self, i, sched):
        self.i, self.sched = i, sched
        self.sock = None
        self.start = self.connected = self.status_at = self.first = self.last = None
        self.status = None
        self.events = 0
        self.done = False
        self.error = None
        self.parser = ChunkedEvents()
        self.finished = False


def percentile(values, p):
    """Nearest-rank percentile; None for no values."""
    if not values:
        return None
    v = sorted(values)
    k = max(0, min(len(v) - 1, int(round(p / 100 * len(v) + 0.5)) - 1))
    return v[k]


def cmd_run(a):
    host, port = split_addr(a.target)
    request = (
        f"POST {CHAT_PATH} HTTP/1.1\r\nHost: {host}:{port}\r\n{a.header}: {a.key}\r\n"
        f"Content-Type: application/json\r\nAccept: text/event-stream\r\n"
        f"Content-Length: {len(STREAM_BODY)}\r\nConnection: close\r\n\r\n"
    ).encode() + STREAM_BODY
    expected_events = a.events + 1  # the content events and `data: [DONE]`

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < a.n + 64:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        if hard < a.n + 64:
            sys.exit(f"streams: the open-files limit ({hard}) is below {a.n} streams; raise it (ulimit -n)")

    pids = expand_pids(a.pids)
    up_pids = expand_pids(a.upstream_pids) if a.upstream_pids else []
    hwm_reset = reset_hwm(pids)
    idle = status_sum(pids)
    net0 = listen_counters()
    cpu0, up_cpu0 = cpu_seconds(pids), cpu_seconds(up_pids)
    self0 = resource.getrusage(resource.RUSAGE_SELF)

    sel = selectors.EpollSelector()
    t0 = time.perf_counter() + 0.05
    streams = [Stream(i, t0 + (a.ramp_s * i / a.n if a.n > 1 else 0)) for i in range(a.n)]
    active = {}  # fd -> Stream
    next_i = 0
    finished = 0
    peak_threads, peak_rss_sampled = idle["Threads"], idle["VmRSS"]
    next_sample = time.perf_counter()
    next_timeout_scan = time.perf_counter() + 0.5

    def finish(s, error=None):
        nonlocal finished
        if s.finished:
            return
        s.finished = True
        s.error = error
        finished += 1
        if s.sock is not None:
            try:
                sel.unregister(s.sock)
            except (KeyError, ValueError):
                pass
            active.pop(s.sock.fileno(), None)
            s.sock.close()
            s.sock = None

    def start(s):
        s.start = time.perf_counter()
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setblocking(False)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        rc = sock.connect_ex((host, port))
        s.sock = sock
        if rc not in (0, errno.EINPROGRESS):
            finish(s, f"connect: {errno.errorcode.get(rc, rc)}")
            return
        active[sock.fileno()] = s
        sel.register(sock, selectors.EVENT_WRITE, s)

    def on_ready(s, mask):
        now = time.perf_counter()
        if s.connected is None:
            err = s.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
            if err:
                finish(s, f"connect: {errno.errorcode.get(err, err)}")
                return
            s.connected = now
            try:
                s.sock.send(request)  # ~300 bytes: a fresh socket's buffer takes them whole
            except OSError as e:
                finish(s, f"send: {e.strerror or e}")
                return
            sel.modify(s.sock, selectors.EVENT_READ, s)
            return
        try:
            data = s.sock.recv(65536)
        except BlockingIOError:
            return
        except OSError as e:
            finish(s, f"recv: {errno.errorcode.get(e.errno, e)}")
            return
        if not data:
            finish(s, "eof before the end of the stream")
            return
        try:
            n = s.parser.feed(data)
        except (ValueError, IndexError) as e:
            finish(s, f"unparseable response: {e}")
            return
        if s.parser.status is not None and s.status is None:
            s.status = s.parser.status
            s.status_at = now
            if s.status != 200:
                finish(s)
                return
        if n:
            if s.first is None:
                s.first = now
            s.last = now
            s.events = s.parser.events
        if s.parser.done:
            s.done = True
            finish(s, None if s.events == expected_events else f"{s.events} events")

    while finished < a.n:
        now = time.perf_counter()
        # A bounded batch of starts per round, so that a burst's first streams are read while later ones connect
        # (otherwise a 2,000-stream burst would add its whole connect loop to every first-event time).
        batch = 0
        while next_i < a.n and streams[next_i].sched <= now and batch < START_BATCH:
            start(streams[next_i])
            next_i += 1
            batch += 1
            now = time.perf_counter()
        if now >= next_sample:
            st = status_sum(pids)
            peak_threads = max(peak_threads, st["Threads"])
            peak_rss_sampled = max(peak_rss_sampled, st["VmRSS"])
            next_sample = now + SAMPLE_EVERY_S
        if now >= next_timeout_scan:
            for s in list(active.values()):
                if now - s.start > a.timeout:
                    finish(s, "timeout")
            next_timeout_scan = now + 0.5
        wait = 0.05
        if batch == START_BATCH:
            wait = 0.0
        elif next_i < a.n:
            wait = max(0.0, min(wait, streams[next_i].sched - now))
        for key, mask in sel.select(timeout=wait):
            on_ready(key.data, mask)
    wall = time.perf_counter() - t0
    end_epoch = time.time()

    after = status_sum(pids)
    cpu = cpu_seconds(pids) - cpu0
    up_cpu = cpu_seconds(up_pids) - up_cpu0 if up_pids else None
    net1 = listen_counters()
    self1 = resource.getrusage(resource.RUSAGE_SELF)
    sel.close()

    completed = [s for s in streams if s.status == 200 and s.done and s.error is None]
    refused = [s for s in streams if s.status is not None and s.status != 200]
    classified = {s.i for s in completed} | {s.i for s in refused}
    broken = [s for s in streams if s.i not in classified]
    ms = lambda t, s: (t - s.start) * 1e3  # noqa: E731
    firsts = [ms(s.first, s) for s in streams if s.first is not None and s.status == 200]
    lasts = [ms(s.last, s) for s in completed]
    connects = [ms(s.connected, s) for s in streams if s.connected is not None]
    lags = [(s.start - s.sched) * 1e3 for s in streams if s.start is not None]
    refusals = [ms(s.status_at, s) for s in refused]
    # Streams open at once (between their first and last event), at the busiest moment: what the server really
    # held, which is less than N when it refuses or queues.
    spans = [s for s in streams if s.first is not None and s.last is not None]
    edges = sorted([(s.first, 1) for s in spans] + [(s.last, -1) for s in spans])
    open_now = peak_open = 0
    for _, step in edges:
        open_now += step
        peak_open = max(peak_open, open_now)
    errors = {}
    for s in broken:
        key = s.error or "unknown"
        errors[key] = errors.get(key, 0) + 1
    statuses = {}
    for s in refused:
        statuses[str(s.status)] = statuses.get(str(s.status), 0) + 1
    events_total = sum(s.events for s in streams)
    peak_kib = max(after["VmHWM"], peak_rss_sampled) if hwm_reset else peak_rss_sampled
    load_cpu = (self1.ru_utime + self1.ru_stime) - (self0.ru_utime + self0.ru_stime)
    r = lambda v, d=1: None if v is None else round(v, d)  # noqa: E731
    out = {
        "target": a.name, "scenario": a.scenario, "n": a.n, "ramp_s": a.ramp_s, "events_per_stream": a.events,
        "event_delay_ms": a.event_delay_ms, "timeout_s": a.timeout,
        "completed": len(completed), "refused": len(refused), "broken": len(broken),
        "refused_statuses": statuses, "broken_reasons": errors,
        "first_event_ms_p50": r(percentile(firsts, 50)), "first_event_ms_p99": r(percentile(firsts, 99)),
        "first_event_ms_max": r(max(firsts) if firsts else None),
        "last_event_ms_p50": r(percentile(lasts, 50)), "last_event_ms_p99": r(percentile(lasts, 99)),
        "last_event_ms_max": r(max(lasts) if lasts else None),
        "refused_ms_p50": r(percentile(refusals, 50)), "refused_ms_p99": r(percentile(refusals, 99)),
        "streams_open_peak": peak_open,
        "connect_ms_p50": r(percentile(connects, 50), 2), "connect_ms_p99": r(percentile(connects, 99), 2),
        "connect_ms_max": r(max(connects) if connects else None, 2),
        "start_lag_ms_p99": r(percentile(lags, 99), 2), "start_lag_ms_max": r(max(lags) if lags else None, 2),
        "events_received": events_total,
        "wall_s": round(wall, 3), "end_epoch": end_epoch,
        "pids": pids, "processes": len(pids),
        "idle_rss_kib": idle["VmRSS"], "peak_rss_kib": peak_kib, "peak_rss_from_vmhwm": hwm_reset,
        "rss_per_stream_kib": round((peak_kib - idle["VmRSS"]) / a.n, 2),
        "rss_per_open_stream_kib": round((peak_kib - idle["VmRSS"]) / peak_open, 2) if peak_open else None,
        "rss_after_run_kib": after["VmRSS"],
        "threads_idle": idle["Threads"], "threads_peak": peak_threads, "threads_after_run": after["Threads"],
        "server_cpu_s": round(cpu, 3),
        "cpu_us_per_event": round(cpu / events_total * 1e6, 2) if events_total else None,
        "upstream_cpu_cores": round(up_cpu / wall, 3) if up_cpu is not None and wall > 0 else None,
        "loadgen_cpu_cores": round(load_cpu / wall, 3) if wall > 0 else None,
        "listen_overflows": (net1.get("ListenOverflows") or 0) - (net0.get("ListenOverflows") or 0),
        "listen_drops": (net1.get("ListenDrops") or 0) - (net0.get("ListenDrops") or 0),
    }
    with open(a.out, "w") as f:
        json.dump(out, f, indent=1)
    with open(a.out + ".rows", "w") as f:
        f.write("i start_s connect_ms first_ms last_ms status events done error\n")
        for s in streams:
            f.write(" ".join(str(x) for x in (
                s.i, None if s.start is None else round(s.start - t0, 4),
                None if s.connected is None else round(ms(s.connected, s), 2),
                None if s.first is None else round(ms(s.first, s), 2),
                None if s.last is None else round(ms(s.last, s), 2),
                s.status, s.events, int(s.done), json.dumps(s.error))) + "\n")
    print(f"    {a.scenario:<11} {a.name:<12} completed {out['completed']:>5}  refused {out['refused']:>5}  "
          f"broken {out['broken']:>5}  first p50/p99 {fmt(out['first_event_ms_p50'])}/"
          f"{fmt(out['first_event_ms_p99'])} ms  last p50/p99 {fmt(out['last_event_ms_p50'])}/"
          f"{fmt(out['last_event_ms_p99'])} ms  peak RSS {peak_kib / 1024:.1f} MiB  threads {peak_threads}  "
          f"overflows {out['listen_overflows']}  load-gen cpu {out['loadgen_cpu_cores']}", file=sys.stderr)


# --------------------------------------------------------------------------------------------------------
# Settle and report
# --------------------------------------------------------------------------------------------------------

def cmd_settle(a):
    runs = []
    for path in a.files:
        with open(path) as f:
            runs.append((json.load(f), path))
    for run, path in sorted(runs, key=lambda x: x[0]["end_epoch"]):
        wait = run["end_epoch"] + a.settle - time.time()
        if wait > 0:
            time.sleep(wait)
        st = status_sum(run["pids"])
        run["settle_s"] = a.settle
        run["rss_settled_kib"] = st["VmRSS"]
        run["threads_settled"] = st["Threads"]
        with open(path, "w") as f:
            json.dump(run, f, indent=1)


def fmt(v, digits=0, unit=""):
    return "n/a" if v is None else f"{v:,.{digits}f}{unit}"


NAMES = {"direct": "direct (upstream)", "nginx": "nginx", "proxy": "azure-proxy"}


def cmd_report(a):
    runs = []
    for path in a.files:
        with open(path) as f:
            runs.append(json.load(f))
    meta = {}
    if a.meta:
        with open(a.meta) as f:
            meta = json.load(f)
    mib = lambda k: "n/a" if k is None else f"{k / 1024:.1f} MiB"  # noqa: E731
    L = ["## Concurrent streams (SSE)", ""]
    settle = next((r.get("settle_s") for r in runs if r.get("settle_s") is not None), None)
    first = runs[0] if runs else {}
    L.append(f"Each stream: `POST` with `stream: true`, {first.get('events_per_stream', '?')} `data:` events "
             f"{first.get('event_delay_ms', '?')} ms apart + `data: [DONE]` from `sse_upstream` (one epoll thread, "
             f"3 ports). `ramp N` = N streams started evenly over {meta.get('ramp_s', '?')} s, `burst N` = all at "
             f"once; per scenario the targets run one after the other (direct first, to show the load generator "
             f"keeps up), each on a freshly started server. Times from just before connect; first event over the "
             f"streams that got one, last event over the completed ones. azure-proxy: "
             f"{meta.get('proxy_config', 'default configuration')}. nginx: {meta.get('nginx_config', '?')}."
             + (" Listen backlogs in effect: " + ", ".join(f"{NAMES.get(k, k)} {v}" for k, v in
                                                         meta["listen_backlog"].items()) + "."
                if meta.get("listen_backlog") else ""))
    L.append("")
    L.append("| scenario | target | completed / refused / broken | first event p50 / p99 | last event p50 / p99 | "
             "idle RSS | peak RSS | RSS per stream | RSS " + (f"{settle:g} s after" if settle is not None else "after") +
             " | CPU per event | threads peak / after | listen overflows |")
    L.append("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for x in runs:
        settled_rss = x.get("rss_settled_kib", x.get("rss_after_run_kib"))
        settled_thr = x.get("threads_settled", x.get("threads_after_run"))
        L.append(
            f"| {x['scenario']} | {NAMES.get(x['target'], x['target'])} | {x['completed']} / {x['refused']} / "
            f"{x['broken']} | {fmt(x['first_event_ms_p50'], 1)} / {fmt(x['first_event_ms_p99'], 1)} ms | "
            f"{fmt(x['last_event_ms_p50'] and x['last_event_ms_p50'] / 1e3, 2)} / "
            f"{fmt(x['last_event_ms_p99'] and x['last_event_ms_p99'] / 1e3, 2)} s | {mib(x['idle_rss_kib'])} | "
            f"{mib(x['peak_rss_kib'])} | "
            f"{fmt(x['rss_per_stream_kib'], 1)} KiB | {mib(settled_rss)} | {fmt(x['cpu_us_per_event'], 1)} µs | "
            f"{x['threads_peak']} / {settled_thr} | {x['listen_overflows']} |")
    L.append("")
    L.append("| scenario | target | refused statuses (after p50 / p99) | broken because | streams open at peak "
             "(RSS per open stream) | connect p99 / max | upstream CPU | load-generator CPU (start lag max) | wall |")
    L.append("|---|---|---|---|---:|---:|---:|---:|---:|")
    for x in runs:
        st = ", ".join(f"{k}: {v}" for k, v in sorted(x["refused_statuses"].items())) or "—"
        if x["refused"]:
            st += f" ({fmt(x.get('refused_ms_p50'), 1)} / {fmt(x.get('refused_ms_p99'), 1)} ms)"
        br = ", ".join(f"{k}: {v}" for k, v in sorted(x["broken_reasons"].items())) or "—"
        L.append(f"| {x['scenario']} | {NAMES.get(x['target'], x['target'])} | {st} | {br} | "
                 f"{x.get('streams_open_peak', 'n/a')} ({fmt(x.get('rss_per_open_stream_kib'), 1)} KiB) | "
                 f"{fmt(x['connect_ms_p99'], 1)} / {fmt(x['connect_ms_max'], 1)} ms | "
                 f"{fmt(x['upstream_cpu_cores'], 2)} | {fmt(x['loadgen_cpu_cores'], 2)} "
                 f"({fmt(x['start_lag_ms_max'], 1)} ms) | {fmt(x['wall_s'], 1)} s |")
    L.append("")
    L.append("peak RSS = VmHWM summed over the server's processes (nginx: master + workers; direct: the upstream), "
             "reset at the start of each run; a sum over processes counts shared pages once per process, so compare "
             "nginx by RSS per stream. RSS per stream = (peak − RSS before the run) ÷ N; per open stream: ÷ the most "
             "streams that were between their first and last event at one moment. refused after = connect to the "
             "status line. CPU per event = the server's utime+stime over the run ÷ events received by the clients. "
             "threads = /proc Threads summed, sampled every 100 ms. listen overflows = TcpExtListenOverflows during "
             "the run: counted for the whole network namespace, so other activity on the machine adds to it. For "
             "direct, the settled figures are taken while the upstream serves the later targets.")
    L.append("")
    md = "\n".join(L) + "\n"
    doc = {"settings": meta, "runs": runs}
    with open(a.md, "w") as f:
        f.write(md)
    with open(a.json, "w") as f:
        json.dump(doc, f, indent=2)
        f.write("\n")
    sys.stdout.write(md)


def main():
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run")
    r.add_argument("--target", required=True, help="127.0.0.1:PORT")
    r.add_argument("--name", required=True, help="direct, nginx or proxy")
    r.add_argument("--scenario", required=True)
    r.add_argument("--key", required=True)
    r.add_argument("--header", default="api-key")
    r.add_argument("--n", type=int, required=True)
    r.add_argument("--ramp-s", type=float, default=1.0)
    r.add_argument("--events", type=int, default=20, help="data events per stream before [DONE]")
    r.add_argument("--event-delay-ms", type=int, default=500, help="recorded only")
    r.add_argument("--timeout", type=float, default=120, help="seconds a stream may take from its connect")
    r.add_argument("--pids", type=int, nargs="+", required=True, help="server processes (children included)")
    r.add_argument("--upstream-pids", type=int, nargs="*")
    r.add_argument("--out", required=True)
    s = sub.add_parser("settle")
    s.add_argument("files", nargs="+")
    s.add_argument("--settle", type=float, default=60)
    m = sub.add_parser("report")
    m.add_argument("files", nargs="+")
    m.add_argument("--meta")
    m.add_argument("--md", required=True)
    m.add_argument("--json", required=True)
    a = p.parse_args()
    if a.cmd == "run":
        if a.n < 1:
            sys.exit("streams: --n must be at least 1")
        cmd_run(a)
    elif a.cmd == "settle":
        cmd_settle(a)
    else:
        cmd_report(a)


if __name__ == "__main__":
    main()
