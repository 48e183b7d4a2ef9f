#!/usr/bin/env python3
"""Parses wrk output and assembles bench/results/latest.{md,json} (Python 3 stdlib only).

  report.py wrk FILE --target T --conns N --round R [--upstream-cpu X] [--server-cpu X]
      prints one JSON line for one wrk run (bench/run.sh appends it to WORK/wrk.jsonl)
  report.py assemble WORK --md OUT.md --json OUT.json [--streams-md MD --streams-json JSON]
      reads WORK/{wrk.jsonl,meta.json,stream.json,streams.json,startup.json,memory.json}, writes both files
      (with bench/streams.sh's concurrent-streams section when given)
"""

import argparse
import json
import os
import re
import statistics
import sys

TARGET_NAMES = {"direct": "direct (upstream nginx)", "nginx": "nginx reverse proxy", "proxy": "azure-proxy"}
UNIT_US = {"us": 1.0, "ms": 1e3, "s": 1e6, "m": 60e6, "h": 3600e6}
MIB = 1024 * 1024


def to_us(text):
    """wrk prints latencies as e.g. 87.00us, 1.23ms, 2.01s, 1.00m: all to microseconds."""
    m = re.fullmatch(r"([0-9.]+)(us|ms|s|m|h)", text.strip())
    if not m:
        raise ValueError(f"unparseable wrk latency {text!r}")
    return float(m.group(1)) * UNIT_US[m.group(2)]


def parse_wrk(text):
    """Figures of one wrk run. Exact values from post.lua's done() line when present; otherwise wrk's text,
    with every latency unit converted to microseconds."""
    r = {}
    m = re.search(r"^BENCH_WRK (.*)$", text, re.M)
    if m:
        kv = dict(item.split("=", 1) for item in m.group(1).split())
        dur_s = int(kv["duration_us"]) / 1e6
        r["requests"] = int(kv["requests"])
        r["rps"] = r["requests"] / dur_s if dur_s > 0 else 0.0
        r["p50_us"] = float(kv["p50_us"])
        r["p90_us"] = float(kv["p90_us"])
        r["p99_us"] = float(kv["p99_us"])
        r["max_us"] = float(kv["max_us"])
        r["non2xx"] = int(kv["status"])
        r["socket_errors"] = sum(int(kv[k]) for k in ("connect", "read", "write", "timeout"))
        r["source"] = "lua"
    else:
        rps = re.search(r"^Requests/sec:\s+([0-9.]+)", text, re.M)
        if not rps:
            raise ValueError("no Requests/sec in wrk output")
        r["rps"] = float(rps.group(1))
        reqs = re.search(r"^\s*(\d+) requests in", text, re.M)
        r["requests"] = int(reqs.group(1)) if reqs else None
        for pct, key in (("50", "p50_us"), ("90", "p90_us"), ("99", "p99_us")):
            pm = re.search(rf"^\s+{pct}(?:\.000)?%\s+(\S+)", text, re.M)
            r[key] = to_us(pm.group(1)) if pm else None
        non2xx = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", text)
        r["non2xx"] = int(non2xx.group(1)) if non2xx else 0
        sock = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", text)
        r["socket_errors"] = sum(int(x) for x in sock.groups()) if sock else 0
        r["source"] = "text"
    r["errors"] = r["non2xx"] + r["socket_errors"]
    return r


def cmd_wrk(a):
    with open(a.file) as f:
        text = f.read()
    r = parse_wrk(text)
    r.update({"target": a.target, "conns": a.conns, "round": a.round, "upstream_cpu_cores": a.upstream_cpu,
              "upstream_busiest_process_cores": a.upstream_busiest, "server_cpu_cores": a.server_cpu})
    print(json.dumps(r))


# --------------------------------------------------------------------------------------------------------

def load(path, default=None):
    try:
        with open(path) as f:
            return json.load(f)
    except FileNotFoundError:
        return default


def med(values):
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def fmt(v, digits=0, unit=""):
    if v is None:
        return "n/a"
    return f"{v:,.{digits}f}{unit}"


def status(ok):
    return "n/a" if ok is None else ("**met**" if ok else "**missed**")


def cmp(value, limit, op):
    if value is None:
        return None
    return value >= limit if op == ">=" else value <= limit


def cmd_assemble(a):
    work = a.work
    meta = load(os.path.join(work, "meta.json"), {})
    runs = []
    wrk_path = os.path.join(work, "wrk.jsonl")
    if os.path.exists(wrk_path):
        with open(wrk_path) as f:
            runs = [json.loads(line) for line in f if line.strip()]
    stream = load(os.path.join(work, "stream.json"))
    streams = load(os.path.join(work, "streams.json"))
    startup = load(os.path.join(work, "startup.json"))
    memory = load(os.path.join(work, "memory.json"), {})

    conns_list = sorted({r["conns"] for r in runs})
    load_summary = {}
    for c in conns_list:
        per = {}
        for t in ("direct", "nginx", "proxy"):
            rs = [r for r in runs if r["conns"] == c and r["target"] == t]
            if not rs:
                continue
            per[t] = {
                "rps": med([r["rps"] for r in rs]),
                "p50_us": med([r["p50_us"] for r in rs]),
                "p99_us": med([r["p99_us"] for r in rs]),
                "errors": med([r["errors"] for r in rs]),
                "errors_total": sum(r["errors"] for r in rs),
                "upstream_cpu_cores": med([r.get("upstream_cpu_cores") for r in rs]),
                "upstream_busiest_process_cores": med([r.get("upstream_busiest_process_cores") for r in rs]),
                "server_cpu_cores": med([r.get("server_cpu_cores") for r in rs]),
                "rounds": len(rs),
            }
        d, n, p = per.get("direct"), per.get("nginx"), per.get("proxy")
        ratios = {}
        if p and d:
            ratios["proxy_over_direct_rps"] = p["rps"] / d["rps"] if d["rps"] else None
            ratios["proxy_added_p50_us"] = p["p50_us"] - d["p50_us"]
            ratios["proxy_added_p99_us"] = p["p99_us"] - d["p99_us"]
        if p and n:
            ratios["proxy_over_nginx_rps"] = p["rps"] / n["rps"] if n["rps"] else None
        if n and d:
            ratios["nginx_over_direct_rps"] = n["rps"] / d["rps"] if d["rps"] else None
            ratios["nginx_added_p50_us"] = n["p50_us"] - d["p50_us"]
            ratios["nginx_added_p99_us"] = n["p99_us"] - d["p99_us"]
        load_summary[str(c)] = {"median": per, "ratios": ratios}

    def ratio(c, key):
        return load_summary.get(str(c), {}).get("ratios", {}).get(key)

    static_bytes = memory.get("static_binary_bytes")
    targets = [
        ("req/s at 16 connections vs nginx", ratio(16, "proxy_over_nginx_rps"), ">=", 1.0, "{:.2f}×", "≥ 1.0×"),
        ("req/s at 64 connections vs nginx", ratio(64, "proxy_over_nginx_rps"), ">=", 1.0, "{:.2f}×", "≥ 1.0×"),
        ("added p50 over direct at 16 connections", ratio(16, "proxy_added_p50_us"), "<=", 100, "{:.0f} µs",
         "≤ 100 µs"),
        ("added p99 over direct at 16 connections", ratio(16, "proxy_added_p99_us"), "<=", 1000, "{:.0f} µs",
         "≤ 1 ms"),
        ("added time to first SSE event", stream and stream.get("added_first_event_ms"), "<=", 1.0, "{:.3f} ms",
         "≤ 1 ms"),
        ("idle RSS", memory.get("idle_rss_kib") and memory["idle_rss_kib"] / 1024, "<=", 4.0, "{:.2f} MiB",
         "≤ 4 MiB"),
        ("RSS with 256 streams open", streams and streams.get("rss_kib") and streams["rss_kib"] / 1024, "<=", 64.0,
         "{:.2f} MiB", "≤ 64 MiB"),
        ("static binary size", static_bytes and static_bytes / MIB, "<=", 3.0, "{:.2f} MiB", "≤ 3 MiB"),
        ("start to first served request", startup and startup.get("ms_median"), "<=", 20.0, "{:.1f} ms",
         "≤ 20 ms"),
    ]
    target_rows = []
    for name, value, op, limit, vfmt, goal in targets:
        ok = cmp(value, limit, op)
        target_rows.append({"target": name, "value": value, "goal": goal, "met": ok})

    # ------------------------------------------------------------------------------------------ Markdown
    L = []
    L.append("# azure-proxy benchmark")
    L.append("")
    L.append(f"{meta.get('date', '?')} · {meta.get('nproc', '?')} CPUs ({meta.get('cpu_model', '?')}) · "
             f"kernel {meta.get('kernel', '?')} · commit {meta.get('git_commit', '?')}"
             f"{' (dirty tree)' if meta.get('git_dirty') else ''}")
    L.append("")
    L.append(f"Command: `{meta.get('command', '?')}` · {meta.get('rounds', '?')} round(s) × "
             f"{meta.get('duration_s', '?')} s per figure, rounds interleaved (direct, nginx, azure-proxy, …), "
             f"medians shown · upstream: nginx `worker_processes {meta.get('upstream_workers', '?')}`, "
             f"~{meta.get('upstream_body_bytes', '?')}-byte JSON on 3 ports · everything on 127.0.0.1, "
             f"load generator on the same machine.")
    L.append("")
    L.append("## Targets")
    L.append("")
    L.append("| target | measured | goal | |")
    L.append("|---|---:|---|---|")
    for (name, value, op, limit, vfmt, goal), row in zip(targets, target_rows):
        L.append(f"| {name} | {'n/a' if value is None else vfmt.format(value)} | {goal} | {status(row['met'])} |")
    L.append("")
    negative = [k for k in ("proxy_added_p50_us", "proxy_added_p99_us") if (ratio(16, k) or 0) < 0]
    if negative:
        L.append("Note: at 16 connections the direct run's " + " and ".join(k.split("_")[2] for k in negative)
                 + " is worse than azure-proxy's, so the \"added\" figure is negative and says little: the direct "
                 "run's tail is dominated by wrk and the upstream competing for the same cores.")
        L.append("")
    L.append("## Throughput and latency (wrk, POST chat completion, keep-alive)")
    L.append("")
    L.append("| conns | target | req/s | p50 | p99 | errors | upstream CPU (busiest worker) | server CPU |")
    L.append("|---:|---|---:|---:|---:|---:|---:|---:|")
    for c in conns_list:
        per = load_summary[str(c)]["median"]
        for t in ("direct", "nginx", "proxy"):
            if t not in per:
                continue
            x = per[t]
            server = "—" if t == "direct" else fmt(x["server_cpu_cores"], 2)
            L.append(f"| {c} | {TARGET_NAMES[t]} | {fmt(x['rps'])} | {fmt(x['p50_us'])} µs | "
                     f"{fmt(x['p99_us'])} µs | {x['errors_total']} | {fmt(x['upstream_cpu_cores'], 2)} "
                     f"({fmt(x['upstream_busiest_process_cores'], 2)}) | "
                     f"{server} |")
    L.append("")
    L.append("| conns | azure-proxy / direct req/s | azure-proxy / nginx req/s | azure-proxy added p50 / p99 | "
             "nginx added p50 / p99 |")
    L.append("|---:|---:|---:|---:|---:|")
    for c in conns_list:
        r = load_summary[str(c)]["ratios"]
        L.append(f"| {c} | {fmt(r.get('proxy_over_direct_rps'), 2, '×')} | {fmt(r.get('proxy_over_nginx_rps'), 2, '×')}"
                 f" | {fmt(r.get('proxy_added_p50_us'), 0, ' µs')} / {fmt(r.get('proxy_added_p99_us'), 0, ' µs')}"
                 f" | {fmt(r.get('nginx_added_p50_us'), 0, ' µs')} / {fmt(r.get('nginx_added_p99_us'), 0, ' µs')} |")
    L.append("")
    L.append("errors = non-2xx responses + socket errors, summed over all rounds. CPU = cores used during the run "
             "(/proc utime+stime; the upstream's busiest single process in brackets: near 1.00 would mean that "
             "nginx worker was saturated); server = the nginx reverse proxy or azure-proxy.")
    L.append("")
    L.append("## Streaming (SSE)")
    L.append("")
    if stream:
        d, p = stream["direct"], stream["proxy"]
        L.append(f"{stream['events_expected']} events, {meta.get('stream_delay_ms', '?')} ms apart, from the mock "
                 f"instance; median of {stream['reps']} requests each, interleaved; the clock starts before connect.")
        L.append("")
        L.append("| | direct to the mock | through azure-proxy | added |")
        L.append("|---|---:|---:|---:|")
        L.append(f"| time to first event | {fmt(d['first_event_ms_median'], 3, ' ms')} | "
                 f"{fmt(p['first_event_ms_median'], 3, ' ms')} | {fmt(stream.get('added_first_event_ms'), 3, ' ms')} |")
        L.append(f"| time to last event | {fmt(d['last_event_ms_median'], 3, ' ms')} | "
                 f"{fmt(p['last_event_ms_median'], 3, ' ms')} | {fmt(stream.get('added_last_event_ms'), 3, ' ms')} |")
        bad = len(d["failed"]) + len(p["failed"])
        if bad:
            L.append("")
            L.append(f"**{bad} streamed request(s) failed or had the wrong number of events** (see latest.json).")
    else:
        L.append("not measured")
    L.append("")
    L.append("## Memory, size, start-up")
    L.append("")
    L.append("| figure | value |")
    L.append("|---|---:|")
    kib = lambda v: "n/a" if v is None else f"{v / 1024:.2f} MiB"  # noqa: E731
    L.append(f"| idle RSS after start (VmRSS) | {kib(memory.get('idle_rss_kib'))} |")
    L.append(f"| peak RSS under the 64-connection load (VmHWM) | {kib(memory.get('peak_rss_64_kib'))} |")
    if streams:
        L.append(f"| RSS with {streams['streams']} slow streams open ({streams['with_first_event']} got their first "
                 f"event; `--workers {meta.get('streams_workers', '?')}`) | {kib(streams.get('rss_kib'))} |")
    else:
        L.append("| RSS with 256 slow streams open | n/a |")
    static_txt = "n/a"
    if static_bytes is not None:
        static_txt = f"{static_bytes:,} bytes (file from {memory.get('static_binary_mtime') or '?'})"
    L.append(f"| static binary (musl) | {static_txt} |")
    L.append(f"| dynamic release binary | {fmt(memory.get('release_binary_bytes'), 0, ' bytes')} |")
    su = "n/a"
    if startup and startup.get("ms_median") is not None:
        su = f"{startup['ms_median']:.1f} ms (median of {len(startup['ms'])})"
    L.append(f"| process start → first served `GET /healthz` | {su} |")
    L.append("")
    md = "\n".join(L) + "\n"
    if a.streams_md:  # the concurrent-streams section, as bench/streams.sh wrote it
        with open(a.streams_md) as f:
            md += "\n" + f.read()

    doc = {
        "machine": {k: meta.get(k) for k in ("nproc", "cpu_model", "kernel", "date", "hostname")},
        "command": meta.get("command"),
        "settings": {k: v for k, v in meta.items() if k not in ("nproc", "cpu_model", "kernel", "date", "hostname",
                                                                  "command")},
        "load": {"summary": load_summary, "runs": runs},
        "streaming": stream,
        "streams_256": streams,
        "startup": startup,
        "memory_and_size": memory,
        "targets": target_rows,
        "concurrent_streams": load(a.streams_json) if a.streams_json else None,
    }
    os.makedirs(os.path.dirname(os.path.abspath(a.md)), exist_ok=True)
    with open(a.md, "w") as f:
        f.write(md)
    with open(a.json, "w") as f:
        json.dump(doc, f, indent=2)
        f.write("\n")
    sys.stdout.write(md)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    w = sub.add_parser("wrk")
    w.add_argument("file")
    w.add_argument("--target", required=True, choices=sorted(TARGET_NAMES))
    w.add_argument("--conns", type=int, required=True)
    w.add_argument("--round", type=int, required=True)
    w.add_argument("--upstream-cpu", type=float)
    w.add_argument("--upstream-busiest", type=float)
    w.add_argument("--server-cpu", type=float)
    s = sub.add_parser("assemble")
    s.add_argument("work")
    s.add_argument("--md", required=True)
    s.add_argument("--json", required=True)
    s.add_argument("--streams-md", help="bench/streams.sh's Markdown, appended")
    s.add_argument("--streams-json", help="bench/streams.sh's JSON, included as concurrent_streams")
    a = p.parse_args()
    cmd_wrk(a) if a.cmd == "wrk" else cmd_assemble(a)


if __name__ == "__main__":
    main()
