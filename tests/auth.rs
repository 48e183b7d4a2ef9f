//! Client admission: the key allowlist, 401s, blocking an address after repeated bad keys, and keeping the
//! client key away from the upstream and out of every answer.

use std::io;
use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::os::fd::{AsRawFd, FromRawFd};
use std::time::{Duration, Instant};

use crate::support::client::{call, read_raw_head, Client, Resp};
use crate::support::mock::{azure_like, MockAzure, Recorded, Reply};
use crate::support::proxy::{self, Proxy, CHAT};
use serde_json::json;

fn azure_mock() -> MockAzure {
    MockAzure::start(azure_like("east", "key0", Duration::from_millis(1)))
}

fn proxy_for(m: &MockAzure, extra: serde_json::Value) -> Proxy {
    proxy::start_with(proxy::instances_for(&[m]), extra)
}

/// One chat request on a fresh connection with `key` in `api-key` (none if `None`).
fn with_key(addr: SocketAddr, key: Option<&str>) -> Resp {
    match key {
        Some(k) => call(addr, "POST", CHAT, &[("api-key", k)], b"{}"),
        None => call(addr, "POST", CHAT, &[], b"{}"),
    }
}

/// The OpenAI error envelope, whose request_id is the x-request-id header.
fn assert_error(r: &Resp, status: u16, what: &str) {
    assert_eq!(r.status, status, "{what}: {}", r.text());
    let rid = r.header("x-request-id").unwrap_or_else(|| panic!("{what}: no x-request-id"));
    let body = r.json();
    let e = &body["error"];
    assert!(e["message"].is_string() && e["type"].is_string() && e["code"].is_string(), "{what}: {body}");
    assert_eq!(e["request_id"], rid, "{what}");
}

/// A TCP connection to `to` from the local address `from` (any 127.x.y.z is local on Linux), so that the proxy
/// sees another client IP. std cannot bind before connecting, hence libc.
fn connect_from(from: Ipv4Addr, to: SocketAddr) -> TcpStream {
    let SocketAddr::V4(to) = to else { panic!("the proxy listens on IPv4") };
    let sockaddr = |ip: Ipv4Addr, port: u16| libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: port.to_be(),
        sin_addr: libc::in_addr { s_addr: u32::from(ip).to_be() },
        sin_zero: [0; 8],
    };
    let local = sockaddr(from, 0);
    let remote = sockaddr(*to.ip(), to.port());
    let len = std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t;
    // SAFETY: plain socket(2) call; the returned fd is checked and then owned by the TcpStream.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) };
    assert!(fd >= 0, "socket: {}", io::Error::last_os_error());
    // SAFETY: `fd` is a fresh, open socket that nothing else owns; the stream closes it when dropped.
    let stream = unsafe { TcpStream::from_raw_fd(fd) };
    // SAFETY: the pointers refer to live sockaddr_in values of the length passed, for the duration of each call.
    unsafe {
        let rc = libc::bind(stream.as_raw_fd(), &local as *const libc::sockaddr_in as *const libc::sockaddr, len);
        assert_eq!(rc, 0, "bind {from}: {}", io::Error::last_os_error());
        let rc = libc::connect(stream.as_raw_fd(), &remote as *const libc::sockaddr_in as *const libc::sockaddr, len);
        assert_eq!(rc, 0, "connect from {from}: {}", io::Error::last_os_error());
    }
    stream
}

/// One chat request from local address `from` with `key`.
fn with_key_from(from: Ipv4Addr, addr: SocketAddr, key: &str) -> Resp {
    let mut c = Client::from_stream(connect_from(from, addr));
    c.send("POST", CHAT, &[("api-key", key)], b"{}");
    c.read_response(false).expect("a complete response")
}

#[test]
fn missing_or_wrong_key_is_401_and_the_good_key_passes() {
    let m = azure_mock();
    let running = proxy_for(&m, json!({}));
    let addr = running.addr;
    let r = with_key(addr, None);
    assert_error(&r, 401, "no key");
    assert_eq!(r.json()["error"]["type"], "authentication_error");
    let r = with_key(addr, Some("wrong-key"));
    assert_error(&r, 401, "wrong key");
    assert_eq!(r.json()["error"]["type"], "authentication_error");
    assert_ne!(with_key(addr, None).header("x-request-id"), r.header("x-request-id"), "a fresh id per request");
    assert_eq!(m.hits(), 0, "rejected requests are not forwarded");
    let r = with_key(addr, Some("client-key"));
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(m.hits(), 1);
}

#[test]
fn repeated_bad_keys_block_the_address() {
    let m = azure_mock();
    let running = proxy_for(&m, json!({"max_bad_keys": 3, "block_seconds": 60}));
    let addr = running.addr;
    assert_eq!(with_key(addr, Some("client-key")).status, 200);
    for i in 0..3 {
        assert_error(&with_key(addr, Some(&format!("guess-{i}"))), 401, "bad key before the block");
    }
    for key in [Some("client-key"), Some("guess-4"), None] {
        let r = with_key(addr, key);
        assert_error(&r, 403, "blocked");
        let secs: u64 = r.header("retry-after").expect("Retry-After").parse().expect("Retry-After in seconds");
        assert!((1..=60).contains(&secs), "Retry-After: {secs}");
        assert_eq!(r.json()["error"]["type"], "permission_error");
    }
    assert_eq!(m.hits(), 1, "blocked requests never reach the upstream");
}

#[test]
fn a_good_key_resets_the_count() {
    let m = azure_mock();
    let running = proxy_for(&m, json!({"max_bad_keys": 3, "block_seconds": 60}));
    let addr = running.addr;
    for _ in 0..2 {
        assert_eq!(with_key(addr, Some("bad")).status, 401);
    }
    assert_eq!(with_key(addr, Some("client-key")).status, 200);
    for _ in 0..2 {
        assert_eq!(with_key(addr, Some("bad")).status, 401);
    }
    let r = with_key(addr, Some("client-key"));
    assert_eq!(r.status, 200, "only consecutive bad keys count: {}", r.text());
}

#[test]
fn a_block_expires() {
    let m = azure_mock();
    let running = proxy_for(&m, json!({"max_bad_keys": 3, "block_seconds": 1}));
    let addr = running.addr;
    for _ in 0..3 {
        assert_eq!(with_key(addr, Some("bad")).status, 401);
    }
    assert_eq!(with_key(addr, Some("client-key")).status, 403);
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let r = with_key(addr, Some("client-key"));
        if r.status == 200 {
            break;
        }
        assert_eq!(r.status, 403, "{}", r.text());
        assert!(Instant::now() < deadline, "still blocked well after block_seconds");
        std::thread::sleep(Duration::from_millis(50));
    }
    // The block is over and the count starts from zero again.
    assert_eq!(with_key(addr, Some("bad")).status, 401);
    assert_eq!(with_key(addr, Some("client-key")).status, 200);
}

#[test]
fn a_missing_key_is_not_a_strike() {
    // A client without any key is misconfigured, not guessing: it gets 401s but is never blocked.
    let m = azure_mock();
    let running = proxy_for(&m, json!({"max_bad_keys": 3, "block_seconds": 60}));
    let addr = running.addr;
    for _ in 0..5 {
        assert_error(&with_key(addr, None), 401, "missing key");
    }
    assert_eq!(with_key(addr, Some("client-key")).status, 200);
}

#[test]
fn without_an_allowlist_any_non_empty_key_passes() {
    let m = azure_mock();
    let running = proxy_for(&m, json!({"client_keys": []}));
    let addr = running.addr;
    for key in ["anything", "client-key", "x"] {
        let r = with_key(addr, Some(key));
        assert_eq!(r.status, 200, "{key}: {}", r.text());
        assert_eq!(m.last_request().expect("seen").header("api-key"), Some("key0"), "instance key upstream");
    }
    let r = call(addr, "POST", CHAT, &[("api-key", "")], b"{}");
    assert_error(&r, 401, "empty key");
    assert_error(&with_key(addr, None), 401, "no key");
    assert_eq!(m.hits(), 3);
}

#[test]
fn expect_100_continue_with_a_bad_key_gets_401_and_never_100() {
    let m = azure_mock();
    let running = proxy_for(&m, json!({}));
    let addr = running.addr;
    for key in ["api-key: wrong\r\n", ""] {
        let mut c = Client::connect(addr);
        let head = format!(
            "POST {CHAT} HTTP/1.1\r\nHost: p\r\n{key}Content-Type: application/json\r\nContent-Length: 15\r\n\
             Expect: 100-continue\r\n\r\n"
        );
        c.send_raw(head.as_bytes());
        let (status, text) = read_raw_head(&mut c.stream).expect("an answer to the head alone");
        assert_eq!(status, 401, "the first thing sent is the 401, not a 100 Continue: {text}");
        assert!(text.to_ascii_lowercase().contains("\r\nconnection: close\r\n"), "{text}");
        // The rest is the JSON error, then the close: the body the client held back is never asked for.
        let body = c.read_to_end().expect("body then EOF");
        let json: serde_json::Value = serde_json::from_slice(&body).expect("JSON error body");
        assert_eq!(json["error"]["type"], "authentication_error");
    }
    assert_eq!(m.hits(), 0);
}

#[test]
fn client_addresses_are_tracked_separately() {
    let m = azure_mock();
    let running = proxy_for(&m, json!({"max_bad_keys": 3, "block_seconds": 60}));
    let addr = running.addr;
    let one = Ipv4Addr::new(127, 0, 0, 1);
    let two = Ipv4Addr::new(127, 0, 0, 2);
    for _ in 0..3 {
        assert_eq!(with_key_from(two, addr, "bad").status, 401);
    }
    assert_eq!(with_key_from(two, addr, "client-key").status, 403, "127.0.0.2 is blocked");
    assert_eq!(with_key_from(one, addr, "client-key").status, 200, "127.0.0.1 is not");
    // Strikes from one address do not add up with another's.
    for _ in 0..2 {
        assert_eq!(with_key_from(one, addr, "bad").status, 401);
    }
    assert_eq!(with_key_from(one, addr, "client-key").status, 200);
    assert_eq!(with_key_from(two, addr, "client-key").status, 403, "127.0.0.2 is still blocked");
}

#[test]
fn the_client_key_never_reaches_the_upstream_or_an_answer() {
    const KEY: &str = "sk-proxy-client-7f3a9c";
    // An upstream that echoes every header it received: a forwarded client key would come back in the body.
    let m = MockAzure::start(|r: &Recorded| {
        let headers: Vec<String> = r.headers.iter().map(|(n, v)| format!("{n}: {v}")).collect();
        Reply::json(200, json!({ "seen_headers": headers }))
    });
    let check = |r: &Resp, what: &str| {
        assert!(!r.text().contains(KEY), "{what}: key in the body: {}", r.text());
        for (n, v) in &r.headers {
            assert!(!v.contains(KEY), "{what}: key in response header {n}");
        }
    };

    // Same header for both keys (the default): the instance key replaces the client key.
    let running = proxy_for(&m, json!({"client_keys": [KEY], "max_bad_keys": 2, "block_seconds": 60}));
    let addr = running.addr;
    let r = call(addr, "POST", CHAT, &[("api-key", KEY), ("Content-Type", "application/json")], b"{}");
    assert_eq!(r.status, 200, "{}", r.text());
    check(&r, "200");
    let seen = m.last_request().expect("seen");
    assert_eq!(seen.header("api-key"), Some("key0"));
    assert_eq!(seen.header_count("api-key"), 1);
    // A near-miss key is not echoed either, nor is the allowlisted one in a 403.
    let near = &KEY[..KEY.len() - 1];
    for _ in 0..2 {
        let r = call(addr, "POST", CHAT, &[("api-key", near)], b"{}");
        assert_eq!(r.status, 401);
        check(&r, "401");
        assert!(!r.text().contains(near), "the wrong key is not echoed: {}", r.text());
    }
    let r = call(addr, "POST", CHAT, &[("api-key", KEY)], b"{}");
    assert_eq!(r.status, 403);
    check(&r, "403");

    // Separate client header: it is dropped, not forwarded next to the instance key.
    let running = proxy_for(&m, json!({"client_keys": [KEY], "client_header_name": "x-client-key"}));
    let addr = running.addr;
    let r = call(addr, "POST", CHAT, &[("X-Client-Key", KEY)], b"{}");
    assert_eq!(r.status, 200, "{}", r.text());
    check(&r, "200 (separate header)");

    assert_eq!(m.hits(), 2);
    for seen in m.requests() {
        for (n, v) in &seen.headers {
            assert!(!v.contains(KEY), "client key forwarded upstream in {n}");
        }
        assert!(!String::from_utf8_lossy(&seen.body).contains(KEY));
    }
}

#[test]
fn v1_clients_send_their_key_as_a_bearer_token_in_any_case() {
    let m = azure_mock();
    let running = proxy_for(&m, json!({"max_bad_keys": 3, "block_seconds": 60}));
    let v1 = "/openai/v1/chat/completions";
    let body = br#"{"model":"gpt-4o","messages":[{"role":"user","content":"hi"}]}"#;
    for scheme in ["Bearer", "bearer", "BEARER"] {
        let auth = format!("{scheme} client-key");
        let r = call(running.addr, "POST", v1, &[("Authorization", &auth), ("Content-Type", "application/json")], body);
        assert_eq!(r.status, 200, "{scheme}: {}", r.text());
        let seen = m.last_request().expect("forwarded");
        assert_eq!(seen.path(), v1);
        assert_eq!(seen.header_count("authorization"), 0, "the bearer key is not forwarded");
        assert_eq!(seen.header("api-key"), Some("key0"));
    }
    // Both headers with the same key: fine.
    let headers = [("api-key", "client-key"), ("Authorization", "Bearer client-key")];
    assert_eq!(call(running.addr, "POST", CHAT, &headers, b"{}").status, 200);
    // A wrong bearer key is a wrong key: 401 and a strike.
    for _ in 0..3 {
        let r = call(running.addr, "POST", v1, &[("Authorization", "Bearer wrong")], body);
        assert_eq!(r.status, 401, "{}", r.text());
    }
    let r = call(running.addr, "POST", v1, &[("Authorization", "Bearer client-key")], body);
    assert_eq!(r.status, 403, "three bad bearer keys block the address like three bad api-keys");
}

#[test]
fn two_different_keys_are_refused_without_a_strike_and_an_old_authorization_config_still_works() {
    let m = azure_mock();
    let running = proxy_for(&m, json!({"max_bad_keys": 2, "block_seconds": 60}));
    let before = m.hits();
    for _ in 0..4 {
        let headers = [("api-key", "client-key"), ("Authorization", "Bearer other-key")];
        let r = call(running.addr, "POST", CHAT, &headers, b"{}");
        assert_eq!(r.status, 401, "{}", r.text());
        assert!(r.text().contains("two different client keys"), "{}", r.text());
    }
    assert_eq!(m.hits(), before, "refused before any attempt");
    let r = call(running.addr, "POST", CHAT, &[("api-key", "client-key")], b"{}");
    assert_eq!(r.status, 200, "four conflicting requests are not four strikes: {}", r.text());
    let r = call(running.addr, "POST", CHAT, &[], b"{}");
    assert_eq!(r.status, 401);
    assert!(r.text().contains("Authorization: Bearer"), "the message says both ways: {}", r.text());

    // The old workaround: client_header_name "Authorization" with "Bearer <key>" listed as the key.
    let old = proxy_for(&m, json!({"client_header_name": "Authorization", "client_keys": ["Bearer legacy-key"]}));
    let r = call(old.addr, "POST", CHAT, &[("Authorization", "Bearer legacy-key")], b"{}");
    assert_eq!(r.status, 200, "{}", r.text());
    let r = call(old.addr, "POST", CHAT, &[("Authorization", "Bearer nope")], b"{}");
    assert_eq!(r.status, 401);
}
