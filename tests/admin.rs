//! The admin endpoints: `/metrics` in the Prometheus text format (checked against the format's rules, and with
//! `promtool check metrics` when it is installed), counters that move with traffic, token usage read from
//! relayed bodies, and endpoints that can be turned off or moved to `admin_listen`.

use std::collections::HashMap;
use std::net::TcpListener;
use std::time::Duration;

use crate::support::client::{call, chat};
use crate::support::mock::{azure_like, MockAzure, Recorded, Reply};
use crate::support::proxy::{self, CHAT};
use crate::support::{eventually, free_addr};

fn metrics(addr: std::net::SocketAddr) -> String {
    let r = call(addr, "GET", "/metrics", &[], b"");
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.header("content-type"), Some("text/plain; version=0.0.4; charset=utf-8"));
    r.text()
}

/// Sample lines as `name{labels}` → value.
fn samples(text: &str) -> HashMap<String, f64> {
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .map(|l| {
            let (k, v) = l.rsplit_once(' ').expect("sample line has a value");
            (k.to_string(), v.parse::<f64>().expect("numeric value"))
        })
        .collect()
}

/// The exposition format's rules that matter to a scraper: every sample's family has HELP and TYPE before it,
/// names and labels are well-formed, histogram buckets are cumulative and end with +Inf equal to _count.
fn check_format(text: &str) {
    let mut typed: HashMap<String, String> = HashMap::new();
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let (name, kind) = rest.split_once(' ').expect("TYPE name kind");
            assert!(["counter", "gauge", "histogram"].contains(&kind), "{line}");
            assert!(typed.insert(name.to_string(), kind.to_string()).is_none(), "TYPE twice: {line}");
            continue;
        }
        if line.starts_with("# HELP ") || line.is_empty() {
            continue;
        }
        let name: String = line.chars().take_while(|c| c.is_ascii_alphanumeric() || *c == '_').collect();
        let family = ["_bucket", "_sum", "_count"]
            .iter()
            .find_map(|s| name.strip_suffix(s).filter(|f| typed.get(*f).is_some_and(|k| k == "histogram")))
            .unwrap_or(&name);
        assert!(typed.contains_key(family), "sample before its TYPE: {line}");
        if let Some(labels) = line[name.len()..].strip_prefix('{') {
            let labels = &labels[..labels.rfind('}').expect("closing brace")];
            for pair in labels.split("\",").filter(|p| !p.is_empty()) {
                let (k, v) = pair.split_once("=\"").expect("label=\"value\"");
                assert!(k.chars().all(|c| c.is_ascii_alphanumeric() || c == '_'), "{line}");
                assert!(!v.trim_end_matches('"').contains('\n'), "{line}");
            }
        }
    }
    let s = samples(text);
    for (family, kind) in &typed {
        if kind != "histogram" {
            continue;
        }
        let mut buckets: Vec<(f64, f64)> = s
            .iter()
            .filter_map(|(k, v)| {
                let le = k.strip_prefix(&format!("{family}_bucket{{le=\""))?.strip_suffix("\"}")?;
                Some((if le == "+Inf" { f64::INFINITY } else { le.parse().ok()? }, *v))
            })
            .collect();
        buckets.sort_by(|a, b| a.0.total_cmp(&b.0));
        assert!(buckets.windows(2).all(|w| w[0].1 <= w[1].1), "{family} buckets not cumulative");
        assert_eq!(buckets.last().map(|b| b.1), s.get(&format!("{family}_count")).copied(), "{family} +Inf != count");
    }
}

#[test]
fn metrics_follow_the_exposition_format_and_count_traffic() {
    let m = MockAzure::start(azure_like("east", "key0", Duration::from_millis(1)));
    let throttled =
        MockAzure::start(|_: &Recorded| Reply::json(429, serde_json::json!({})).with_header("retry-after-ms", "60000"));
    let p = proxy::start_with(
        vec![proxy::instance(&throttled.url(), "key0", "busy"), proxy::instance(&m.url(), "key0", "east")],
        serde_json::json!({}),
    );
    let before = samples(&metrics(p.addr));
    assert_eq!(chat(p.addr, "{}").status, 200);
    assert_eq!(chat(p.addr, r#"{"stream": true, "stream_options": {"include_usage": true}}"#).status, 200);
    assert_eq!(call(p.addr, "POST", CHAT, &[("api-key", "wrong")], b"{}").status, 401);
    // A request is counted when its worker is done with it, a moment after the client has the answer.
    // Labelled with the client key's name (a plain-string key is named by position); a refused key has none.
    let key200 = r#"azure_proxy_requests_total{route="chat",status="200",client="key-1"}"#;
    let key401 = r#"azure_proxy_requests_total{route="chat",status="401",client="-"}"#;
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let text = loop {
        let text = metrics(p.addr);
        let s = samples(&text);
        let done = s.get(key200).copied().unwrap_or(0.0) >= before.get(key200).copied().unwrap_or(0.0) + 2.0
            && s.get(key401).copied().unwrap_or(0.0) >= before.get(key401).copied().unwrap_or(0.0) + 1.0;
        if done || std::time::Instant::now() > deadline {
            break text;
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    check_format(&text);
    let after = samples(&text);
    let delta = |k: &str| after.get(k).copied().unwrap_or(0.0) - before.get(k).copied().unwrap_or(0.0);
    assert_eq!(delta(key200), 2.0, "{text}");
    assert_eq!(delta(key401), 1.0, "{text}");
    assert_eq!(delta(r#"azure_proxy_upstream_attempts_total{instance="busy",outcome="429"}"#), 1.0, "{text}");
    assert_eq!(delta(r#"azure_proxy_upstream_attempts_total{instance="east",outcome="2xx"}"#), 2.0, "{text}");
    assert_eq!(delta("azure_proxy_retries_total"), 1.0, "{text}");
    assert_eq!(after.get(r#"azure_proxy_instance_available{instance="busy"}"#), Some(&0.0), "cooling down");
    assert_eq!(after.get(r#"azure_proxy_instance_available{instance="east"}"#), Some(&1.0));
    assert_eq!(delta("azure_proxy_stream_first_byte_seconds_count"), 1.0, "one streamed answer");
    // Usage: the JSON completion says 10 prompt + 3 completion tokens; the streamed one ends with a usage chunk.
    let tokens = |kind: &str| {
        delta(&format!(
            r#"azure_proxy_tokens_total{{instance="east",deployment="gpt-4o",client="key-1",kind="{kind}"}}"#
        ))
    };
    assert_eq!(tokens("prompt"), 20.0, "{text}");
    assert_eq!(tokens("completion"), 6.0, "{text}");
    assert!(after.contains_key("azure_proxy_queue_depth") && after.contains_key("azure_proxy_open_connections"));
    assert!(after.contains_key("azure_proxy_in_flight_requests") && after.contains_key("azure_proxy_blocked_clients"));
}

#[test]
#[ignore = "needs promtool (Debian package prometheus); .ci/run installs it and runs this"]
fn promtool_accepts_the_metrics() {
    let m = MockAzure::start(azure_like("east", "key0", Duration::from_millis(1)));
    let p = proxy::start(&[&m]);
    assert_eq!(chat(p.addr, "{}").status, 200);
    let text = metrics(p.addr);
    let Ok(mut child) = std::process::Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
    else {
        panic!("promtool is not installed (Debian package prometheus)");
    };
    use std::io::Write;
    child.stdin.take().expect("stdin").write_all(text.as_bytes()).expect("write");
    let out = child.wait_with_output().expect("promtool");
    let report = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "promtool: {report}\n{text}");
}

#[test]
fn admin_endpoints_can_be_turned_off_and_need_no_key() {
    let m = MockAzure::start(azure_like("east", "key0", Duration::from_millis(1)));
    let p = proxy::start_with(proxy::instances_for(&[&m]), serde_json::json!({"admin_endpoints": ["healthz"]}));
    assert_eq!(call(p.addr, "GET", "/healthz", &[], b"").status, 200);
    assert_eq!(call(p.addr, "GET", "/metrics", &[], b"").status, 404);
    assert_eq!(call(p.addr, "GET", "/readyz", &[], b"").status, 404);
    assert_eq!(m.hits(), 0, "never forwarded");
}

#[test]
fn admin_listen_moves_the_endpoints_off_the_proxy_port() {
    let m = MockAzure::start(azure_like("east", "key0", Duration::from_millis(1)));
    let admin = free_addr();
    let p = proxy::start_with(proxy::instances_for(&[&m]), serde_json::json!({"admin_listen": admin.to_string()}));
    for path in ["/healthz", "/readyz", "/metrics"] {
        assert_eq!(call(p.addr, "GET", path, &[], b"").status, 404, "{path} on the proxy port");
        assert_eq!(call(admin, "GET", path, &[], b"").status, 200, "{path} on the admin port");
    }
    assert_eq!(
        call(admin, "POST", CHAT, &[("api-key", "client-key")], b"{}").status,
        404,
        "admin port proxies nothing"
    );
    assert_eq!(chat(p.addr, "{}").status, 200);
}

#[test]
fn a_stopped_server_closes_its_admin_listener() {
    // A program that embeds the proxy and stops it may bind the admin address again (before, the admin thread
    // kept accepting for the life of the process).
    let m = MockAzure::start(azure_like("east", "key0", Duration::from_millis(1)));
    let admin = free_addr();
    let p = proxy::start_with(proxy::instances_for(&[&m]), serde_json::json!({"admin_listen": admin.to_string()}));
    assert_eq!(call(admin, "GET", "/healthz", &[], b"").status, 200);
    assert!(TcpListener::bind(admin).is_err(), "the admin port is taken while the server runs");
    drop(p); // stops the server and waits for its front thread
    eventually("the admin address can be bound again", || TcpListener::bind(admin).is_ok());
}
