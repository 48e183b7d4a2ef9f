//! Faults in the world around the proxy: upstream TLS and DNS failures, throttling and error storms, a slow
//! instance, every instance down, client addresses behind a trusted load balancer, odd bytes in requests, and no
//! key leaking through any of it (checked on the real binary's log).
//!
//! A stream that breaks mid-way under a failing upstream (reset after a few events) is covered in `streaming.rs`
//! (`upstream_reset_inside_a_chunked_body_is_never_a_clean_end_for_the_client` and its length-framed and HTTP/1.0
//! siblings): the client sees an error, never a clean end. It is not repeated here.

use std::io::{ErrorKind, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream, ToSocketAddrs};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use crate::support::client::{call, find, Client, Resp};
use crate::support::mock::{azure_like, serving as ok_mock, MockAzure, Recorded, Reply};
use crate::support::process::{write_config, Running};
use crate::support::proxy::{self, instance, Proxy, CHAT};
use crate::support::{eventually, free_addr};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use serde_json::{json, Value};

/// A self-signed end-entity certificate for `wrong.example` (CA:FALSE, valid until 2126) and its key, made once
/// with the `openssl` CLI (see `fixtures/README.md`). No public root vouches for it: a proxy that checks
/// certificates refuses it (rustls: `UnknownIssuer`).
const WRONG_CERT: &[u8] = include_bytes!("fixtures/wrong-cert.pem");
const WRONG_KEY: &[u8] = include_bytes!("fixtures/wrong-key.pem");

// ---------------------------------------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------------------------------------

/// An instance that always answers `status` (with `Retry-After: 1` for 429).
fn failing_mock(status: u16) -> MockAzure {
    MockAzure::start(move |_: &Recorded| {
        let reply = Reply::json(status, json!({"error": {"code": status.to_string(), "message": "mock failure"}}));
        if status == 429 {
            reply.with_header("Retry-After", "1")
        } else {
            reply
        }
    })
}

/// The URL of a port nobody listens on (bound, then released).
fn refused_url() -> String {
    format!("http://{}", free_addr())
}

/// POST a chat completion with the client key and a chosen request ID (which reaches each instance as
/// `x-ms-client-request-id`, so that the attempts of one request can be counted on the mocks).
fn post(p: &Proxy, rid: &str) -> Resp {
    call(
        p.addr,
        "POST",
        CHAT,
        &[("api-key", "client-key"), ("Content-Type", "application/json"), ("x-request-id", rid)],
        b"{}",
    )
}

fn attempts(r: &Resp) -> Vec<Value> {
    r.json()["error"]["attempts"].as_array().unwrap_or_else(|| panic!("no attempts list: {}", r.text())).clone()
}

/// How many times `m` was asked to serve the request with ID `rid`.
fn seen(m: &MockAzure, rid: &str) -> usize {
    m.requests().iter().filter(|r| r.header("x-ms-client-request-id") == Some(rid)).count()
}

/// A little TCP server for this file's own upstreams (TLS, raw capture): one thread per connection, stopped
/// (accepting no more) when dropped.
struct TinyServer {
    addr: SocketAddr,
    stop: Arc<AtomicBool>,
    accept: Option<JoinHandle<()>>,
}

impl TinyServer {
    fn start(handler: impl Fn(TcpStream) + Send + Sync + 'static) -> TinyServer {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = listener.local_addr().expect("addr");
        let stop = Arc::new(AtomicBool::new(false));
        let handler = Arc::new(handler);
        let flag = Arc::clone(&stop);
        let accept = thread::spawn(move || {
            for conn in listener.incoming() {
                if flag.load(Ordering::SeqCst) {
                    break;
                }
                let Ok(conn) = conn else { continue };
                let h = Arc::clone(&handler);
                thread::spawn(move || h(conn));
            }
        });
        TinyServer { addr, stop, accept: Some(accept) }
    }
}

impl Drop for TinyServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        let _ = TcpStream::connect_timeout(&self.addr, Duration::from_secs(1));
        if let Some(h) = self.accept.take() {
            let _ = h.join();
        }
    }
}

/// An HTTPS "instance" whose certificate no public root vouches for (self-signed, for `wrong.example`).
/// Records each handshake's outcome. Should a client ever accept the certificate, it answers 200 with
/// `x-served-by: tls`, so that the test sees who served.
struct WrongCertServer {
    server: TinyServer,
    accepted: Arc<AtomicUsize>,
    outcomes: Arc<Mutex<Vec<String>>>,
}

impl WrongCertServer {
    fn start() -> WrongCertServer {
        let cert = CertificateDer::from_pem_slice(WRONG_CERT).expect("fixture certificate");
        let key = PrivateKeyDer::from_pem_slice(WRONG_KEY).expect("fixture key");
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let config = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .expect("protocol versions")
            .with_no_client_auth()
            .with_single_cert(vec![cert], key)
            .expect("certificate and key match");
        let config = Arc::new(config);
        let accepted = Arc::new(AtomicUsize::new(0));
        let outcomes = Arc::new(Mutex::new(Vec::new()));
        let (count, out) = (Arc::clone(&accepted), Arc::clone(&outcomes));
        let server = TinyServer::start(move |mut tcp| {
            count.fetch_add(1, Ordering::SeqCst);
            let _ = tcp.set_read_timeout(Some(Duration::from_secs(5)));
            let mut conn = rustls::ServerConnection::new(Arc::clone(&config)).expect("server connection");
            let outcome = loop {
                if !conn.is_handshaking() {
                    break "handshake completed".to_string();
                }
                match conn.complete_io(&mut tcp) {
                    Ok((0, 0)) => break "eof during handshake".to_string(),
                    Ok(_) => {}
                    Err(e) => break format!("handshake failed: {e}"),
                }
            };
            let completed = !conn.is_handshaking();
            out.lock().expect("outcomes").push(outcome);
            if completed {
                let mut tls = rustls::Stream::new(&mut conn, &mut tcp);
                let mut buf = [0u8; 4096];
                let _ = tls.read(&mut buf);
                let _ = tls.write_all(b"HTTP/1.1 200 OK\r\nx-served-by: tls\r\ncontent-length: 2\r\n\r\n{}");
                let _ = tls.flush();
            }
        });
        WrongCertServer { server, accepted, outcomes }
    }

    fn url(&self) -> String {
        format!("https://{}", self.server.addr)
    }
}

/// An upstream that records the raw bytes of every request head it gets and answers each with a small 200 (then
/// closes), so that header bytes can be compared exactly.
struct RawUpstream {
    server: TinyServer,
    heads: Arc<Mutex<Vec<Vec<u8>>>>,
}

impl RawUpstream {
    fn start() -> RawUpstream {
        let heads = Arc::new(Mutex::new(Vec::new()));
        let sink = Arc::clone(&heads);
        let server = TinyServer::start(move |mut s| {
            let _ = s.set_read_timeout(Some(Duration::from_secs(5)));
            let mut head = Vec::new();
            let mut buf = [0u8; 4096];
            while find(&head, b"\r\n\r\n").is_none() && head.len() < 65536 {
                match s.read(&mut buf) {
                    Ok(0) | Err(_) => return,
                    Ok(n) => head.extend_from_slice(&buf[..n]),
                }
            }
            sink.lock().expect("heads").push(head);
            let _ = s.write_all(
                b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 2\r\nconnection: close\r\n\r\n{}",
            );
            let _ = s.shutdown(Shutdown::Write);
        });
        RawUpstream { server, heads }
    }

    fn url(&self) -> String {
        format!("http://{}", self.server.addr)
    }

    fn heads(&self) -> Vec<Vec<u8>> {
        self.heads.lock().expect("heads").clone()
    }

    /// The value bytes of header `name` in the last recorded head.
    fn last_header(&self, name: &str) -> Option<Vec<u8>> {
        let head = self.heads().pop()?;
        head.split(|b| *b == b'\n').find_map(|line| {
            let line = line.strip_suffix(b"\r").unwrap_or(line);
            let colon = line.iter().position(|b| *b == b':')?;
            let value = &line[colon + 1..];
            let start = value.iter().position(|b| *b != b' ' && *b != b'\t').unwrap_or(value.len());
            line[..colon].eq_ignore_ascii_case(name.as_bytes()).then(|| value[start..].to_vec())
        })
    }
}

/// The real binary on a config written from `config`.
fn start_binary(config: &Value, name: &str, env: &[(&str, &str)]) -> Running {
    Running::start(&write_config(name, &config.to_string()), env)
}

// ---------------------------------------------------------------------------------------------------------
// 1. TLS with a certificate no root vouches for
// ---------------------------------------------------------------------------------------------------------

#[test]
fn a_tls_instance_with_a_wrong_certificate_fails_over_and_alone_gives_502_naming_tls() {
    let tls = WrongCertServer::start();
    let good = ok_mock("good");
    let p = proxy::start_with(
        vec![instance(&tls.url(), "key0", "tls"), instance(&good.url(), "key1", "good")],
        json!({"connect_timeout_ms": 5000}),
    );
    // A fresh proxy starts its round-robin at the first instance: the TLS one is tried first.
    let r = post(&p, "tls-failover");
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.header("x-served-by"), Some("good"));
    assert_eq!(tls.accepted.load(Ordering::SeqCst), 1, "the TLS instance was tried first");
    assert_eq!(seen(&good, "tls-failover"), 1);
    eventually("the TLS server recorded the handshake", || !tls.outcomes.lock().expect("o").is_empty());
    let outcome = tls.outcomes.lock().expect("o")[0].clone();
    assert!(outcome.starts_with("handshake failed"), "the proxy must refuse the certificate: {outcome}");

    let alone = proxy::start_with(vec![instance(&tls.url(), "key0", "tls")], json!({"connect_timeout_ms": 5000}));
    let r = post(&alone, "tls-alone");
    assert_eq!(r.status, 502, "{}", r.text());
    assert_eq!(r.json()["error"]["code"], "all_instances_failed");
    let list = attempts(&r);
    assert_eq!(list.len(), 1, "{list:?}");
    assert_eq!(list[0]["instance"], "tls");
    assert!(list[0].get("status").is_none(), "{}", list[0]);
    let error = list[0]["error"].as_str().expect("an error string").to_ascii_lowercase();
    assert!(error.contains("tls") && error.contains("certificate"), "{error}");
}

// ---------------------------------------------------------------------------------------------------------
// 2. DNS failure
// ---------------------------------------------------------------------------------------------------------

/// Whether this machine answers "no such host" for `host` within 3 s (None), or why the test cannot rely on it.
fn lookup_fails_quickly(host: &'static str) -> Option<String> {
    let (tx, rx) = mpsc::channel();
    thread::spawn(move || {
        let _ = tx.send((host, 80).to_socket_addrs().map(|a| a.count()));
    });
    match rx.recv_timeout(Duration::from_secs(3)) {
        Ok(Err(_)) | Ok(Ok(0)) => None,
        Ok(Ok(n)) => Some(format!("{host} resolves to {n} address(es) here")),
        Err(_) => Some(format!("resolving {host} takes more than 3 s here (no resolver?)")),
    }
}

#[test]
#[ignore = "needs a resolver that answers 'no such host' for .invalid within 3 s; .ci/run checks and runs this"]
fn an_instance_whose_host_does_not_resolve_fails_over_and_alone_gives_502_naming_the_lookup() {
    const HOST: &str = "nonexistent-host.invalid";
    // The proxy gives ureq no resolve timeout (connect_timeout_ms does not bound the lookup), so a resolver that
    // hangs would hang this test: check the machine first.
    if let Some(why) = lookup_fails_quickly(HOST) {
        panic!("this machine cannot run the test: {why}");
    }
    let good = ok_mock("good");
    let dead = instance(&format!("http://{HOST}:80"), "key0", "nowhere");
    let p = proxy::start_with(vec![dead.clone(), instance(&good.url(), "key1", "good")], json!({}));
    let r = post(&p, "dns-failover");
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.header("x-served-by"), Some("good"));
    assert_eq!(seen(&good, "dns-failover"), 1);

    let alone = proxy::start_with(vec![dead], json!({}));
    let r = post(&alone, "dns-alone");
    assert_eq!(r.status, 502, "{}", r.text());
    let list = attempts(&r);
    assert_eq!(list.len(), 1, "{list:?}");
    assert_eq!(list[0]["instance"], "nowhere");
    let error = list[0]["error"].as_str().expect("an error string").to_ascii_lowercase();
    assert!(error.contains("lookup") || error.contains("host not found"), "{error}");
}

// ---------------------------------------------------------------------------------------------------------
// 3, 4. Storms
// ---------------------------------------------------------------------------------------------------------

#[test]
fn a_429_storm_on_two_of_three_instances_is_absorbed_by_cooldowns() {
    let (t0, t1, good) = (failing_mock(429), failing_mock(429), ok_mock("good"));
    let p = proxy::start_with(proxy::instances_for(&[&t0, &t1, &good]), json!({}));
    let started = Instant::now();
    for i in 0..30 {
        let rid = format!("storm429-{i}");
        let r = post(&p, &rid);
        assert_eq!(r.status, 200, "request {i}: {}", r.text());
        assert_eq!(r.json()["served_by"], "good", "request {i}");
        assert_eq!(seen(&good, &rid), 1, "request {i}");
        assert!(seen(&t0, &rid) + seen(&t1, &rid) <= 2, "request {i}: each instance at most once");
    }
    let elapsed = started.elapsed();
    // The first request meets both throttled instances (round-robin starts at m0); each then cools down for the
    // second its Retry-After asks, so it can be asked again only once per second. Without cooldowns the 30
    // requests would make 30 attempts on them.
    let per_instance = 1 + elapsed.as_secs() as usize;
    for (name, m) in [("m0", &t0), ("m1", &t1)] {
        assert!(m.hits() >= 1, "{name} was never tried");
        assert!(m.hits() <= per_instance, "{name} was asked {} times in {elapsed:?}: cooldowns not honoured", m.hits());
    }
    assert_eq!(good.hits(), 30);
}

#[test]
fn a_500_storm_on_two_of_three_instances_is_served_by_the_third_with_bounded_attempts() {
    let (f0, f1, good) = (failing_mock(500), failing_mock(500), ok_mock("good"));
    let p = proxy::start_with(proxy::instances_for(&[&f0, &f1, &good]), json!({}));
    for i in 0..30 {
        let rid = format!("storm500-{i}");
        let r = post(&p, &rid);
        assert_eq!(r.status, 200, "request {i}: {}", r.text());
        assert_eq!(r.json()["served_by"], "good", "request {i}");
        // 500 neither cools an instance down nor counts against its circuit: plain round-robin, each instance
        // at most once. Starting at m0: m0, m1, good; at m1: m1, good; at good: good.
        let expected = [(1, 1), (0, 1), (0, 0)][i % 3];
        assert_eq!((seen(&f0, &rid), seen(&f1, &rid), seen(&good, &rid)), (expected.0, expected.1, 1), "request {i}");
    }
    assert_eq!((f0.hits(), f1.hits(), good.hits()), (10, 20, 30));
}

// ---------------------------------------------------------------------------------------------------------
// 5. A very slow instance
// ---------------------------------------------------------------------------------------------------------

#[test]
fn a_slow_instance_times_out_fails_over_and_its_circuit_opens_after_three_timeouts() {
    let slow = MockAzure::start(|_: &Recorded| {
        Reply::json(200, json!({"served_by": "slow"}))
            .with_header("x-served-by", "slow")
            .delayed(Duration::from_secs(2))
    });
    let (m1, m2) = (ok_mock("m1"), ok_mock("m2"));
    let mut slow_inst = instance(&slow.url(), "key0", "slow");
    slow_inst["upstream_response_timeout_ms"] = 200.into();
    slow_inst["upstream_read_timeout_ms"] = 200.into();
    // A long open interval, so that no half-open probe can happen during the test however slow the machine is.
    let p = proxy::start_with(
        vec![slow_inst.clone(), instance(&m1.url(), "key1", "m1"), instance(&m2.url(), "key2", "m2")],
        json!({"circuit_open_ms": 60000, "circuit_max_open_ms": 60000}),
    );
    for i in 0..12 {
        let rid = format!("slow-{i}");
        let r = post(&p, &rid);
        assert_eq!(r.status, 200, "request {i}: {}", r.text());
        // Round-robin start: slow, m1, m2, slow, ... A request starting at "slow" waits 200 ms, then goes on.
        let (expect_slow, expect_by) = match i % 3 {
            0 if i < 9 => (1, "m1"),
            0 => (0, "m1"), // circuit open after 3 timeouts: skipped without a connection
            1 => (0, "m1"),
            _ => (0, "m2"),
        };
        assert_eq!(r.header("x-served-by"), Some(expect_by), "request {i}");
        assert_eq!(seen(&slow, &rid), expect_slow, "request {i}");
    }
    assert_eq!(slow.hits(), 3, "circuit_failures (3) timeouts, then the slow instance is skipped");
    assert_eq!(slow.connections(), 3, "no connection to an open circuit");
    let ready = call(p.addr, "GET", "/readyz", &[], b"");
    assert_eq!(ready.status, 200, "{}", ready.text());
    let states = ready.json()["instances"].clone();
    assert_eq!(states[0]["name"], "slow");
    assert_eq!(states[0]["state"], "circuit_open", "{states}");

    // Alone, the timeout is the last failure: 504, and the attempt says it was a timeout.
    let alone = proxy::start_with(vec![slow_inst], json!({}));
    let r = post(&alone, "slow-alone");
    assert_eq!(r.status, 504, "{}", r.text());
    assert_eq!(r.json()["error"]["code"], "upstream_timeout");
    let list = attempts(&r);
    assert_eq!(list.len(), 1, "{list:?}");
    let error = list[0]["error"].as_str().expect("an error string").to_ascii_lowercase();
    assert!(error.contains("timeout") || error.contains("timed out"), "{error}");
}

// ---------------------------------------------------------------------------------------------------------
// 6. Every instance down
// ---------------------------------------------------------------------------------------------------------

#[test]
fn all_instances_down_gives_502_with_attempts_then_503_with_retry_after_once_circuits_open() {
    let urls: Vec<String> = (0..3).map(|_| refused_url()).collect();
    let insts = urls.iter().enumerate().map(|(i, u)| instance(u, &format!("key{i}"), &format!("d{i}"))).collect();
    let p = proxy::start_with(
        insts,
        json!({"circuit_open_ms": 60000, "circuit_max_open_ms": 60000, "upstream_response_timeout_ms": 2000}),
    );
    // Three requests, three refused attempts each: every circuit has seen circuit_failures (3) failures.
    for i in 0..3 {
        let r = post(&p, &format!("down-{i}"));
        assert_eq!(r.status, 502, "request {i}: {}", r.text());
        assert_eq!(r.json()["error"]["code"], "all_instances_failed");
        let list = attempts(&r);
        assert_eq!(list.len(), 3, "request {i}: {list:?}");
        for a in &list {
            let error = a["error"].as_str().unwrap_or_default().to_ascii_lowercase();
            assert!(error.contains("refused"), "request {i}: {a}");
        }
    }
    // Listen on the dead ports now: an attempt would show up as a connection here.
    let listeners: Vec<TcpListener> = urls
        .iter()
        .filter_map(|u| TcpListener::bind(u.trim_start_matches("http://")).ok())
        .inspect(|l| l.set_nonblocking(true).expect("nonblocking"))
        .collect();
    if listeners.len() < 3 {
        eprintln!("NOTE: {} dead port(s) taken by someone else meanwhile; not watched", 3 - listeners.len());
    }
    for i in 3..10 {
        let r = post(&p, &format!("down-{i}"));
        assert_eq!(r.status, 503, "request {i}: {}", r.text());
        assert_eq!(r.json()["error"]["code"], "no_instance_available");
        assert_eq!(attempts(&r).len(), 0, "request {i}");
        let secs: u64 = r.header("retry-after").and_then(|v| v.parse().ok()).expect("a Retry-After in seconds");
        assert!((1..=60).contains(&secs), "request {i}: Retry-After {secs}");
    }
    for l in &listeners {
        match l.accept() {
            Err(e) if e.kind() == ErrorKind::WouldBlock => {}
            other => panic!("the proxy connected to an instance whose circuit is open: {other:?}"),
        }
    }
}

#[test]
fn all_instances_down_with_the_breaker_off_gives_502_listing_every_attempt_each_time() {
    let insts = (0..3).map(|i| instance(&refused_url(), &format!("key{i}"), &format!("d{i}"))).collect();
    let p = proxy::start_with(insts, json!({"circuit_failures": 0}));
    for i in 0..10 {
        let r = post(&p, &format!("down-nobreaker-{i}"));
        assert_eq!(r.status, 502, "request {i}: {}", r.text());
        let names: Vec<String> = attempts(&r).iter().map(|a| a["instance"].as_str().unwrap_or("").into()).collect();
        let mut sorted = names.clone();
        sorted.sort();
        assert_eq!(sorted, ["d0", "d1", "d2"], "request {i}: each instance once: {names:?}");
    }
}

// ---------------------------------------------------------------------------------------------------------
// 8. trusted_proxies and X-Forwarded-For
// ---------------------------------------------------------------------------------------------------------

fn keyed(p: &Proxy, key: &str, xff: Option<&str>) -> Resp {
    let mut headers = vec![("api-key", key)];
    if let Some(x) = xff {
        headers.push(("X-Forwarded-For", x));
    }
    call(p.addr, "POST", CHAT, &headers, b"{}")
}

#[test]
fn without_trusted_proxies_x_forwarded_for_is_ignored_and_the_peer_is_blocked() {
    let good = ok_mock("good");
    let p = proxy::start_with(proxy::instances_for(&[&good]), json!({"max_bad_keys": 3}));
    for (i, xff) in ["203.0.113.1", "203.0.113.2", "203.0.113.3"].into_iter().enumerate() {
        let r = keyed(&p, "wrong-key", Some(xff));
        assert_eq!(r.status, 401, "bad key {i}: {}", r.text());
    }
    // The three strikes were all 127.0.0.1's, whatever the header said.
    for xff in [None, Some("198.51.100.1")] {
        let r = keyed(&p, "client-key", xff);
        assert_eq!(r.status, 403, "XFF {xff:?}: {}", r.text());
        assert!(r.header("retry-after").is_some());
    }
    assert_eq!(good.hits(), 0);
}

#[test]
fn with_a_trusted_proxy_the_rightmost_untrusted_forwarded_address_is_the_one_blocked() {
    let good = ok_mock("good");
    let p =
        proxy::start_with(proxy::instances_for(&[&good]), json!({"max_bad_keys": 3, "trusted_proxies": ["127.0.0.1"]}));
    for i in 0..3 {
        let r = keyed(&p, "wrong-key", Some("203.0.113.9"));
        assert_eq!(r.status, 401, "bad key {i}: {}", r.text());
    }
    let cases = [
        (Some("203.0.113.9"), 403, "the blocked client"),
        (Some("198.51.100.1"), 200, "another client behind the same balancer"),
        (None, 200, "the balancer itself (the peer, 127.0.0.1)"),
        (Some("1.2.3.4, 203.0.113.9"), 403, "a client-written prefix does not help"),
        (Some("1.2.3.4, 203.0.113.9, 127.0.0.1"), 403, "trusted hops on the right are skipped"),
        (Some("203.0.113.9, 198.51.100.7"), 200, "the rightmost untrusted hop counts"),
    ];
    for (xff, status, what) in cases {
        let r = keyed(&p, "client-key", xff);
        assert_eq!(r.status, status, "{what} (XFF {xff:?}): {}", r.text());
    }
    assert_eq!(good.hits(), 3, "only the three requests answered 200 reached the instance");
}

#[test]
fn the_access_line_names_the_forwarded_client_only_behind_a_trusted_proxy() {
    let good = MockAzure::start(azure_like("good", "k0", Duration::from_millis(1)));
    let cfg = |trusted: Value| {
        json!({"instances": [{"endpoint": good.url(), "api_key": "k0", "name": "good"}], "client_keys": ["ck"],
               "trusted_proxies": trusted})
    };
    let send = |addr: SocketAddr, rid: &str, xff: Option<&str>| {
        let mut headers = vec![("api-key", "ck"), ("x-request-id", rid)];
        if let Some(x) = xff {
            headers.push(("X-Forwarded-For", x));
        }
        assert_eq!(call(addr, "POST", CHAT, &headers, b"{}").status, 200, "{rid}");
    };
    let trusting = start_binary(&cfg(json!(["127.0.0.1"])), "xff-trusted.json", &[]);
    send(trusting.addr, "xff-t1", Some("1.2.3.4, 203.0.113.9"));
    send(trusting.addr, "xff-t2", None);
    assert!(trusting.access_line("xff-t1").contains(" client=203.0.113.9 "), "{}", trusting.access_line("xff-t1"));
    assert!(trusting.access_line("xff-t2").contains(" client=127.0.0.1 "), "{}", trusting.access_line("xff-t2"));

    let plain = start_binary(&cfg(json!([])), "xff-plain.json", &[]);
    send(plain.addr, "xff-p1", Some("203.0.113.9"));
    assert!(plain.access_line("xff-p1").contains(" client=127.0.0.1 "), "{}", plain.access_line("xff-p1"));
}

// ---------------------------------------------------------------------------------------------------------
// 9. Odd bytes in requests
// ---------------------------------------------------------------------------------------------------------

/// Sends `request` on a fresh connection and reads the whole answer.
fn raw_exchange(p: &Proxy, request: &[u8]) -> Resp {
    let mut c = Client::connect(p.addr);
    c.send_raw(request);
    c.read_response(false).expect("a complete response")
}

fn assert_still_serving(p: &Proxy, up: &RawUpstream, after: &str) {
    let before = up.heads().len();
    let r = raw_exchange(p, b"GET /openai/models HTTP/1.1\r\nHost: t\r\napi-key: client-key\r\n\r\n");
    assert_eq!(r.status, 200, "after {after}: {}", r.text());
    assert_eq!(up.heads().len(), before + 1, "after {after}");
}

#[test]
fn non_ascii_header_values_are_forwarded_byte_for_byte_or_refused_cleanly() {
    let up = RawUpstream::start();
    let p = proxy::start_with(vec![instance(&up.url(), "key0", "raw")], json!({}));
    for (what, value) in [("UTF-8", "café".as_bytes()), ("obs-text", b"caf\xe9".as_slice())] {
        let before = up.heads().len();
        let mut req = b"GET /openai/models HTTP/1.1\r\nHost: t\r\napi-key: client-key\r\nX-Note: ".to_vec();
        req.extend_from_slice(value);
        req.extend_from_slice(b"\r\n\r\n");
        let r = raw_exchange(&p, &req);
        match r.status {
            200 => {
                assert_eq!(up.heads().len(), before + 1, "{what}");
                let got = up.last_header("x-note").expect("x-note forwarded");
                assert!(got == value, "{what}: forwarded as {got:?}, sent {value:?}");
            }
            400 => {
                assert_eq!(r.json()["error"]["type"], "invalid_request_error", "{what}");
                assert_eq!(up.heads().len(), before, "{what}: a refused request must not be forwarded");
            }
            other => panic!("{what}: expected the header forwarded (200) or a clean 400, got {other}: {}", r.text()),
        }
        assert_still_serving(&p, &up, what);
    }
}

#[test]
fn control_bytes_in_headers_and_nul_in_the_path_are_400_and_unknown_methods_pass_through() {
    let up = RawUpstream::start();
    let p = proxy::start_with(vec![instance(&up.url(), "key0", "raw")], json!({}));
    let bad: [(&str, &[u8]); 3] = [
        (
            "a control byte in a header value",
            b"GET /openai/models HTTP/1.1\r\nHost: t\r\napi-key: client-key\r\nX-Note: a\x01b\r\n\r\n",
        ),
        ("a NUL in the path", b"GET /openai/mo\0dels HTTP/1.1\r\nHost: t\r\napi-key: client-key\r\n\r\n"),
        (
            "a DEL in a header value",
            b"GET /openai/models HTTP/1.1\r\nHost: t\r\napi-key: client-key\r\nX-Note: a\x7fb\r\n\r\n",
        ),
    ];
    for (what, req) in bad {
        let before = up.heads().len();
        let r = raw_exchange(&p, req);
        assert_eq!(r.status, 400, "{what}: {}", r.text());
        assert_eq!(r.json()["error"]["type"], "invalid_request_error", "{what}");
        assert_eq!(up.heads().len(), before, "{what}: forwarded");
        assert_still_serving(&p, &up, what);
    }
    let heads_before = up.heads().len();
    let path = "/openai/deployments/gpt-4o/files?api-version=2024-06-01";
    let r = call(p.addr, "PROPFIND", path, &[("api-key", "client-key"), ("Depth", "1")], b"");
    assert_eq!(r.status, 200, "{}", r.text());
    let heads = up.heads();
    assert_eq!(heads.len(), heads_before + 1);
    let head = String::from_utf8_lossy(heads.last().expect("head")).into_owned();
    assert!(head.starts_with(&format!("PROPFIND {path} HTTP/1.1\r\n")), "{head}");
    assert_eq!(up.last_header("depth").as_deref(), Some(b"1".as_slice()), "{head}");
}

// ---------------------------------------------------------------------------------------------------------
// 10. Secrets, through the real binary at debug level
// ---------------------------------------------------------------------------------------------------------

const UP_REFUSED: &str = "UPSTREAMKEYrefused0123456789abcdefghijklmnop";
const UP_ECHO: &str = "UPSTREAMKEYecho0123456789abcdefghijklmnopqrs";
const UP_TLS: &str = "UPSTREAMKEYtls0123456789abcdefghijklmnopqrstu";
const UP_GOOD: &str = "UPSTREAMKEYgood0123456789abcdefghijklmnopqrs";
const CLIENT: &str = "CLIENTKEYgood0123456789abcdefghijklmnopqrstuv";
const WRONG: &str = "CLIENTKEYwrong0123456789abcdefghijklmnopqrstu";

/// An instance that answers 500 and echoes the key it was sent in its body and in a header.
fn echoing_500() -> MockAzure {
    MockAzure::start(|r: &Recorded| {
        let key = r.header("api-key").unwrap_or_default().to_string();
        Reply::json(
            500,
            json!({"error": {"code": "InternalServerError", "message": format!("upstream got key {key}")}}),
        )
        .with_header("x-echo-key", &key)
    })
}

fn transcript(r: &Resp) -> String {
    let headers: Vec<String> = r.headers.iter().map(|(n, v)| format!("{n}: {v}")).collect();
    format!("{} {}\n{}", r.status, headers.join("\n"), r.text())
}

#[test]
fn no_key_appears_in_any_log_line_or_response_through_refused_500_tls_and_bad_key_failures() {
    let echo = echoing_500();
    let tls = WrongCertServer::start();
    let good = MockAzure::start(azure_like("good", UP_GOOD, Duration::from_millis(1)));
    let config = json!({
        "instances": [
            {"endpoint": refused_url(), "api_key": UP_REFUSED, "name": "refused"},
            {"endpoint": echo.url(), "api_key": UP_ECHO, "name": "echo"},
            {"endpoint": tls.url(), "api_key": UP_TLS, "name": "tls"},
            // Serves gpt-4o only, so that requests for other deployments meet nothing but failures.
            {"endpoint": good.url(), "api_key": UP_GOOD, "name": "good",
             "deployments": {"gpt-4o": "gpt-4o"}, "deployments_only": true},
        ],
        "client_keys": [CLIENT],
        "max_bad_keys": 2,
        "circuit_failures": 0,
        "connect_timeout_ms": 5000,
    });
    let p = start_binary(&config, "secrets.json", &[("RUST_LOG", "debug")]);
    let mut seen_by_client = Vec::new();
    let other = "/openai/deployments/other/chat/completions?api-version=2024-06-01";
    for i in 0..3 {
        let rid = format!("sec-fail-{i}");
        let r = call(p.addr, "POST", other, &[("api-key", CLIENT), ("x-request-id", &rid)], b"{}");
        assert_eq!(r.status, 502, "{}", r.text());
        let errors = r.text().to_ascii_lowercase();
        assert!(errors.contains("refused") && errors.contains("tls") && errors.contains("500"), "{errors}");
        seen_by_client.push(transcript(&r));
    }
    for i in 0..4 {
        let rid = format!("sec-ok-{i}");
        let r = call(p.addr, "POST", CHAT, &[("api-key", CLIENT), ("x-request-id", &rid)], b"{}");
        assert_eq!(r.status, 200, "{}", r.text());
        seen_by_client.push(transcript(&r));
    }
    for (i, key) in [WRONG, WRONG, CLIENT].into_iter().enumerate() {
        let rid = format!("sec-badkey-{i}");
        let r = call(p.addr, "POST", CHAT, &[("api-key", key), ("x-request-id", &rid)], b"{}");
        assert_eq!(r.status, if i < 2 { 401 } else { 403 }, "{}", r.text());
        seen_by_client.push(transcript(&r));
    }
    let log = p.log_when(|l| l.contains("[access]") && l.contains("sec-badkey-2"));
    assert!(echo.requests().iter().any(|r| r.header("api-key") == Some(UP_ECHO)), "the echo instance got its key");
    assert!(log.iter().any(|l| l.contains("status=500") && l.contains("[REDACTED]")), "echo not logged: {log:#?}");
    assert!(log.iter().any(|l| l.contains("error=Tls")), "TLS failure not logged: {log:#?}");
    for secret in [UP_REFUSED, UP_ECHO, UP_TLS, UP_GOOD, CLIENT, WRONG] {
        for line in &log {
            assert!(!line.contains(secret), "a key in the log: {line}");
        }
        for r in &seen_by_client {
            assert!(!r.contains(secret), "a key in a response: {r}");
        }
    }
}

#[test]
fn an_error_body_cut_inside_an_echoed_key_leaks_no_part_of_it() {
    let echo = echoing_500();
    let good = MockAzure::start(azure_like("good", UP_GOOD, Duration::from_millis(1)));
    let config = json!({
        "instances": [
            {"endpoint": echo.url(), "api_key": UP_ECHO, "name": "echo"},
            {"endpoint": good.url(), "api_key": UP_GOOD, "name": "good"},
        ],
        "client_keys": [CLIENT],
    });
    // The echoed body is {"error":{"code":"InternalServerError","message":"upstream got key <KEY>"}}: cut it
    // 20 bytes into the key.
    let prefix = r#"{"error":{"code":"InternalServerError","message":"upstream got key "#;
    let cut = (prefix.len() + 20).to_string();
    let p = start_binary(&config, "secrets-cut.json", &[("ERROR_BODY_MAX_BYTES", cut.as_str())]);
    let r = call(p.addr, "POST", CHAT, &[("api-key", CLIENT), ("x-request-id", "sec-cut")], b"{}");
    assert_eq!(r.status, 200, "{}", r.text());
    let log = p.log_when(|l| l.contains("[access]") && l.contains("sec-cut"));
    let attempt = log.iter().find(|l| l.contains("sec-cut") && l.contains("status=500")).expect("the attempt line");
    assert!(attempt.contains("upstream got key"), "the body was logged up to the cut: {attempt}");
    // Any 12 consecutive characters of the key are enough to recognise (and start guessing) it.
    for start in 0..UP_ECHO.len() - 12 {
        let piece = &UP_ECHO[start..start + 12];
        assert!(!attempt.contains(piece), "part of the key ({piece}) in the log: {attempt}");
    }
}
