//! Prometheus metrics, hand-written in the text exposition format 0.0.4. Counters are atomics or small maps
//! behind a mutex held for one increment; nothing here is on the data path of a stream except one tail copy of
//! at most `USAGE_TAIL_BYTES` per read, used to find the token `usage` the response already carries.

use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::atomic::{AtomicI64, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// Upper bounds of the latency histograms, in seconds: an LLM request spans milliseconds to minutes.
const BUCKETS: [f64; 14] = [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0];
/// How much of the end of a response is kept to find its `usage` object (it comes last in Azure's JSON and
/// in the final SSE chunk, which is about 600 bytes with every `*_details` field). Held by every open stream.
pub const USAGE_TAIL_BYTES: usize = 2048;

pub struct Histogram {
    counts: [AtomicU64; BUCKETS.len()],
    sum_micros: AtomicU64,
    count: AtomicU64,
}

impl Default for Histogram {
    fn default() -> Histogram {
        Histogram {
            counts: std::array::from_fn(|_| AtomicU64::new(0)),
            sum_micros: AtomicU64::new(0),
            count: AtomicU64::new(0),
        }
    }
}

impl Histogram {
    pub fn observe(&self, d: Duration) {
        let secs = d.as_secs_f64();
        if let Some(i) = BUCKETS.iter().position(|b| secs <= *b) {
            self.counts[i].fetch_add(1, Ordering::Relaxed);
        }
        self.sum_micros.fetch_add(d.as_micros() as u64, Ordering::Relaxed);
        self.count.fetch_add(1, Ordering::Relaxed);
    }

    fn render(&self, out: &mut String, name: &str, help: &str) {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} histogram");
        let mut cumulative = 0;
        for (i, bound) in BUCKETS.iter().enumerate() {
            cumulative += self.counts[i].load(Ordering::Relaxed);
            let _ = writeln!(out, "{name}_bucket{{le=\"{bound}\"}} {cumulative}");
        }
        let count = self.count.load(Ordering::Relaxed);
        let _ = writeln!(out, "{name}_bucket{{le=\"+Inf\"}} {count}");
        let _ = writeln!(out, "{name}_sum {}", self.sum_micros.load(Ordering::Relaxed) as f64 / 1e6);
        let _ = writeln!(out, "{name}_count {count}");
    }
}

/// Everything counted since start. Lives across configuration reloads.
#[derive(Default)]
pub struct Metrics {
    /// client key name → (route class, status) → count; looked up by `&str`, so counting allocates only for a
    /// new client. Client names come from the configuration only, so the label set is bounded.
    requests: Mutex<BTreeMap<String, ByRouteAndStatus>>,
    /// instance → outcome → count; looked up by `&str`, so counting allocates only for a new instance.
    attempts: Mutex<BTreeMap<String, BTreeMap<&'static str, u64>>>,
    /// (instance, deployment, client) → [prompt, completion] tokens.
    tokens: Mutex<BTreeMap<(String, String, String), [u64; 2]>>,
    pub retries: AtomicU64,
    /// Attempts that failed on this side (out of resources, a request that cannot be sent): no instance's fault.
    pub attempts_not_sent: AtomicU64,
    pub shed: AtomicU64,
    pub in_flight: AtomicI64,
    pub request_seconds: Histogram,
    pub upstream_seconds: Histogram,
    pub stream_first_byte_seconds: Histogram,
    /// The front thread's and the pool's own counters, read at scrape time.
    pub probes: Probes,
}

/// The serving machinery's own counters: made before the front thread and the worker pool and handed to them
/// (`server::launch`), so that a scrape reads what they count; nothing is attached to `Metrics` afterwards.
#[derive(Default)]
pub struct Probes {
    /// Open client connections (waiting at the front, queued or being served).
    pub open_connections: Arc<AtomicUsize>,
    pub workers: Arc<WorkerGauges>,
    /// The number of requests waiting for a worker (the queue's length); `None` when no server runs.
    pub queue_depth: Option<Box<dyn Fn() -> usize + Send + Sync>>,
}

/// The worker pool's thread counts; the pool runs on these counters (they are not copies).
#[derive(Default)]
pub struct WorkerGauges {
    pub live: AtomicUsize,
    pub idle: AtomicUsize,
    /// Most threads alive at once since start.
    pub peak: AtomicUsize,
}

/// Request counts of one client, by (route class, status).
type ByRouteAndStatus = BTreeMap<(&'static str, u16), u64>;

/// Values read at scrape time from the rest of the proxy.
pub struct Gauges<'a> {
    pub blocked_clients: usize,
    /// (instance, available now)
    pub instances: Vec<(&'a str, bool)>,
}

impl Metrics {
    pub fn with_probes(probes: Probes) -> Metrics {
        Metrics { probes, ..Metrics::default() }
    }

    /// One answered request; `client` is the name of its client key (`-` when none was checked).
    pub fn request(&self, route: &'static str, status: u16, client: &str, took: Duration) {
        let mut requests = self.requests.lock().unwrap_or_else(|p| p.into_inner());
        let per_client = match requests.get_mut(client) {
            Some(m) => m,
            None => requests.entry(client.to_string()).or_default(),
        };
        *per_client.entry((route, status)).or_default() += 1;
        drop(requests);
        self.request_seconds.observe(took);
    }

    /// One upstream attempt; `outcome` is a status class (`2xx`, `429`, `5xx`, …) or an error kind.
    pub fn attempt(&self, instance: &str, outcome: &'static str, took: Duration) {
        let mut attempts = self.attempts.lock().unwrap_or_else(|p| p.into_inner());
        let per_instance = match attempts.get_mut(instance) {
            Some(m) => m,
            None => attempts.entry(instance.to_string()).or_default(),
        };
        *per_instance.entry(outcome).or_default() += 1;
        drop(attempts);
        self.upstream_seconds.observe(took);
    }

    /// The tokens one relayed answer used, by the instance that served it, the deployment the request named
    /// (`-` when none) and the client key's name.
    pub fn tokens(&self, instance: &str, deployment: &str, client: &str, usage: Usage) {
        let key = (instance.to_string(), deployment.to_string(), client.to_string());
        let mut map = self.tokens.lock().unwrap_or_else(|p| p.into_inner());
        let counts = map.entry(key).or_default();
        counts[0] += usage.prompt;
        counts[1] += usage.completion;
    }

    fn render_requests(&self, out: &mut String) {
        counter_header(out, "azure_proxy_requests_total", "Requests answered, by route class, status and client key.");
        let requests = self.requests.lock().unwrap_or_else(|p| p.into_inner());
        for (client, per_client) in requests.iter() {
            let c = escape(client);
            for ((route, status), n) in per_client {
                let _ = writeln!(
                    out,
                    "azure_proxy_requests_total{{route=\"{route}\",status=\"{status}\",client=\"{c}\"}} {n}"
                );
            }
        }
    }

    fn render_tokens(&self, out: &mut String) {
        counter_header(out, "azure_proxy_tokens_total", "Tokens reported in the usage of relayed responses.");
        for ((instance, deployment, client), counts) in self.tokens.lock().unwrap_or_else(|p| p.into_inner()).iter() {
            let (i, d, c) = (escape(instance), escape(deployment), escape(client));
            for (kind, n) in [("prompt", counts[0]), ("completion", counts[1])] {
                let _ = writeln!(
                    out,
                    "azure_proxy_tokens_total{{instance=\"{i}\",deployment=\"{d}\",client=\"{c}\",kind=\"{kind}\"}} {n}"
                );
            }
        }
    }

    pub fn render(&self, g: &Gauges) -> String {
        let mut out = String::with_capacity(4096);
        self.render_requests(&mut out);
        counter_header(&mut out, "azure_proxy_upstream_attempts_total", "Upstream attempts, by instance and outcome.");
        let attempts = self.attempts.lock().unwrap_or_else(|p| p.into_inner());
        for (instance, outcome, n) in attempts.iter().flat_map(|(i, m)| m.iter().map(move |(o, n)| (i, o, n))) {
            let (i, o) = (escape(instance), escape(outcome));
            let _ = writeln!(out, "azure_proxy_upstream_attempts_total{{instance=\"{i}\",outcome=\"{o}\"}} {n}");
        }
        counter(&mut out, "azure_proxy_retries_total", "Attempts beyond the first of a request.", &self.retries);
        counter(
            &mut out,
            "azure_proxy_attempts_not_sent_total",
            "Attempts that failed in this process (out of resources, request not sendable); counted against no instance.",
            &self.attempts_not_sent,
        );
        counter(
            &mut out,
            "azure_proxy_shed_total",
            "Connections answered 503 at once (queue full, connection or fd limit).",
            &self.shed,
        );
        self.render_tokens(&mut out);
        self.request_seconds.render(
            &mut out,
            "azure_proxy_request_duration_seconds",
            "Time from request head to the end of the answer.",
        );
        self.upstream_seconds.render(
            &mut out,
            "azure_proxy_upstream_duration_seconds",
            "Time from sending an attempt to its response head (or failure).",
        );
        self.stream_first_byte_seconds.render(
            &mut out,
            "azure_proxy_stream_first_byte_seconds",
            "Time from request head to the first byte of a streamed (SSE) body.",
        );
        gauge(
            &mut out,
            "azure_proxy_in_flight_requests",
            "Requests being served by a worker.",
            self.in_flight.load(Ordering::Relaxed),
        );
        let queue_depth = self.probes.queue_depth.as_ref().map_or(0, |f| f());
        gauge(&mut out, "azure_proxy_queue_depth", "Requests waiting for a worker.", queue_depth as i64);
        let w = &self.probes.workers;
        let (live, idle, peak) =
            (w.live.load(Ordering::Relaxed), w.idle.load(Ordering::Relaxed), w.peak.load(Ordering::Relaxed));
        gauge(&mut out, "azure_proxy_worker_threads", "Worker threads alive (serving or idle).", live as i64);
        gauge(&mut out, "azure_proxy_idle_worker_threads", "Worker threads waiting for a request.", idle as i64);
        gauge(
            &mut out,
            "azure_proxy_worker_threads_peak",
            "Most worker threads alive at once since start.",
            peak as i64,
        );
        let open = self.probes.open_connections.load(Ordering::Relaxed);
        gauge(&mut out, "azure_proxy_open_connections", "Open client connections.", open as i64);
        gauge(
            &mut out,
            "azure_proxy_blocked_clients",
            "Client addresses blocked now after bad keys.",
            g.blocked_clients as i64,
        );
        let _ = writeln!(out, "# HELP azure_proxy_instance_available 1 when the instance can take requests now (not cooling down, circuit not open).");
        let _ = writeln!(out, "# TYPE azure_proxy_instance_available gauge");
        for (name, up) in &g.instances {
            let _ = writeln!(out, "azure_proxy_instance_available{{instance=\"{}\"}} {}", escape(name), u8::from(*up));
        }
        out
    }
}

fn counter_header(out: &mut String, name: &str, help: &str) {
    let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} counter");
}

fn counter(out: &mut String, name: &str, help: &str, v: &AtomicU64) {
    counter_header(out, name, help);
    let _ = writeln!(out, "{name} {}", v.load(Ordering::Relaxed));
}

fn gauge(out: &mut String, name: &str, help: &str, v: i64) {
    let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} gauge\n{name} {v}");
}

/// Label values: backslash, double quote and newline escaped (exposition format 0.0.4).
fn escape(v: &str) -> String {
    v.replace('\\', "\\\\").replace('"', "\\\"").replace('\n', "\\n")
}

/// The route class of a path, a small fixed set so that label cardinality stays bounded.
pub fn route_class(path: &str) -> &'static str {
    if !path.starts_with("/openai/") {
        return match path {
            "/healthz" | "/readyz" | "/metrics" => "admin",
            _ => "not_found",
        };
    }
    let classes = [
        ("/chat/completions", "chat"),
        ("/completions", "completions"),
        ("/embeddings", "embeddings"),
        ("/responses", "responses"),
        ("/images/", "images"),
        ("/audio/", "audio"),
    ];
    classes.iter().find(|(needle, _)| path.contains(needle)).map_or("other", |(_, class)| class)
}

/// The tail of a response body, kept while it is copied, to read the token `usage` at the end.
#[derive(Default)]
pub struct UsageTail {
    buf: Vec<u8>,
}

impl UsageTail {
    pub fn push(&mut self, bytes: &[u8]) {
        // Exactly the tail's size, once: growing by doubling would hold up to twice that per open stream.
        self.buf.reserve_exact(USAGE_TAIL_BYTES.saturating_sub(self.buf.capacity()));
        if bytes.len() >= USAGE_TAIL_BYTES {
            self.buf.clear();
            self.buf.extend_from_slice(&bytes[bytes.len() - USAGE_TAIL_BYTES..]);
            return;
        }
        let overflow = (self.buf.len() + bytes.len()).saturating_sub(USAGE_TAIL_BYTES);
        self.buf.drain(..overflow);
        self.buf.extend_from_slice(bytes);
    }

    /// The last `"usage"` object in the tail, if there is one.
    pub fn usage(&self) -> Option<Usage> {
        let text = std::str::from_utf8(&self.buf).ok().or_else(|| {
            let start = self.buf.iter().position(|b| b.is_ascii())?;
            std::str::from_utf8(&self.buf[start..]).ok()
        })?;
        let at = text.rfind("\"usage\"")?;
        let after = text[at + "\"usage\"".len()..].trim_start().strip_prefix(':')?.trim_start();
        // `"usage": null` (every chunk of a stream but the last) is no usage.
        if !after.starts_with('{') {
            return None;
        }
        let object = balanced_object(after)?;
        Usage::from_object(object)
    }
}

/// The tokens of one answer. Chat and completions report `prompt_tokens` and `completion_tokens`; the Responses
/// API `input_tokens` and `output_tokens` (counted as prompt and completion); embeddings only `prompt_tokens`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Usage {
    pub prompt: u64,
    pub completion: u64,
}

impl Usage {
    fn from_object(object: &str) -> Option<Usage> {
        // Keys are matched with their quotes, so `prompt_tokens_details` (an object of its own) is not
        // `prompt_tokens`.
        let prompt = number_after(object, "\"prompt_tokens\"").or_else(|| number_after(object, "\"input_tokens\""));
        let completion =
            number_after(object, "\"completion_tokens\"").or_else(|| number_after(object, "\"output_tokens\""));
        match (prompt, completion) {
            (None, None) => None,
            (p, c) => Some(Usage { prompt: p.unwrap_or(0), completion: c.unwrap_or(0) }),
        }
    }

    pub fn total(&self) -> u64 {
        self.prompt + self.completion
    }
}

/// The `{…}` that starts at the first `{` of `text`, nested objects included (Azure's usage object holds
/// `completion_tokens_details {…}` before `prompt_tokens`, so the first `}` is not its end).
fn balanced_object(text: &str) -> Option<&str> {
    let start = text.find('{')?;
    let mut depth = 0usize;
    let mut in_string = false;
    let mut escaped = false;
    for (i, c) in text[start..].char_indices() {
        match c {
            _ if escaped => escaped = false,
            '\\' if in_string => escaped = true,
            '"' => in_string = !in_string,
            '{' if !in_string => depth += 1,
            '}' if !in_string => {
                depth -= 1;
                if depth == 0 {
                    return Some(&text[start..start + i + 1]);
                }
            }
            _ => {}
        }
    }
    None
}

/// The number after the first `key` and a colon in `text` (JSON-ish: `"prompt_tokens": 12`). A byte search and no
/// allocation: `str::find` set up its searcher anew for every key of every answer (3 % of a request, callgrind).
fn number_after(text: &str, key: &str) -> Option<u64> {
    let at = crate::bytes::find(text.as_bytes(), key.as_bytes())?;
    let rest = text[at + key.len()..].trim_start().strip_prefix(':')?.trim_start();
    if !rest.as_bytes().first().is_some_and(u8::is_ascii_digit) {
        return None;
    }
    // As `str::parse::<u64>` would: None past u64::MAX.
    rest.bytes()
        .take_while(u8::is_ascii_digit)
        .try_fold(0u64, |n, d| n.checked_mul(10)?.checked_add(u64::from(d - b'0')))
}

#[cfg(test)]
#[path = "metrics_tests.rs"]
mod tests;
