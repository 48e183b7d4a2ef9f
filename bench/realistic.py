#!/usr/bin/env python3
"""Figures of bench/realistic.sh (Python 3 stdlib only): one JSON line per run, then the report.

  realistic.py closed WRK_OUT --target T --conns N --round R --clk-tck HZ --cpu-ticks N --upstream-cpu-ticks N
                --dns-queries N --handshakes "F0 R0" "F1 R1" --threads T0 T1 --warnings N
      one measured wrk run (counters taken around it by the script) -> one JSON line
  realistic.py count PREFIX --target T --conns N --tool perf|strace
      PREFIX.wrk + PREFIX.perf (perf stat -x,) or PREFIX.strace (strace -c) -> syscalls and context switches per request
  realistic.py open OHA_JSON --db OHA_DB --skip-s S --target T --rate Q --cpu-ticks N --clk-tck HZ
      one oha run (its JSON summary and its --db-url table of requests) -> one JSON line
  realistic.py show-closed | show-open      one JSON line on stdin -> one progress line
  realistic.py assemble WORK --md OUT.md --json OUT.json
"""

import argparse
import json
import math
import os
import sqlite3
import statistics
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from report import parse_wrk  # noqa: E402  (the same wrk parser as the plain benchmark)

NAMES = {"direct": "direct", "nginx": "nginx", "proxy": "azure-proxy"}


def read(path):
    with open(path) as f:
        return f.read()


def jsonl(path):
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def per(value, n, scale=1.0):
    return value * scale / n if n else None


# ------------------------------------------------------------------------------------------------------------

def cmd_closed(a):
    r = parse_wrk(read(a.file))
    n = r["requests"]
    full = int(a.handshakes[1].split()[0]) - int(a.handshakes[0].split()[0])
    resumed = int(a.handshakes[1].split()[1]) - int(a.handshakes[0].split()[1])
    duration_s = n / r["rps"] if r["rps"] else None
    r.update({
        "target": a.target, "conns": a.conns, "round": a.round,
        "cpu_us_per_request": per(a.cpu_ticks, n, 1e6 / a.clk_tck),
        "server_cpu_cores": a.cpu_ticks / a.clk_tck / duration_s if duration_s else None,
        "upstream_cpu_cores": a.upstream_cpu_ticks / a.clk_tck / duration_s if duration_s else None,
        "dns_queries": a.dns_queries, "dns_queries_per_request": per(a.dns_queries, n),
        "handshakes_full": full, "handshakes_resumed": resumed,
        "handshakes_per_10k": per(full + resumed, n, 1e4), "full_handshakes_per_10k": per(full, n, 1e4),
        "threads_before": a.threads[0], "threads_after": a.threads[1], "log_warnings": a.warnings,
    })
    print(json.dumps(r))


def cmd_show_closed(_):
    r = json.loads(sys.stdin.readline())
    print(f"    c={r['conns']:<3} round {r['round']} {NAMES[r['target']]:<11} {r['rps']:>8.0f} req/s"
          f"  p50 {r['p50_us']:>6.0f} us  p99 {r['p99_us']:>6.0f} us  CPU {fmt(r['cpu_us_per_request'], 1)} us/req"
          f"  handshakes {r['handshakes_full']}+{r['handshakes_resumed']}r  DNS {r['dns_queries']}"
          f"  errors {r['errors']}  threads {r['threads_before']}->{r['threads_after']}")


def parse_perf(text):
    """perf stat -x, lines: value,unit,event,...; '<not counted>' and comments give None."""
    out = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        f = line.split(",")
        if len(f) >= 3:
            try:
                out[f[2]] = float(f[0])
            except ValueError:
                out[f[2]] = None
    return out.get("raw_syscalls:sys_enter"), out.get("context-switches"), {}


def parse_strace(text):
    """strace -c's table: per-syscall calls, and the total line."""
    calls, total = {}, None
    for line in text.splitlines():
        f = line.split()
        if len(f) >= 5 and f[0].replace(".", "").isdigit() and f[3].isdigit():
            if f[-1] == "total":
                total = float(f[3])
            else:
                calls[f[-1]] = int(f[3])
    return total, None, calls


def cmd_count(a):
    wrk = parse_wrk(read(a.prefix + ".wrk"))
    n = wrk["requests"]
    if a.tool == "perf":
        syscalls, switches, calls = parse_perf(read(a.prefix + ".perf"))
    else:
        syscalls, switches, calls = parse_strace(read(a.prefix + ".strace"))
    print(json.dumps({
        "target": a.target, "conns": a.conns, "tool": a.tool, "requests": n, "rps": wrk["rps"],
        "syscalls_per_request": per(syscalls, n) if syscalls is not None else None,
        "context_switches_per_request": per(switches, n) if switches is not None else None,
        "syscalls_by_name_per_request": {k: v / n for k, v in sorted(calls.items(), key=lambda kv: -kv[1])} if n else {},
    }))


def corrected_latencies_us(db, skip_s):
    """Latencies of oha's succeeded requests (its --db-url table), each from the time it was due (latency
    correction) to its end, leaving out the requests due in the first skip_s seconds: every connection is set up
    then (for direct, a TLS handshake each), and that burst is no part of a steady rate."""
    con = sqlite3.connect(db)
    try:
        rows = con.execute("SELECT end - COALESCE(start_latency_correction, start) FROM oha "
                           "WHERE COALESCE(start_latency_correction, start) >= ?", (skip_s,)).fetchall()
    finally:
        con.close()
    return sorted(r[0] * 1e6 for r in rows)


def nearest_rank(sorted_values, pct):
    if not sorted_values:
        return None
    k = max(0, min(len(sorted_values) - 1, math.ceil(pct / 100 * len(sorted_values)) - 1))
    return sorted_values[k]


def cmd_open(a):
    o = json.loads(read(a.file))
    s = o.get("summary", {})
    codes = o.get("statusCodeDistribution", {}) or {}
    errors = o.get("errorDistribution", {}) or {}
    # Requests still in flight when the duration ends are cut off by oha itself, not failed by the server.
    cut = errors.pop("aborted due to deadline", 0)
    ok = sum(v for k, v in codes.items() if str(k).startswith("2"))
    failed = sum(v for k, v in codes.items() if not str(k).startswith("2")) + sum(errors.values())
    lat = corrected_latencies_us(a.db, a.skip_s)
    print(json.dumps({
        "target": a.target, "rate": a.rate, "achieved_rps": s.get("requestsPerSec"),
        "ok": ok, "errors": failed, "error_kinds": errors, "cut_at_deadline": cut,
        "skip_s": a.skip_s, "counted": len(lat),
        "p50_us": nearest_rank(lat, 50), "p99_us": nearest_rank(lat, 99), "p99_9_us": nearest_rank(lat, 99.9),
        "max_us": lat[-1] if lat else None,
        "cpu_us_per_request": per(a.cpu_ticks, ok, 1e6 / a.clk_tck) if a.target != "direct" else None,
    }))


def cmd_show_open(_):
    r = json.loads(sys.stdin.readline())
    print(f"    rate {r['rate']:>6} {NAMES[r['target']]:<11} achieved {fmt(r['achieved_rps'])} req/s  p50 "
          f"{fmt(r['p50_us'])} us  p99 {fmt(r['p99_us'])} us  p99.9 {fmt(r['p99_9_us'])} us  errors {r['errors']}")


# ------------------------------------------------------------------------------------------------------------

def med(values):
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def fmt(v, digits=0, unit=""):
    return "n/a" if v is None else f"{v:,.{digits}f}{unit}"


def ratio(a, b):
    return a / b if a is not None and b else None


def diff(a, b):
    return a - b if a is not None and b is not None else None


def summarize(work):
    closed, counts, opened = (jsonl(os.path.join(work, f)) for f in ("closed.jsonl", "counts.jsonl", "open.jsonl"))
    keys = ("rps", "p50_us", "p99_us", "cpu_us_per_request", "server_cpu_cores", "upstream_cpu_cores",
            "dns_queries_per_request", "handshakes_per_10k", "full_handshakes_per_10k")
    closed_sum = {}
    for c in sorted({r["conns"] for r in closed}):
        row = {}
        for t in ("nginx", "proxy"):
            rs = [r for r in closed if r["conns"] == c and r["target"] == t]
            if not rs:
                continue
            m = {k: med([r[k] for r in rs]) for k in keys}
            m["rounds"] = len(rs)
            m["errors_total"] = sum(r["errors"] for r in rs)
            m["requests_total"] = sum(r["requests"] for r in rs)
            m["dns_queries_total"] = sum(r["dns_queries"] for r in rs)
            m["handshakes_full_total"] = sum(r["handshakes_full"] for r in rs)
            m["handshakes_resumed_total"] = sum(r["handshakes_resumed"] for r in rs)
            m["log_warnings_total"] = sum(r["log_warnings"] for r in rs)
            cnt = [x for x in counts if x["conns"] == c and x["target"] == t]
            m["syscalls_per_request"] = cnt[0]["syscalls_per_request"] if cnt else None
            m["context_switches_per_request"] = cnt[0]["context_switches_per_request"] if cnt else None
            row[t] = m
        n, p = row.get("nginx", {}), row.get("proxy", {})
        row["ratios"] = {"rps_proxy_over_nginx": ratio(p.get("rps"), n.get("rps")),
                         "cpu_proxy_over_nginx": ratio(p.get("cpu_us_per_request"), n.get("cpu_us_per_request"))}
        closed_sum[str(c)] = row
    open_sum = {}
    for q in sorted({r["rate"] for r in opened}):
        row = {r["target"]: r for r in opened if r["rate"] == q}
        d = row.get("direct", {})
        for t in ("nginx", "proxy"):
            if t in row:
                row[t]["added_us"] = {k: diff(row[t].get(k), d.get(k)) for k in ("p50_us", "p99_us", "p99_9_us")}
        open_sum[str(q)] = row
    return closed, counts, opened, closed_sum, open_sum


def dns_pair(row):
    """Queries over all rounds ÷ requests over all rounds: a background refresh now and then, not a median of 0."""
    def one(t):
        m = row.get(t, {})
        return per(m.get("dns_queries_total"), m.get("requests_total")) if m else None
    return " / ".join("n/a" if v is None else (f"{v:.6f}" if v else "0") for v in (one("nginx"), one("proxy")))


def pair(row, key, digits=1):
    return f"{fmt(row.get('nginx', {}).get(key), digits)} / {fmt(row.get('proxy', {}).get(key), digits)}"


def profile(meta, work):
    path = os.path.join(work, "profile-top.txt")
    if not meta.get("profile") or not os.path.exists(path):
        return []
    lines = [line.rstrip() for line in read(path).splitlines() if line.strip()]
    return [f"## Where azure-proxy's CPU goes ({meta.get('profile_conns', 16)} connections)", "",
            "`perf record -g -p PID` during one extra wrk run, then `perf report --no-children --sort dso,sym`: "
            "the 15 busiest symbols (self time).", "", "```", *lines, "```", ""]


def markdown(meta, closed_sum, open_sum, counts, work):
    out = ["# azure-proxy realistic benchmark: HTTPS upstreams by host name, side by side with nginx", ""]
    out.append(f"Run {meta.get('date', '?')} on {meta.get('nproc', '?')} cores ({meta.get('cpu_model', '?')}), "
               f"kernel {meta.get('kernel', '?')}, commit {meta.get('git_commit', '?')}"
               f"{' (dirty)' if meta.get('git_dirty') else ''}; {meta.get('nginx', '')}, {meta.get('oha', '')}.")
    out.append("")
    out.append(f"Command: `{meta.get('command', '?')}`")
    out.append("")
    out.append("Three HTTPS instances (one nginx, TLS 1.3, a certificate from a CA the bench makes) named "
               f"`{meta.get('names', '')}`, known only to a DNS server on {meta.get('dns_server', '?')} that the "
               "bench starts; azure-proxy (default settings"
               f"{', plus ' + meta['proxy_settings'] if meta.get('proxy_settings') else ''}, `ca_bundle`) and nginx (`upstream` block, "
               "`keepalive 64`, `proxy_ssl_session_reuse on`) run in one private mount namespace whose "
               "resolv.conf names only that server. Everything, load generator included, shares the machine's "
               "cores: compare within the run. The machine was "
               f"{meta.get('cpu_busy_before_pct', '?')} % busy just before the measurements and "
               f"{meta.get('cpu_busy_after_pct', '?')} % just after (every server here idle; other work on the "
               "machine shows up as noise).")
    out.append("")
    out.append(f"## Closed loop (wrk, {meta.get('rounds', '?')} interleaved rounds × {meta.get('duration_s', '?')} s, "
               "medians)")
    out.append("")
    out.append("| conns | nginx req/s · CPU µs/req | azure-proxy req/s · CPU µs/req | ratio req/s · CPU "
               "| syscalls/req nginx / proxy | ctx switches/req nginx / proxy | upstream handshakes/10k nginx / proxy "
               "| DNS queries/req nginx / proxy |")
    out.append("|---:|---:|---:|---:|---:|---:|---:|---:|")
    for c, row in closed_sum.items():
        n, p, r = row.get("nginx", {}), row.get("proxy", {}), row["ratios"]
        out.append(
            f"| {c} | {fmt(n.get('rps'))} · {fmt(n.get('cpu_us_per_request'))} "
            f"| {fmt(p.get('rps'))} · {fmt(p.get('cpu_us_per_request'))} "
            f"| {fmt(r['rps_proxy_over_nginx'], 2, '×')} · {fmt(r['cpu_proxy_over_nginx'], 2, '×')} "
            f"| {pair(row, 'syscalls_per_request')} | {pair(row, 'context_switches_per_request', 2)} "
            f"| {pair(row, 'handshakes_per_10k', 2)} | {dns_pair(row)} |")
    out.append("")
    out.append("| conns | nginx p50 / p99 | azure-proxy p50 / p99 | errors nginx / proxy | nginx / proxy CPU "
               "(cores) | upstream CPU (cores) nginx / proxy runs | DNS queries nginx / proxy (all rounds) "
               "| handshakes full + resumed nginx / proxy (all rounds) |")
    out.append("|---:|---:|---:|---:|---:|---:|---:|---:|")
    for c, row in closed_sum.items():
        n, p = row.get("nginx", {}), row.get("proxy", {})
        out.append(
            f"| {c} | {fmt(n.get('p50_us'))} / {fmt(n.get('p99_us'))} µs | {fmt(p.get('p50_us'))} / "
            f"{fmt(p.get('p99_us'))} µs | {n.get('errors_total', 'n/a')} / {p.get('errors_total', 'n/a')} "
            f"| {pair(row, 'server_cpu_cores', 2)} | {pair(row, 'upstream_cpu_cores', 2)} "
            f"| {n.get('dns_queries_total', 'n/a')} / {p.get('dns_queries_total', 'n/a')} "
            f"| {n.get('handshakes_full_total', '?')} + {n.get('handshakes_resumed_total', '?')} / "
            f"{p.get('handshakes_full_total', '?')} + {p.get('handshakes_resumed_total', '?')} |")
    out.append("")
    out.append(f"nginx resolved the three names at start ({meta.get('nginx_start_dns_queries', '?')} DNS queries) and "
               "never again: an `upstream` block's servers are resolved once (see bench/README.md).")
    out.append("")
    out.append(f"## Open loop (oha, fixed rate, latency correction, {meta.get('open_conns', '?')} connections, "
               f"{meta.get('open_duration_s', '?')} s per run)")
    out.append("")
    out.append("| rate req/s | direct p50 / p99 / p99.9 | nginx added p50 / p99 / p99.9 "
               "| azure-proxy added p50 / p99 / p99.9 | achieved req/s direct / nginx / proxy "
               "| errors direct / nginx / proxy | CPU µs/req nginx / proxy |")
    out.append("|---:|---:|---:|---:|---:|---:|---:|")

    def three(r, prefix=""):
        src = r.get("added_us", {}) if prefix else r
        return " / ".join(fmt(src.get(k)) for k in ("p50_us", "p99_us", "p99_9_us")) + " µs"

    for q, row in open_sum.items():
        d, n, p = row.get("direct", {}), row.get("nginx", {}), row.get("proxy", {})
        out.append(
            f"| {int(q):,} | {three(d)} | {three(n, 'added')} | {three(p, 'added')} "
            f"| {fmt(d.get('achieved_rps'))} / {fmt(n.get('achieved_rps'))} / {fmt(p.get('achieved_rps'))} "
            f"| {d.get('errors', 'n/a')} / {n.get('errors', 'n/a')} / {p.get('errors', 'n/a')} "
            f"| {fmt(n.get('cpu_us_per_request'))} / {fmt(p.get('cpu_us_per_request'))} |")
    out.append("")
    out.append("Direct is oha straight to one upstream instance over HTTPS; \"added\" is the target's percentile "
               "minus direct's at the same rate. With latency correction a request's time counts from when it was "
               "due, so a server that falls behind the rate shows its queueing delay. Percentiles leave out the "
               f"requests due in the first {meta.get('open_skip_s', '?')} s of each run (connection set-up: for "
               "direct, one TLS handshake per connection); oha's own cut-off at the deadline is not an error.")
    out.append("")
    out += targets(closed_sum, open_sum)
    out.append("")
    out += profile(meta, work)
    out.append("## How")
    out.append("")
    out.append(f"- req/s, p50, p99: `wrk -t2 -c N` (`-t1` for N=1) with bench/post.lua, proxy then nginx in each "
               "round after a warm-up per concurrency; medians of the rounds.")
    out.append("- CPU µs/req: utime + stime of the server's processes (all threads; nginx: master + workers) from "
               "/proc/PID/stat over the run, ÷ requests.")
    out.append(f"- syscalls and context switches per request: one extra {meta.get('count_duration_s', '?')} s wrk run "
               f"per target and concurrency under `{meta.get('counter', '?')} -p PIDS` (not during the measured "
               "rounds, so that tracing costs them nothing), ÷ that run's requests.")
    out.append("- upstream handshakes: the upstream logs the first request of every connection with "
               "`$ssl_session_reused`; new connections during the run ÷ requests × 10,000 (full + resumed).")
    out.append("- DNS queries: lines the bench's DNS server logged during the run (A and AAAA alike) ÷ requests.")
    by_name = [x for x in counts if x.get("syscalls_by_name_per_request")]
    if by_name:
        out.append("")
        out.append("strace -f -c per request, busiest calls:")
        out.append("")
        for x in by_name:
            top = ", ".join(f"{k} {v:.2f}" for k, v in list(x["syscalls_by_name_per_request"].items())[:8])
            out.append(f"- {NAMES[x['target']]}, c={x['conns']}: {top}")
    return "\n".join(out) + "\n"


def targets(closed_sum, open_sum):
    """Issue 14's 'done when' figures against this run."""
    rows = []
    p = {c: r.get("proxy", {}) for c, r in closed_sum.items()}
    queries = sum(v.get("dns_queries_total", 0) for v in p.values())
    requests = sum(v.get("requests_total", 0) for v in p.values())
    if requests:
        # A name resolved per request costs at least 2 queries (A + AAAA); the cache's background refresh costs
        # 2 per name every dns_refresh_ms whatever the load. Under 0.001 per request can only be the latter.
        rows.append(("DNS queries per request (azure-proxy, all closed-loop rounds)",
                     f"{queries / requests:.6f} ({queries} in {requests:,} requests)",
                     "0 per request (< 0.001: only the background refresh)", queries / requests < 0.001))
    sys_ = [(c, v.get("syscalls_per_request")) for c, v in p.items() if v.get("syscalls_per_request") is not None]
    if sys_:
        worst = max(s for _, s in sys_)
        rows.append(("syscalls per request (azure-proxy, worst concurrency)", f"{worst:.1f}", "≤ 12", worst <= 12))
    for c in ("16", "64"):
        r = closed_sum.get(c, {}).get("ratios", {}).get("cpu_proxy_over_nginx")
        if r is not None:
            rows.append((f"CPU per request vs nginx, {c} connections", f"{r:.2f}×", "≤ 2×", r <= 2))
    added = open_sum.get("5000", {}).get("proxy", {}).get("added_us", {}).get("p99_us")
    if added is not None:
        rows.append(("added p99 at 5,000 req/s (open loop)", f"{added / 1000:.2f} ms", "≤ 1 ms", added <= 1000))
    if not rows:
        return []
    out = ["## Issue 14's targets", "", "| figure | measured | target | |", "|---|---:|---:|---|"]
    out += [f"| {a} | {b} | {c} | {'**met**' if ok else '**missed**'} |" for a, b, c, ok in rows]
    return out


def cmd_assemble(a):
    meta_path = os.path.join(a.work, "meta.json")
    meta = json.loads(read(meta_path)) if os.path.exists(meta_path) else {}
    closed, counts, opened, closed_sum, open_sum = summarize(a.work)
    md = markdown(meta, closed_sum, open_sum, counts, a.work)
    with open(a.md, "w") as f:
        f.write(md)
    with open(a.json, "w") as f:
        json.dump({"meta": meta, "closed_loop": closed_sum, "open_loop": open_sum,
                   "runs": {"closed": closed, "counted": counts, "open": opened}}, f, indent=2)
    sys.stdout.write(md)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    c = sub.add_parser("closed")
    c.add_argument("file")
    c.add_argument("--target", required=True)
    c.add_argument("--conns", type=int, required=True)
    c.add_argument("--round", type=int, required=True)
    c.add_argument("--clk-tck", type=int, required=True)
    c.add_argument("--cpu-ticks", type=int, required=True)
    c.add_argument("--upstream-cpu-ticks", type=int, required=True)
    c.add_argument("--dns-queries", type=int, required=True)
    c.add_argument("--handshakes", nargs=2, required=True, metavar=("'FULL RESUMED' before", "after"))
    c.add_argument("--threads", nargs=2, type=int, required=True)
    c.add_argument("--warnings", type=int, default=0)
    n = sub.add_parser("count")
    n.add_argument("prefix")
    n.add_argument("--target", required=True)
    n.add_argument("--conns", type=int, required=True)
    n.add_argument("--tool", choices=("perf", "strace"), required=True)
    o = sub.add_parser("open")
    o.add_argument("file")
    o.add_argument("--db", required=True)
    o.add_argument("--skip-s", type=float, default=1.0)
    o.add_argument("--target", required=True)
    o.add_argument("--rate", type=int, required=True)
    o.add_argument("--cpu-ticks", type=int, default=0)
    o.add_argument("--clk-tck", type=int, required=True)
    sub.add_parser("show-closed")
    sub.add_parser("show-open")
    s = sub.add_parser("assemble")
    s.add_argument("work")
    s.add_argument("--md", required=True)
    s.add_argument("--json", required=True)
    a = ap.parse_args()
    {"closed": cmd_closed, "count": cmd_count, "open": cmd_open, "show-closed": cmd_show_closed,
     "show-open": cmd_show_open, "assemble": cmd_assemble}[a.cmd](a)


if __name__ == "__main__":
    main()
