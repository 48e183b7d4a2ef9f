//! The real binary: command line, exit codes, configuration errors, logging, and the rule that no key ever
//! appears in a log line or a response.

use std::process::Command;
use std::time::Duration;

use crate::support::client::call;
use crate::support::mock::{azure_like, MockAzure, Recorded, Reply};
use crate::support::process::{write_config, Running, BIN};
use crate::support::proxy::CHAT;

fn run(args: &[&str]) -> (i32, String, String) {
    let out = Command::new(BIN).args(args).env_remove("AZURE_PROXY_CONFIG").output().expect("run azure-proxy");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn help_and_version() {
    let (code, out, _) = run(&["--help"]);
    assert_eq!(code, 0);
    assert!(out.contains("--config") && out.contains("--check-config"), "{out}");
    let (code, out, _) = run(&["--version"]);
    assert_eq!((code, out.trim()), (0, format!("azure-proxy {}", env!("CARGO_PKG_VERSION")).as_str()));
    let (code, _, err) = run(&["--frobnicate"]);
    assert_eq!(code, 2);
    assert!(err.contains("--frobnicate"), "{err}");
}

#[test]
fn check_config_accepts_the_example_file() {
    let example = concat!(env!("CARGO_MANIFEST_DIR"), "/azure_instances.example.json");
    let out = Command::new(BIN)
        .args(["--config", example, "--check-config"])
        .env("WESTUS_API_KEY", "YYYY")
        .output()
        .expect("run azure-proxy");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{stdout}{}", String::from_utf8_lossy(&out.stderr));
    assert!(stdout.contains("config OK") && stdout.contains("eastus"), "{stdout}");
    assert!(!stdout.contains("XXXX") && !stdout.contains("YYYY"), "keys printed: {stdout}");
    // Without the variable that api_key_env names, the error says which one.
    let (code, _, err) = run(&["--config", example, "--check-config"]);
    assert_eq!(code, 2);
    assert!(err.contains("WESTUS_API_KEY") && err.contains("instances[1].api_key_env"), "{err}");
}

#[test]
fn config_errors_name_the_file_and_field_and_exit_2() {
    let cases = [
        (
            "typo.json",
            r#"{"instances": [{"endpoint": "https://a.example", "api_key": "k"}], "client_key": ["x"]}"#,
            "client_key",
        ),
        ("endpoint.json", r#"{"instances": [{"endpoint": "a.example", "api_key": "k"}]}"#, "instances[0].endpoint"),
        ("nokey.json", r#"{"instances": [{"endpoint": "https://a.example"}]}"#, "instances[0].api_key"),
        ("syntax.json", r#"{"instances": [ "#, "line"),
    ];
    for (name, text, field) in cases {
        let path = write_config(name, text);
        let (code, _, err) = run(&["--config", path.to_str().expect("path"), "--check-config"]);
        assert_eq!(code, 2, "{name}: {err}");
        assert!(err.contains(name) && err.contains(field), "{name}: {err}");
    }
    let (code, _, err) = run(&["--config", "/nonexistent/azure.json", "--check-config"]);
    assert_eq!(code, 2);
    assert!(err.contains("/nonexistent/azure.json"), "{err}");
}

#[test]
fn api_key_env_and_config_path_from_environment() {
    let m = MockAzure::start(azure_like("east", "from-env-key", Duration::from_millis(1)));
    let path = write_config(
        "env.json",
        &format!(
            r#"{{"instances": [{{"endpoint": "{}", "api_key_env": "EAST_KEY"}}], "client_keys": ["ck"]}}"#,
            m.url()
        ),
    );
    let out = Command::new(BIN)
        .arg("--check-config")
        .env("AZURE_PROXY_CONFIG", &path)
        .env("EAST_KEY", "from-env-key")
        .output()
        .expect("run");
    assert_eq!(out.status.code(), Some(0), "{}", String::from_utf8_lossy(&out.stderr));
    let p = Running::start(&path, &[("EAST_KEY", "from-env-key")]);
    let r = call(p.addr, "POST", CHAT, &[("api-key", "ck")], b"{}");
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(m.last_request().expect("seen").header("api-key"), Some("from-env-key"));
}

#[test]
fn missing_allowlist_is_a_loud_warning() {
    let m = MockAzure::start(azure_like("east", "k", Duration::from_millis(1)));
    let path =
        write_config("open.json", &format!(r#"{{"instances": [{{"endpoint": "{}", "api_key": "k"}}]}}"#, m.url()));
    let p = Running::start(&path, &[]);
    let log = p.log_when(|l| l.contains("NO CLIENT KEY ALLOWLIST"));
    assert!(log.iter().any(|l| l.contains("WARN") && l.contains("NO CLIENT KEY ALLOWLIST")), "{log:#?}");
    assert_eq!(call(p.addr, "POST", CHAT, &[("api-key", "anything")], b"{}").status, 200);
}

#[test]
fn access_and_attempt_lines_carry_the_fields_and_cut_error_bodies() {
    let failing = MockAzure::start(|_: &Recorded| Reply::text(500, &format!("{}TAIL", "E".repeat(100))));
    let ok = MockAzure::start(azure_like("west", "k1", Duration::from_millis(1)));
    let path = write_config(
        "logs.json",
        &format!(
            r#"{{"instances": [{{"endpoint": "{}", "api_key": "k0", "name": "east"}},
                              {{"endpoint": "{}", "api_key": "k1", "name": "west"}}], "client_keys": ["ck"]}}"#,
            failing.url(),
            ok.url()
        ),
    );
    let p = Running::start(&path, &[("ERROR_BODY_MAX_BYTES", "40")]);
    let r = call(p.addr, "POST", CHAT, &[("api-key", "ck"), ("x-request-id", "log-test-1")], b"{}");
    assert_eq!(r.status, 200);
    let log = p.log_when(|l| l.contains("[access]") && l.contains("log-test-1"));
    let access = log.iter().find(|l| l.contains("[access]") && l.contains("log-test-1")).expect("access line");
    for field in ["client=127.0.0.1", "method=POST", "path=/openai/deployments/gpt-4o/chat/completions", "status=200"] {
        assert!(access.contains(field), "{field} missing: {access}");
    }
    for field in ["instance=west", "attempts=2", "duration_ms=", "bytes="] {
        assert!(access.contains(field), "{field} missing: {access}");
    }
    assert!(access.contains("Z INFO"), "UTC timestamp and level: {access}");
    let attempt = log.iter().find(|l| l.contains("log-test-1") && l.contains("status=500")).expect("attempt line");
    assert!(attempt.contains("instance=east") && attempt.contains(&"E".repeat(40)), "{attempt}");
    assert!(!attempt.contains(&"E".repeat(41)) && !attempt.contains("TAIL"), "body not cut at 40 bytes: {attempt}");
}

/// Recognisable keys, used everywhere a key can go; then every log line and response is searched for them.
#[test]
fn no_key_ever_appears_in_logs_or_responses() {
    const UP0: &str = "UPSTREAMSECRET0aaaaaaaaaaaa";
    const UP1: &str = "UPSTREAMSECRET1bbbbbbbbbbbb";
    const CLIENT: &str = "CLIENTSECRETcccccccccccc";
    const WRONG: &str = "WRONGCLIENTSECRETdddddddd";
    // An instance that echoes the key it got into its error body, as a misbehaving upstream might.
    let echo = MockAzure::start(|r: &Recorded| {
        let key = r.header("api-key").unwrap_or_default().to_string();
        Reply::text(503, &format!("{{\"error\": \"bad key {key}\"}}"))
    });
    let ok = MockAzure::start(azure_like("west", UP1, Duration::from_millis(1)));
    let path = write_config(
        "secrets.json",
        &format!(
            r#"{{"instances": [{{"endpoint": "{}", "api_key": "{UP0}", "name": "echo"}},
                              {{"endpoint": "{}", "api_key": "{UP1}", "name": "west"}},
                              {{"endpoint": "http://127.0.0.1:1", "api_key": "{UP1}x", "name": "dead"}}],
                "client_keys": ["{CLIENT}"], "max_bad_keys": 2}}"#,
            echo.url(),
            ok.url()
        ),
    );
    let p = Running::start(&path, &[("RUST_LOG", "trace")]);
    let mut bodies = Vec::new();
    for _ in 0..6 {
        let r = call(p.addr, "POST", CHAT, &[("api-key", CLIENT)], br#"{"stream": true}"#);
        bodies.push(format!("{:?} {}", r.headers, r.text()));
    }
    for key in [WRONG, "", WRONG, WRONG] {
        let r = call(p.addr, "POST", CHAT, &[("api-key", key)], b"{}");
        bodies.push(format!("{:?} {}", r.headers, r.text()));
    }
    let log = p.log_when(|l| l.contains("blocked"));
    assert!(log.iter().any(|l| l.contains("status=503")), "the echoing instance was tried: {log:#?}");
    for secret in [UP0, UP1, CLIENT, WRONG] {
        for line in &log {
            assert!(!line.contains(secret), "secret in log: {line}");
        }
        for body in &bodies {
            assert!(!body.contains(secret), "secret in response: {body}");
        }
    }
}

#[test]
fn log_format_json_writes_one_object_per_request() {
    let m = MockAzure::start(azure_like("east", "k", Duration::from_millis(1)));
    let path = write_config(
        "json-log.json",
        &format!(
            r#"{{"instances": [{{"endpoint": "{}", "api_key": "k", "name": "east"}}], "client_keys": ["ck"]}}"#,
            m.url()
        ),
    );
    let p = Running::start(&path, &[("LOG_FORMAT", "json")]);
    let r = call(p.addr, "POST", CHAT, &[("api-key", "ck"), ("x-request-id", "json-1")], b"{}");
    assert_eq!(r.status, 200);
    let log = p.log_when(|l| l.contains("json-1"));
    let line = log.iter().find(|l| l.contains("json-1")).expect("access line");
    let v: serde_json::Value = serde_json::from_str(line).unwrap_or_else(|e| panic!("not JSON ({e}): {line}"));
    assert_eq!(v["request_id"], "json-1");
    assert_eq!(v["client"], "127.0.0.1");
    assert_eq!((v["method"].as_str(), v["status"].as_u64()), (Some("POST"), Some(200)));
    assert_eq!(v["path"], "/openai/deployments/gpt-4o/chat/completions");
    assert_eq!((v["instance"].as_str(), v["attempts"].as_u64()), (Some("east"), Some(1)));
    assert!(v["duration_ms"].is_u64() && v["bytes"].as_u64().unwrap_or(0) > 0, "{line}");
    assert!(v["ts"].as_str().is_some_and(|t| t.ends_with('Z') && t.len() == 24), "{line}");

    let bad = Command::new(BIN)
        .args(["--config", path.to_str().expect("path"), "--check-config"])
        .env("LOG_FORMAT", "xml")
        .output();
    let bad = bad.expect("run");
    assert_eq!(bad.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&bad.stderr).contains("LOG_FORMAT"));
}
