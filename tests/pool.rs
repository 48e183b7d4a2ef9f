//! The elastic worker pool: with the default configuration many more streams are served at once than the old
//! fixed pool of 64 (threads start on demand); a request never waits in the queue for a stream to end (it is
//! answered 503 after `queue_timeout_ms`); idle threads exit down to `idle_workers`.

use std::sync::mpsc::{self, Sender};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::Duration;

use crate::support::client::{call, Client};
use crate::support::mock::{MockAzure, Recorded, Reply};
use crate::support::process::{write_config, Running};
use crate::support::proxy::{self, CHAT};
use crate::support::{eventually, free_addr};
use serde_json::json;

/// A mock whose every request gets an SSE stream: the first event at once, the rest only when the test drops
/// the stream's gate (kept in `gates`).
fn gated_streams(gates: Arc<Mutex<Vec<Sender<()>>>>) -> MockAzure {
    MockAzure::start(move |_: &Recorded| {
        let (tx, rx) = mpsc::channel();
        gates.lock().expect("gates").push(tx);
        let events = vec!["data: {\"first\":true}\n\n".to_string(), "data: [DONE]\n\n".to_string()];
        Reply::Sse { events, pause: Duration::ZERO, gate: Some(rx) }
    })
}

fn open_stream(addr: std::net::SocketAddr) -> Client {
    let mut c = Client::connect(addr);
    c.send("POST", CHAT, &[("api-key", "client-key"), ("Content-Type", "application/json")], b"{\"stream\":true}");
    c
}

/// Reads the stream's head and its first event.
fn first_event(c: &mut Client) {
    let (status, _) = c.read_head().expect("head");
    assert_eq!(status, 200);
    c.read_chunks_until(b"\"first\"").expect("first event");
}

fn metric(addr: std::net::SocketAddr, name: &str) -> i64 {
    let r = call(addr, "GET", "/metrics", &[], b"");
    let text = r.text();
    let line = text.lines().find(|l| l.starts_with(name) && l[name.len()..].starts_with(' '));
    line.and_then(|l| l.rsplit(' ').next()?.parse().ok()).unwrap_or_else(|| panic!("no {name} in {text}"))
}

#[test]
fn with_the_default_pool_stream_200_starts_while_stream_1_is_still_open() {
    let gates = Arc::new(Mutex::new(Vec::new()));
    let m = gated_streams(Arc::clone(&gates));
    // No `workers` in the config: the defaults (the harness's own 4 is removed).
    let p = proxy::start_with(proxy::instances_for(&[&m]), json!({"workers": null}));
    let mut streams: Vec<Client> = Vec::new();
    for i in 0..200 {
        let mut c = open_stream(p.addr);
        first_event(&mut c);
        streams.push(c);
        assert_eq!(m.hits(), i + 1);
    }
    // Every one of the 200 has its first event while all are open: none of them has ended (their gates are
    // shut), so 200 requests were being served at once, against 64 workers before.
    assert_eq!(gates.lock().expect("gates").len(), 200);
    assert!(metric(p.addr, "azure_proxy_worker_threads") >= 200);
    gates.lock().expect("gates").clear();
    for (i, c) in streams.iter_mut().enumerate() {
        let rest = c.read_chunks_until(b"[DONE]").unwrap_or_else(|e| panic!("stream {i}: {e}"));
        assert!(!rest.is_empty());
    }
}

#[test]
fn when_every_worker_is_busy_a_request_gets_503_after_queue_timeout_not_after_a_stream() {
    let gates = Arc::new(Mutex::new(Vec::new()));
    let m = gated_streams(Arc::clone(&gates));
    // The admin endpoints on their own listener: /metrics must answer while every worker is busy.
    let admin = free_addr();
    let p = proxy::start_with(
        proxy::instances_for(&[&m]),
        json!({"workers": 2, "idle_workers": 2, "queue_timeout_ms": 300, "admin_listen": admin.to_string()}),
    );
    let mut held: Vec<Client> = (0..2).map(|_| open_stream(p.addr)).collect();
    for c in &mut held {
        first_event(c);
    }
    let r = call(p.addr, "POST", CHAT, &[("api-key", "client-key")], b"{}");
    assert_eq!(r.status, 503, "{}", r.text());
    assert_eq!(r.header("retry-after"), Some("1"));
    assert_eq!(r.json()["error"]["type"], "server_error");
    // Counted like any other answered request (and logged with an access line, note=queue_timeout).
    let refused = r#"azure_proxy_requests_total{route="chat",status="503",client="-"}"#;
    eventually("the 503 is counted", || metric(admin, refused) == 1);
    // Answered while both streams are still open (their gates are shut), and never sent upstream.
    assert_eq!(gates.lock().expect("gates").len(), 2);
    assert_eq!(m.hits(), 2);
    gates.lock().expect("gates").clear();
    for c in &mut held {
        c.read_chunks_until(b"[DONE]").expect("the held streams end normally");
    }
    // With workers free again, requests are served.
    let gates_after = Arc::clone(&gates);
    thread::spawn(move || {
        // The next stream's gate is released as soon as it appears.
        eventually("the next stream starts", || !gates_after.lock().expect("gates").is_empty());
        gates_after.lock().expect("gates").clear();
    });
    let mut c = open_stream(p.addr);
    first_event(&mut c);
    c.read_chunks_until(b"[DONE]").expect("served after the burst");
}

#[test]
fn idle_workers_exit_down_to_idle_workers_and_come_back_on_demand() {
    let gates = Arc::new(Mutex::new(Vec::new()));
    let m = gated_streams(Arc::clone(&gates));
    let p = proxy::start_with(
        proxy::instances_for(&[&m]),
        json!({"workers": 64, "idle_workers": 2, "worker_idle_ms": 100}),
    );
    assert_eq!(metric(p.addr, "azure_proxy_worker_threads"), 2, "only the warm ones at start");
    let mut streams: Vec<Client> = (0..20).map(|_| open_stream(p.addr)).collect();
    for c in &mut streams {
        first_event(c);
    }
    assert!(metric(p.addr, "azure_proxy_worker_threads") >= 20);
    gates.lock().expect("gates").clear();
    for c in &mut streams {
        c.read_chunks_until(b"[DONE]").expect("stream ends");
    }
    drop(streams);
    // The metrics request itself may hold one more worker while it is answered.
    eventually("idle workers retire", || metric(p.addr, "azure_proxy_worker_threads") <= 3);
    assert!(metric(p.addr, "azure_proxy_worker_threads_peak") >= 20);
    // And they come back when needed.
    let mut again: Vec<Client> = (0..10).map(|_| open_stream(p.addr)).collect();
    for c in &mut again {
        first_event(c);
    }
    gates.lock().expect("gates").clear();
}

#[test]
fn requests_turned_away_for_lack_of_a_worker_get_an_access_line() {
    let gates = Arc::new(Mutex::new(Vec::new()));
    let m = gated_streams(Arc::clone(&gates));
    let admin = free_addr();
    let config = json!({
        "instances": [proxy::instance(&m.url(), "key0", "m0")],
        "client_keys": ["client-key"],
        "queue_size": 1,
        "queue_timeout_ms": 1000,
        "admin_listen": admin.to_string(),
    });
    let path = write_config("pool-access-lines.json", &config.to_string());
    // `Running::start` passes --workers 4: four streams, opened one after the other, hold every worker.
    let p = Running::start(&path, &[]);
    let mut held = Vec::new();
    for _ in 0..4 {
        let mut c = open_stream(p.addr);
        first_event(&mut c);
        held.push(c);
    }
    // One waits in the queue (and times out there); the next finds the queue full.
    let mut waiting = Client::connect(p.addr);
    waiting.send("POST", CHAT, &[("api-key", "client-key"), ("x-request-id", "queued-one")], b"{}");
    eventually("the first waits in the queue", || metric(admin, "azure_proxy_queue_depth") == 1);
    let full = call(p.addr, "POST", CHAT, &[("api-key", "client-key"), ("x-request-id", "full-one")], b"{}");
    assert_eq!(full.status, 503, "{}", full.text());
    assert_eq!(waiting.read_response(false).expect("503 after the queue wait").status, 503);
    let line = p.access_line("full-one");
    assert!(line.contains(" status=503 ") && line.contains(" note=queue_full"), "{line}");
    let line = p.access_line("queued-one");
    assert!(line.contains(" status=503 ") && line.contains(" note=queue_timeout"), "{line}");
    gates.lock().expect("gates").clear();
}

#[test]
fn a_worker_waiting_for_a_keep_alive_clients_next_request_gives_way_to_a_queued_one() {
    let m = MockAzure::start(|_: &Recorded| Reply::json(200, json!({"ok": true})));
    // One worker and a linger far longer than the test: a worker that waited it out would keep the second client
    // waiting for a minute (and the pool cannot start another thread).
    let settings = json!({"workers": 1, "idle_workers": 1, "keepalive_linger_ms": 60000, "queue_timeout_ms": 60000});
    let p = proxy::start_with(proxy::instances_for(&[&m]), settings);
    let headers = [("api-key", "client-key"), ("Content-Type", "application/json")];
    let mut a = Client::connect(p.addr);
    a.send("POST", CHAT, &headers, b"{}");
    assert_eq!(a.read_response(false).expect("first answer").status, 200);
    // `a` stays open and quiet, so the only worker is now waiting for its next request. Another client's request
    // must reach it all the same (the client's read timeout is far shorter than the linger).
    let b = call(p.addr, "POST", CHAT, &headers, b"{}");
    assert_eq!(b.status, 200, "{}", b.text());
    // `a` was handed back to the front thread, which still serves its next request.
    a.send("POST", CHAT, &headers, b"{}");
    assert_eq!(a.read_response(false).expect("second answer").status, 200);
    assert_eq!(m.hits(), 3);
}
