//! Forwarding: paths, headers, keys, round-robin, request IDs, local routes.

use crate::support::client::{call, chat, Client};
use crate::support::mock::{azure_like, MockAzure, Reply};
use crate::support::proxy::{self, CHAT};
use std::time::Duration;

fn ok_mock(name: &str, key: &str) -> MockAzure {
    MockAzure::start(azure_like(name, key, Duration::from_millis(1)))
}

#[test]
fn chat_completion_is_forwarded_with_the_instance_key_and_unchanged_path() {
    let m = ok_mock("east", "key0");
    let p = proxy::start(&[&m]);
    let body = r#"{"messages":[{"role":"user","content":"hi"}]}"#;
    let r = chat(p.addr, body);
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json()["choices"][0]["message"]["content"], "Hello from east");
    assert_eq!(r.header("x-served-by"), Some("east"));
    let seen = m.last_request().expect("upstream saw the request");
    assert_eq!(seen.method, "POST");
    assert_eq!(seen.target, CHAT);
    assert_eq!(seen.body, body.as_bytes());
    assert_eq!(seen.header("api-key"), Some("key0"), "instance key replaces the client key");
    assert_eq!(seen.header_count("api-key"), 1);
    assert_eq!(seen.header("content-type"), Some("application/json"));
    assert_eq!(seen.header("host"), Some(m.addr().to_string().as_str()), "Host is the upstream's");
    let rid = r.header("x-request-id").expect("request id returned");
    assert_eq!(seen.header("x-ms-client-request-id"), Some(rid));
}

#[test]
fn custom_header_names_move_the_keys() {
    let m = MockAzure::start(|_: &crate::support::mock::Recorded| Reply::json(200, serde_json::json!({"ok": true})));
    let p = proxy::start_with(
        proxy::instances_for(&[&m]),
        serde_json::json!({"header_name": "X-Upstream-Key", "client_header_name": "X-Client-Key"}),
    );
    let r = call(p.addr, "POST", CHAT, &[("x-client-key", "client-key")], b"{}");
    assert_eq!(r.status, 200);
    let seen = m.last_request().expect("seen");
    assert_eq!(seen.header("x-upstream-key"), Some("key0"));
    assert_eq!(seen.header("x-client-key"), None, "client key never reaches Azure");
    // The default header is now just another header: a client key there does not authenticate.
    assert_eq!(call(p.addr, "POST", CHAT, &[("api-key", "client-key")], b"{}").status, 401);
}

#[test]
fn round_robin_starts_each_request_at_the_next_instance() {
    let mocks: Vec<MockAzure> = (0..3).map(|i| ok_mock(&format!("m{i}"), &format!("key{i}"))).collect();
    let p = proxy::start(&mocks.iter().collect::<Vec<_>>());
    let served: Vec<String> =
        (0..6).map(|_| chat(p.addr, "{}").header("x-served-by").unwrap_or_default().to_string()).collect();
    assert_eq!(served, ["m0", "m1", "m2", "m0", "m1", "m2"]);
    for m in &mocks {
        assert_eq!(m.hits(), 2);
    }
}

#[test]
fn every_openai_route_is_forwarded_and_others_are_404_locally() {
    let m = MockAzure::start(|_: &crate::support::mock::Recorded| Reply::json(200, serde_json::json!({"ok": true})));
    let p = proxy::start(&[&m]);
    let key = [("api-key", "client-key")];
    for path in [
        "/openai/deployments/emb/embeddings?api-version=2024-06-01",
        "/openai/v1/chat/completions",
        "/openai/v1/responses?x=1&y=2",
        "/openai/deployments/dalle/images/generations?api-version=2024-02-01",
        "/openai/deployments/whisper/audio/transcriptions?api-version=2024-06-01",
    ] {
        assert_eq!(call(p.addr, "POST", path, &key, b"{}").status, 200, "{path}");
        assert_eq!(m.last_request().expect("seen").target, path);
    }
    let r = call(p.addr, "GET", "/openai/models?api-version=2024-06-01", &key, b"");
    assert_eq!(r.status, 200);
    assert_eq!(m.last_request().expect("seen").method, "GET");
    let before = m.hits();
    for path in ["/", "/v1/chat/completions", "/openaix/deployments", "/admin", "/healthz/x"] {
        let r = call(p.addr, "POST", path, &key, b"{}");
        assert_eq!(r.status, 404, "{path}");
        assert!(r.header("x-request-id").is_some());
    }
    assert_eq!(m.hits(), before, "nothing outside /openai/ is forwarded");
    let h = call(p.addr, "GET", "/healthz", &[], b"");
    assert_eq!((h.status, h.json()["status"].as_str()), (200, Some("ok")));
}

#[test]
fn request_ids_are_kept_when_sane_and_replaced_otherwise() {
    let m = ok_mock("east", "key0");
    let p = proxy::start(&[&m]);
    let r = call(p.addr, "POST", CHAT, &[("api-key", "client-key"), ("x-request-id", "abc-123._X")], b"{}");
    assert_eq!(r.header("x-request-id"), Some("abc-123._X"));
    assert_eq!(m.last_request().expect("seen").header("x-ms-client-request-id"), Some("abc-123._X"));
    let long = "a".repeat(129);
    for bad in ["has space", "semi;colon", long.as_str()] {
        let r = call(p.addr, "POST", CHAT, &[("api-key", "client-key"), ("x-request-id", bad)], b"{}");
        let id = r.header("x-request-id").expect("id");
        assert_ne!(id, bad);
        assert_eq!(id.len(), 32);
        assert_eq!(m.last_request().expect("seen").header("x-ms-client-request-id"), Some(id));
    }
    // On local errors too, and in the error body.
    let r = call(p.addr, "POST", CHAT, &[("x-request-id", "rid-401")], b"{}");
    assert_eq!((r.status, r.header("x-request-id")), (401, Some("rid-401")));
    assert_eq!(r.json()["error"]["request_id"], "rid-401");
}

#[test]
fn hop_by_hop_headers_are_not_forwarded_either_way() {
    let m = MockAzure::start(|_: &crate::support::mock::Recorded| {
        Reply::json(200, serde_json::json!({"ok": true}))
            .with_header("Keep-Alive", "timeout=5")
            .with_header("X-Secret-Hop", "1")
            .with_header("Connection", "X-Secret-Hop")
            .with_header("X-Request-Id", "azure-side-id")
            .with_header("X-Kept", "yes")
    });
    let p = proxy::start(&[&m]);
    let r = call(
        p.addr,
        "POST",
        CHAT,
        &[
            ("api-key", "client-key"),
            ("Connection", "keep-alive, X-Drop-Me"),
            ("X-Drop-Me", "1"),
            ("Keep-Alive", "timeout=5"),
            ("TE", "trailers"),
            ("Proxy-Connection", "keep-alive"),
            ("X-Ms-Client-Request-Id", "spoofed"),
            ("X-Custom", "kept"),
        ],
        b"{}",
    );
    assert_eq!(r.status, 200);
    let seen = m.last_request().expect("seen");
    for gone in ["x-drop-me", "keep-alive", "te", "proxy-connection"] {
        assert_eq!(seen.header(gone), None, "{gone} forwarded");
    }
    assert_ne!(seen.header("connection"), Some("keep-alive, X-Drop-Me"));
    assert_ne!(seen.header("x-ms-client-request-id"), Some("spoofed"));
    assert_eq!(seen.header("x-custom"), Some("kept"));
    assert_eq!(r.header("keep-alive"), None);
    assert_eq!(r.header("x-secret-hop"), None);
    assert_eq!(r.header("x-kept"), Some("yes"));
    assert_eq!(r.header("x-upstream-request-id"), Some("azure-side-id"));
    assert_ne!(r.header("x-request-id"), Some("azure-side-id"));
}

#[test]
fn keep_alive_connection_carries_several_requests_and_pipelining_works() {
    let m = ok_mock("east", "key0");
    let p = proxy::start(&[&m]);
    let mut c = Client::connect(p.addr);
    for _ in 0..3 {
        c.send("POST", CHAT, &[("api-key", "client-key")], b"{}");
        assert_eq!(c.read_response(false).expect("response").status, 200);
    }
    // Two requests in one write: answered in order on the same connection.
    let one = format!("POST {CHAT} HTTP/1.1\r\nHost: x\r\napi-key: client-key\r\nx-request-id: first\r\nContent-Length: 2\r\n\r\n{{}}");
    let two = "GET /healthz HTTP/1.1\r\nHost: x\r\nx-request-id: second\r\n\r\n";
    c.send_raw(format!("{one}{two}").as_bytes());
    let a = c.read_response(false).expect("first");
    let b = c.read_response(false).expect("second");
    assert_eq!((a.status, a.header("x-request-id")), (200, Some("first")));
    assert_eq!((b.status, b.header("x-request-id")), (200, Some("second")));
}

#[test]
fn http_1_0_client_gets_an_answer_and_a_close() {
    let m = ok_mock("east", "key0");
    let p = proxy::start(&[&m]);
    let mut c = Client::connect(p.addr);
    c.send_raw(format!("POST {CHAT} HTTP/1.0\r\napi-key: client-key\r\nContent-Length: 2\r\n\r\n{{}}").as_bytes());
    let r = c.read_response(false).expect("response");
    assert_eq!(r.status, 200);
    assert!(!r.chunked);
    assert!(c.is_closed());
}

#[test]
fn bodies_keep_their_length_and_bodiless_requests_stay_bodiless() {
    let m = MockAzure::start(|_: &crate::support::mock::Recorded| Reply::json(200, serde_json::json!({"ok": true})));
    let p = proxy::start(&[&m]);
    let r = call(p.addr, "POST", CHAT, &[("api-key", "client-key")], b"");
    assert_eq!(r.status, 200);
    let seen = m.last_request().expect("seen");
    assert_eq!(seen.header("content-length"), Some("0"), "an empty POST keeps its Content-Length: 0");
    let r = call(p.addr, "GET", "/openai/models?api-version=2024-06-01", &[("api-key", "client-key")], b"");
    assert_eq!(r.status, 200);
    let seen = m.last_request().expect("seen");
    assert_eq!((seen.header("content-length"), seen.header("transfer-encoding")), (None, None));
    assert!(seen.body.is_empty());
}

#[test]
fn heads_larger_than_the_small_upstream_buffer_and_large_bodies_are_forwarded_whole() {
    // Most requests go through an agent whose output buffer holds a 4 KiB head; larger heads take the other one.
    let m = ok_mock("east", "key0");
    let p = proxy::start(&[&m]);
    let big = "v".repeat(12 * 1024);
    let body = format!(r#"{{"messages":[{{"role":"user","content":"{}"}}]}}"#, "x".repeat(200_000));
    for (i, header) in ["small", big.as_str()].into_iter().enumerate() {
        let headers = [("api-key", "client-key"), ("Content-Type", "application/json"), ("x-big", header)];
        let r = call(p.addr, "POST", CHAT, &headers, body.as_bytes());
        assert_eq!(r.status, 200, "request {i}: {}", r.text());
        let seen = m.last_request().expect("forwarded");
        assert_eq!(seen.header("x-big"), Some(header), "request {i}");
        assert!(seen.body == body.as_bytes(), "request {i}: body of {} bytes", seen.body.len());
    }
}
