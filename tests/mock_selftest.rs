//! Self-tests of the mock Azure instance (tests/support/mock.rs), using plain std TCP clients.

use std::io::{BufRead, BufReader, ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::mpsc;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::support::mock::{azure_like, sse_data_json, MockAzure, Reply};

struct Resp {
    status: u16,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

impl Resp {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(n, _)| n.eq_ignore_ascii_case(name)).map(|(_, v)| v.as_str())
    }
}

fn connect(addr: SocketAddr) -> BufReader<TcpStream> {
    let s = TcpStream::connect(addr).expect("connect to mock");
    s.set_read_timeout(Some(Duration::from_secs(5))).expect("set read timeout");
    BufReader::new(s)
}

fn send(r: &mut BufReader<TcpStream>, raw: &[u8]) {
    r.get_mut().write_all(raw).expect("write request");
}

fn read_line(r: &mut BufReader<TcpStream>) -> String {
    let mut line = String::new();
    r.read_line(&mut line).expect("read line");
    line.trim_end_matches(['\r', '\n']).to_string()
}

fn read_head(r: &mut BufReader<TcpStream>) -> (u16, Vec<(String, String)>) {
    let status_line = read_line(r);
    let status = status_line.split(' ').nth(1).and_then(|s| s.parse().ok()).expect("status line has a status code");
    let mut headers = Vec::new();
    loop {
        let line = read_line(r);
        if line.is_empty() {
            break;
        }
        let (n, v) = line.split_once(':').expect("header line has a colon");
        headers.push((n.to_ascii_lowercase(), v.trim().to_string()));
    }
    (status, headers)
}

/// One chunk of a chunked body; None for the last (zero) chunk.
fn read_chunk(r: &mut BufReader<TcpStream>) -> Option<Vec<u8>> {
    let size_line = read_line(r);
    let size = usize::from_str_radix(size_line.split(';').next().unwrap_or("").trim(), 16).expect("chunk size");
    if size == 0 {
        assert_eq!(read_line(r), "", "no trailers expected");
        return None;
    }
    let mut data = vec![0; size];
    r.read_exact(&mut data).expect("chunk data");
    assert_eq!(read_line(r), "", "CRLF after chunk");
    Some(data)
}

fn read_response(r: &mut BufReader<TcpStream>) -> Resp {
    let (status, headers) = read_head(r);
    let mut resp = Resp { status, headers, body: Vec::new() };
    if resp.header("transfer-encoding").is_some_and(|v| v.contains("chunked")) {
        while let Some(c) = read_chunk(r) {
            resp.body.extend_from_slice(&c);
        }
    } else {
        let n: usize = resp.header("content-length").expect("content-length").parse().expect("numeric content-length");
        resp.body = vec![0; n];
        r.read_exact(&mut resp.body).expect("body");
    }
    resp
}

/// Reads until EOF/error; returns the bytes read and whether it ended with an error (e.g. reset).
fn read_to_end_or_err(r: &mut BufReader<TcpStream>) -> (Vec<u8>, Option<ErrorKind>) {
    let mut buf = Vec::new();
    match r.read_to_end(&mut buf) {
        Ok(_) => (buf, None),
        Err(e) => (buf, Some(e.kind())),
    }
}

#[test]
fn full_reply_and_recording() {
    let mock = MockAzure::start(|_req| {
        Reply::Full {
            status: 201,
            headers: vec![("Content-Type".into(), "text/plain".into())],
            body: b"hello".to_vec(),
        }
        .with_header("X-Extra", "yes")
    });
    assert!(mock.url().starts_with("http://127.0.0.1:"));
    assert!(!mock.url().ends_with('/'));

    let mut c = connect(mock.addr());
    let body = br#"{"a":1}"#;
    let req = format!(
        "POST /openai/deployments/d/chat/completions?api-version=2024-06-01&x=%20 HTTP/1.1\r\n\
         Host: example\r\nX-Custom: Some Value\r\nX-Dup: 1\r\nx-dup: 2\r\n\
         Content-Type: application/json\r\nContent-Length: {}\r\n\r\n",
        body.len()
    );
    send(&mut c, req.as_bytes());
    send(&mut c, body);
    let resp = read_response(&mut c);
    assert_eq!(resp.status, 201);
    assert_eq!(resp.body, b"hello");
    assert_eq!(resp.header("x-extra"), Some("yes"));
    assert_eq!(resp.header("content-type"), Some("text/plain"));

    assert_eq!(mock.hits(), 1);
    let rec = &mock.requests()[0];
    assert_eq!(rec.method, "POST");
    assert_eq!(rec.target, "/openai/deployments/d/chat/completions?api-version=2024-06-01&x=%20");
    assert_eq!(rec.header("X-CUSTOM"), Some("Some Value"));
    assert!(rec.headers.iter().any(|(n, _)| n == "x-custom"));
    assert_eq!(rec.header_count("x-dup"), 2);
    assert_eq!(rec.header("x-dup"), Some("1"));
    assert_eq!(rec.header("missing"), None);
    assert_eq!(rec.body, body);
    assert_eq!(rec.json(), Some(serde_json::json!({"a": 1})));
}

#[test]
fn keep_alive_reuses_one_connection() {
    let mock = MockAzure::start(|req| Reply::json(200, serde_json::json!({"path": req.target})));
    let mut c = connect(mock.addr());
    for i in 0..2 {
        send(&mut c, format!("GET /r{i} HTTP/1.1\r\nHost: x\r\n\r\n").as_bytes());
        let resp = read_response(&mut c);
        assert_eq!(resp.status, 200);
        let v: serde_json::Value = serde_json::from_slice(&resp.body).expect("json body");
        assert_eq!(v["path"], format!("/r{i}"));
    }
    // A request with Connection: close gets its answer, then EOF.
    send(&mut c, b"GET /last HTTP/1.1\r\nConnection: close\r\n\r\n");
    let resp = read_response(&mut c);
    assert_eq!(resp.header("connection"), Some("close"));
    let (rest, err) = read_to_end_or_err(&mut c);
    assert!(rest.is_empty() && err.is_none());

    assert_eq!(mock.connections(), 1);
    assert_eq!(mock.hits(), 3);
    let targets: Vec<String> = mock.requests().into_iter().map(|r| r.target).collect();
    assert_eq!(targets, ["/r0", "/r1", "/last"]);
}

#[test]
fn chunked_request_body_and_expect_continue() {
    let mock = MockAzure::start(|req| Reply::Full { status: 200, headers: vec![], body: req.body.clone() });
    let mut c = connect(mock.addr());
    send(
        &mut c,
        b"POST /echo HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n\
          5\r\nhello\r\n7;ext=1\r\n, world\r\n0\r\nX-Trailer: t\r\n\r\n",
    );
    let resp = read_response(&mut c);
    assert_eq!(resp.body, b"hello, world");
    assert_eq!(mock.requests()[0].body, b"hello, world");

    // Expect: 100-continue: the interim response comes before the body is sent.
    send(&mut c, b"POST /echo HTTP/1.1\r\nExpect: 100-continue\r\nContent-Length: 3\r\n\r\n");
    let (status, _) = read_head(&mut c);
    assert_eq!(status, 100);
    send(&mut c, b"abc");
    let resp = read_response(&mut c);
    assert_eq!(resp.status, 200);
    assert_eq!(resp.body, b"abc");
    assert_eq!(mock.connections(), 1);
}

#[test]
fn sse_gate_releases_events_one_at_a_time() {
    let (tx, rx) = mpsc::channel::<()>();
    let gate = Mutex::new(Some(rx));
    let mock = MockAzure::start(move |_req| Reply::Sse {
        events: vec!["data: one\n\n".into(), "data: two\n\n".into()],
        pause: Duration::from_secs(60),
        gate: gate.lock().expect("gate lock").take(),
    });
    let mut c = connect(mock.addr());
    send(&mut c, b"POST /stream HTTP/1.1\r\nContent-Length: 0\r\n\r\n");
    let (status, headers) = read_head(&mut c);
    assert_eq!(status, 200);
    assert!(headers.iter().any(|(n, v)| n == "content-type" && v == "text/event-stream"));
    assert_eq!(read_chunk(&mut c).as_deref(), Some(&b"data: one\n\n"[..]));

    // Event 2 is held back by the gate.
    c.get_ref().set_read_timeout(Some(Duration::from_millis(300))).expect("set short timeout");
    let mut probe = [0u8; 1];
    match c.read(&mut probe) {
        Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
        other => panic!("event 2 arrived before the gate opened: {other:?}"),
    }

    tx.send(()).expect("open gate");
    c.get_ref().set_read_timeout(Some(Duration::from_secs(5))).expect("set long timeout");
    assert_eq!(read_chunk(&mut c).as_deref(), Some(&b"data: two\n\n"[..]));
    assert_eq!(read_chunk(&mut c), None);
}

#[test]
fn reset_before_head_gives_no_bytes() {
    let mock = MockAzure::start(|_req| Reply::ResetBeforeHead);
    let mut c = connect(mock.addr());
    send(&mut c, b"GET / HTTP/1.1\r\n\r\n");
    let (bytes, err) = read_to_end_or_err(&mut c);
    assert!(bytes.is_empty(), "got bytes: {bytes:?}");
    assert!(matches!(err, None | Some(ErrorKind::ConnectionReset)), "unexpected error {err:?}");
    assert_eq!(mock.hits(), 1);
}

#[test]
fn reset_mid_body_sends_partial_then_reset() {
    let mock = MockAzure::start(|_req| Reply::ResetMidBody {
        status: 200,
        headers: vec![],
        partial: b"abc".to_vec(),
        declared_len: Some(10),
        after: Duration::from_millis(10),
    });
    let mut c = connect(mock.addr());
    send(&mut c, b"GET / HTTP/1.1\r\n\r\n");
    let (status, headers) = read_head(&mut c);
    assert_eq!(status, 200);
    assert!(headers.iter().any(|(n, v)| n == "content-length" && v == "10"));
    let (bytes, err) = read_to_end_or_err(&mut c);
    assert_eq!(bytes, b"abc");
    assert_eq!(err, Some(ErrorKind::ConnectionReset));
}

#[test]
fn hang_is_released_when_mock_is_dropped() {
    let mock = MockAzure::start(|_req| Reply::Hang { for_at_most: Duration::from_secs(30) });
    let mut c = connect(mock.addr());
    send(&mut c, b"GET / HTTP/1.1\r\n\r\n");
    while mock.hits() == 0 {
        std::thread::sleep(Duration::from_millis(5));
    }
    let started = Instant::now();
    drop(mock);
    let (bytes, _) = read_to_end_or_err(&mut c);
    assert!(bytes.is_empty());
    assert!(started.elapsed() < Duration::from_secs(3));
}

#[test]
fn azure_like_checks_key_and_answers() {
    let mock = MockAzure::start(azure_like("east", "k1", Duration::ZERO));
    let path = "/openai/deployments/gpt-4o/chat/completions?api-version=2024-06-01";
    let body = br#"{"messages":[{"role":"user","content":"hi"}]}"#;
    let mut c = connect(mock.addr());

    let req = |key: &str, body: &[u8]| {
        let mut r = format!(
            "POST {path} HTTP/1.1\r\nHost: x\r\napi-key: {key}\r\nContent-Type: application/json\r\n\
             Content-Length: {}\r\n\r\n",
            body.len()
        )
        .into_bytes();
        r.extend_from_slice(body);
        r
    };

    send(&mut c, &req("wrong", body));
    let resp = read_response(&mut c);
    assert_eq!(resp.status, 401);
    let v: serde_json::Value = serde_json::from_slice(&resp.body).expect("json");
    assert_eq!(v["error"]["code"], "401");

    send(&mut c, &req("k1", body));
    let resp = read_response(&mut c);
    assert_eq!(resp.status, 200);
    assert_eq!(resp.header("x-served-by"), Some("east"));
    let v: serde_json::Value = serde_json::from_slice(&resp.body).expect("json");
    assert_eq!(v["object"], "chat.completion");
    assert_eq!(v["choices"][0]["message"]["content"], "Hello from east");
    assert_eq!(v["choices"][0]["finish_reason"], "stop");
    assert!(v["usage"]["total_tokens"].as_u64().is_some());

    // Streaming.
    send(&mut c, &req("k1", br#"{"messages":[],"stream":true}"#));
    let resp = read_response(&mut c);
    assert_eq!(resp.status, 200);
    assert_eq!(resp.header("content-type"), Some("text/event-stream"));
    assert!(resp.body.ends_with(b"data: [DONE]\n\n"));
    let chunks = sse_data_json(&resp.body);
    assert_eq!(chunks[0]["choices"][0]["delta"]["role"], "assistant");
    let text: String = chunks.iter().filter_map(|c| c["choices"][0]["delta"]["content"].as_str()).collect();
    assert_eq!(text, "Hello from east");
    assert!(chunks.iter().all(|c| c["object"] == "chat.completion.chunk" && c["model"] == "gpt-4o"));
    assert_eq!(chunks.last().expect("chunks")["choices"][0]["finish_reason"], "stop");

    // Unknown path → Azure-style 404.
    send(&mut c, b"GET /openai/models HTTP/1.1\r\napi-key: k1\r\n\r\n");
    let resp = read_response(&mut c);
    assert_eq!(resp.status, 404);
    let v: serde_json::Value = serde_json::from_slice(&resp.body).expect("json");
    assert_eq!(v["error"]["code"], "DeploymentNotFound");

    assert_eq!(mock.connections(), 1);
    assert_eq!(mock.hits(), 4);
}
