//! The holes a hostile review found, each closed as a class: request targets the upstream client cannot send,
//! framing headers that disagree with the bytes sent, client credentials leaving the proxy, path spellings that
//! upstream servers resolve as traversal, keys echoed back by an upstream, unsolicited protocol switches, and
//! HTTP/1.1 requests with no or several `Host` headers.

use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::Duration;

use crate::support::client::{call, find, Client, Resp};
use crate::support::mock::{MockAzure, Recorded, Reply};
use crate::support::proxy::{self, instance, Proxy, CHAT};
use serde_json::json;

const UP_KEY: &str = "UPSTREAMKEYsecurity0123456789abcdefghijklmno";
const CLIENT_KEY: &str = "CLIENTKEYsecurity0123456789abcdefghijklmnopq";

/// An instance that answers 200 and records every target it gets.
fn ok_mock() -> MockAzure {
    MockAzure::start(|_: &Recorded| Reply::json(200, json!({"ok": true})))
}

fn proxy_with_key(mocks: &[&MockAzure], extra: serde_json::Value) -> Proxy {
    let instances = mocks.iter().enumerate().map(|(i, m)| instance(&m.url(), UP_KEY, &format!("m{i}"))).collect();
    let mut extra = extra;
    extra["client_keys"] = json!([CLIENT_KEY]);
    proxy::start_with(instances, extra)
}

/// One raw request on a fresh connection.
fn raw(addr: SocketAddr, request: &[u8]) -> Resp {
    let mut c = Client::connect(addr);
    c.send_raw(request);
    c.read_response(false).unwrap_or_else(|e| panic!("no response to {:?}: {e}", String::from_utf8_lossy(request)))
}

fn get(addr: SocketAddr, target: &[u8]) -> Resp {
    let mut req = b"GET ".to_vec();
    req.extend_from_slice(target);
    req.extend_from_slice(format!(" HTTP/1.1\r\nHost: t\r\napi-key: {CLIENT_KEY}\r\n\r\n").as_bytes());
    raw(addr, &req)
}

/// An upstream that reads one request (head and a Content-Length body) per connection, answers it with the
/// bytes `reply` gives, then holds the connection for `hold` (or until the peer closes) and closes it.
struct Canned {
    addr: SocketAddr,
    hits: Arc<AtomicUsize>,
}

impl Canned {
    fn start(reply: &'static [u8], hold: Duration) -> Canned {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = listener.local_addr().expect("addr");
        let hits = Arc::new(AtomicUsize::new(0));
        let counter = Arc::clone(&hits);
        thread::spawn(move || {
            for conn in listener.incoming() {
                let Ok(mut s) = conn else { continue };
                let counter = Arc::clone(&counter);
                thread::spawn(move || {
                    let _ = s.set_read_timeout(Some(Duration::from_secs(5)));
                    if read_request(&mut s).is_none() {
                        return;
                    }
                    counter.fetch_add(1, Ordering::SeqCst);
                    let _ = s.write_all(reply);
                    let _ = s.set_read_timeout(Some(hold.max(Duration::from_millis(1))));
                    let mut sink = [0u8; 1024];
                    while matches!(s.read(&mut sink), Ok(n) if n > 0) {}
                    let _ = s.shutdown(Shutdown::Both);
                });
            }
        });
        Canned { addr, hits }
    }

    fn url(&self) -> String {
        format!("http://{}", self.addr)
    }
}

/// Reads a request head and its Content-Length body; `None` when the peer closed first.
fn read_request(s: &mut TcpStream) -> Option<Vec<u8>> {
    let mut buf = Vec::new();
    let mut tmp = [0u8; 4096];
    let end = loop {
        if let Some(end) = find(&buf, b"\r\n\r\n") {
            break end + 4;
        }
        match s.read(&mut tmp) {
            Ok(0) | Err(_) => return None,
            Ok(n) => buf.extend_from_slice(&tmp[..n]),
        }
    };
    let head = String::from_utf8_lossy(&buf[..end]).to_ascii_lowercase();
    let len: usize =
        head.lines().find_map(|l| l.strip_prefix("content-length:")).and_then(|v| v.trim().parse().ok()).unwrap_or(0);
    while buf.len() < end + len {
        match s.read(&mut tmp) {
            Ok(0) | Err(_) => return None,
            Ok(n) => buf.extend_from_slice(&tmp[..n]),
        }
    }
    Some(buf)
}

// ---------------------------------------------------------------------------------------------------------
// 1. Targets: accepted exactly when they can be forwarded byte for byte; a refused one costs no instance.
// ---------------------------------------------------------------------------------------------------------

#[test]
fn targets_the_upstream_client_cannot_send_are_400_and_never_open_a_circuit() {
    let (a, b) = (ok_mock(), ok_mock());
    let p = proxy_with_key(&[&a, &b], json!({"circuit_failures": 2}));
    let nasty: &[&[u8]] = &[
        b"/openai/models?q=\"x\"",
        b"/openai/models?q=<script>",
        b"/openai/models?q=a>b",
        b"/openai/deploy`ments/x/chat",
        b"/openai/deployments/<x>/chat",
        b"/openai/models?\x7f",
    ];
    for _ in 0..3 {
        for target in nasty {
            let r = get(p.addr, target);
            let shown = String::from_utf8_lossy(target);
            assert_eq!(r.status, 400, "{shown}: {}", r.text());
            assert_eq!(r.json()["error"]["type"], "invalid_request_error", "{shown}");
        }
    }
    assert_eq!(a.hits() + b.hits(), 0, "a refused target reached an instance");
    // Targets that http allows, with characters that look odd, go through unchanged.
    for target in ["/openai/x{y}|z^w", "/openai/models?q=`a`&b={c}|^~", "/openai/models?", "/openai/a%20b?x=%22"] {
        let before: Vec<String> = a.requests().into_iter().chain(b.requests()).map(|r| r.target).collect();
        let r = get(p.addr, target.as_bytes());
        assert_eq!(r.status, 200, "{target}: {}", r.text());
        let after: Vec<String> = a.requests().into_iter().chain(b.requests()).map(|r| r.target).collect();
        let new: Vec<&String> = after.iter().filter(|t| !before.contains(t) || *t == target).collect();
        assert!(new.iter().any(|t| *t == target), "{target} not forwarded byte for byte: {after:?}");
    }
    // Every instance is still available: nothing above counted against a circuit.
    for _ in 0..4 {
        assert_eq!(get(p.addr, b"/openai/models").status, 200);
    }
}

// ---------------------------------------------------------------------------------------------------------
// 2. Framing: a response with Content-Length and Transfer-Encoding is chunked; the length never reaches the client.
// ---------------------------------------------------------------------------------------------------------

#[test]
fn an_upstream_answer_with_both_content_length_and_chunked_reaches_the_client_whole_and_in_sync() {
    let up = Canned::start(
        b"HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n\
          b\r\nhello world\r\n0\r\n\r\n",
        Duration::ZERO,
    );
    let ok = ok_mock();
    let instances = vec![instance(&up.url(), UP_KEY, "both"), instance(&ok.url(), UP_KEY, "ok")];
    let p = proxy::start_with(instances, json!({"client_keys": [CLIENT_KEY], "max_cooldown_ms": 0}));
    let mut c = Client::connect(p.addr);
    c.send("GET", "/openai/models", &[("api-key", CLIENT_KEY)], b"");
    let r = c.read_response(false).expect("first response");
    assert_eq!(r.status, 200);
    assert_eq!(r.text(), "hello world");
    assert_eq!(r.header("content-length"), None, "the upstream's length must not reach the client: {:?}", r.headers);
    // The connection is still in sync: the next response on it is a whole, separate one.
    c.send("GET", "/openai/models", &[("api-key", CLIENT_KEY)], b"");
    match c.read_response(false) {
        Ok(next) => assert!(next.text() == "hello world" || next.json()["ok"] == true, "desynced: {}", next.text()),
        Err(_) => assert!(c.is_closed(), "neither a clean answer nor a closed connection"),
    }
}

// ---------------------------------------------------------------------------------------------------------
// 3. No client credential ever leaves the proxy.
// ---------------------------------------------------------------------------------------------------------

#[test]
fn authorization_and_proxy_authorization_from_the_client_are_never_forwarded() {
    let m = ok_mock();
    let p = proxy_with_key(&[&m], json!({}));
    let bearer = format!("Bearer {CLIENT_KEY}");
    let headers = [("api-key", CLIENT_KEY), ("Authorization", bearer.as_str()), ("Proxy-Authorization", "Basic dTpw")];
    let r = call(p.addr, "POST", CHAT, &headers, b"{}");
    assert_eq!(r.status, 200, "{}", r.text());
    let seen = m.last_request().expect("forwarded");
    assert_eq!(seen.header_count("authorization"), 0, "{:?}", seen.headers);
    assert_eq!(seen.header_count("proxy-authorization"), 0, "{:?}", seen.headers);
    assert_eq!(seen.header("api-key"), Some(UP_KEY));
    for (n, v) in &seen.headers {
        assert!(!v.contains(CLIENT_KEY), "the client key left the proxy in {n}");
    }

    // With a custom client header, the client's Authorization is still dropped; an instance whose key header is
    // Authorization gets exactly its own.
    let m2 = ok_mock();
    let p2 = proxy::start_with(
        vec![instance(&m2.url(), "Bearer instance-token", "m")],
        json!({"client_keys": [CLIENT_KEY], "client_header_name": "x-proxy-key", "header_name": "Authorization"}),
    );
    let headers = [("x-proxy-key", CLIENT_KEY), ("Authorization", bearer.as_str())];
    let r = call(p2.addr, "POST", CHAT, &headers, b"{}");
    assert_eq!(r.status, 200, "{}", r.text());
    let seen = m2.last_request().expect("forwarded");
    assert_eq!(seen.header_count("authorization"), 1, "{:?}", seen.headers);
    assert_eq!(seen.header("authorization"), Some("Bearer instance-token"));
    assert_eq!(seen.header_count("x-proxy-key"), 0);
}

// ---------------------------------------------------------------------------------------------------------
// 4. Path spellings that some servers resolve as separators or traversal.
// ---------------------------------------------------------------------------------------------------------

#[test]
fn backslashes_path_parameters_and_double_encoding_are_refused_before_any_attempt() {
    let m = ok_mock();
    let p = proxy_with_key(&[&m], json!({}));
    for target in [
        "/openai\\..\\admin",
        "/openai/deployments/x\\chat",
        "/openai/%5c../admin",
        "/openai/%5C../admin",
        "/openai/..;/admin",
        "/openai/deployments/..;/x",
        "/openai/x/..;jsessionid=1/y",
        "/openai/deployments/gpt-4o;v=1/chat/completions",
        "/openai/deployments/x%3b/chat",
        "/openai/%252e%252e/admin",
        "/openai/%2e%2e%3b/admin",
        "/openai/x%00/y",
        "/openai/x%0d%0ay",
        "/openai/%c0%ae%c0%ae/admin",
    ] {
        let r = get(p.addr, target.as_bytes());
        assert_eq!(r.status, 400, "{target}: {}", r.text());
    }
    assert_eq!(m.hits(), 0, "a traversal spelling reached the instance: {:?}", m.requests());
    // A backslash or a semicolon in the query is data, not a path: forwarded as is.
    let r = get(p.addr, b"/openai/models?q=a\\b;c");
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(m.last_request().expect("forwarded").target, "/openai/models?q=a\\b;c");
}

// ---------------------------------------------------------------------------------------------------------
// 5. Keys an upstream echoes never reach the client.
// ---------------------------------------------------------------------------------------------------------

/// Answers `status` with the key it received in a header and in the body, plus the client key (as a debug
/// upstream or a logging egress proxy might).
fn echoing(status: u16) -> MockAzure {
    MockAzure::start(move |r: &Recorded| {
        let key = r.header("api-key").unwrap_or_default().to_string();
        let body = json!({"error": {"code": status.to_string(),
                          "message": format!("key {key} is not valid here; client sent {CLIENT_KEY}")}});
        Reply::json(status, body).with_header("x-debug-key", &format!("k={key}")).with_header("x-echo", CLIENT_KEY)
    })
}

#[test]
fn keys_echoed_in_relayed_headers_and_error_bodies_are_redacted() {
    for (status, instances) in [(400, 1), (401, 2), (404, 2)] {
        let mocks: Vec<MockAzure> = (0..instances).map(|_| echoing(status)).collect();
        let refs: Vec<&MockAzure> = mocks.iter().collect();
        let p = proxy_with_key(&refs, json!({"max_cooldown_ms": 0}));
        let r = call(p.addr, "POST", CHAT, &[("api-key", CLIENT_KEY)], b"{}");
        assert_eq!(r.status, status, "{}", r.text());
        assert!(mocks.iter().any(|m| m.hits() > 0));
        let whole = format!("{:?}\n{}", r.headers, r.text());
        for secret in [UP_KEY, CLIENT_KEY] {
            for start in 0..secret.len() - 12 {
                let piece = &secret[start..start + 12];
                assert!(!whole.contains(piece), "{status}: part of a key ({piece}) reached the client: {whole}");
            }
        }
        assert!(r.text().contains("is not valid here"), "{status}: the rest of the body is relayed: {}", r.text());
        assert!(r.header("x-debug-key").is_some(), "{status}: the header itself is relayed, its value redacted");
        if status == 400 {
            // Relayed with a length that matches the redacted body (read_response checks the framing).
            let len: usize = r.header("content-length").expect("length").parse().expect("number");
            assert_eq!(len, r.body.len());
        }
    }
}

// ---------------------------------------------------------------------------------------------------------
// 6. An upstream that switches protocols unasked is a failed attempt.
// ---------------------------------------------------------------------------------------------------------

#[test]
fn an_unsolicited_101_is_a_failed_attempt_retried_elsewhere_and_alone_a_502() {
    let upgrade = Canned::start(
        b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n",
        Duration::from_secs(3),
    );
    let ok = ok_mock();
    let instances = vec![instance(&upgrade.url(), UP_KEY, "upgrade"), instance(&ok.url(), UP_KEY, "ok")];
    let p = proxy::start_with(instances, json!({"client_keys": [CLIENT_KEY], "max_cooldown_ms": 0}));
    for i in 0..4 {
        let r = call(p.addr, "GET", "/openai/models", &[("api-key", CLIENT_KEY)], b"");
        assert_eq!(r.status, 200, "request {i}: {}", r.text());
        assert_eq!(r.json()["ok"], true);
    }
    assert!(upgrade.hits.load(Ordering::SeqCst) > 0, "the 101 instance was tried");

    let alone = proxy::start_with(
        vec![instance(&upgrade.url(), UP_KEY, "upgrade")],
        json!({"client_keys": [CLIENT_KEY], "circuit_failures": 0}),
    );
    let r = call(alone.addr, "GET", "/openai/models", &[("api-key", CLIENT_KEY)], b"");
    assert_eq!(r.status, 502, "{}", r.text());
    let attempts = r.json()["error"]["attempts"].clone();
    assert!(attempts.to_string().contains("101"), "the attempt says why: {attempts}");
}

#[test]
fn interim_103_early_hints_before_the_answer_are_skipped() {
    let hints = Canned::start(
        b"HTTP/1.1 103 Early Hints\r\nLink: </x>; rel=preload\r\n\r\n\
          HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 11\r\n\r\n{\"ok\":true}",
        Duration::ZERO,
    );
    let p = proxy::start_with(vec![instance(&hints.url(), UP_KEY, "hints")], json!({"client_keys": [CLIENT_KEY]}));
    let r = call(p.addr, "GET", "/openai/models", &[("api-key", CLIENT_KEY)], b"");
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json()["ok"], true);
}

// ---------------------------------------------------------------------------------------------------------
// 7. Host: exactly one in HTTP/1.1 (RFC 9112 §3.2).
// ---------------------------------------------------------------------------------------------------------

#[test]
fn http11_requests_without_host_or_with_several_are_400() {
    let m = ok_mock();
    let p = proxy_with_key(&[&m], json!({}));
    let key = format!("api-key: {CLIENT_KEY}\r\n");
    for (what, head) in [
        ("no Host", format!("GET /openai/models HTTP/1.1\r\n{key}\r\n")),
        ("two Host", format!("GET /openai/models HTTP/1.1\r\nHost: a\r\nHost: b\r\n{key}\r\n")),
        ("two Host in 1.0", format!("GET /openai/models HTTP/1.0\r\nHost: a\r\nHost: a\r\n{key}\r\n")),
        ("bad Host", format!("GET /openai/models HTTP/1.1\r\nHost: a b/c\r\n{key}\r\n")),
    ] {
        let r = raw(p.addr, head.as_bytes());
        assert_eq!(r.status, 400, "{what}: {}", r.text());
    }
    assert_eq!(m.hits(), 0);
    for (what, head) in [
        ("1.0 without Host", format!("GET /openai/models HTTP/1.0\r\n{key}\r\n")),
        ("empty Host", format!("GET /openai/models HTTP/1.1\r\nHost:\r\n{key}\r\n")),
        ("Host with port", format!("GET /openai/models HTTP/1.1\r\nHost: proxy.local:8000\r\n{key}\r\n")),
        ("IPv6 Host", format!("GET /openai/models HTTP/1.1\r\nHost: [::1]:8000\r\n{key}\r\n")),
    ] {
        let r = raw(p.addr, head.as_bytes());
        assert_eq!(r.status, 200, "{what}: {}", r.text());
    }
}

// ---------------------------------------------------------------------------------------------------------
// The target property: whatever the front end accepts reaches the instance byte for byte; whatever it refuses
// reaches nobody; no target ever fails inside the upstream client (a 502 here would be the old hole).
// ---------------------------------------------------------------------------------------------------------

/// An upstream that records each request line and answers 200, keeping connections alive.
struct LineSink {
    addr: SocketAddr,
    lines: Arc<std::sync::Mutex<Vec<String>>>,
}

impl LineSink {
    fn start() -> LineSink {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = listener.local_addr().expect("addr");
        let lines = Arc::new(std::sync::Mutex::new(Vec::new()));
        let sink = Arc::clone(&lines);
        thread::spawn(move || {
            for conn in listener.incoming() {
                let Ok(mut s) = conn else { continue };
                let sink = Arc::clone(&sink);
                thread::spawn(move || {
                    let _ = s.set_read_timeout(Some(Duration::from_secs(30)));
                    while let Some(req) = read_request(&mut s) {
                        let line = req.split(|b| *b == b'\r').next().unwrap_or_default();
                        sink.lock().expect("lines").push(String::from_utf8_lossy(line).into_owned());
                        if s.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\n{}").is_err() {
                            return;
                        }
                    }
                });
            }
        });
        LineSink { addr, lines }
    }
}

/// Pieces that random targets are made of: every printable ASCII byte, and the spellings the checks are about.
#[rustfmt::skip]
const PIECES: &[&str] = &[
    "/", "/", "/", "?", "&", "=", ".", "..", "%2e", "%2E", "%2f", "%5c", "%5C", "%3b", "%25", "%00", "%0a", "%c0",
    "%zz", "%4", "%41", "\\", ";", "..;", "a", "b", "gpt-4o", "deployments", "{", "}", "|", "^", "`", "\"", "<", ">",
    "~", "'", "[", "]", "@", "!", "$", "(", ")", "*", "+", ",", ":", "%", "#", "\x7f",
];

#[test]
fn every_accepted_target_reaches_the_instance_byte_for_byte_and_no_refused_one_reaches_it() {
    let sink = LineSink::start();
    let p = proxy::start_with(
        vec![instance(&format!("http://{}", sink.addr), UP_KEY, "sink")],
        json!({"client_keys": [CLIENT_KEY]}),
    );
    let mut seed: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut next = move || {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed
    };
    let (mut accepted, mut refused) = (0, 0);
    for _ in 0..1500 {
        let mut target = String::from("/openai/");
        for _ in 0..(next() % 12 + 1) {
            // Half the time a printable byte, otherwise one of the pieces.
            if next() % 2 == 0 {
                target.push((0x21 + (next() % 94) as u8) as char);
            } else {
                target.push_str(PIECES[(next() % PIECES.len() as u64) as usize]);
            }
        }
        let before = sink.lines.lock().expect("lines").len();
        let r = get(p.addr, target.as_bytes());
        let lines = sink.lines.lock().expect("lines").clone();
        match azure_proxy::http::target::check(&target) {
            Ok(()) => {
                accepted += 1;
                assert_eq!(r.status, 200, "{target:?} accepted but not served: {}", r.text());
                assert_eq!(lines.len(), before + 1, "{target:?}");
                assert_eq!(lines[before], format!("GET {target} HTTP/1.1"), "{target:?} not forwarded as sent");
            }
            Err(_) => {
                refused += 1;
                assert!(matches!(r.status, 400 | 414), "{target:?} refused by the check, answered {}", r.status);
                assert_eq!(lines.len(), before, "{target:?} was refused but reached the instance");
            }
        }
    }
    // Both sides of the property were exercised.
    assert!(accepted > 200 && refused > 200, "accepted {accepted}, refused {refused}");
}
