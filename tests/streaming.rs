//! Streaming: upstream bodies reach the client as they arrive (SSE included), with the right framing, and a
//! broken upstream stream is never passed off as a complete one.

use std::io::{self, ErrorKind, Read};
use std::net::{SocketAddr, TcpListener};
use std::sync::mpsc::{self, Receiver};
use std::sync::Mutex;
use std::thread;
use std::time::{Duration, Instant};

use crate::support::client::{call, chat, find, Client, Resp};
use crate::support::eventually;
use crate::support::mock::{MockAzure, Recorded, Reply};
use crate::support::proxy::{self, CHAT};

const KEY: (&str, &str) = ("api-key", "client-key");

fn json_ok() -> Reply {
    Reply::json(200, serde_json::json!({"ok": true}))
}

/// A mock whose first request gets a gated SSE stream of `events`; every later request gets a small JSON 200.
fn gated_sse_mock(events: Vec<String>, gate: Receiver<()>) -> MockAzure {
    let gate = Mutex::new(Some(gate));
    MockAzure::start(move |_: &Recorded| match gate.lock().unwrap().take() {
        Some(g) => Reply::Sse { events: events.clone(), pause: Duration::ZERO, gate: Some(g) },
        None => json_ok(),
    })
}

fn events(n: usize) -> Vec<String> {
    let mut ev: Vec<String> = (0..n - 1).map(|i| format!("data: {{\"n\":{i},\"text\":\"piece {i}\"}}\n\n")).collect();
    ev.push("data: [DONE]\n\n".to_string());
    ev
}

/// `n` reproducible pseudo-random bytes (xorshift64*).
fn pseudo_random(n: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    (0..n)
        .map(|_| {
            x ^= x >> 12;
            x ^= x << 25;
            x ^= x >> 27;
            (x.wrapping_mul(0x2545_F491_4F6C_DD1D) >> 56) as u8
        })
        .collect()
}

fn chat_request(http_version: &str, body: &str) -> Vec<u8> {
    format!(
        "POST {CHAT} {http_version}\r\nHost: proxy.test\r\napi-key: client-key\r\nContent-Type: application/json\r\n\
         Content-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .into_bytes()
}

/// What a raw socket received until the peer closed it: every byte, and how the reading ended.
struct Raw {
    bytes: Vec<u8>,
    /// None for a clean EOF, the error otherwise (a reset, or a timeout if the proxy left the connection open).
    end: Option<io::Error>,
}

impl Raw {
    fn head(&self) -> String {
        let end = find(&self.bytes, b"\r\n\r\n").expect("a complete response head");
        String::from_utf8_lossy(&self.bytes[..end]).to_ascii_lowercase()
    }
    fn body(&self) -> &[u8] {
        let end = find(&self.bytes, b"\r\n\r\n").expect("a complete response head");
        &self.bytes[end + 4..]
    }
    fn closed(&self) -> bool {
        match &self.end {
            None => true,
            Some(e) => matches!(e.kind(), ErrorKind::ConnectionReset | ErrorKind::ConnectionAborted),
        }
    }
}

/// Sends `request` on a fresh connection and reads raw bytes until the proxy closes the connection.
fn exchange_raw(addr: SocketAddr, request: &[u8]) -> Raw {
    let mut c = Client::connect(addr);
    c.send_raw(request);
    let mut bytes = Vec::new();
    let mut tmp = [0u8; 16384];
    loop {
        match c.stream.read(&mut tmp) {
            Ok(0) => return Raw { bytes, end: None },
            Ok(n) => bytes.extend_from_slice(&tmp[..n]),
            Err(e) if e.kind() == ErrorKind::Interrupted => continue,
            Err(e) => return Raw { bytes, end: Some(e) },
        }
    }
}

/// Serves `bytes` once over a fresh loopback connection and closes it cleanly, so that the strict client can
/// parse exactly what the proxy sent.
fn replay(bytes: &[u8]) -> Client {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind replay listener");
    let addr = listener.local_addr().expect("addr");
    let bytes = bytes.to_vec();
    thread::spawn(move || {
        if let Ok((mut s, _)) = listener.accept() {
            let _ = io::Write::write_all(&mut s, &bytes);
        }
    });
    Client::connect(addr)
}

#[test]
fn sse_events_reach_the_client_one_by_one_before_the_next_is_produced() {
    let ev = events(6);
    let (gate, rx) = mpsc::channel();
    let m = gated_sse_mock(ev.clone(), rx);
    let p = proxy::start(&[&m]);
    let mut c = Client::connect(p.addr);
    c.send("POST", CHAT, &[KEY, ("Content-Type", "application/json")], br#"{"stream":true}"#);
    let (status, headers) = c.read_head().expect("head");
    assert_eq!(status, 200);
    let get = |n: &str| headers.iter().find(|(k, _)| k == n).map(|(_, v)| v.as_str());
    assert_eq!(get("transfer-encoding"), Some("chunked"));
    assert_eq!(get("content-type"), Some("text/event-stream"));
    assert_eq!(get("content-length"), None);

    // The mock has produced only the first event: it must already be here.
    assert_eq!(c.read_chunks_until(b"\n\n").expect("first event"), ev[0].as_bytes());
    // Then one at a time: each event is only produced after the previous one was received through the proxy.
    for e in &ev[1..3] {
        gate.send(()).expect("mock waits on the gate");
        assert_eq!(c.read_chunks_until(b"\n\n").expect("next event"), e.as_bytes());
    }
    // Release the rest at once: all of it arrives, in order, then a proper end.
    drop(gate);
    let rest = c.read_chunks_until(b"data: [DONE]\n\n").expect("remaining events");
    assert_eq!(rest, ev[3..].concat().as_bytes());
    assert_eq!(c.read_line().expect("last chunk"), "0");
    assert_eq!(c.read_line().expect("end of trailers"), "");
    // The connection is still usable.
    c.send("POST", CHAT, &[KEY], b"{}");
    assert_eq!(c.read_response(false).expect("second response").status, 200);
}

#[test]
fn upstream_content_length_is_kept_and_the_body_is_byte_identical() {
    let big = pseudo_random(3 * 1024 * 1024, 0x5eed);
    let small = b"{\"id\":\"x\",\"text\":\"caf\xc3\xa9\"}".to_vec();
    let (b, s) = (big.clone(), small.clone());
    let m = MockAzure::start(move |req: &Recorded| {
        let body = if req.path().ends_with("/big") { b.clone() } else { s.clone() };
        Reply::Full { status: 200, headers: vec![("content-type".into(), "application/octet-stream".into())], body }
    });
    let p = proxy::start(&[&m]);
    for (path, expected) in [("/openai/files/big", &big), ("/openai/files/small", &small)] {
        let r = call(p.addr, "GET", path, &[KEY], b"");
        assert_eq!(r.status, 200);
        assert!(!r.chunked, "{path}: a length-framed upstream body must not become chunked");
        assert_eq!(r.header("transfer-encoding"), None);
        assert_eq!(r.header("content-length"), Some(expected.len().to_string().as_str()), "{path}");
        assert_eq!(r.header("content-type"), Some("application/octet-stream"));
        assert_eq!(r.body.len(), expected.len(), "{path}");
        assert!(r.body == *expected, "{path}: body differs from the upstream's");
    }
}

#[test]
fn upstream_chunked_body_is_relayed_chunked_and_byte_identical() {
    // Many chunks of varied sizes, some larger than one proxy read.
    let chunks: Vec<Vec<u8>> = (0..300u64).map(|i| pseudo_random(1 + ((i * 7919) % 40_000) as usize, i + 1)).collect();
    let expected = chunks.concat();
    let m = MockAzure::start(move |_: &Recorded| Reply::Chunked {
        status: 200,
        headers: vec![("content-type".into(), "application/octet-stream".into())],
        chunks: chunks.clone(),
    });
    let p = proxy::start(&[&m]);
    let mut c = Client::connect(p.addr);
    for _ in 0..2 {
        c.send("GET", "/openai/files/stream", &[KEY], b"");
        let r = c.read_response(false).expect("a strictly valid chunked response");
        assert_eq!(r.status, 200);
        assert!(r.chunked);
        assert_eq!(r.header("content-length"), None);
        assert_eq!(r.body.len(), expected.len());
        assert!(r.body == expected, "body differs from the upstream's");
    }
}

#[test]
fn http_1_0_client_gets_a_close_delimited_body_when_upstream_has_no_length() {
    let chunks: Vec<Vec<u8>> = (0..50u64).map(|i| pseudo_random(100 + (i as usize) * 300, i + 7)).collect();
    let expected_chunked = chunks.concat();
    let ev = events(5);
    let expected_sse = ev.concat().into_bytes();
    let m = MockAzure::start(move |req: &Recorded| {
        if req.path().ends_with("/chat/completions") {
            Reply::sse(ev.clone(), Duration::ZERO)
        } else {
            Reply::Chunked { status: 200, headers: vec![], chunks: chunks.clone() }
        }
    });
    let p = proxy::start(&[&m]);
    let file = "GET /openai/files/stream HTTP/1.0\r\napi-key: client-key\r\n";
    let cases = [
        (format!("{file}\r\n").into_bytes(), &expected_chunked),
        // Asking to keep the connection does not help: without a length only the close can end the body.
        (format!("{file}Connection: keep-alive\r\n\r\n").into_bytes(), &expected_chunked),
        (chat_request("HTTP/1.0", r#"{"stream":true}"#), &expected_sse),
    ];
    for (request, expected) in cases {
        let mut c = Client::connect(p.addr);
        c.send_raw(&request);
        let r: Resp = c.read_response(false).expect("response");
        assert_eq!(r.status, 200);
        assert!(!r.chunked, "an HTTP/1.0 client cannot read chunked framing");
        assert_eq!(r.header("transfer-encoding"), None);
        assert_eq!(r.header("content-length"), None);
        assert_eq!(r.header("connection").map(str::to_ascii_lowercase).as_deref(), Some("close"));
        assert!(r.body == *expected, "close-delimited body differs from the upstream's");
        assert!(c.is_closed());
    }
}

#[test]
fn upstream_reset_inside_a_chunked_body_is_never_a_clean_end_for_the_client() {
    let partial = b"data: {\"n\":0}\n\ndata: {\"n\":1}\n\n".to_vec();
    let part = partial.clone();
    let m = MockAzure::start(move |_: &Recorded| Reply::ResetMidBody {
        status: 200,
        headers: vec![("content-type".into(), "text/event-stream".into())],
        partial: part.clone(),
        declared_len: None,
        after: Duration::from_millis(20),
    });
    let p = proxy::start(&[&m]);
    let raw = exchange_raw(p.addr, &chat_request("HTTP/1.1", r#"{"stream":true}"#));
    assert!(raw.closed(), "the proxy must close the connection after a broken stream: {:?}", raw.end);
    assert!(raw.head().contains("transfer-encoding: chunked"), "{}", raw.head());
    assert!(find(raw.body(), &partial).is_some(), "the bytes received before the reset are relayed");
    assert!(!raw.bytes.ends_with(b"0\r\n\r\n"), "a broken stream must not end with the last chunk");

    // A strict client reading exactly those bytes reports an error, never a complete body.
    let mut c = replay(&raw.bytes);
    let (status, _) = c.read_head().expect("head");
    assert_eq!(status, 200);
    assert_eq!(c.read_chunks_until(b"\"n\":1}\n\n").expect("the relayed events"), partial);
    let mut c = replay(&raw.bytes);
    let got = c.read_response(false);
    assert!(got.is_err(), "truncated stream taken for a complete one: {:?}", got.map(|r| r.text()));
}

#[test]
fn upstream_reset_inside_a_length_body_leaves_the_client_short_of_the_length() {
    let partial = pseudo_random(4000, 99);
    let part = partial.clone();
    let m = MockAzure::start(move |_: &Recorded| Reply::ResetMidBody {
        status: 200,
        headers: vec![("content-type".into(), "application/octet-stream".into())],
        partial: part.clone(),
        declared_len: Some(10_000),
        after: Duration::from_millis(20),
    });
    let p = proxy::start(&[&m]);
    let request = b"GET /openai/files/x HTTP/1.1\r\nHost: proxy.test\r\napi-key: client-key\r\n\r\n";
    let raw = exchange_raw(p.addr, request);
    assert!(raw.closed(), "the proxy must close the connection after a broken body: {:?}", raw.end);
    assert!(raw.head().contains("content-length: 10000"), "{}", raw.head());
    assert!(!raw.head().contains("transfer-encoding"), "{}", raw.head());
    assert_eq!(raw.body(), partial, "exactly the bytes received before the reset");

    let mut c = Client::connect(p.addr);
    c.send_raw(request);
    let got = c.read_response(false);
    assert!(got.is_err(), "truncated body taken for a complete one: {:?}", got.map(|r| r.body.len()));
}

#[test]
fn http_1_0_client_sees_a_reset_when_the_upstream_breaks_a_close_delimited_body() {
    let partial = b"data: {\"n\":0}\n\n".to_vec();
    let part = partial.clone();
    let m = MockAzure::start(move |_: &Recorded| Reply::ResetMidBody {
        status: 200,
        headers: vec![("content-type".into(), "text/event-stream".into())],
        partial: part.clone(),
        declared_len: None,
        after: Duration::from_millis(20),
    });
    let p = proxy::start(&[&m]);
    let raw = exchange_raw(p.addr, &chat_request("HTTP/1.0", r#"{"stream":true}"#));
    assert!(!raw.head().contains("transfer-encoding"), "{}", raw.head());
    assert!(!raw.head().contains("content-length"), "{}", raw.head());
    assert_eq!(raw.body(), partial, "the bytes received before the reset are relayed");
    // With a close-delimited body a clean EOF would read as a complete answer: only a reset says otherwise.
    match &raw.end {
        Some(e) if e.kind() == ErrorKind::ConnectionReset => {}
        other => panic!("expected the connection to be reset, got {other:?} (None = clean EOF)"),
    }
}

#[test]
fn client_disconnect_mid_stream_closes_the_upstream_connection() {
    // Big events, so that the proxy has many writes to do after the client is gone.
    let mut ev = vec!["data: {\"n\":0}\n\n".to_string()];
    ev.extend((1..100).map(|i| format!("data: {{\"n\":{i},\"pad\":\"{}\"}}\n\n", "x".repeat(64 * 1024))));
    let (gate, rx) = mpsc::channel();
    let m = gated_sse_mock(ev.clone(), rx);
    let p = proxy::start(&[&m]);
    let mut c = Client::connect(p.addr);
    c.send("POST", CHAT, &[KEY], br#"{"stream":true}"#);
    assert_eq!(c.read_head().expect("head").0, 200);
    assert_eq!(c.read_chunks_until(b"\n\n").expect("first event"), ev[0].as_bytes());
    assert_eq!(m.open_connections(), 1);
    drop(c);

    for _ in 1..ev.len() {
        let _ = gate.send(());
    }
    drop(gate);
    eventually("the proxy closed its upstream connection", || m.open_connections() == 0);

    let r = chat(p.addr, "{}");
    assert_eq!((r.status, r.json()["ok"].as_bool()), (200, Some(true)));
    assert_eq!(m.hits(), 2);
}

#[test]
fn upstream_stall_mid_stream_ends_in_an_error_for_the_client() {
    let ev = events(3);
    let (gate, rx) = mpsc::channel::<()>();
    let m = gated_sse_mock(ev.clone(), rx);
    let p = proxy::start_with(
        proxy::instances_for(&[&m]),
        serde_json::json!({"upstream_response_timeout_ms": 300, "upstream_read_timeout_ms": 300}),
    );
    let mut c = Client::connect(p.addr);
    c.send("POST", CHAT, &[KEY], br#"{"stream":true}"#);
    assert_eq!(c.read_head().expect("head").0, 200);
    assert_eq!(c.read_chunks_until(b"\n\n").expect("first event"), ev[0].as_bytes());
    // The gate stays shut: the upstream goes silent, the proxy's per-read timeout fires.
    // Not a zero chunk (a clean end, UnexpectedEof here) and not our read timeout: an invalid chunk line.
    match c.read_chunks_until(b"\n\n") {
        Err(e) => assert_eq!(e.kind(), ErrorKind::InvalidData, "expected a broken chunk, got {e}"),
        Ok(data) => panic!("no event was sent, yet got {:?}", String::from_utf8_lossy(&data)),
    }
    assert!(c.is_closed(), "the connection is closed after a broken stream");
    drop(gate);
}

#[test]
fn head_and_204_answers_carry_no_body_and_keep_the_connection_usable() {
    let m = MockAzure::start(|req: &Recorded| match (req.method.as_str(), req.path()) {
        // A HEAD answer announces a length but carries no body.
        ("HEAD", _) => Reply::Full {
            status: 200,
            headers: vec![("content-length".into(), "1234".into()), ("content-type".into(), "application/json".into())],
            body: vec![],
        },
        ("DELETE", _) => Reply::Full { status: 204, headers: vec![("x-deleted".into(), "yes".into())], body: vec![] },
        _ => json_ok(),
    });
    let p = proxy::start(&[&m]);
    let mut c = Client::connect(p.addr);

    c.send("HEAD", "/openai/files/f1", &[KEY], b"");
    let r = c.read_response(true).expect("HEAD response");
    assert_eq!(r.status, 200);
    assert_eq!(r.header("content-length"), Some("1234"), "HEAD keeps the announced length");
    assert_eq!(r.header("transfer-encoding"), None);
    assert_eq!(m.last_request().expect("seen").method, "HEAD");

    c.send("POST", CHAT, &[KEY], b"{}");
    let r = c.read_response(false).expect("response after HEAD");
    assert_eq!((r.status, r.json()["ok"].as_bool()), (200, Some(true)));

    c.send("DELETE", "/openai/files/f1", &[KEY], b"");
    let r = c.read_response(false).expect("204 response");
    assert_eq!(r.status, 204);
    assert_eq!(r.header("x-deleted"), Some("yes"));
    assert_eq!(r.header("transfer-encoding"), None);

    c.send("POST", CHAT, &[KEY], b"{}");
    let r = c.read_response(false).expect("response after 204");
    assert_eq!((r.status, r.json()["ok"].as_bool()), (200, Some(true)));
    assert_eq!(m.hits(), 4);
}

/// A client socket with a 4 KiB receive buffer, set before connecting so that the window stays small.
fn connect_with_small_window(addr: SocketAddr) -> std::net::TcpStream {
    use std::os::fd::FromRawFd;
    let SocketAddr::V4(v4) = addr else { panic!("IPv4 loopback expected") };
    // SAFETY: a fresh socket fd, owned by the TcpStream made from it at the end (or leaked on a failed assert in a
    // test); the option value and the sockaddr_in live across the calls that read them.
    unsafe {
        let fd = libc::socket(libc::AF_INET, libc::SOCK_STREAM, 0);
        assert!(fd >= 0, "socket");
        let size: libc::c_int = 4096;
        let p = &size as *const libc::c_int as *const libc::c_void;
        assert_eq!(libc::setsockopt(fd, libc::SOL_SOCKET, libc::SO_RCVBUF, p, 4), 0);
        let sin = libc::sockaddr_in {
            sin_family: libc::AF_INET as libc::sa_family_t,
            sin_port: v4.port().to_be(),
            sin_addr: libc::in_addr { s_addr: u32::from(*v4.ip()).to_be() },
            sin_zero: [0; 8],
        };
        let len = std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t;
        assert_eq!(libc::connect(fd, &sin as *const libc::sockaddr_in as *const libc::sockaddr, len), 0, "connect");
        std::net::TcpStream::from_raw_fd(fd)
    }
}

#[test]
fn a_client_that_reads_too_slowly_is_cut_off_and_frees_its_worker() {
    // 32 MiB that the client drains at about 25 KB/s: a 16 KiB chunk then takes ~650 ms to go out, over the
    // 300 ms allowed for one write. Every partial write makes progress, so the socket timeout alone never fires.
    let m = MockAzure::start(|_: &Recorded| Reply::Full {
        status: 200,
        headers: vec![("content-type".into(), "application/octet-stream".into())],
        body: vec![b'x'; 32 << 20],
    });
    let p = proxy::start_with(
        proxy::instances_for(&[&m]),
        serde_json::json!({"workers": 1, "client_write_timeout_ms": 300}),
    );
    let mut slow = connect_with_small_window(p.addr);
    use std::io::Write;
    slow.write_all(format!("GET {CHAT} HTTP/1.1\r\nHost: x\r\napi-key: client-key\r\n\r\n").as_bytes()).expect("send");
    slow.set_read_timeout(Some(Duration::from_secs(5))).expect("timeout");
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut got = 0usize;
    let mut buf = [0u8; 512];
    let cut_off = loop {
        assert!(Instant::now() < deadline, "still streaming to a slow reader after 20 s ({got} bytes)");
        match slow.read(&mut buf) {
            Ok(0) | Err(_) => break got,
            Ok(n) => got += n,
        }
        thread::sleep(Duration::from_millis(20));
    };
    assert!(cut_off < 32 << 20, "the slow client was cut off before the end ({cut_off} bytes)");
    let deadline = Instant::now() + Duration::from_secs(10);
    while m.open_connections() > 0 {
        assert!(Instant::now() < deadline, "the upstream connection was not dropped");
        thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(chat(p.addr, "{}").status, 200, "the only worker is free again");
}
