//! Retries: which failures move the request to the next instance, what a non-retryable answer looks like to the
//! client, and the fallback answer when every instance failed.

use std::net::TcpListener;
use std::time::Duration;

use crate::support::client::{call, Resp};
use crate::support::mock::{serving as ok_mock, MockAzure, Recorded, Reply};
use crate::support::proxy::{self, instance, Proxy, CHAT};
use serde_json::{json, Value};

/// Short upstream timeouts, for the instances that never answer.
fn short_timeouts() -> Value {
    json!({"upstream_response_timeout_ms": 300, "upstream_read_timeout_ms": 300, "connect_timeout_ms": 500})
}

/// A mock that gives every request the reply `f` builds.
fn mock(f: impl Fn() -> Reply + Send + Sync + 'static) -> MockAzure {
    MockAzure::start(move |_: &Recorded| f())
}

/// An Azure-style error answer.
fn error_mock(status: u16, code: &'static str) -> MockAzure {
    mock(move || Reply::json(status, json!({"error": {"code": code, "message": format!("mock says {status}")}})))
}

/// The URL of a port nobody listens on (bound, then released).
fn refused_url() -> String {
    let l = TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = l.local_addr().expect("addr").port();
    drop(l);
    format!("http://127.0.0.1:{port}")
}

/// A proxy in front of `mocks` (named m0, m1, … with keys key0, key1, …) and short timeouts.
fn proxy_for(mocks: &[&MockAzure]) -> Proxy {
    proxy::start_with(proxy::instances_for(mocks), short_timeouts())
}

fn post(p: &Proxy, body: &[u8]) -> Resp {
    call(p.addr, "POST", CHAT, &[("api-key", "client-key"), ("Content-Type", "application/json")], body)
}

fn attempts(r: &Resp) -> Vec<Value> {
    r.json()["error"]["attempts"].as_array().unwrap_or_else(|| panic!("no attempts list: {}", r.text())).clone()
}

fn attempt_instances(r: &Resp) -> Vec<String> {
    attempts(r).iter().map(|a| a["instance"].as_str().expect("instance name").to_string()).collect()
}

/// A request body worth replaying: non-ASCII, escapes, and longer than one read.
fn request_body() -> Vec<u8> {
    let filler = "lorem ipsum ".repeat(5000);
    format!(r#"{{"messages":[{{"role":"user","content":"héllo \"wörld\" ✓ {filler}"}}],"temperature":0.2}}"#)
        .into_bytes()
}

#[test]
fn each_retryable_status_moves_the_request_to_the_next_instance_with_the_same_body() {
    let body = request_body();
    for status in [429, 500, 502, 503, 504, 401, 403, 404] {
        let bad = error_mock(status, "Whatever");
        let good = ok_mock("m1");
        let p = proxy_for(&[&bad, &good]);
        let r = post(&p, &body);
        assert_eq!(r.status, 200, "after a {status}: {}", r.text());
        assert_eq!(r.header("x-served-by"), Some("m1"), "after a {status}");
        assert_eq!((bad.hits(), good.hits()), (1, 1), "after a {status}");
        let first = bad.last_request().expect("first instance saw the request");
        let replayed = good.last_request().expect("second instance saw the request");
        assert!(first.body == body, "after a {status}: body sent to the first instance differs");
        assert!(replayed.body == body, "after a {status}: replayed body differs");
        assert_eq!(replayed.header("content-length"), Some(body.len().to_string().as_str()));
        assert_eq!(replayed.target, CHAT);
        assert_eq!(replayed.header("api-key"), Some("key1"), "the replay uses the second instance's key");
    }
}

#[test]
fn non_retryable_client_errors_are_relayed_unchanged_at_once() {
    for status in [400, 422] {
        let body =
            json!({"error": {"code": "BadRequest", "message": format!("invalid input ({status})"), "param": "x"}});
        let expected = serde_json::to_vec(&body).expect("json");
        let b = body.clone();
        let first = mock(move || Reply::json(status, b.clone()).with_header("x-custom-error", "detail-7"));
        let second = ok_mock("m1");
        let p = proxy_for(&[&first, &second]);
        let r = post(&p, b"{}");
        assert_eq!(r.status, status);
        assert!(r.body == expected, "{status}: body changed: {}", r.text());
        assert_eq!(r.header("x-custom-error"), Some("detail-7"));
        assert_eq!(r.header("content-type"), Some("application/json"));
        assert_eq!(r.header("content-length"), Some(expected.len().to_string().as_str()));
        assert_eq!((first.hits(), second.hits()), (1, 0), "{status} must not be retried");
    }
}

#[test]
fn connection_refused_moves_the_request_to_the_next_instance() {
    let good = ok_mock("good");
    let p = proxy::start_with(
        vec![instance(&refused_url(), "key0", "dead"), instance(&good.url(), "key1", "good")],
        short_timeouts(),
    );
    let r = post(&p, b"{}");
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.header("x-served-by"), Some("good"));
    assert_eq!(good.hits(), 1);
}

#[test]
fn reset_or_close_before_the_head_moves_the_request_to_the_next_instance() {
    let body = request_body();
    for (what, reply) in [("reset", (|| Reply::ResetBeforeHead) as fn() -> Reply), ("close", || Reply::CloseBeforeHead)]
    {
        let broken = mock(reply);
        let good = ok_mock("m1");
        let p = proxy_for(&[&broken, &good]);
        let r = post(&p, &body);
        assert_eq!(r.status, 200, "{what}: {}", r.text());
        assert_eq!(r.header("x-served-by"), Some("m1"), "{what}");
        assert_eq!((broken.hits(), good.hits()), (1, 1), "{what}: each instance tried once");
        assert!(good.last_request().expect("seen").body == body, "{what}: replayed body differs");
    }
}

#[test]
fn a_head_that_never_comes_moves_the_request_to_the_next_instance() {
    let hung = mock(|| Reply::Hang { for_at_most: Duration::from_secs(30) });
    let good = ok_mock("m1");
    let p = proxy_for(&[&hung, &good]);
    let r = post(&p, b"{}");
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.header("x-served-by"), Some("m1"));
    assert_eq!((hung.hits(), good.hits()), (1, 1));
}

#[test]
fn every_instance_is_tried_once_then_502_lists_the_attempts() {
    let mocks: Vec<MockAzure> = (0..3).map(|_| error_mock(500, "InternalServerError")).collect();
    let p = proxy_for(&mocks.iter().collect::<Vec<_>>());
    let r = post(&p, b"{}");
    assert_eq!(r.status, 502, "{}", r.text());
    assert_eq!(r.header("content-type"), Some("application/json"));
    let rid = r.header("x-request-id").expect("request id").to_string();
    let e = &r.json()["error"];
    assert_eq!(e["type"], "upstream_error");
    assert_eq!(e["code"], "all_instances_failed");
    assert!(e["message"].as_str().is_some_and(|m| !m.is_empty()), "{e}");
    assert_eq!(e["request_id"], rid.as_str());
    let list = attempts(&r);
    assert_eq!(list.len(), 3);
    for a in &list {
        assert_eq!(a["status"], 500, "{a}");
        assert!(a["elapsed_ms"].is_u64(), "{a}");
        assert!(a.get("error").is_none(), "{a}");
    }
    assert_eq!(attempt_instances(&r), ["m0", "m1", "m2"]);
    for m in &mocks {
        assert_eq!(m.hits(), 1, "each instance at most once per request");
    }
    // The next request starts one instance further and still visits each once.
    let r = post(&p, b"{}");
    assert_eq!(r.status, 502);
    assert_eq!(attempt_instances(&r), ["m1", "m2", "m0"]);
    for m in &mocks {
        assert_eq!(m.hits(), 2);
    }
}

#[test]
fn all_throttled_gives_429_with_the_shortest_retry_after_rounded_up() {
    let throttled = |headers: &'static [(&'static str, &'static str)]| {
        mock(move || {
            headers
                .iter()
                .fold(Reply::json(429, json!({"error": {"code": "429", "message": "Rate limit"}})), |r, (n, v)| {
                    r.with_header(n, v)
                })
        })
    };
    let mocks = [
        throttled(&[("retry-after-ms", "7000"), ("Retry-After", "7")]),
        throttled(&[("Retry-After", "5")]),
        throttled(&[("x-ms-retry-after-ms", "2500")]),
    ];
    let p = proxy_for(&mocks.iter().collect::<Vec<_>>());
    let r = post(&p, b"{}");
    assert_eq!(r.status, 429, "{}", r.text());
    assert_eq!(r.header("retry-after"), Some("3"), "2500 ms is the shortest wait, rounded up to 3 s");
    let e = &r.json()["error"];
    assert_eq!(e["type"], "rate_limit_error");
    assert_eq!(e["code"], "all_instances_throttled");
    assert_eq!(attempt_instances(&r), ["m0", "m1", "m2"]);
    assert!(attempts(&r).iter().all(|a| a["status"] == 429));
    assert!(mocks.iter().all(|m| m.hits() == 1));

    // Milliseconds win over seconds on one instance.
    let a = throttled(&[("retry-after-ms", "1200"), ("Retry-After", "60")]);
    let b = throttled(&[("Retry-After", "60")]);
    let r = post(&proxy_for(&[&a, &b]), b"{}");
    assert_eq!((r.status, r.header("retry-after")), (429, Some("2")));

    // No hint at all: one second.
    let a = throttled(&[]);
    let b = throttled(&[]);
    let r = post(&proxy_for(&[&a, &b]), b"{}");
    assert_eq!((r.status, r.header("retry-after")), (429, Some("1")));
    assert_eq!(attempts(&r).len(), 2);
}

#[test]
fn a_timeout_as_last_failure_gives_504() {
    let failing = error_mock(500, "InternalServerError");
    let hung = mock(|| Reply::Hang { for_at_most: Duration::from_secs(30) });
    let p = proxy_for(&[&failing, &hung]);
    let r = post(&p, b"{}");
    assert_eq!(r.status, 504, "{}", r.text());
    let e = &r.json()["error"];
    assert_eq!(e["type"], "upstream_timeout");
    let list = attempts(&r);
    assert_eq!(attempt_instances(&r), ["m0", "m1"]);
    assert_eq!(list[0]["status"], 500);
    assert!(list[1].get("status").is_none(), "{}", list[1]);
    assert!(list[1]["error"].as_str().is_some_and(|s| !s.is_empty()), "{}", list[1]);
    assert_eq!(r.header("retry-after"), None);
}

#[test]
fn refused_and_500_give_502_with_an_error_string_for_the_refused_instance() {
    let failing = error_mock(500, "InternalServerError");
    let p = proxy::start_with(
        vec![instance(&refused_url(), "key0", "dead"), instance(&failing.url(), "key1", "failing")],
        short_timeouts(),
    );
    // Starts at "dead", then "failing"; the next request the other way round.
    for expected in [["dead", "failing"], ["failing", "dead"]] {
        let r = post(&p, b"{}");
        assert_eq!(r.status, 502, "{}", r.text());
        assert_eq!(attempt_instances(&r), expected);
        for a in attempts(&r) {
            if a["instance"] == "dead" {
                assert!(a.get("status").is_none(), "{a}");
                assert!(a["error"].as_str().is_some_and(|s| !s.is_empty()), "{a}");
            } else {
                assert_eq!(a["status"], 500, "{a}");
                assert!(a.get("error").is_none(), "{a}");
            }
            assert!(a["elapsed_ms"].is_u64(), "{a}");
        }
    }
    assert_eq!(failing.hits(), 2);
}

#[test]
fn the_same_auth_or_not_found_error_everywhere_is_relayed_as_azure_sent_it() {
    for (status, code) in [(404, "DeploymentNotFound"), (401, "401"), (403, "403")] {
        let body = |name: &str| json!({"error": {"code": code, "message": format!("{code} from {name}")}});
        let (b0, b1) = (body("m0"), body("m1"));
        let m0 = mock(move || Reply::json(status, b0.clone()).with_header("x-from", "m0"));
        let m1 = mock(move || Reply::json(status, b1.clone()).with_header("x-from", "m1"));
        let p = proxy_for(&[&m0, &m1]);
        let r = post(&p, b"{}");
        assert_eq!(r.status, status, "{}", r.text());
        // Every instance was asked; the last answer goes back unchanged.
        assert!(r.body == serde_json::to_vec(&body("m1")).expect("json"), "{status}: {}", r.text());
        assert_eq!(r.header("x-from"), Some("m1"));
        assert_eq!((m0.hits(), m1.hits()), (1, 1));
    }
}

#[test]
fn not_found_mixed_with_500_gives_502() {
    let not_found = error_mock(404, "DeploymentNotFound");
    let failing = error_mock(500, "InternalServerError");
    let p = proxy_for(&[&not_found, &failing]);
    for (expected, statuses) in [(["m0", "m1"], [404, 500]), (["m1", "m0"], [500, 404])] {
        let r = post(&p, b"{}");
        assert_eq!(r.status, 502, "{}", r.text());
        assert_eq!(attempt_instances(&r), expected);
        let got: Vec<Value> = attempts(&r).iter().map(|a| a["status"].clone()).collect();
        assert_eq!(got, statuses.map(Value::from));
    }
}

#[test]
fn the_fallback_answer_never_contains_an_instance_key() {
    let keys = ["SECRET-instance-key-0-d41d8cd98f00b204e980", "SECRET-instance-key-1-9800998ecf8427e0abcd"];
    let echo = |status: u16| {
        // An upstream error that quotes the key it was sent: the proxy must not pass that on.
        MockAzure::start(move |req: &Recorded| {
            let key = req.header("api-key").unwrap_or_default().to_string();
            Reply::json(status, json!({"error": {"message": format!("bad key {key}")}})).with_header("x-echo-key", &key)
        })
    };
    let (a, b) = (echo(500), echo(429));
    let c = mock(|| Reply::Hang { for_at_most: Duration::from_secs(30) });
    let p = proxy::start_with(
        vec![
            instance(&a.url(), keys[0], "a"),
            instance(&b.url(), keys[1], "b"),
            instance(&refused_url(), "SECRET-instance-key-2-refused", "refused"),
            instance(&c.url(), "SECRET-instance-key-3-hung", "hung"),
        ],
        short_timeouts(),
    );
    let r = post(&p, b"{}");
    assert_eq!(r.status, 504, "{}", r.text());
    assert_eq!(a.last_request().expect("seen").header("api-key"), Some(keys[0]));
    let mut everything = r.text();
    for (n, v) in &r.headers {
        everything.push_str(&format!("\n{n}: {v}"));
    }
    assert!(!everything.contains("SECRET"), "a key leaked into the fallback answer:\n{everything}");
    assert!(!everything.contains("client-key"), "the client key leaked into the fallback answer:\n{everything}");
}

#[test]
fn retry_after_on_a_relayed_answer_is_passed_through_unchanged() {
    let first = mock(|| {
        Reply::json(400, json!({"error": {"code": "BadRequest", "message": "no"}}))
            .with_header("Retry-After", "17")
            .with_header("retry-after-ms", "17250")
    });
    let second = ok_mock("m1");
    let p = proxy_for(&[&first, &second]);
    let r = post(&p, b"{}");
    assert_eq!(r.status, 400);
    assert_eq!(r.header("retry-after"), Some("17"));
    assert_eq!(r.header("retry-after-ms"), Some("17250"));
    assert_eq!(second.hits(), 0);
}
