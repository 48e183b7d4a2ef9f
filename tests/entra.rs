//! Keyless instances with Microsoft Entra ID tokens (issue 13): mock token endpoints that record every request
//! and mint short-lived tokens, mock instances that accept only a current token, and the proxy between them.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::support::client::{call, Resp};
use crate::support::eventually;
use crate::support::mock::{chat_completion_json, MockAzure, Recorded, Reply};
use crate::support::process::{write_config, Running};
use crate::support::proxy::{self, MapEnv, Proxy, CHAT};

/// A token endpoint: mints `tok-<n>-<suffix>` valid for `lifetime_s`, or answers 503 while `failing`.
struct TokenServer {
    mock: MockAzure,
    failing: Arc<AtomicBool>,
}

impl TokenServer {
    fn start(lifetime_s: u64, lifetime_field: &'static str) -> TokenServer {
        let failing = Arc::new(AtomicBool::new(false));
        let minted = Arc::new(AtomicU64::new(0));
        let fail = Arc::clone(&failing);
        let mock = MockAzure::start(move |_: &Recorded| {
            if fail.load(Ordering::SeqCst) {
                return Reply::json(
                    503,
                    json!({"error": "temporarily_unavailable", "error_description": "AADSTS50196: the server is busy.\r\nTrace ID: x"}),
                );
            }
            let n = minted.fetch_add(1, Ordering::SeqCst) + 1;
            let expiry = match lifetime_field {
                "expires_on" => {
                    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs();
                    json!((now + lifetime_s).to_string())
                }
                "expires_in_string" => json!(lifetime_s.to_string()),
                _ => json!(lifetime_s),
            };
            let field = if lifetime_field == "expires_on" { "expires_on" } else { "expires_in" };
            Reply::json(200, json!({"token_type": "Bearer", "access_token": format!("tok-{n}-zq9"), field: expiry}))
        });
        TokenServer { mock, failing }
    }

    fn requests(&self) -> Vec<Recorded> {
        self.mock.requests()
    }
}

/// The fields of a form body.
fn form(r: &Recorded) -> Vec<(String, String)> {
    let text = String::from_utf8_lossy(&r.body).into_owned();
    text.split('&')
        .filter(|p| !p.is_empty())
        .map(|p| {
            let (k, v) = p.split_once('=').unwrap_or((p, ""));
            (decode(k), decode(v))
        })
        .collect()
}

fn decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' && i + 3 <= b.len() {
            out.push(u8::from_str_radix(&s[i + 1..i + 3], 16).expect("hex"));
            i += 3;
        } else {
            out.push(if b[i] == b'+' { b' ' } else { b[i] });
            i += 1;
        }
    }
    String::from_utf8(out).expect("utf-8")
}

/// An instance that accepts `Bearer tok-*` except the tokens in `revoked`, and records what it got.
fn keyless_instance(name: &str, revoked: Arc<Mutex<Vec<String>>>) -> MockAzure {
    let name = name.to_string();
    MockAzure::start(move |r: &Recorded| {
        let auth = r.header("authorization").unwrap_or_default().to_string();
        let token = auth.strip_prefix("Bearer ").unwrap_or_default();
        if !token.starts_with("tok-")
            || revoked.lock().unwrap().iter().any(|t| t == token)
            || r.header("api-key").is_some()
        {
            return Reply::json(401, json!({"error": {"code": "PermissionDenied", "message": "token refused"}}));
        }
        Reply::json(200, chat_completion_json("hi", "gpt-4o")).with_header("x-served-by", &name)
    })
}

fn keyless(url: &str, name: &str, auth: Value) -> Value {
    json!({ "endpoint": url, "name": name, "auth": auth })
}

fn env(vars: &[(&str, &str)]) -> MapEnv {
    MapEnv(vars.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect())
}

fn chat(p: &Proxy) -> Resp {
    call(p.addr, "POST", CHAT, &[("api-key", "client-key")], b"{}")
}

#[test]
fn client_secret_sends_the_exact_token_request_once_for_many_requests() {
    let tokens = TokenServer::start(3600, "expires_in");
    let inst = keyless_instance("kl", Arc::default());
    let auth = json!({"type": "client_secret", "tenant_id": "tenant-1", "client_id": "client-1",
                      "client_secret_env": "SP_SECRET", "authority_host": tokens.mock.url()});
    let p = proxy::start_with_env(
        vec![keyless(&inst.url(), "kl", auth)],
        json!({}),
        &env(&[("SP_SECRET", "sp-s3cret-value")]),
    );
    for i in 0..20 {
        let r = chat(&p);
        assert_eq!(r.status, 200, "request {i}: {}", r.text());
    }
    let reqs = tokens.requests();
    assert_eq!(reqs.len(), 1, "one token for all 20 requests");
    let r = &reqs[0];
    assert_eq!((r.method.as_str(), r.target.as_str()), ("POST", "/tenant-1/oauth2/v2.0/token"));
    assert_eq!(r.header("content-type"), Some("application/x-www-form-urlencoded"));
    let mut fields = form(r);
    fields.sort();
    let want = [
        ("client_id", "client-1"),
        ("client_secret", "sp-s3cret-value"),
        ("grant_type", "client_credentials"),
        ("scope", "https://cognitiveservices.azure.com/.default"),
    ];
    assert_eq!(fields, want.map(|(k, v)| (k.to_string(), v.to_string())));
    let seen = inst.requests();
    assert_eq!(seen.len(), 20);
    assert!(seen.iter().all(|r| r.header("authorization") == Some("Bearer tok-1-zq9")), "{:?}", seen[0].headers);
    assert!(seen.iter().all(|r| r.header_count("api-key") == 0), "no key header to a keyless instance");
}

#[test]
fn workload_identity_rereads_the_federated_token_and_refreshes_before_expiry_without_a_failed_request() {
    // Tokens live 2 s: each is refreshed when half its life is left, in the background.
    let tokens = TokenServer::start(2, "expires_in");
    let inst = keyless_instance("kl", Arc::default());
    let file = write_config("federated-token", "assertion-one\n");
    let authority = format!("{}/", tokens.mock.url()); // the AKS webhook's trailing slash
    let vars = [
        ("AZURE_TENANT_ID", "tenant-w"),
        ("AZURE_CLIENT_ID", "client-w"),
        ("AZURE_FEDERATED_TOKEN_FILE", file.to_str().unwrap()),
        ("AZURE_AUTHORITY_HOST", authority.as_str()),
    ];
    let p = proxy::start_with_env(
        vec![keyless(&inst.url(), "kl", json!({"type": "workload_identity"}))],
        json!({}),
        &env(&vars),
    );
    assert_eq!(chat(&p).status, 200);
    // Kubernetes rotates the projected token: the next token request must send the new one.
    std::fs::write(&file, "assertion-two\n").unwrap();
    let until = Instant::now() + Duration::from_millis(4500);
    let mut n = 0;
    while Instant::now() < until {
        let r = chat(&p);
        assert_eq!(r.status, 200, "request {n} across token refreshes: {}", r.text());
        n += 1;
        std::thread::sleep(Duration::from_millis(30));
    }
    let reqs = tokens.requests();
    assert!(reqs.len() >= 2, "refreshed: {} token requests", reqs.len());
    assert!(reqs.len() <= 8, "not one per request: {} token requests for {n}", reqs.len());
    let first = form(&reqs[0]);
    let last = form(reqs.last().unwrap());
    let field = |f: &[(String, String)], k: &str| f.iter().find(|(n, _)| n == k).map(|(_, v)| v.clone());
    assert_eq!(reqs[0].target, "/tenant-w/oauth2/v2.0/token");
    assert_eq!(field(&first, "client_assertion").as_deref(), Some("assertion-one"));
    assert_eq!(field(&last, "client_assertion").as_deref(), Some("assertion-two"));
    assert_eq!(
        field(&first, "client_assertion_type").as_deref(),
        Some("urn:ietf:params:oauth:client-assertion-type:jwt-bearer")
    );
    assert_eq!(field(&first, "client_id").as_deref(), Some("client-w"));
    assert_eq!(field(&first, "client_secret"), None);
    let tokens_used: std::collections::BTreeSet<String> =
        inst.requests().iter().filter_map(|r| r.header("authorization").map(str::to_string)).collect();
    assert!(tokens_used.len() >= 2, "the instance saw the refreshed token: {tokens_used:?}");
}

#[test]
fn managed_identity_asks_the_metadata_service_or_the_app_service_endpoint() {
    // IMDS (host from AZURE_POD_IDENTITY_AUTHORITY_HOST), a user-assigned identity, expires_on as a string.
    let imds = TokenServer::start(3600, "expires_on");
    let inst = keyless_instance("kl", Arc::default());
    let p = proxy::start_with_env(
        vec![keyless(&inst.url(), "kl", json!({"type": "managed_identity", "client_id": "mi-client"}))],
        json!({}),
        &env(&[("AZURE_POD_IDENTITY_AUTHORITY_HOST", &imds.mock.url())]),
    );
    assert_eq!(chat(&p).status, 200);
    let r = &imds.requests()[0];
    assert_eq!(r.method, "GET");
    assert_eq!(
        r.target,
        "/metadata/identity/oauth2/token?api-version=2018-02-01&resource=https%3A%2F%2Fcognitiveservices.azure.com&client_id=mi-client"
    );
    assert_eq!(r.header("metadata"), Some("true"));
    drop(p);

    // App Service / Container Apps: IDENTITY_ENDPOINT with IDENTITY_HEADER; expires_in as a string.
    let app = TokenServer::start(3600, "expires_in_string");
    let endpoint = format!("{}/msi/token", app.mock.url());
    let vars = [("IDENTITY_ENDPOINT", endpoint.as_str()), ("IDENTITY_HEADER", "hdr-s3cret")];
    let p = proxy::start_with_env(
        vec![keyless(&inst.url(), "kl", json!({"type": "managed_identity", "scope": "https://example.test/.default"}))],
        json!({}),
        &env(&vars),
    );
    assert_eq!(chat(&p).status, 200);
    let r = &app.requests()[0];
    assert_eq!(r.target, "/msi/token?api-version=2019-08-01&resource=https%3A%2F%2Fexample.test");
    assert_eq!(r.header("x-identity-header"), Some("hdr-s3cret"));
    assert_eq!(r.header("metadata"), None);
}

#[test]
fn while_the_token_endpoint_is_down_another_instance_serves_and_the_keyless_one_comes_back() {
    let tokens = TokenServer::start(3600, "expires_in");
    tokens.failing.store(true, Ordering::SeqCst);
    let kl = keyless_instance("kl", Arc::default());
    let keyed = MockAzure::start(|_: &Recorded| {
        Reply::json(200, chat_completion_json("hi", "gpt-4o")).with_header("x-served-by", "keyed")
    });
    let auth =
        json!({"type": "client_secret", "tenant_id": "t", "client_id": "c", "authority_host": tokens.mock.url()});
    let vars = env(&[("AZURE_CLIENT_SECRET", "sp-s3cret-value")]);
    // The token endpoint is down from the start: the proxy still starts and serves.
    let p = proxy::start_with_env(
        vec![keyless(&kl.url(), "kl", auth.clone()), proxy::instance(&keyed.url(), "keyed-instance-key", "keyed")],
        json!({}),
        &vars,
    );
    eventually("the first token request has failed", || !tokens.requests().is_empty());
    for i in 0..6 {
        let r = chat(&p);
        assert_eq!(r.status, 200, "request {i}: {}", r.text());
        assert_eq!(r.header("x-served-by"), Some("keyed"), "request {i}");
    }
    assert!(kl.requests().is_empty(), "no request without a token");
    let ready = call(p.addr, "GET", "/readyz", &[], b"").json();
    assert_eq!(ready["status"], "ready", "{ready}");
    assert_eq!(ready["identities"][0]["state"], "failing", "{ready}");
    assert!(ready["identities"][0]["last_error"].as_str().unwrap_or_default().contains("AADSTS50196"), "{ready}");
    assert_eq!(ready["instances"][0]["state"], "no_token", "{ready}");
    let metrics = call(p.addr, "GET", "/metrics", &[], b"").text();
    assert!(metrics.contains(r#"azure_proxy_entra_token_valid{identity="client_secret:c"} 0"#), "{metrics}");
    assert!(metrics.contains(r#"azure_proxy_upstream_attempts_total{instance="kl",outcome="auth"}"#), "{metrics}");

    // Alone, the keyless instance's fallback says why.
    let alone = proxy::start_with_env(vec![keyless(&kl.url(), "kl", auth)], json!({}), &vars);
    let r = chat(&alone);
    assert_eq!(r.status, 502, "{}", r.text());
    let attempt = &r.json()["error"]["attempts"][0];
    assert_eq!(attempt["kind"], "auth", "{attempt}");
    assert!(attempt["error"].as_str().unwrap_or_default().contains("no Entra ID token"), "{attempt}");
    assert!(!r.text().contains("sp-s3cret-value"));

    // The endpoint recovers: after its backoff the keyless instance gets a token and serves again.
    tokens.failing.store(false, Ordering::SeqCst);
    eventually("the keyless instance serves again", || chat(&p).header("x-served-by") == Some("kl"));
    let metrics = call(p.addr, "GET", "/metrics", &[], b"").text();
    assert!(metrics.contains(r#"azure_proxy_entra_token_valid{identity="client_secret:c"} 1"#), "{metrics}");
    assert!(
        metrics.contains(r#"azure_proxy_entra_token_requests_total{identity="client_secret:c",outcome="ok"} 1"#),
        "{metrics}"
    );
}

#[test]
fn a_401_from_the_instance_gets_a_new_token_before_the_next_request() {
    let tokens = TokenServer::start(3600, "expires_in");
    let revoked = Arc::new(Mutex::new(vec!["tok-1-zq9".to_string()]));
    let inst = keyless_instance("kl", Arc::clone(&revoked));
    let auth =
        json!({"type": "client_secret", "tenant_id": "t", "client_id": "c", "authority_host": tokens.mock.url()});
    let p = proxy::start_with_env(
        vec![keyless(&inst.url(), "kl", auth)],
        json!({}),
        &env(&[("AZURE_CLIENT_SECRET", "sp-s3cret-value")]),
    );
    let r = chat(&p);
    assert_eq!(r.status, 401, "the revoked token's 401 is relayed: {}", r.text());
    let r = chat(&p);
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(tokens.requests().len(), 2);
    assert_eq!(inst.last_request().unwrap().header("authorization"), Some("Bearer tok-2-zq9"));
}

#[test]
fn no_token_secret_or_assertion_reaches_the_log() {
    let tokens = TokenServer::start(3600, "expires_in");
    let revoked = Arc::new(Mutex::new(vec!["tok-1-zq9".to_string()]));
    let inst = keyless_instance("kl", revoked);
    let file = write_config("federated-token-log", "assertion-s3cret-jwt\n");
    let config = json!({
        "instances": [
            keyless(&inst.url(), "kl", json!({"type": "workload_identity", "authority_host": tokens.mock.url()})),
            keyless(&inst.url(), "kl2", json!({"type": "client_secret", "tenant_id": "t", "client_id": "c2",
                                                "authority_host": tokens.mock.url()})),
        ],
        "client_keys": ["client-key"],
    });
    let path = write_config("entra-log.json", &config.to_string());
    let vars = [
        ("RUST_LOG", "trace"),
        ("AZURE_TENANT_ID", "t"),
        ("AZURE_CLIENT_ID", "c1"),
        ("AZURE_FEDERATED_TOKEN_FILE", file.to_str().unwrap()),
        ("AZURE_CLIENT_SECRET", "sp-s3cret-value"),
    ];
    let p = Running::start(&path, &vars);
    for _ in 0..4 {
        call(p.addr, "POST", CHAT, &[("api-key", "client-key")], b"{}");
    }
    tokens.failing.store(true, Ordering::SeqCst);
    let lines = p.log_when(|l| l.contains("[access]"));
    let log = lines.join("\n");
    assert!(log.contains("Entra ID token"), "the token work is logged: {log}");
    for secret in ["sp-s3cret-value", "assertion-s3cret-jwt", "tok-1-zq9", "tok-2-zq9", "tok-3-zq9", "zq9"] {
        assert!(!log.contains(secret), "{secret} in the log:\n{log}");
    }
}

/// An instance that echoes the `Authorization` it received, as a debugging upstream or an egress proxy might:
/// in a header and in the body of a `status` answer.
fn echoing_instance(status: u16) -> MockAzure {
    MockAzure::start(move |r: &Recorded| {
        let auth = r.header("authorization").unwrap_or_default().to_string();
        Reply::json(status, json!({"error": {"code": "Echo", "message": format!("you sent {auth}")}}))
            .with_header("x-echo", &auth)
    })
}

#[test]
fn a_token_an_instance_echoes_is_masked_in_the_answer_and_redacted_in_the_log() {
    let tokens = TokenServer::start(3600, "expires_in");
    let auth =
        json!({"type": "client_secret", "tenant_id": "t", "client_id": "c", "authority_host": tokens.mock.url()});
    let vars = env(&[("AZURE_CLIENT_SECRET", "sp-s3cret-value")]);
    // A 400 is relayed: its header and body reach the client with the token masked (same length).
    let relayed = echoing_instance(400);
    let p = proxy::start_with_env(vec![keyless(&relayed.url(), "kl", auth.clone())], json!({}), &vars);
    let r = chat(&p);
    assert_eq!(r.status, 400, "{}", r.text());
    assert_eq!(relayed.last_request().unwrap().header("authorization"), Some("Bearer tok-1-zq9"), "it was sent");
    // A secret shorter than "[REDACTED]" is masked with as many '*'.
    assert!(!r.text().contains("tok-1-zq9") && r.text().contains("Bearer *********"), "{}", r.text());
    let echoed = r.header("x-echo").unwrap_or_default();
    assert!(!echoed.contains("tok-1-zq9") && echoed.len() == "Bearer tok-1-zq9".len(), "{echoed}");

    // A 500 is retried and logged with an excerpt of its body: the token is redacted there (the real binary).
    let logged = echoing_instance(500);
    let config = json!({"instances": [keyless(&logged.url(), "kl", auth)], "client_keys": ["client-key"]});
    let path = write_config("entra-echo.json", &config.to_string());
    let p = Running::start(&path, &[("AZURE_CLIENT_SECRET", "sp-s3cret-value")]);
    let r = call(p.addr, "POST", CHAT, &[("api-key", "client-key"), ("x-request-id", "echo-500")], b"{}");
    assert_eq!(r.status, 502, "{}", r.text());
    let lines = p.log_when(|l| l.contains("echo-500") && l.contains("status=500"));
    let attempt =
        lines.iter().find(|l| l.contains("echo-500") && l.contains("status=500")).expect("the attempt's line");
    assert!(attempt.contains("[REDACTED]"), "{attempt}");
    let log = lines.join("\n");
    assert!(!log.contains("zq9"), "a token in the log:\n{log}");
}
