-- wrk script: POST a small chat completion request with the client key (BENCH_CLIENT_KEY).
-- done() prints one machine-readable line with exact figures (latencies in microseconds), which
-- bench/report.py prefers over wrk's human-readable text.
wrk.method = "POST"
wrk.body = '{"messages":[{"role":"user","content":"hi"}]}'
wrk.headers["Content-Type"] = "application/json"
wrk.headers["api-key"] = os.getenv("BENCH_CLIENT_KEY") or "bench-client-key"

function done(summary, latency, requests)
   local e = summary.errors
   io.write(string.format(
      "BENCH_WRK requests=%d duration_us=%d connect=%d read=%d write=%d status=%d timeout=%d " ..
      "p50_us=%d p90_us=%d p99_us=%d max_us=%d mean_us=%.1f\n",
      summary.requests, summary.duration, e.connect, e.read, e.write, e.status, e.timeout,
      latency:percentile(50), latency:percentile(90), latency:percentile(99), latency.max, latency.mean))
end
