//! The routing issue's scripted scenario, run in one process: 3 mock instances, one of which answers
//! `429 Retry-After: 5` for its first 5 seconds; 1,000 chat requests from 8 concurrent clients through two
//! proxies side by side, one with plain round-robin (`max_cooldown_ms: 0`) and one cooldown-aware (defaults).
//! Healthy answers take 40 ms, a 429 takes 20 ms (a round trip to a remote region). Prints upstream attempts
//! and client latency percentiles for each.
//!
//! `cargo run --release --example cooldown_scenario`
#![allow(dead_code)]

#[path = "../tests/support/mock.rs"]
mod mock;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use azure_proxy::config::{Config, Env, Overrides};
use mock::{MockAzure, Recorded, Reply};

const REQUESTS: usize = 1000;
const CLIENTS: usize = 8;
/// Time a healthy instance takes to answer (a short completion).
const MODEL_TIME: Duration = Duration::from_millis(40);
/// Time a throttled instance takes to say 429: a round trip to a remote Azure region.
const THROTTLE_RTT: Duration = Duration::from_millis(20);
const THROTTLE_FOR: Duration = Duration::from_secs(5);

struct NoEnv;
impl Env for NoEnv {
    fn var(&self, _: &str) -> Option<String> {
        None
    }
}

fn healthy() -> MockAzure {
    MockAzure::start(|_: &Recorded| Reply::json(200, serde_json::json!({"ok": true})).delayed(MODEL_TIME))
}

/// Throttles from its first request for THROTTLE_FOR, like an Azure deployment out of quota.
fn throttled(count: Arc<AtomicUsize>) -> MockAzure {
    let since: Mutex<Option<Instant>> = Mutex::new(None);
    MockAzure::start(move |_: &Recorded| {
        let start = *since.lock().expect("lock").get_or_insert_with(Instant::now);
        if start.elapsed() < THROTTLE_FOR {
            count.fetch_add(1, Ordering::Relaxed);
            Reply::json(429, serde_json::json!({"error": {"code": "429"}}))
                .with_header("Retry-After", "5")
                .delayed(THROTTLE_RTT)
        } else {
            Reply::json(200, serde_json::json!({"ok": true})).delayed(MODEL_TIME)
        }
    })
}

/// A proxy in front of `mocks`; it stops (and its threads end) when the returned server is dropped.
fn proxy(mocks: &[&MockAzure], extra: serde_json::Value) -> azure_proxy::Server {
    let instances: Vec<serde_json::Value> = mocks
        .iter()
        .enumerate()
        .map(|(i, m)| serde_json::json!({"endpoint": m.url(), "api_key": format!("k{i}"), "name": format!("m{i}")}))
        .collect();
    let mut cfg = serde_json::json!({"instances": instances, "client_keys": ["ck"], "workers": 16, "drain_seconds": 1});
    for (k, v) in extra.as_object().expect("object") {
        cfg[k] = v.clone();
    }
    let o = Overrides { listen: Some("127.0.0.1:0".into()), ..Default::default() };
    let config = Config::from_json(&cfg.to_string(), Path::new("scenario.json"), &o, &NoEnv).expect("config");
    azure_proxy::start(config).expect("start")
}

/// One request on its own connection; returns the status.
fn request(addr: SocketAddr) -> u16 {
    let mut s = TcpStream::connect(addr).expect("connect");
    let body = r#"{"messages":[{"role":"user","content":"hi"}]}"#;
    let req = format!(
        "POST /openai/deployments/gpt-4o/chat/completions?api-version=2024-06-01 HTTP/1.1\r\nHost: p\r\napi-key: ck\r\n\
         Content-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    s.write_all(req.as_bytes()).expect("write");
    let mut out = Vec::new();
    let _ = s.read_to_end(&mut out);
    String::from_utf8_lossy(&out).split(' ').nth(1).and_then(|c| c.parse().ok()).unwrap_or(0)
}

struct Outcome {
    attempts: usize,
    throttled_attempts: usize,
    latencies: Vec<Duration>,
    non_200: usize,
    wall: Duration,
}

fn run(name: &str, extra: serde_json::Value) -> Outcome {
    let answered_429 = Arc::new(AtomicUsize::new(0));
    let (a, b, c) = (throttled(Arc::clone(&answered_429)), healthy(), healthy());
    let server = proxy(&[&a, &b, &c], extra);
    let addr = server.local_addr();
    let next = Arc::new(AtomicUsize::new(0));
    let results = Arc::new(Mutex::new(Vec::new()));
    let started = Instant::now();
    let threads: Vec<_> = (0..CLIENTS)
        .map(|_| {
            let (next, results) = (Arc::clone(&next), Arc::clone(&results));
            std::thread::spawn(move || {
                while next.fetch_add(1, Ordering::Relaxed) < REQUESTS {
                    let t = Instant::now();
                    let status = request(addr);
                    results.lock().expect("lock").push((t.elapsed(), status));
                }
            })
        })
        .collect();
    for t in threads {
        t.join().expect("client thread");
    }
    let wall = started.elapsed();
    let results = results.lock().expect("lock");
    let mut latencies: Vec<Duration> = results.iter().map(|(d, _)| *d).collect();
    latencies.sort();
    let throttled_attempts = answered_429.load(Ordering::Relaxed);
    println!("{name}: done in {:.1} s", wall.as_secs_f64());
    Outcome {
        attempts: a.hits() + b.hits() + c.hits(),
        throttled_attempts,
        non_200: results.iter().filter(|(_, s)| *s != 200).count(),
        latencies,
        wall,
    }
}

fn pct(v: &[Duration], p: f64) -> f64 {
    let i = ((v.len() as f64 * p).ceil() as usize).clamp(1, v.len()) - 1;
    v[i].as_secs_f64() * 1000.0
}

fn main() {
    let plain = run("plain round-robin (max_cooldown_ms: 0)", serde_json::json!({"max_cooldown_ms": 0}));
    let aware = run("cooldown-aware (defaults)", serde_json::json!({}));
    println!();
    println!("| {REQUESTS} requests, {CLIENTS} clients, 1 of 3 instances 429 + Retry-After: 5 for 5 s | plain round-robin | cooldown-aware |");
    println!("|---|---|---|");
    println!("| upstream attempts | {} | {} |", plain.attempts, aware.attempts);
    println!("| attempts answered 429 | {} | {} |", plain.throttled_attempts, aware.throttled_attempts);
    println!("| client answers other than 200 | {} | {} |", plain.non_200, aware.non_200);
    for (label, p) in [("p50", 0.50), ("p99", 0.99)] {
        println!("| client latency {label} (ms) | {:.1} | {:.1} |", pct(&plain.latencies, p), pct(&aware.latencies, p));
    }
    println!("| wall time (s) | {:.1} | {:.1} |", plain.wall.as_secs_f64(), aware.wall.as_secs_f64());
}
