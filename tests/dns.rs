//! Upstream host names through a real DNS server: the real binary runs in a private mount namespace whose
//! /etc/resolv.conf names a `support::dns::DnsServer` and whose /etc/hosts does not know the upstream's name, so
//! every lookup the proxy makes is a query the server counts. This proves the address cache (`src/resolve.rs`)
//! end to end: no query per request, requests served through a DNS outage, a moved name picked up in the
//! background, and a failed connect refreshing the addresses.
//!
//! Needs root (port 53, mount) and unshare(1): #[ignore]d in `cargo test`; .ci/run runs them where they work.

use std::net::Ipv4Addr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use serde_json::json;

use crate::support::client::{call, Resp};
use crate::support::dns::DnsServer;
use crate::support::mock::{MockAzure, Recorded, Reply};
use crate::support::process::{write_config, Running};
use crate::support::proxy::CHAT;

const NAME: &str = "azure-a.test";
const FIRST: Ipv4Addr = Ipv4Addr::new(127, 0, 0, 1);
const SECOND: Ipv4Addr = Ipv4Addr::new(127, 0, 0, 2);

/// The proxy binary in a mount namespace where `dns` is the only name server and only `localhost` is in
/// /etc/hosts, in front of one instance at `http://azure-a.test:{port}`, with `extra` config fields.
fn proxy(dns: &DnsServer, test: &str, port: u16, extra: serde_json::Value) -> Running {
    let mut cfg = json!({
        "instances": [{"endpoint": format!("http://{NAME}:{port}"), "api_key": "key", "name": "a"}],
        "client_keys": ["ck"],
    });
    for (k, v) in extra.as_object().expect("extra is an object") {
        cfg[k] = v.clone();
    }
    let config = write_config(&format!("{test}.json"), &cfg.to_string());
    let etc = |file: &str, text: &str| write_config(&format!("{test}.{file}"), text).display().to_string();
    let resolv = etc("resolv.conf", &format!("nameserver {}\noptions attempts:1 timeout:1\n", dns.ip()));
    let hosts = etc("hosts", "127.0.0.1 localhost\n::1 localhost\n");
    let nsswitch = etc("nsswitch.conf", "hosts: files dns\n");
    let script = format!(
        "mount --bind {resolv} /etc/resolv.conf && mount --bind {hosts} /etc/hosts && \
         mount --bind {nsswitch} /etc/nsswitch.conf && exec \"$@\""
    );
    Running::start_via(&["unshare", "--mount", "--propagation", "private", "sh", "-c", &script, "sh"], &config, &[])
}

fn dns_server(ip: Ipv4Addr) -> DnsServer {
    DnsServer::start(&[(NAME, ip)]).expect("a DNS server on 127.53.0.x:53 (this test needs root)")
}

/// A mock instance on `ip:port` whose every `close_every`-th reply closes its connection, so that the proxy has
/// to connect again (and use the addresses it has then).
fn mock_on(ip: Ipv4Addr, port: u16, close_every: usize) -> std::io::Result<MockAzure> {
    let n = AtomicUsize::new(0);
    MockAzure::start_on(&format!("{ip}:{port}"), move |_: &Recorded| {
        let reply = Reply::text(200, "ok");
        match (n.fetch_add(1, Ordering::SeqCst) + 1) % close_every {
            0 => reply.with_header("connection", "close"),
            _ => reply,
        }
    })
}

/// Two mock instances on the same port, on 127.0.0.1 and 127.0.0.2 (the port is in the endpoint URL, so a moved
/// name keeps it), each closing every connection after one reply.
fn mock_pair() -> (MockAzure, MockAzure) {
    for _ in 0..50 {
        let first = mock_on(FIRST, 0, 1).expect("a mock on 127.0.0.1");
        if let Ok(second) = mock_on(SECOND, first.addr().port(), 1) {
            return (first, second);
        }
    }
    panic!("no port free on both 127.0.0.1 and 127.0.0.2");
}

fn chat(p: &Running) -> Resp {
    call(p.addr, "POST", CHAT, &[("api-key", "ck")], b"{}")
}

/// The value of the sample `series` (name and labels, as rendered) on the proxy's /metrics.
fn metric(p: &Running, series: &str) -> u64 {
    let text = call(p.addr, "GET", "/metrics", &[], b"").text();
    let line = text.lines().find(|l| l.strip_prefix(series).is_some_and(|rest| rest.starts_with(' ')));
    let value = line.and_then(|l| l.rsplit(' ').next()).and_then(|v| v.parse().ok());
    value.unwrap_or_else(|| panic!("no {series} in /metrics:\n{text}"))
}

fn log_lines(p: &Running, needle: &str) -> Vec<String> {
    p.log.lock().expect("log").iter().filter(|l| l.contains(needle)).cloned().collect()
}

#[test]
#[ignore = "needs root and unshare(1) (a DNS server on port 53, a private mount namespace); .ci/run runs it"]
fn requests_cost_no_dns_queries_once_the_name_is_known() {
    let dns = dns_server(FIRST);
    // Every other reply closes its connection: half the requests reuse a pooled connection, half open one.
    let mock = mock_on(FIRST, 0, 2).expect("mock");
    let p = proxy(&dns, "dns-steady", mock.addr().port(), json!({}));
    assert_eq!(dns.queries(), 0, "nothing is looked up before the first request");
    const N: usize = 300;
    for i in 0..N {
        let r = chat(&p);
        assert_eq!(r.status, 200, "request {i}: {}", r.text());
    }
    let queries = dns.queries();
    eprintln!("{N} requests through the proxy ({} upstream connections): {queries} DNS queries", mock.connections());
    assert!(mock.connections() >= N / 2, "new connections were made: {}", mock.connections());
    // One lookup: an A and an AAAA query.
    assert!((1..=2).contains(&queries), "{queries} DNS queries for {N} requests");
    assert_eq!(metric(&p, "azure_proxy_dns_lookups_total{outcome=\"ok\"}"), 1);
    assert_eq!(metric(&p, "azure_proxy_dns_lookups_total{outcome=\"failed\"}"), 0);
}

#[test]
#[ignore = "needs root and unshare(1) (a DNS server on port 53, a private mount namespace); .ci/run runs it"]
fn requests_are_served_through_a_dns_outage_with_the_last_known_addresses() {
    let mut dns = dns_server(FIRST);
    let mock = mock_on(FIRST, 0, 2).expect("mock");
    let p = proxy(&dns, "dns-outage", mock.addr().port(), json!({"dns_refresh_ms": 100}));
    assert_eq!(chat(&p).status, 200);
    dns.stop();
    // Requests keep coming while refreshes fall due (every 100 ms) and fail; every one is served.
    let started = Instant::now();
    let mut served = 1;
    while metric(&p, "azure_proxy_dns_lookups_total{outcome=\"failed\"}") < 3 {
        assert!(started.elapsed() < Duration::from_secs(20), "no 3 failed refreshes in 20 s");
        let r = chat(&p);
        assert_eq!(r.status, 200, "request {served} during the outage: {}", r.text());
        served += 1;
        std::thread::sleep(Duration::from_millis(10));
    }
    assert!(mock.connections() > 1, "new upstream connections were opened during the outage");
    assert!(metric(&p, "azure_proxy_dns_stale_answers_total") >= 3);
    // One WARN per failed refresh, not one per request.
    let warned = log_lines(&p, &format!("dns: refreshing {NAME}:{} failed", mock.addr().port()));
    let failed = metric(&p, "azure_proxy_dns_lookups_total{outcome=\"failed\"}") as usize;
    assert!(warned.iter().all(|l| l.contains("WARN") && l.contains("still using 127.0.0.1")), "{warned:#?}");
    assert!((3..=failed).contains(&warned.len()), "{} warnings, {failed} failed lookups", warned.len());
    assert!(warned.len() < served, "{} warnings for {served} requests", warned.len());
}

#[test]
#[ignore = "needs root and unshare(1) (a DNS server on port 53, a private mount namespace); .ci/run runs it"]
fn a_moved_name_is_picked_up_in_the_background_without_failing_a_request() {
    let dns = dns_server(FIRST);
    let (first, second) = mock_pair();
    let p = proxy(&dns, "dns-move", first.addr().port(), json!({"dns_refresh_ms": 200}));
    assert_eq!(chat(&p).status, 200);
    assert_eq!((first.hits(), second.hits()), (1, 0));
    dns.set(NAME, SECOND);
    let started = Instant::now();
    while second.hits() == 0 {
        assert!(started.elapsed() < Duration::from_secs(20), "the new address was not used within 20 s");
        let r = chat(&p);
        assert_eq!(r.status, 200, "{}", r.text());
        std::thread::sleep(Duration::from_millis(10));
    }
    // From now on every request (each on a new connection) goes to the new address.
    let before = first.hits();
    for _ in 0..10 {
        assert_eq!(chat(&p).status, 200);
    }
    assert_eq!((first.hits(), second.hits()), (before, 11));
    let moved = log_lines(&p, &format!("dns: {NAME}:{} now resolves to 127.0.0.2", first.addr().port()));
    assert_eq!(moved.len(), 1, "{:#?}", p.log.lock().expect("log"));
}

#[test]
#[ignore = "needs root and unshare(1) (a DNS server on port 53, a private mount namespace); .ci/run runs it"]
fn a_failed_connect_refreshes_the_addresses_long_before_the_refresh_interval() {
    let dns = dns_server(FIRST);
    let (first, second) = mock_pair();
    let port = first.addr().port();
    let extra = json!({"dns_refresh_ms": 600_000, "circuit_failures": 0, "connect_timeout_ms": 1000});
    let p = proxy(&dns, "dns-connect", port, extra);
    assert_eq!(chat(&p).status, 200);
    dns.set(NAME, SECOND);
    drop(first);
    // A failed connect refreshes only addresses at least a second old (so that an instance that is down costs
    // one lookup a second, not one per attempt): let that second pass.
    std::thread::sleep(Duration::from_millis(1100));
    let started = Instant::now();
    let mut statuses = Vec::new();
    while second.hits() == 0 {
        assert!(started.elapsed() < Duration::from_secs(20), "not moved within 20 s: {statuses:?}");
        statuses.push(chat(&p).status);
        std::thread::sleep(Duration::from_millis(10));
    }
    assert_eq!(statuses.last(), Some(&200), "{statuses:?}");
    assert!(!log_lines(&p, &format!("dns: a connect to {NAME}:{port} failed")).is_empty());
    assert_eq!(metric(&p, "azure_proxy_dns_lookups_total{outcome=\"ok\"}"), 2);
}
