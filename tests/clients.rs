//! Client keys with names, per-key deployment allowlists and rate limits, and the usage accounting behind them
//! (issue 12): in-process proxies in front of mock instances, and the real binary for what it logs.

use std::time::Duration;

use serde_json::{json, Value};

use crate::support::client::{call, Client, Resp};
use crate::support::eventually;
use crate::support::mock::{azure_like, sse_data_json, MockAzure, Recorded, Reply};
use crate::support::process::{write_config, Running};
use crate::support::proxy::{self, Proxy, CHAT};

fn sha256_hex(key: &str) -> String {
    ring::digest::digest(&ring::digest::SHA256, key.as_bytes()).as_ref().iter().map(|b| format!("{b:02x}")).collect()
}

fn mock() -> MockAzure {
    MockAzure::start(azure_like("m0", "key0", Duration::from_millis(1)))
}

fn with_keys(m: &MockAzure, keys: Value) -> Proxy {
    proxy::start_with(proxy::instances_for(&[m]), json!({ "client_keys": keys }))
}

fn post(addr: std::net::SocketAddr, path: &str, key: &str, body: Value) -> Resp {
    let headers = [("api-key", key), ("Content-Type", "application/json")];
    call(addr, "POST", path, &headers, body.to_string().as_bytes())
}

fn metrics(addr: std::net::SocketAddr) -> String {
    call(addr, "GET", "/metrics", &[], b"").text()
}

/// The value of the sample `name{labels}` in a scrape, 0 when absent.
fn sample(text: &str, series: &str) -> f64 {
    text.lines().find_map(|l| l.strip_prefix(series).and_then(|rest| rest.trim().parse().ok())).unwrap_or(0.0)
}

/// The access line of request `rid`, in either log format.
fn access_line(p: &Running, rid: &str) -> String {
    let text = format!(" {rid} ");
    let json = format!(r#""request_id":"{rid}""#);
    let is_it = |l: &str| (l.contains("[access]") && l.contains(&text)) || l.contains(&json);
    p.log_when(is_it).into_iter().find(|l| is_it(l)).unwrap_or_else(|| panic!("no access line for {rid}"))
}

const V1_CHAT: &str = "/openai/v1/chat/completions";

#[test]
fn named_keys_from_the_file_the_environment_and_a_digest_are_accepted_and_only_their_names_are_shown() {
    let m = mock();
    let keys = json!([
        "legacy-key-value",
        { "name": "team-a", "key": "team-a-key-value" },
        { "name": "team-b", "key_env": "TEAM_B_KEY" },
        { "name": "ci", "key_sha256": sha256_hex("ci-key-value") },
    ]);
    let config = json!({
        "instances": [proxy::instance(&m.url(), "key0", "m0")],
        "client_keys": keys,
    });
    let secrets = ["legacy-key-value", "team-a-key-value", "team-b-key-value", "ci-key-value"];
    for json_log in [false, true] {
        let path = write_config(&format!("named-keys-{json_log}.json"), &config.to_string());
        let mut env = vec![("TEAM_B_KEY", "team-b-key-value")];
        if json_log {
            env.push(("LOG_FORMAT", "json"));
        }
        let p = Running::start(&path, &env);
        let sent = [("legacy-key-value", "key-1"), ("team-a-key-value", "team-a"), ("team-b-key-value", "team-b")];
        for (i, (key, name)) in sent.iter().chain([("ci-key-value", "ci")].iter()).enumerate() {
            // Half of them as the v1 API's clients send it.
            let auth = format!("Bearer {key}");
            let header = if i % 2 == 0 { ("api-key", *key) } else { ("Authorization", auth.as_str()) };
            let rid = format!("named-{json_log}-{i}");
            let r = call(p.addr, "POST", CHAT, &[header, ("x-request-id", &rid)], b"{}");
            assert_eq!(r.status, 200, "{name}: {}", r.text());
            let line = access_line(&p, &rid);
            if json_log {
                let start = line.find('{').expect("a JSON object");
                let v: Value = serde_json::from_str(&line[start..]).expect("the access line is JSON");
                assert_eq!(v["client_name"], *name, "{line}");
            } else {
                assert!(line.contains(&format!(" client_name={name} ")), "{line}");
            }
        }
        let r = call(p.addr, "POST", CHAT, &[("api-key", "not-a-key"), ("x-request-id", "named-bad")], b"{}");
        assert_eq!(r.status, 401);
        let line = access_line(&p, "named-bad");
        assert!(line.contains("client_name=-") || line.contains(r#""client_name":"-""#), "{line}");
        let text = metrics(p.addr);
        for name in ["key-1", "team-a", "team-b", "ci"] {
            let series = format!(r#"azure_proxy_requests_total{{route="chat",status="200",client="{name}"}}"#);
            assert_eq!(sample(&text, &series), 1.0, "{series}\n{text}");
        }
        // No key, plain or hashed, in anything the proxy wrote or answered.
        let log = p.log.lock().expect("log").join("\n");
        for s in secrets.iter().chain([sha256_hex("ci-key-value").as_str()].iter()) {
            assert!(!log.contains(s), "{s} in the log");
            assert!(!text.contains(s), "{s} in the metrics");
        }
    }
}

#[test]
fn a_key_may_use_only_the_deployments_it_lists_by_path_or_by_model() {
    let m = mock();
    let p = with_keys(
        &m,
        json!([{ "name": "batch", "key": "batch-key", "deployments": ["gpt-4o-mini"] }, { "name": "all", "key": "all-key" }]),
    );
    let path = |dep: &str| format!("/openai/deployments/{dep}/chat/completions?api-version=2024-06-01");
    let ok = post(p.addr, &path("gpt-4o-mini"), "batch-key", json!({}));
    assert_eq!(ok.status, 200, "{}", ok.text());
    let hits = m.hits();
    for (target, body) in
        [(path("gpt-4o"), json!({})), (V1_CHAT.to_string(), json!({"model": "gpt-4o", "messages": []}))]
    {
        let r = post(p.addr, &target, "batch-key", body);
        assert_eq!(r.status, 403, "{target}: {}", r.text());
        let e = &r.json()["error"];
        assert_eq!(e["code"], "client_deployment_not_allowed", "{e}");
        assert_eq!(e["type"], "permission_error");
        assert!(e["message"].as_str().unwrap_or_default().contains("\"gpt-4o\""), "{e}");
    }
    // A body whose deployment cannot be read could name any: refused too.
    let r = call(p.addr, "POST", "/openai/v1/audio/transcriptions", &[("api-key", "batch-key")], b"--x\r\n");
    assert_eq!(r.status, 403, "{}", r.text());
    assert_eq!(m.hits(), hits, "no refused request reached an instance");

    let r = post(p.addr, V1_CHAT, "batch-key", json!({"model": "gpt-4o-mini", "messages": []}));
    assert_eq!(r.status, 200, "{}", r.text());
    let r = post(p.addr, &path("gpt-4o"), "all-key", json!({}));
    assert_eq!(r.status, 200, "a key without a list may use any deployment");
    // A request without a body names no deployment and is let through (listing models).
    let r = call(p.addr, "GET", "/openai/v1/models", &[("api-key", "batch-key")], b"");
    assert_ne!(r.status, 403, "{}", r.text());
    assert_eq!(m.hits(), hits + 3);

    // The refusal keeps the connection: the body was read.
    let mut c = Client::connect(p.addr);
    c.send("POST", &path("gpt-4o"), &[("api-key", "batch-key")], b"{}");
    assert_eq!(c.read_response(false).expect("403").status, 403);
    c.send("POST", &path("gpt-4o-mini"), &[("api-key", "batch-key")], b"{}");
    assert_eq!(c.read_response(false).expect("200 on the same connection").status, 200);
}

#[test]
fn a_key_over_its_requests_per_minute_gets_429_while_another_key_is_served_and_a_reload_keeps_the_count() {
    let m = mock();
    let keys = json!([
        { "name": "slow", "key": "slow-key", "requests_per_minute": 3 },
        { "name": "fast", "key": "fast-key" },
    ]);
    // One bad key would block the address: a 429 must not count as one.
    let p = proxy::start_with(proxy::instances_for(&[&m]), json!({ "client_keys": keys, "max_bad_keys": 1 }));
    for i in 0..3 {
        assert_eq!(post(p.addr, CHAT, "slow-key", json!({})).status, 200, "request {i}");
    }
    let hits = m.hits();
    let r = post(p.addr, CHAT, "slow-key", json!({}));
    assert_eq!(r.status, 429, "{}", r.text());
    let retry: u64 = r.header("retry-after").expect("Retry-After").parse().expect("seconds");
    assert!((1..=20).contains(&retry), "3 per minute: one comes back within 20 s, got {retry}");
    let e = &r.json()["error"];
    assert_eq!(e["code"], "client_requests_per_minute_exceeded", "{e}");
    assert_eq!(e["type"], "rate_limit_error");
    assert_eq!(m.hits(), hits, "no upstream call");
    assert_eq!(post(p.addr, CHAT, "fast-key", json!({})).status, 200, "another key (same address) is served");

    // A reload with the key unchanged keeps its spent allowance; one that changes the key starts afresh.
    let reload = |keys: Value| {
        let cfg = json!({
            "instances": proxy::instances_for(&[&m]), "client_keys": keys, "max_bad_keys": 1, "workers": 4,
        });
        let config = azure_proxy::config::Config::from_json(
            &cfg.to_string(),
            std::path::Path::new("reload.json"),
            &azure_proxy::config::Overrides { listen: Some("127.0.0.1:0".into()), ..Default::default() },
            &proxy::NoEnv,
        )
        .expect("valid");
        p.server.reload(config).expect("reloads");
    };
    reload(keys.clone());
    assert_eq!(post(p.addr, CHAT, "slow-key", json!({})).status, 429, "still spent after a reload");
    reload(json!([{ "name": "slow", "key": "new-slow-key", "requests_per_minute": 3 }]));
    assert_eq!(post(p.addr, CHAT, "new-slow-key", json!({})).status, 200, "a new key, a new allowance");
}

#[test]
fn tokens_per_minute_counts_the_usage_of_answers_streamed_or_not() {
    let m = mock();
    // Every answer of the mock uses 10 prompt + 3 completion tokens.
    let p = with_keys(&m, json!([{ "name": "t", "key": "t-key", "tokens_per_minute": 20 }, "other-key"]));
    assert_eq!(post(p.addr, CHAT, "t-key", json!({})).status, 200);
    // 7 tokens left: still admitted; this streamed answer's usage chunk takes the key below zero.
    let r = post(p.addr, CHAT, "t-key", json!({"stream": true, "stream_options": {"include_usage": true}}));
    assert_eq!(r.status, 200);
    assert!(sse_data_json(&r.body).iter().any(|e| e["usage"]["completion_tokens"] == 3), "a usage chunk");
    // The usage is taken once the answer is done, a moment after the client has it.
    eventually("the streamed usage is taken", || post(p.addr, CHAT, "t-key", json!({})).status == 429);
    let hits = m.hits();
    let r = post(p.addr, CHAT, "t-key", json!({}));
    assert_eq!(r.status, 429);
    assert_eq!(r.json()["error"]["code"], "client_tokens_per_minute_exceeded");
    assert!(r.header("retry-after").is_some());
    assert_eq!(m.hits(), hits, "no upstream call while over the limit");
    assert_eq!(post(p.addr, CHAT, "other-key", json!({})).status, 200);
}

/// A mock of the v1 routes whose deployment is in the body: the Responses API (plain and streamed) and
/// embeddings, each reporting its usage the way Azure does.
fn v1_usage_mock(req: &Recorded) -> Reply {
    let body = req.json().unwrap_or_default();
    match req.path() {
        "/openai/v1/responses" if body["stream"] == true => Reply::sse(
            vec![
                "event: response.created\ndata: {\"type\":\"response.created\",\"response\":{\"status\":\"in_progress\",\"usage\":null}}\n\n".into(),
                "event: response.output_text.delta\ndata: {\"type\":\"response.output_text.delta\",\"delta\":\"Hi\"}\n\n".into(),
                format!(
                    "event: response.completed\ndata: {}\n\n",
                    json!({"type": "response.completed", "response": {"status": "completed", "output": [],
                        "usage": {"input_tokens": 7, "input_tokens_details": {"cached_tokens": 0},
                                  "output_tokens": 2, "output_tokens_details": {"reasoning_tokens": 0},
                                  "total_tokens": 9}, "user": null}})
                ),
            ],
            Duration::from_millis(1),
        ),
        "/openai/v1/responses" => Reply::json(
            200,
            json!({"object": "response", "status": "completed", "model": "gpt-4o-mini-2024-07-18", "output": [],
                   "usage": {"input_tokens": 5, "input_tokens_details": {"cached_tokens": 0}, "output_tokens": 4,
                             "output_tokens_details": {"reasoning_tokens": 0}, "total_tokens": 9}}),
        ),
        "/openai/v1/embeddings" => Reply::json(
            200,
            json!({"object": "list", "data": [], "model": "text-embedding-3-small",
                   "usage": {"prompt_tokens": 8, "total_tokens": 8}}),
        ),
        _ => Reply::json(404, json!({"error": {"code": "404", "message": "not here"}})),
    }
}

#[test]
fn usage_of_the_responses_api_and_embeddings_is_counted_by_model_and_client() {
    let m = MockAzure::start(v1_usage_mock);
    let p = with_keys(&m, json!([{ "name": "team-a", "key": "a-key" }]));
    let r = post(p.addr, "/openai/v1/responses", "a-key", json!({"model": "gpt-4o-mini", "input": "hi"}));
    assert_eq!(r.status, 200, "{}", r.text());
    let r =
        post(p.addr, "/openai/v1/responses", "a-key", json!({"model": "gpt-4o-mini", "input": "hi", "stream": true}));
    assert_eq!(r.status, 200);
    let r = post(p.addr, "/openai/v1/embeddings", "a-key", json!({"model": "text-embedding-3-small", "input": "x"}));
    assert_eq!(r.status, 200);
    let series = |dep: &str, kind: &str| {
        format!(r#"azure_proxy_tokens_total{{instance="m0",deployment="{dep}",client="team-a",kind="{kind}"}}"#)
    };
    let mut text = String::new();
    eventually("all three usages are counted", || {
        text = metrics(p.addr);
        sample(&text, &series("text-embedding-3-small", "prompt")) == 8.0
            && sample(&text, &series("gpt-4o-mini", "prompt")) == 12.0
    });
    assert_eq!(sample(&text, &series("gpt-4o-mini", "completion")), 6.0, "{text}");
    assert_eq!(sample(&text, &series("text-embedding-3-small", "completion")), 0.0, "{text}");
    assert!(!text.contains(r#"deployment="-""#), "every v1 answer is labelled by its model: {text}");
}
