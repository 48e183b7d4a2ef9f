//! The socket layer under ureq (`src/transport`): what upstreams see on the wire. A request head and a small body
//! arrive together; large bodies arrive whole; a pooled connection the upstream closed is noticed before a
//! request goes out on it; idle connections are kept for `upstream_idle_timeout_ms`; and reconnects resume their
//! TLS sessions, more of them at once than rustls's own session cache (8 tickets per host) would allow.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{mpsc, Arc, Condvar, Mutex};
use std::thread;
use std::time::Duration;

use rustls::HandshakeKind;
use serde_json::json;

use crate::support::client::{call, find, read_request, request_content_length};
use crate::support::mock::{azure_like, MockAzure};
use crate::support::proxy::{self, CHAT};
use crate::support::tls::{fixture, localhost_server_config};

const KEY: (&str, &str) = ("api-key", "client-key");

/// A plain-HTTP upstream that runs `serve` on each accepted connection (on its own thread); counts connections.
fn raw_upstream(serve: impl Fn(TcpStream) + Send + Sync + 'static) -> (SocketAddr, Arc<AtomicUsize>) {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = listener.local_addr().expect("addr");
    let accepted = Arc::new(AtomicUsize::new(0));
    let count = Arc::clone(&accepted);
    let serve = Arc::new(serve);
    thread::spawn(move || {
        for s in listener.incoming().map_while(Result::ok) {
            count.fetch_add(1, Ordering::SeqCst);
            let serve = Arc::clone(&serve);
            thread::spawn(move || serve(s));
        }
    });
    (addr, accepted)
}

const OK: &[u8] = b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 11\r\n\r\n{\"ok\":true}";

fn proxy_to(url: &str, extra: serde_json::Value) -> proxy::Proxy {
    proxy::start_with(vec![proxy::instance(url, "key0", "up")], extra)
}

#[test]
fn the_request_head_and_a_small_body_arrive_in_one_read() {
    // The upstream reads each request with ONE read, as soon as anything arrives, and reports what it got.
    let (tx, rx) = mpsc::channel::<Vec<u8>>();
    let tx = Mutex::new(tx);
    let (addr, accepted) = raw_upstream(move |mut s| {
        let mut buf = vec![0u8; 64 * 1024];
        while let Ok(n) = s.read(&mut buf) {
            if n == 0 || tx.lock().expect("tx").send(buf[..n].to_vec()).is_err() || s.write_all(OK).is_err() {
                return;
            }
        }
    });
    let p = proxy_to(&format!("http://{addr}"), json!({}));
    let body = format!("{{\"messages\":[{{\"role\":\"user\",\"content\":\"{}\"}}]}}", "x".repeat(600));
    for i in 0..5 {
        let r = call(p.addr, "POST", CHAT, &[KEY, ("Content-Type", "application/json")], body.as_bytes());
        assert_eq!(r.status, 200, "{}", r.text());
        let got = rx.recv_timeout(Duration::from_secs(10)).expect("the upstream's read");
        let end = find(&got, b"\r\n\r\n").expect("the whole head in the first read");
        assert_eq!(request_content_length(&got[..end]), body.len());
        assert_eq!(&got[end + 4..], body.as_bytes(), "request {i}: the body came in the same read as the head");
    }
    // Mostly over one pooled connection; not asserted: the proxy puts it back only after it has relayed the
    // answer, so the next request may come first and open a second one.
    assert!(accepted.load(Ordering::SeqCst) >= 1);
}

#[test]
fn a_large_body_arrives_whole_over_http_and_https() {
    let m = MockAzure::start(azure_like("east", "key0", Duration::from_millis(1)));
    let p = proxy::start(&[&m]);
    let big: Vec<u8> = (0..3 * 1024 * 1024 + 7).map(|i| b'a' + (i % 26) as u8).collect();
    let mut body = b"{\"messages\":[],\"pad\":\"".to_vec();
    body.extend_from_slice(&big);
    body.extend_from_slice(b"\"}");
    let r = call(p.addr, "POST", CHAT, &[KEY, ("Content-Type", "application/json")], &body);
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(m.last_request().expect("request").body, body);

    let up = TlsUpstream::start(None);
    let p = proxy_to(&up.url(), json!({"ca_bundle": fixture("private-ca.pem")}));
    let r = call(p.addr, "POST", CHAT, &[KEY, ("Content-Type", "application/json")], &body);
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(*up.bodies.lock().expect("bodies"), [body]);
}

#[test]
fn a_pooled_connection_the_upstream_closed_is_replaced_without_an_error() {
    // Each connection answers one request as keep-alive (no `Connection: close`), then the upstream closes it.
    let (closed_tx, closed) = mpsc::channel::<()>();
    let closed_tx = Mutex::new(closed_tx);
    let (addr, accepted) = raw_upstream(move |mut s| {
        if read_request(&mut s).is_some() {
            let _ = s.write_all(OK);
        }
        drop(s);
        let _ = closed_tx.lock().expect("tx").send(());
    });
    let p = proxy_to(&format!("http://{addr}"), json!({}));
    for _ in 0..3 {
        let r = call(p.addr, "POST", CHAT, &[KEY], b"{}");
        assert_eq!(r.status, 200, "{}", r.text());
        closed.recv_timeout(Duration::from_secs(10)).expect("the upstream closed its side");
    }
    assert_eq!(accepted.load(Ordering::SeqCst), 3, "a new connection each time");
    let metrics = call(p.addr, "GET", "/metrics", &[], b"").text();
    let failed: Vec<&str> = metrics
        .lines()
        .filter(|l| l.starts_with("azure_proxy_upstream_attempts_total{") && !l.contains("outcome=\"2xx\""))
        .filter(|l| !l.ends_with(" 0"))
        .collect();
    assert!(failed.is_empty(), "no attempt failed on a dead pooled connection: {failed:?}");
}

#[test]
fn idle_upstream_connections_are_kept_for_upstream_idle_timeout_ms() {
    let m = MockAzure::start(azure_like("east", "key0", Duration::from_millis(1)));
    let kept = proxy::start(&[&m]);
    let short = proxy::start_with(proxy::instances_for(&[&m]), json!({"upstream_idle_timeout_ms": 200}));
    for p in [&kept, &short] {
        assert_eq!(call(p.addr, "POST", CHAT, &[KEY], b"{}").status, 200);
    }
    // A pause longer than the short timeout and shorter than the default (no event to wait for: it is the time).
    thread::sleep(Duration::from_millis(600));
    assert_eq!(call(kept.addr, "POST", CHAT, &[KEY], b"{}").status, 200);
    assert_eq!(m.connections(), 2, "the default keeps the connection through the pause");
    assert_eq!(call(short.addr, "POST", CHAT, &[KEY], b"{}").status, 200);
    assert_eq!(m.connections(), 3, "200 ms: the pooled connection was dropped and a new one made");
}

#[test]
fn a_pool_of_reconnects_resumes_its_tls_sessions() {
    // Twelve connections at once (more than rustls's default cache keeps tickets for), each closed after its
    // answer; then twelve again: every one of the second round resumes.
    const N: usize = 12;
    let up = TlsUpstream::start(Some(N));
    let p = proxy_to(&up.url(), json!({"ca_bundle": fixture("private-ca.pem"), "workers": 2 * N}));
    for round in 0..2 {
        let clients: Vec<_> = (0..N)
            .map(|_| {
                let addr = p.addr;
                thread::spawn(move || call(addr, "POST", CHAT, &[KEY], b"{}").status)
            })
            .collect();
        for c in clients {
            assert_eq!(c.join().expect("client"), 200, "round {round}");
        }
    }
    let kinds = up.kinds.lock().expect("kinds").clone();
    assert_eq!(kinds.len(), 2 * N, "{kinds:?}");
    // In the first round a connection may already find a ticket of one made a moment before it.
    assert!(kinds[..N].contains(&HandshakeKind::Full), "first round: full handshakes: {kinds:?}");
    assert!(kinds[N..].iter().all(|k| *k == HandshakeKind::Resumed), "second round: all resumed: {kinds:?}");
}

#[test]
fn https_upstreams_through_the_egress_proxy_resume_too() {
    let up = TlsUpstream::start(None);
    let (egress, seen) = crate::tls::connect_proxy();
    let extra = json!({"ca_bundle": fixture("private-ca.pem"), "egress_proxy": format!("http://{egress}")});
    let p = proxy_to(&up.url(), extra);
    for _ in 0..3 {
        let r = call(p.addr, "POST", CHAT, &[KEY], b"{\"messages\":[]}");
        assert_eq!(r.status, 200, "{}", r.text());
    }
    assert_eq!(seen.lock().expect("seen").len(), 3, "each connection tunnelled through the proxy");
    let kinds = up.kinds.lock().expect("kinds").clone();
    assert_eq!(kinds, [HandshakeKind::Full, HandshakeKind::Resumed, HandshakeKind::Resumed]);
}

/// An HTTPS upstream (the localhost certificate of the private test CA) that records each connection's
/// handshake kind and request body, and answers 200 with `Connection: close`. With `batch`, it holds each answer
/// until that many requests are in (or 10 s passed), so that the proxy has that many connections open at once.
struct TlsUpstream {
    addr: SocketAddr,
    kinds: Arc<Mutex<Vec<HandshakeKind>>>,
    bodies: Arc<Mutex<Vec<Vec<u8>>>>,
}

impl TlsUpstream {
    fn start(batch: Option<usize>) -> TlsUpstream {
        let config = localhost_server_config();
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
        let up =
            TlsUpstream { addr: listener.local_addr().expect("addr"), kinds: Arc::default(), bodies: Arc::default() };
        let (kinds, bodies) = (Arc::clone(&up.kinds), Arc::clone(&up.bodies));
        let arrived = Arc::new((Mutex::new(0usize), Condvar::new()));
        thread::spawn(move || {
            for tcp in listener.incoming().map_while(Result::ok) {
                let (config, kinds, bodies, arrived) =
                    (Arc::clone(&config), Arc::clone(&kinds), Arc::clone(&bodies), Arc::clone(&arrived));
                thread::spawn(move || {
                    let _ = tcp.set_read_timeout(Some(Duration::from_secs(10)));
                    let mut tls = rustls::StreamOwned::new(rustls::ServerConnection::new(config).expect("conn"), tcp);
                    let Some(req) = read_request(&mut tls) else { return };
                    kinds.lock().expect("kinds").push(tls.conn.handshake_kind().expect("handshake done"));
                    let end = find(&req, b"\r\n\r\n").expect("head");
                    bodies.lock().expect("bodies").push(req[end + 4..].to_vec());
                    if let Some(n) = batch {
                        let (count, cv) = &*arrived;
                        let mut c = count.lock().expect("count");
                        *c += 1;
                        let _ = cv.wait_timeout_while(c, Duration::from_secs(10), |c| *c % n != 0).expect("wait");
                        cv.notify_all();
                    }
                    let close = b"HTTP/1.1 200 OK\r\ncontent-length: 11\r\nconnection: close\r\n\r\n{\"ok\":true}";
                    let _ = tls.write_all(close);
                    tls.conn.send_close_notify();
                    let _ = tls.flush();
                });
            }
        });
        up
    }

    fn url(&self) -> String {
        format!("https://localhost:{}", self.addr.port())
    }
}
