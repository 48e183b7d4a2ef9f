//! TLS on both sides: the proxy's own HTTPS listener (`tls_cert` + `tls_key`), an upstream behind a private CA
//! (`ca_bundle`), and upstream traffic through an HTTP CONNECT proxy (`egress_proxy`). The certificates are test
//! fixtures made with openssl (see tests/fixtures/README.md).

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::time::Duration;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};

use crate::support::client::{call, read_request};
use crate::support::mock::{azure_like, MockAzure, Recorded, Reply};
use crate::support::proxy::{self, NoEnv, Proxy, CHAT};
use crate::support::tls::{fixture, localhost_server_config, provider};
use azure_proxy::config::{Config, Overrides};

/// A TLS client that trusts only the private test CA.
fn tls_connect(addr: SocketAddr) -> rustls::StreamOwned<rustls::ClientConnection, TcpStream> {
    let mut roots = rustls::RootCertStore::empty();
    roots.add(CertificateDer::from_pem_file(fixture("private-ca.pem")).expect("ca")).expect("add ca");
    let config = rustls::ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .expect("versions")
        .with_root_certificates(roots)
        .with_no_client_auth();
    let name = ServerName::try_from("127.0.0.1").expect("name").to_owned();
    let conn = rustls::ClientConnection::new(Arc::new(config), name).expect("client");
    let tcp = TcpStream::connect(addr).expect("connect");
    tcp.set_read_timeout(Some(Duration::from_secs(20))).expect("timeout");
    rustls::StreamOwned::new(conn, tcp)
}

fn tls_proxy(mocks: &[&MockAzure]) -> Proxy {
    let extra = serde_json::json!({
        "tls_cert": fixture("localhost-cert.pem"),
        "tls_key": fixture("localhost-key.pem"),
    });
    proxy::start_with(proxy::instances_for(mocks), extra)
}

/// Reads one response head from a TLS stream, byte by byte.
fn read_head(s: &mut impl Read) -> String {
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        assert_eq!(s.read(&mut byte).expect("read head"), 1, "EOF in head: {}", String::from_utf8_lossy(&head));
        head.push(byte[0]);
    }
    String::from_utf8_lossy(&head).into_owned()
}

fn content_length(head: &str) -> usize {
    head.lines()
        .find_map(|l| l.to_ascii_lowercase().strip_prefix("content-length:").map(|v| v.trim().parse().expect("len")))
        .expect("content-length")
}

#[test]
fn https_listener_serves_keep_alive_requests() {
    let m = MockAzure::start(azure_like("east", "key0", Duration::from_millis(1)));
    let running = tls_proxy(&[&m]);
    let addr = running.addr;
    let mut tls = tls_connect(addr);
    for _ in 0..3 {
        let req = format!("POST {CHAT} HTTP/1.1\r\nHost: x\r\napi-key: client-key\r\nContent-Length: 2\r\n\r\n{{}}");
        tls.write_all(req.as_bytes()).expect("write");
        let head = read_head(&mut tls);
        assert!(head.starts_with("HTTP/1.1 200"), "{head}");
        let mut body = vec![0u8; content_length(&head)];
        tls.read_exact(&mut body).expect("body");
        assert!(String::from_utf8_lossy(&body).contains("Hello from east"));
    }
    // Plain HTTP on the TLS port gets no HTTP answer.
    let mut plain = TcpStream::connect(addr).expect("connect");
    plain.set_read_timeout(Some(Duration::from_secs(20))).expect("timeout");
    plain.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n").expect("write");
    let mut out = Vec::new();
    let _ = plain.read_to_end(&mut out);
    assert!(!out.starts_with(b"HTTP/1.1 200"), "plain HTTP must not be served on the TLS port");
}

#[test]
fn https_listener_streams_events_live() {
    let (open_gate, gate) = mpsc::channel::<()>();
    let gate = Mutex::new(Some(gate));
    let m = MockAzure::start(move |_: &Recorded| Reply::Sse {
        events: vec!["data: one\n\n".into(), "data: two\n\n".into()],
        pause: Duration::ZERO,
        gate: gate.lock().expect("gate").take(),
    });
    let running = tls_proxy(&[&m]);
    let addr = running.addr;
    let mut tls = tls_connect(addr);
    let req = format!("POST {CHAT} HTTP/1.1\r\nHost: x\r\napi-key: client-key\r\nContent-Length: 2\r\n\r\n{{}}");
    tls.write_all(req.as_bytes()).expect("write");
    let head = read_head(&mut tls);
    assert!(head.contains("transfer-encoding: chunked") || head.contains("Transfer-Encoding: chunked"), "{head}");
    let mut reader = BufReader::new(tls);
    let mut seen = String::new();
    while !seen.contains("data: one") {
        let mut line = String::new();
        assert!(reader.read_line(&mut line).expect("line") > 0, "stream ended early");
        seen.push_str(&line);
    }
    // The first event arrived before the upstream was allowed to send the second.
    open_gate.send(()).expect("gate");
    while !seen.contains("data: two") {
        let mut line = String::new();
        assert!(reader.read_line(&mut line).expect("line") > 0, "stream ended early");
        seen.push_str(&line);
    }
}

#[test]
fn tls_cert_without_key_is_a_config_error() {
    let text = format!(
        r#"{{"instances": [{{"endpoint": "https://a.example", "api_key": "k"}}], "tls_cert": {:?}}}"#,
        fixture("localhost-cert.pem")
    );
    let e = Config::from_json(&text, Path::new("t.json"), &Overrides::default(), &NoEnv).expect_err("no key");
    assert!(e.message.contains("tls_cert") && e.message.contains("tls_key"), "{}", e.message);
    let text = format!(
        r#"{{"instances": [{{"endpoint": "https://a.example", "api_key": "k"}}], "tls_cert": {:?}, "tls_key": {:?}}}"#,
        fixture("localhost-cert.pem"),
        fixture("wrong-key.pem")
    );
    let e = Config::from_json(&text, Path::new("t.json"), &Overrides::default(), &NoEnv).expect_err("mismatch");
    assert!(e.message.contains("tls_cert"), "{}", e.message);
}

/// An HTTPS upstream with the localhost certificate signed by the private test CA; answers every request 200.
fn private_ca_upstream() -> (SocketAddr, Arc<AtomicUsize>) {
    private_ca_server(br#"{"ok":true}"#)
}

/// An HTTPS server with the localhost certificate signed by the private test CA; answers every request 200 with
/// the JSON `body`.
fn private_ca_server(body: &'static [u8]) -> (SocketAddr, Arc<AtomicUsize>) {
    let config = localhost_server_config();
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = listener.local_addr().expect("addr");
    let served = Arc::new(AtomicUsize::new(0));
    let count = Arc::clone(&served);
    std::thread::spawn(move || {
        for tcp in listener.incoming().map_while(Result::ok) {
            let (config, count) = (Arc::clone(&config), Arc::clone(&count));
            std::thread::spawn(move || {
                let _ = tcp.set_read_timeout(Some(Duration::from_secs(5)));
                let conn = rustls::ServerConnection::new(config).expect("conn");
                let mut tls = rustls::StreamOwned::new(conn, tcp);
                // Read the whole request (head, then Content-Length bytes) before answering: closing with unread
                // bytes would reset the connection and could destroy the answer in flight.
                if read_request(&mut tls).is_none() {
                    return;
                }
                count.fetch_add(1, Ordering::SeqCst);
                let head = format!("HTTP/1.1 200 OK\r\ncontent-length: {}\r\nconnection: close\r\n\r\n", body.len());
                let _ = tls.write_all(head.as_bytes());
                let _ = tls.write_all(body);
                let _ = tls.flush();
                tls.conn.send_close_notify();
                let _ = tls.flush();
            });
        }
    });
    (addr, served)
}

#[test]
fn ca_bundle_trusts_a_private_ca_for_upstreams() {
    let (upstream, served) = private_ca_upstream();
    let instance = proxy::instance(&format!("https://{upstream}"), "key0", "private");
    let without = proxy::start_with(vec![instance.clone()], serde_json::json!({}));
    let r = call(without.addr, "POST", CHAT, &[("api-key", "client-key")], b"{}");
    assert_eq!(r.status, 502, "the built-in roots do not know the private CA: {}", r.text());
    assert!(r.text().to_ascii_lowercase().contains("tls"), "{}", r.text());
    assert_eq!(served.load(Ordering::SeqCst), 0);

    let with = proxy::start_with(vec![instance], serde_json::json!({"ca_bundle": fixture("private-ca.pem")}));
    let r = call(with.addr, "POST", CHAT, &[("api-key", "client-key")], b"{}");
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(served.load(Ordering::SeqCst), 1);
}

#[test]
fn a_reload_that_changes_ca_bundle_or_egress_proxy_reaches_the_instances_and_the_token_requests() {
    let (upstream, served) = private_ca_upstream();
    let (egress, seen) = connect_proxy();
    let instance = proxy::instance(&format!("https://{upstream}"), "key0", "private");
    let p = proxy::start_with(vec![instance.clone()], serde_json::json!({}));
    let post = || call(p.addr, "POST", CHAT, &[("api-key", "client-key")], b"{}");
    assert_eq!(post().status, 502, "the built-in roots do not know the private CA");
    let reload =
        |extra: serde_json::Value| p.server.reload(proxy::config_with_env(vec![instance.clone()], extra, &NoEnv));

    // Before the fix, the agents (and their TLS client) were kept: still 502 after this reload.
    reload(serde_json::json!({"ca_bundle": fixture("private-ca.pem")})).expect("reloads");
    assert_eq!(post().status, 200, "the new ca_bundle is trusted");
    reload(serde_json::json!({"ca_bundle": fixture("private-ca.pem"), "egress_proxy": format!("http://{egress}")}))
        .expect("reloads");
    assert_eq!(post().status, 200);
    assert_eq!(seen.lock().expect("log").clone(), [format!("CONNECT {upstream} HTTP/1.1")], "through the new proxy");
    reload(serde_json::json!({"ca_bundle": fixture("private-ca.pem")})).expect("reloads");
    assert_eq!(post().status, 200);
    assert_eq!(seen.lock().expect("log").len(), 1, "direct again");
    assert_eq!(served.load(Ordering::SeqCst), 3);

    // An identity kept across the reload (same flow, tenant and client) fetches with the new clients, at once,
    // although its failed fetch had started a backoff.
    let (authority, token_served) =
        private_ca_server(br#"{"token_type":"Bearer","access_token":"tok-reload","expires_in":3600}"#);
    let inst = MockAzure::start(|r: &crate::support::mock::Recorded| {
        let ok = r.header("authorization") == Some("Bearer tok-reload");
        crate::support::mock::Reply::json(if ok { 200 } else { 401 }, serde_json::json!({}))
    });
    let auth = serde_json::json!({"type": "client_secret", "tenant_id": "t", "client_id": "c",
                                  "authority_host": format!("https://localhost:{}", authority.port())});
    let env = proxy::MapEnv(vec![("AZURE_CLIENT_SECRET".into(), "sp-s3cret".into())]);
    let keyless = serde_json::json!({"endpoint": inst.url(), "name": "kl", "auth": auth});
    let p = proxy::start_with_env(vec![keyless.clone()], serde_json::json!({}), &env);
    let r = call(p.addr, "POST", CHAT, &[("api-key", "client-key")], b"{}");
    assert_eq!(r.status, 502, "no token: the token endpoint's CA is unknown: {}", r.text());
    assert_eq!(inst.hits(), 0);
    let config =
        proxy::config_with_env(vec![keyless], serde_json::json!({"ca_bundle": fixture("private-ca.pem")}), &env);
    p.server.reload(config).expect("reloads");
    let r = call(p.addr, "POST", CHAT, &[("api-key", "client-key")], b"{}");
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(token_served.load(Ordering::SeqCst), 1, "one token request, trusting the new ca_bundle");
}

/// A minimal HTTP CONNECT proxy: records each CONNECT target, then splices bytes both ways.
pub(crate) fn connect_proxy() -> (SocketAddr, Arc<Mutex<Vec<String>>>) {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = listener.local_addr().expect("addr");
    let seen = Arc::new(Mutex::new(Vec::new()));
    let log = Arc::clone(&seen);
    std::thread::spawn(move || {
        for client in listener.incoming().map_while(Result::ok) {
            let log = Arc::clone(&log);
            std::thread::spawn(move || {
                let mut reader = BufReader::new(client.try_clone().expect("clone"));
                let mut line = String::new();
                if reader.read_line(&mut line).is_err() {
                    return;
                }
                let target = line.split_whitespace().nth(1).unwrap_or_default().to_string();
                loop {
                    let mut h = String::new();
                    if reader.read_line(&mut h).unwrap_or(0) == 0 || h == "\r\n" {
                        break;
                    }
                }
                log.lock().expect("log").push(line.trim().to_string());
                let Ok(upstream) = TcpStream::connect(&target) else { return };
                let mut client_w = client;
                let _ = client_w.write_all(b"HTTP/1.1 200 Connection established\r\n\r\n");
                let (mut up_r, mut up_w) = (upstream.try_clone().expect("clone"), upstream);
                let mut client_r = reader.into_inner();
                std::thread::spawn(move || {
                    let _ = std::io::copy(&mut up_r, &mut client_w);
                });
                let _ = std::io::copy(&mut client_r, &mut up_w);
            });
        }
    });
    (addr, seen)
}

#[test]
fn egress_proxy_carries_upstream_traffic() {
    let m = MockAzure::start(azure_like("east", "key0", Duration::from_millis(1)));
    let (egress, seen) = connect_proxy();
    let p =
        proxy::start_with(proxy::instances_for(&[&m]), serde_json::json!({"egress_proxy": format!("http://{egress}")}));
    let r = call(p.addr, "POST", CHAT, &[("api-key", "client-key")], b"{}");
    assert_eq!(r.status, 200, "{}", r.text());
    let lines = seen.lock().expect("log").clone();
    assert_eq!(lines, [format!("CONNECT {} HTTP/1.1", m.addr())], "the upstream was reached through the proxy");

    // Without egress_proxy the upstream is called directly (and the environment's proxy variables are ignored).
    let direct = proxy::start(&[&m]);
    assert_eq!(call(direct.addr, "POST", CHAT, &[("api-key", "client-key")], b"{}").status, 200);
    assert_eq!(seen.lock().expect("log").len(), 1);
}

#[test]
fn token_requests_use_ca_bundle_and_egress_proxy_and_the_metadata_service_is_never_proxied() {
    let (authority, served) =
        private_ca_server(br#"{"token_type":"Bearer","access_token":"tok-tls","expires_in":3600}"#);
    let inst = MockAzure::start(|r: &crate::support::mock::Recorded| {
        let ok = r.header("authorization") == Some("Bearer tok-tls");
        crate::support::mock::Reply::json(if ok { 200 } else { 401 }, serde_json::json!({}))
    });
    let (egress, seen) = connect_proxy();
    let auth = serde_json::json!({"type": "client_secret", "tenant_id": "t", "client_id": "c",
                                  "authority_host": format!("https://localhost:{}", authority.port())});
    let settings =
        serde_json::json!({"ca_bundle": fixture("private-ca.pem"), "egress_proxy": format!("http://{egress}")});
    let env = proxy::MapEnv(vec![("AZURE_CLIENT_SECRET".into(), "sp-s3cret".into())]);
    let instance = serde_json::json!({"endpoint": inst.url(), "name": "kl", "auth": auth});
    let p = proxy::start_with_env(vec![instance], settings.clone(), &env);
    let r = call(p.addr, "POST", CHAT, &[("api-key", "client-key")], b"{}");
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(served.load(Ordering::SeqCst), 1, "one token request, over TLS trusting the private CA");
    let lines = seen.lock().expect("log").clone();
    assert!(lines.contains(&format!("CONNECT localhost:{} HTTP/1.1", authority.port())), "{lines:?}");

    // The metadata service is on the host: never through the egress proxy.
    let imds = MockAzure::start(|_: &crate::support::mock::Recorded| {
        crate::support::mock::Reply::json(200, serde_json::json!({"access_token": "tok-tls", "expires_in": "3600"}))
    });
    let env = proxy::MapEnv(vec![("AZURE_POD_IDENTITY_AUTHORITY_HOST".into(), imds.url())]);
    let instance = serde_json::json!({"endpoint": inst.url(), "name": "kl", "auth": {"type": "managed_identity"}});
    let p = proxy::start_with_env(vec![instance], settings, &env);
    let r = call(p.addr, "POST", CHAT, &[("api-key", "client-key")], b"{}");
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(imds.hits(), 1);
    let lines = seen.lock().expect("log").clone();
    assert!(!lines.iter().any(|l| l.contains(&imds.addr().port().to_string())), "{lines:?}");
}
