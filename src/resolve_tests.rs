//! Unit tests of `resolve`.
use super::*;
use std::sync::atomic::AtomicUsize;

/// A lookup whose answer the test sets: the last octet of 10.0.0.x, or None for a failure. Counts calls.
struct Script {
    answer: Mutex<Option<u8>>,
    calls: AtomicUsize,
    /// While set, lookups wait (a slow name server).
    hold: Mutex<bool>,
}

fn scripted(refresh: Duration) -> (DnsCache, Arc<Script>) {
    let script = Arc::new(Script { answer: Mutex::new(Some(1)), calls: AtomicUsize::new(0), hold: Mutex::new(false) });
    let s = Arc::clone(&script);
    let lookup = move |_: &str, port: u16| {
        s.calls.fetch_add(1, Ordering::SeqCst);
        while *s.hold.lock().expect("hold") {
            std::thread::sleep(Duration::from_millis(1));
        }
        match *s.answer.lock().expect("answer") {
            Some(x) => Ok(vec![SocketAddr::from(([10, 0, 0, x], port)), SocketAddr::from(([10, 0, 1, x], port))]),
            None => Err(io::Error::other("failed to lookup address information: scripted")),
        }
    };
    (DnsCache::with_lookup(refresh, Box::new(lookup)), script)
}

fn first(dns: &DnsCache, host: &str) -> SocketAddr {
    dns.addresses(host, 443).expect("addresses")[0]
}

fn eventually(what: &str, cond: impl Fn() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !cond() {
        assert!(Instant::now() < deadline, "not within 10 s: {what}");
        std::thread::sleep(Duration::from_millis(1));
    }
}

#[test]
fn a_host_is_looked_up_once_and_its_addresses_kept_in_order() {
    let (dns, script) = scripted(Duration::from_secs(3600));
    for _ in 0..100 {
        let addrs = dns.addresses("Azure-A.test", 443).expect("addresses");
        assert_eq!(&addrs[..], &["10.0.0.1:443".parse().expect("a"), "10.0.1.1:443".parse().expect("a")]);
    }
    assert_eq!(dns.addresses("azure-a.test", 443).expect("same host, any case")[0].port(), 443);
    assert_eq!(script.calls.load(Ordering::SeqCst), 1);
    assert_eq!(dns.addresses("azure-a.test", 8443).expect("another port")[0].port(), 8443);
    assert_eq!(script.calls.load(Ordering::SeqCst), 2);
}

#[test]
fn ip_literals_are_never_looked_up() {
    let (dns, script) = scripted(Duration::from_secs(3600));
    let uri: Uri = "https://[::1]:8443/x".parse().expect("uri");
    let got = dns.resolve(&uri, &ureq::config::Config::default(), NextTimeout::default()).expect("resolved");
    assert_eq!(&got[..], &["[::1]:8443".parse().expect("a")]);
    assert_eq!(first(&dns, "127.0.0.2"), "127.0.0.2:443".parse().expect("a"));
    assert_eq!(script.calls.load(Ordering::SeqCst), 0);
    assert_eq!(dns.shared.table().len(), 0);
}

#[test]
fn a_due_entry_is_answered_at_once_and_refreshed_once_in_the_background() {
    let (dns, script) = scripted(Duration::from_millis(1));
    assert_eq!(first(&dns, "a.test"), "10.0.0.1:443".parse().expect("a"));
    *script.hold.lock().expect("hold") = true;
    *script.answer.lock().expect("answer") = Some(2);
    std::thread::sleep(Duration::from_millis(2));
    // The refresh hangs in its lookup; meanwhile every request gets the old address, none starts another.
    for _ in 0..50 {
        assert_eq!(first(&dns, "a.test"), "10.0.0.1:443".parse().expect("a"));
    }
    eventually("the refresh started", || script.calls.load(Ordering::SeqCst) == 2);
    assert_eq!(script.calls.load(Ordering::SeqCst), 2);
    *script.hold.lock().expect("hold") = false;
    eventually("the new address is used", || first(&dns, "a.test") == "10.0.0.2:443".parse().expect("a"));
    assert!(dns.metrics().lookups_ok.load(Ordering::Relaxed) >= 2);
}

#[test]
fn a_failed_refresh_keeps_the_last_addresses_and_is_counted() {
    let (dns, script) = scripted(Duration::from_millis(1));
    first(&dns, "a.test");
    *script.answer.lock().expect("answer") = None;
    std::thread::sleep(Duration::from_millis(2));
    first(&dns, "a.test");
    let m = dns.metrics();
    eventually("the refresh failed", || m.lookups_failed.load(Ordering::Relaxed) >= 1);
    for _ in 0..10 {
        assert_eq!(first(&dns, "a.test"), "10.0.0.1:443".parse().expect("a"));
    }
    assert!(m.stale_answers.load(Ordering::Relaxed) >= 10);
    *script.answer.lock().expect("answer") = Some(3);
    eventually("recovered", || first(&dns, "a.test") == "10.0.0.3:443".parse().expect("a"));
    let before = m.stale_answers.load(Ordering::Relaxed);
    first(&dns, "a.test");
    assert_eq!(m.stale_answers.load(Ordering::Relaxed), before, "fresh answers are not stale");
}

#[test]
fn a_first_lookup_that_fails_is_an_error_and_not_kept() {
    let (dns, script) = scripted(Duration::from_secs(3600));
    *script.answer.lock().expect("answer") = None;
    let e = dns.addresses("a.test", 443).expect_err("no address");
    assert!(e.to_string().contains("failed to lookup address"), "{e}");
    *script.answer.lock().expect("answer") = Some(4);
    assert_eq!(first(&dns, "a.test"), "10.0.0.4:443".parse().expect("a"));
    assert_eq!(dns.metrics().lookups_failed.load(Ordering::Relaxed), 1);
}

#[test]
fn a_failed_connect_refreshes_addresses_older_than_a_second_only() {
    let (dns, script) = scripted(Duration::from_secs(3600));
    first(&dns, "a.test");
    *script.answer.lock().expect("answer") = Some(5);
    dns.connect_failed("a.test", 443);
    assert_eq!(script.calls.load(Ordering::SeqCst), 1, "just looked up: no refresh");
    if let Some(e) = dns.shared.table().get_mut(&("a.test".to_string(), 443)) {
        e.looked_up -= CONNECT_FAILURE_MIN_AGE;
    }
    dns.connect_failed("A.test", 443);
    eventually("refreshed", || first(&dns, "a.test") == "10.0.0.5:443".parse().expect("a"));
    assert_eq!(script.calls.load(Ordering::SeqCst), 2);
}

#[test]
fn the_table_is_bounded_and_forgets_the_least_recently_used_host() {
    let (dns, _) = scripted(Duration::from_secs(3600));
    first(&dns, "keep.test");
    for i in 0..MAX_HOSTS + 10 {
        first(&dns, &format!("h{i}.test"));
        first(&dns, "keep.test");
    }
    let table = dns.shared.table();
    assert_eq!(table.len(), MAX_HOSTS);
    assert!(table.contains_key(&("keep.test".to_string(), 443)));
    assert!(!table.contains_key(&("h0.test".to_string(), 443)));
}

#[test]
fn the_refresh_threads_end_with_the_last_clone() {
    let (dns, _) = scripted(Duration::from_millis(1));
    first(&dns, "a.test");
    std::thread::sleep(Duration::from_millis(2));
    first(&dns, "a.test");
    let weak = Arc::downgrade(&dns.shared);
    let clone = dns.clone();
    drop(dns);
    first(&clone, "a.test");
    drop(clone);
    eventually("the threads let go of the shared state", || weak.strong_count() == 0);
}

#[test]
fn metrics_render_as_prometheus_counters() {
    let (dns, _) = scripted(Duration::from_secs(3600));
    first(&dns, "a.test");
    let mut out = String::new();
    dns.metrics().render(&mut out);
    assert!(out.contains("azure_proxy_dns_lookups_total{outcome=\"ok\"} 1\n"), "{out}");
    assert!(out.contains("azure_proxy_dns_lookups_total{outcome=\"failed\"} 0\n"), "{out}");
    assert!(out.contains("# TYPE azure_proxy_dns_stale_answers_total counter\nazure_proxy_dns_stale_answers_total 0\n"));
}
