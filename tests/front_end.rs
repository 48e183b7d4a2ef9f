//! The front end: request framing (chunked, Expect, limits, smuggling), head limits and deadlines, the
//! connection and queue limits, and what a slow or silent client can and cannot hold.

use std::io::ErrorKind;
use std::net::{SocketAddr, TcpStream};
use std::os::fd::AsRawFd;
use std::sync::mpsc;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::support::client::{chat, read_raw_head, Client, Resp};
use crate::support::mock::{azure_like, MockAzure, Recorded, Reply};
use crate::support::proxy::{self, Proxy, CHAT};
use serde_json::json;

/// Deadline for an eventual state (a connection closed, a slot freed). Only reached when the proxy is wrong.
const EVENTUALLY: Duration = Duration::from_secs(10);

fn ok_mock() -> MockAzure {
    MockAzure::start(|_: &Recorded| Reply::json(200, json!({"ok": true})))
}

fn proxy_for(m: &MockAzure, extra: serde_json::Value) -> Proxy {
    proxy::start_with(proxy::instances_for(&[m]), extra)
}

/// Sends `raw` on a fresh connection and reads one response.
fn raw_call(addr: SocketAddr, raw: &[u8]) -> (Client, Resp) {
    let mut c = Client::connect(addr);
    c.send_raw(raw);
    let r = c.read_response(false).unwrap_or_else(|e| panic!("no response to {:?}: {e}", preview(raw)));
    (c, r)
}

fn preview(raw: &[u8]) -> String {
    String::from_utf8_lossy(&raw[..raw.len().min(120)]).into_owned()
}

/// A proxy-made error: the OpenAI envelope, whose request_id is the x-request-id header.
fn assert_error(r: &Resp, status: u16, what: &str) {
    assert_eq!(r.status, status, "{what}: {}", r.text());
    let rid = r.header("x-request-id").unwrap_or_else(|| panic!("{what}: no x-request-id"));
    assert!(!rid.is_empty());
    assert_eq!(r.header("content-type"), Some("application/json"), "{what}");
    let body = r.json();
    assert!(body["error"]["message"].is_string(), "{what}: {body}");
    assert_eq!(body["error"]["request_id"], rid, "{what}");
}

/// The proxy closed the connection: EOF (or a reset) with nothing more to read, not a read timeout.
fn assert_closed(c: &mut Client, what: &str) {
    c.stream.set_read_timeout(Some(EVENTUALLY)).expect("timeout");
    match c.read_to_end() {
        Ok(rest) => assert!(rest.is_empty(), "{what}: unexpected bytes {:?}", preview(&rest)),
        Err(e) if e.kind() == ErrorKind::ConnectionReset => {}
        Err(e) => panic!("{what}: connection still open ({e})"),
    }
}

/// Index of the first of `streams` with something to read (or EOF), waiting at most `timeout`.
fn first_readable(streams: &[&TcpStream], timeout: Duration) -> Option<usize> {
    let mut fds: Vec<libc::pollfd> =
        streams.iter().map(|s| libc::pollfd { fd: s.as_raw_fd(), events: libc::POLLIN, revents: 0 }).collect();
    // SAFETY: `fds` is a live, initialised slice of pollfd for the whole call, and its length is passed.
    let n = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, timeout.as_millis() as i32) };
    if n <= 0 {
        return None;
    }
    fds.iter().position(|f| f.revents != 0)
}

fn good_request(c: &mut Client) {
    c.send("POST", CHAT, &[("api-key", "client-key")], b"{}");
    let r = c.read_response(false).expect("response");
    assert_eq!(r.status, 200, "{}", r.text());
}

fn post_head(extra_headers: &str) -> String {
    format!("POST {CHAT} HTTP/1.1\r\nHost: p\r\napi-key: client-key\r\n{extra_headers}\r\n")
}

#[test]
fn chunked_request_body_is_forwarded_whole_with_a_content_length() {
    let m = ok_mock();
    let running = proxy_for(&m, json!({}));
    let addr = running.addr;
    let body = br#"{"messages":[{"role":"user","content":"hello, chunked world"}]}"#;
    let (a, b) = body.split_at(20);
    let mut raw = post_head("Transfer-Encoding: chunked\r\nContent-Type: application/json\r\n").into_bytes();
    raw.extend_from_slice(format!("{:x};ext=1\r\n", a.len()).as_bytes());
    raw.extend_from_slice(a);
    raw.extend_from_slice(format!("\r\n{:x}\r\n", b.len()).as_bytes());
    raw.extend_from_slice(b);
    raw.extend_from_slice(b"\r\n0\r\n\r\n");
    let (_c, r) = raw_call(addr, &raw);
    assert_eq!(r.status, 200, "{}", r.text());
    let seen = m.last_request().expect("upstream saw the request");
    assert_eq!(seen.body, body, "byte-identical, no chunk framing");
    assert_eq!(seen.header("transfer-encoding"), None, "forwarded with a length, not re-chunked");
    assert_eq!(seen.header("content-length"), Some(body.len().to_string().as_str()));
}

#[test]
fn expect_100_continue_with_a_good_key_gets_continue_then_the_answer() {
    let m = ok_mock();
    let running = proxy_for(&m, json!({}));
    let addr = running.addr;
    let body = br#"{"messages":[]}"#;
    let mut c = Client::connect(addr);
    c.send_raw(post_head(&format!("Expect: 100-continue\r\nContent-Length: {}\r\n", body.len())).as_bytes());
    let (status, head) = read_raw_head(&mut c.stream).expect("an interim answer before the body is sent");
    assert_eq!(status, 100, "{head}");
    assert!(head.starts_with("HTTP/1.1 100 Continue\r\n"), "{head}");
    assert_eq!(m.hits(), 0, "nothing forwarded before the body");
    c.send_raw(body);
    let r = c.read_response(false).expect("final answer");
    assert_eq!(r.status, 200, "{}", r.text());
    let seen = m.last_request().expect("upstream saw the request");
    assert_eq!(seen.body, body);
    assert_eq!(seen.header("expect"), None, "Expect is answered by the proxy, not forwarded");
}

#[test]
fn only_origin_form_targets_are_accepted() {
    let m = ok_mock();
    let running = proxy_for(&m, json!({}));
    let addr = running.addr;
    for line in [
        "GET http://evil.example/openai/x HTTP/1.1",
        "OPTIONS * HTTP/1.1",
        "CONNECT evil.example:443 HTTP/1.1",
        "GET /openai/../x HTTP/1.1",
        "GET //evil/openai/x HTTP/1.1",
    ] {
        let raw = format!("{line}\r\nHost: evil.example\r\napi-key: client-key\r\n\r\n");
        let (mut c, r) = raw_call(addr, raw.as_bytes());
        assert_error(&r, 400, line);
        assert_closed(&mut c, line);
    }
    assert_eq!(m.hits(), 0, "nothing reached the upstream");
    assert_eq!(m.connections(), 0);
}

#[test]
fn huge_declared_length_is_refused_before_the_body_is_sent() {
    let m = ok_mock();
    let running = proxy_for(&m, json!({}));
    let addr = running.addr;
    // The body is never sent: the answer must come from the head alone.
    let (mut c, r) = raw_call(addr, post_head("Content-Length: 100000000000\r\n").as_bytes());
    assert_error(&r, 413, "100 GB body");
    assert_eq!(r.header("connection"), Some("close"));
    assert_closed(&mut c, "after 413");
    assert_eq!(m.hits(), 0);
    assert_eq!(chat(addr, "{}").status, 200, "still serving");
}

#[test]
fn bodies_over_max_body_bytes_are_413_whatever_the_framing() {
    let m = ok_mock();
    let running = proxy_for(&m, json!({"max_body_bytes": 1000}));
    let addr = running.addr;

    let (mut c, r) = raw_call(addr, post_head("Content-Length: 1001\r\n").as_bytes());
    assert_error(&r, 413, "length over the limit");
    assert_closed(&mut c, "after 413 (length)");

    // 600 bytes, then a second 600-byte chunk announced: refused at its size line, before its data.
    let mut raw = post_head("Transfer-Encoding: chunked\r\n").into_bytes();
    raw.extend_from_slice(b"258\r\n");
    raw.extend_from_slice(&[b'a'; 600]);
    raw.extend_from_slice(b"\r\n258\r\n");
    let (mut c, r) = raw_call(addr, &raw);
    assert_error(&r, 413, "chunked over the limit");
    assert_closed(&mut c, "after 413 (chunked)");

    let mut raw = post_head("Transfer-Encoding: chunked\r\n").into_bytes();
    raw.extend_from_slice(b"ffffffffffffffff\r\n");
    let (mut c, r) = raw_call(addr, &raw);
    assert!(r.status == 413 || r.status == 400, "u64::MAX chunk: {} {}", r.status, r.text());
    assert_error(&r, r.status, "u64::MAX chunk");
    assert_closed(&mut c, "after the huge chunk");

    assert_eq!(m.hits(), 0, "nothing over the limit was forwarded");
    let exactly = format!("{{\"pad\":\"{}\"}}", "x".repeat(1000 - 10));
    assert_eq!(exactly.len(), 1000);
    assert_eq!(chat(addr, &exactly).status, 200, "a body of exactly max_body_bytes still passes");
    assert_eq!(m.hits(), 1);
}

#[test]
fn ambiguous_or_unsupported_framing_is_refused() {
    let m = ok_mock();
    // A short body timeout: if a refused framing were accepted, the test fails fast on a 408 instead of hanging.
    let running = proxy_for(&m, json!({"body_read_timeout_ms": 2000}));
    let addr = running.addr;
    for (headers, status) in [
        ("Content-Length: 5\r\nTransfer-Encoding: chunked\r\n", 400),
        ("Transfer-Encoding: chunked\r\nContent-Length: 5\r\n", 400),
        ("Content-Length: 5\r\nContent-Length: 6\r\n", 400),
        ("Content-Length: 5, 6\r\n", 400),
        ("Content-Length: -1\r\n", 400),
        ("Content-Length: abc\r\n", 400),
        ("Content-Length: 0x10\r\n", 400),
        ("Transfer-Encoding: gzip, chunked\r\n", 501),
        ("Transfer-Encoding: gzip\r\nTransfer-Encoding: chunked\r\n", 501),
    ] {
        let (mut c, r) = raw_call(addr, post_head(headers).as_bytes());
        assert_error(&r, status, headers);
        assert_eq!(r.header("connection"), Some("close"), "{headers}");
        assert_closed(&mut c, headers);
    }
    assert_eq!(m.hits(), 0, "nothing reached the upstream");
}

#[test]
fn head_limits_are_enforced_with_json_answers_and_a_close() {
    let m = ok_mock();
    let running = proxy_for(&m, json!({"max_head_bytes": 4096, "max_headers": 20}));
    let addr = running.addr;
    let big_value = format!("GET /openai/x HTTP/1.1\r\nHost: a\r\nX-Big: {}\r\n\r\n", "a".repeat(5000));
    let many: String = (0..25).map(|i| format!("X-H{i}: v\r\n")).collect();
    let many = format!("GET /openai/x HTTP/1.1\r\nHost: a\r\n{many}\r\n");
    let cases: Vec<(&str, Vec<u8>, u16)> = vec![
        ("header value over max_head_bytes", big_value.into_bytes(), 431),
        ("more headers than max_headers", many.into_bytes(), 431),
        ("NUL in a header value", b"GET /openai/x HTTP/1.1\r\nHost: a\r\nX-A: a\0b\r\n\r\n".to_vec(), 400),
        ("control byte in a header value", b"GET /openai/x HTTP/1.1\r\nHost: a\r\nX-A: a\x01b\r\n\r\n".to_vec(), 400),
        ("HTTP/2.0", b"GET /openai/x HTTP/2.0\r\nHost: a\r\n\r\n".to_vec(), 505),
    ];
    for (what, raw, status) in cases {
        let (mut c, r) = raw_call(addr, &raw);
        assert_error(&r, status, what);
        assert_eq!(r.header("connection"), Some("close"), "{what}");
        assert_closed(&mut c, what);
    }
    assert_eq!(m.hits(), 0);
    assert_eq!(chat(addr, "{}").status, 200, "still serving");
}

#[test]
fn a_request_line_over_max_head_bytes_is_414() {
    let m = ok_mock();
    let running = proxy_for(&m, json!({"max_head_bytes": 4096}));
    let addr = running.addr;
    // A whole request whose request line alone is over the limit: the target is what is too long.
    let raw = format!("GET /openai/{} HTTP/1.1\r\nHost: a\r\napi-key: client-key\r\n\r\n", "a".repeat(5000));
    let (mut c, r) = raw_call(addr, raw.as_bytes());
    assert_error(&r, 414, "request line over max_head_bytes");
    assert_eq!(r.header("connection"), Some("close"));
    assert_closed(&mut c, "after 414");
    assert_eq!(m.hits(), 0);
}

#[test]
fn an_unfinished_head_gets_408_and_a_close() {
    let m = ok_mock();
    let running = proxy_for(&m, json!({"head_timeout_ms": 200}));
    let addr = running.addr;
    let mut c = Client::connect(addr);
    c.send_raw(b"POST /openai/x HTTP/1.1\r\nHost: a\r\n");
    let r = c.read_response(false).expect("an answer to the stalled head");
    assert_error(&r, 408, "head timeout");
    assert_closed(&mut c, "after 408");
    assert_eq!(m.hits(), 0);
}

#[test]
fn an_idle_keep_alive_connection_is_closed_after_idle_timeout() {
    let m = ok_mock();
    let running = proxy_for(&m, json!({"idle_timeout_ms": 200}));
    let addr = running.addr;
    let mut c = Client::connect(addr);
    good_request(&mut c);
    assert_closed(&mut c, "idle keep-alive connection");
}

#[test]
fn a_head_started_on_an_idle_connection_gets_the_head_timeout_not_the_idle_one() {
    // The connection waits idle under the long idle timeout; once its next head starts, the short head timeout
    // applies: the front must not sleep until the idle deadline it knew of before.
    let m = ok_mock();
    let running = proxy_for(&m, json!({"idle_timeout_ms": 60_000, "head_timeout_ms": 200}));
    let mut c = Client::connect(running.addr);
    good_request(&mut c);
    // Back in the front thread, idle, for longer than a head timeout: any deadline it had before has passed.
    std::thread::sleep(Duration::from_millis(500));
    c.send_raw(b"POST /openai/x HTTP/1.1\r\nHost: a\r\n");
    let r = c.read_response(false).expect("an answer to the stalled head");
    assert_error(&r, 408, "head timeout on a kept-alive connection");
    assert_closed(&mut c, "after 408");
    assert_eq!(m.hits(), 1, "only the first request");
}

#[test]
fn idle_keep_alive_connections_do_not_hold_workers() {
    let m = ok_mock();
    let running = proxy_for(&m, json!({"workers": 1}));
    let addr = running.addr;
    let mut idle: Vec<Client> = (0..5).map(|_| Client::connect(addr)).collect();
    for c in &mut idle {
        good_request(c);
    }
    // Five connections sit idle with the single worker: a sixth client must still be served.
    assert_eq!(chat(addr, "{}").status, 200);
    // And the idle ones are still usable.
    good_request(&mut idle[0]);
    good_request(&mut idle[4]);
}

#[test]
fn a_full_queue_answers_503_with_retry_after() {
    let (release, gate) = mpsc::channel::<()>();
    let gate = Mutex::new(Some(gate));
    let m = MockAzure::start(move |r: &Recorded| {
        if r.header("x-test") == Some("hold") {
            if let Some(g) = gate.lock().expect("gate").take() {
                let events = vec!["data: first\n\n".to_string(), "data: second\n\n".to_string()];
                return Reply::Sse { events, pause: Duration::ZERO, gate: Some(g) };
            }
        }
        Reply::json(200, json!({"ok": true}))
    });
    let running = proxy_for(&m, json!({"workers": 1, "queue_size": 1}));
    let addr = running.addr;

    // A holds the only worker: its stream stops after the first event until the test opens the gate.
    let mut a = Client::connect(addr);
    a.send("POST", CHAT, &[("api-key", "client-key"), ("x-test", "hold")], b"{}");
    let deadline = Instant::now() + EVENTUALLY;
    while m.hits() == 0 {
        assert!(Instant::now() < deadline, "A never reached the upstream");
        std::thread::sleep(Duration::from_millis(5));
    }

    // B and C: one takes the single queue slot, the other must be refused at once. Which is which depends on
    // the order in which the front thread reads them; the refused one is the one that gets an answer while A
    // still holds the worker.
    let mut b = Client::connect(addr);
    b.send("POST", CHAT, &[("api-key", "client-key")], b"{}");
    let mut c = Client::connect(addr);
    c.send("POST", CHAT, &[("api-key", "client-key")], b"{}");
    let first = first_readable(&[&b.stream, &c.stream], EVENTUALLY).expect("one of B and C is refused at once");
    let (mut refused, mut queued) = if first == 0 { (b, c) } else { (c, b) };
    let r = refused.read_response(false).expect("503");
    assert_error(&r, 503, "queue full");
    assert_eq!(r.header("retry-after"), Some("1"));
    assert_closed(&mut refused, "after 503");
    assert_eq!(m.hits(), 1, "neither B nor C was forwarded while the worker was busy");

    drop(release);
    let ra = a.read_response(false).expect("A completes");
    assert_eq!(ra.status, 200);
    assert_eq!(ra.text(), "data: first\n\ndata: second\n\n");
    let rq = queued.read_response(false).expect("the queued request completes");
    assert_eq!(rq.status, 200, "{}", rq.text());
    assert_eq!(m.hits(), 2);
}

#[test]
fn max_connections_refuses_extra_connections_until_some_close() {
    let m = ok_mock();
    let running = proxy_for(&m, json!({"max_connections": 3}));
    let addr = running.addr;
    let mut held: Vec<Client> = (0..3).map(|_| Client::connect(addr)).collect();
    for c in &mut held {
        good_request(c);
    }
    let mut extra = Client::connect(addr);
    let r = extra.read_response(false).expect("an answer without sending anything");
    assert_error(&r, 503, "max_connections");
    assert_eq!(r.header("retry-after"), Some("1"));
    assert_closed(&mut extra, "refused connection");

    drop(held);
    let deadline = Instant::now() + EVENTUALLY;
    loop {
        let mut c = Client::connect(addr);
        c.send("POST", CHAT, &[("api-key", "client-key")], b"{}");
        match c.read_response(false) {
            Ok(r) if r.status == 200 => break,
            Ok(r) => assert_eq!(r.status, 503, "{}", r.text()),
            // Refused before our request arrived: the close may come as a reset.
            Err(_) => {}
        }
        assert!(Instant::now() < deadline, "connections never freed after the held ones closed");
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn a_client_that_stops_reading_frees_its_worker_and_upstream() {
    let m = MockAzure::start(|r: &Recorded| {
        if r.header("x-test") == Some("big") {
            let headers = vec![("content-type".to_string(), "application/octet-stream".to_string())];
            Reply::Full { status: 200, headers, body: vec![b'x'; 64 << 20] }
        } else {
            Reply::json(200, json!({"ok": true}))
        }
    });
    let running = proxy_for(&m, json!({"workers": 1, "client_write_timeout_ms": 300}));
    let addr = running.addr;
    let mut stalled = Client::connect(addr);
    stalled.send("POST", CHAT, &[("api-key", "client-key"), ("x-test", "big")], b"{}");
    // `stalled` never reads: the worker's writes block once the socket buffers are full.
    let deadline = Instant::now() + EVENTUALLY;
    while m.hits() == 0 {
        assert!(Instant::now() < deadline, "the request never reached the upstream");
        std::thread::sleep(Duration::from_millis(5));
    }
    while m.open_connections() > 0 {
        assert!(Instant::now() < deadline, "the upstream connection of the stalled client was never closed");
        std::thread::sleep(Duration::from_millis(10));
    }
    // The single worker is free again.
    let r = chat(addr, "{}");
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(m.hits(), 2);
    drop(stalled);
}

#[test]
fn an_early_error_keeps_the_connection_only_when_no_body_is_pending() {
    let m = azure_like_mock();
    let running = proxy_for(&m, json!({}));
    let addr = running.addr;

    // 401 before a body was read: the unread body would be taken for the next request, so the proxy closes.
    let mut c = Client::connect(addr);
    c.send("POST", CHAT, &[], br#"{"messages":[]}"#);
    let r = c.read_response(false).expect("401");
    assert_error(&r, 401, "POST without key");
    assert_eq!(r.header("connection"), Some("close"));
    assert_closed(&mut c, "after 401 with a body");

    // 401 for a bodiless GET: nothing is pending, the connection carries the next request.
    let mut c = Client::connect(addr);
    c.send("GET", "/openai/models?api-version=2024-06-01", &[], b"");
    let r = c.read_response(false).expect("401");
    assert_error(&r, 401, "GET without key");
    assert_eq!(r.header("connection"), None);
    c.send("POST", CHAT, &[("api-key", "client-key")], br#"{"messages":[]}"#);
    let r = c.read_response(false).expect("the next request on the same connection");
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(m.hits(), 1);
}

fn azure_like_mock() -> MockAzure {
    MockAzure::start(azure_like("east", "key0", Duration::from_millis(1)))
}
