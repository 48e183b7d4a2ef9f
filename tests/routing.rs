//! Smart routing on the wire: cooldowns from every retry-hint form (and their cap), the fast answer when every
//! instance is cooling down, priority tiers, weights, deployment mapping and `deployments_only`, api-version
//! pinning, the circuit breaker's open / probe / close cycle, `max_attempts`, `attempt_deadline_ms` with
//! per-instance timeouts, `/readyz`, and the knobs that bring back plain round-robin.
//!
//! Timing: nothing asserts how long something took. Waiting for a cooldown or an open circuit to end is a poll
//! with a deadline (`support::eventually`). Checks that a state still holds ("A is skipped while it cools
//! down") are made only inside a [`Window`] that the state is known to last; at least one request must fit in
//! each window (a test that checked nothing would pass wrongly).

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use crate::support::client::{call, Resp};
use crate::support::eventually;
use crate::support::mock::{served_by_reply as ok_reply, serving as ok_mock, MockAzure, Recorded, Reply};
use crate::support::proxy::{self, instance, Proxy, CHAT};
use serde_json::{json, Value};

/// Subtracted from every window, for the proxy's millisecond rounding and clock reads.
const MARGIN: Duration = Duration::from_millis(20);

// ---------------------------------------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------------------------------------

/// A time span during which a state the proxy entered *after* the window was opened is known to still hold.
struct Window(Instant);

impl Window {
    /// Open it just before sending the request that puts the proxy into the state lasting `len`.
    fn starting_now(len: Duration) -> Window {
        Window(Instant::now() + len.saturating_sub(MARGIN))
    }
    fn open(&self) -> bool {
        Instant::now() < self.0
    }
}

/// An Azure-style error answer with the given retry-hint headers.
fn error_reply(status: u16, hints: &[(&str, &str)]) -> Reply {
    let body = json!({"error": {"code": status.to_string(), "message": format!("mock says {status}")}});
    hints.iter().fold(Reply::json(status, body), |r, (n, v)| r.with_header(n, v))
}

/// Answers `first()` to its first request and 200 to every later one.
fn first_then_ok(name: &'static str, first: impl Fn() -> Reply + Send + Sync + 'static) -> MockAzure {
    let seen = AtomicUsize::new(0);
    MockAzure::start(
        move |_: &Recorded| if seen.fetch_add(1, Ordering::SeqCst) == 0 { first() } else { ok_reply(name) },
    )
}

/// Answers `bad()` while `flag` is set, 200 otherwise.
fn switchable(
    name: &'static str,
    flag: &Arc<AtomicBool>,
    bad: impl Fn() -> Reply + Send + Sync + 'static,
) -> MockAzure {
    let flag = Arc::clone(flag);
    MockAzure::start(move |_: &Recorded| if flag.load(Ordering::SeqCst) { bad() } else { ok_reply(name) })
}

/// One instance entry for `mock`, named `name`, with `more` fields merged in.
fn inst(mock: &MockAzure, name: &str, more: Value) -> Value {
    let mut v = instance(&mock.url(), &format!("key-{name}"), name);
    if let (Some(obj), Some(more)) = (v.as_object_mut(), more.as_object()) {
        for (k, val) in more {
            obj.insert(k.clone(), val.clone());
        }
    }
    v
}

fn post_to(p: &Proxy, target: &str, body: &[u8]) -> Resp {
    call(p.addr, "POST", target, &[("api-key", "client-key"), ("Content-Type", "application/json")], body)
}

fn post(p: &Proxy) -> Resp {
    post_to(p, CHAT, b"{}")
}

fn served_by(r: &Resp) -> String {
    r.header("x-served-by").unwrap_or("-").to_string()
}

/// POSTs and expects a 200; returns the serving instance.
fn served(p: &Proxy) -> String {
    let r = post(p);
    assert_eq!(r.status, 200, "{}", r.text());
    served_by(&r)
}

fn attempts(r: &Resp) -> Vec<Value> {
    r.json()["error"]["attempts"].as_array().unwrap_or_else(|| panic!("no attempts list: {}", r.text())).clone()
}

fn readyz(p: &Proxy) -> Resp {
    // No client key: load balancers and orchestrators probe without one.
    call(p.addr, "GET", "/readyz", &[], b"")
}

/// `t` as an IMF-fixdate (`Sun, 06 Nov 1994 08:49:37 GMT`), whole seconds.
fn imf_fixdate(t: SystemTime) -> String {
    let secs = t.duration_since(UNIX_EPOCH).expect("after 1970").as_secs() as i64;
    let (days, rem) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    // Howard Hinnant's civil_from_days.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    let weekday = ["Sun", "Mon", "Tue", "Wed", "Thu", "Fri", "Sat"][(days + 4).rem_euclid(7) as usize];
    let month =
        ["Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec"][month as usize - 1];
    format!("{weekday}, {day:02} {month} {year} {:02}:{:02}:{:02} GMT", rem / 3600, rem % 3600 / 60, rem % 60)
}

#[test]
fn imf_fixdate_helper_formats_known_dates() {
    let at = |s: u64| imf_fixdate(UNIX_EPOCH + Duration::from_secs(s));
    assert_eq!(at(784_111_777), "Sun, 06 Nov 1994 08:49:37 GMT");
    assert_eq!(at(1_709_164_800), "Thu, 29 Feb 2024 00:00:00 GMT");
    assert_eq!(at(0), "Thu, 01 Jan 1970 00:00:00 GMT");
}

/// The common cooldown scenario. Instances A (answers `first()` once, then 200) and B (always 200), `extra`
/// merged into the config. Request 1 goes to A, which answers `first()`, and is served by B. The next six
/// requests (three of which start at A in round-robin order) all go to B while the cooldown, known to last at
/// least `at_least`, holds. Then A gets traffic again once it is over.
fn assert_cooldown(first: impl Fn() -> Reply + Send + Sync + 'static, at_least: Duration, extra: Value) {
    let a = first_then_ok("A", first);
    let b = ok_mock("B");
    let p = proxy::start_with(vec![inst(&a, "A", json!({})), inst(&b, "B", json!({}))], extra);

    let window = Window::starting_now(at_least);
    assert_eq!(served(&p), "B", "A answered the first request with an error; B serves it");
    assert_eq!((a.hits(), b.hits()), (1, 1));

    let mut checked = 0;
    for n in 0..6 {
        let who = served(&p);
        if !window.open() {
            break;
        }
        assert_eq!(who, "B", "request {} after the throttle", n + 1);
        assert_eq!(a.hits(), 1, "A is skipped while cooling down (request {} after the throttle)", n + 1);
        checked += 1;
    }
    // A machine too slow to send one request inside a cooldown of a second cannot tell anything here: fail
    // rather than pass without having checked.
    assert!(checked > 0, "no request fitted inside the cooldown window; nothing was checked");

    eventually("a request reaches A again after its cooldown", || served(&p) == "A");
    assert_eq!(a.hits(), 2, "A came back with one request");
}

// ---------------------------------------------------------------------------------------------------------
// 1–3. Cooldowns
// ---------------------------------------------------------------------------------------------------------

/// A 1 ms default cooldown: whatever keeps the instance out longer comes from the hint under test.
fn hint_only() -> Value {
    json!({"cooldown_ms": 1})
}

#[test]
fn a_429_with_retry_after_ms_keeps_the_instance_out_until_it_passes() {
    assert_cooldown(|| error_reply(429, &[("retry-after-ms", "400")]), Duration::from_millis(400), hint_only());
}

#[test]
fn x_ms_retry_after_ms_is_honoured() {
    assert_cooldown(|| error_reply(429, &[("x-ms-retry-after-ms", "400")]), Duration::from_millis(400), hint_only());
}

#[test]
fn retry_after_in_seconds_is_honoured() {
    assert_cooldown(|| error_reply(429, &[("Retry-After", "1")]), Duration::from_secs(1), hint_only());
}

#[test]
fn retry_after_as_an_http_date_is_honoured() {
    // Whole seconds: two seconds after the current one is between 1 and 2 s away when the mock answers.
    assert_cooldown(
        || {
            let now = SystemTime::now().duration_since(UNIX_EPOCH).expect("after 1970").as_secs();
            let at = UNIX_EPOCH + Duration::from_secs(now + 2);
            error_reply(429, &[("Retry-After", &imf_fixdate(at))])
        },
        Duration::from_secs(1),
        hint_only(),
    );
}

#[test]
fn a_503_with_a_hint_cools_down_too() {
    assert_cooldown(|| error_reply(503, &[("retry-after-ms", "300")]), Duration::from_millis(300), hint_only());
}

#[test]
fn a_429_without_a_hint_cools_down_for_cooldown_ms() {
    assert_cooldown(|| error_reply(429, &[]), Duration::from_millis(300), json!({"cooldown_ms": 300}));
}

#[test]
fn max_cooldown_ms_caps_a_long_retry_after() {
    // An hour's Retry-After, capped to 300 ms: A is back well inside the poll deadline.
    assert_cooldown(
        || error_reply(429, &[("Retry-After", "3600")]),
        Duration::from_millis(300),
        json!({"max_cooldown_ms": 300, "cooldown_ms": 1}),
    );
}

// ---------------------------------------------------------------------------------------------------------
// 4. Every instance cooling down
// ---------------------------------------------------------------------------------------------------------

#[test]
fn when_every_instance_cools_down_the_proxy_answers_429_at_once_without_calling_any() {
    let a = MockAzure::start(|_: &Recorded| error_reply(429, &[("retry-after-ms", "2000")]));
    let b = MockAzure::start(|_: &Recorded| error_reply(429, &[("retry-after-ms", "2000")]));
    let p = proxy::start_with(vec![inst(&a, "A", json!({})), inst(&b, "B", json!({}))], json!({}));

    let window = Window::starting_now(Duration::from_millis(2000));
    let r = post(&p);
    assert_eq!(r.status, 429, "{}", r.text());
    assert_eq!(r.json()["error"]["code"], "all_instances_throttled");
    assert_eq!(attempts(&r).len(), 2, "both instances tried: {}", r.text());
    assert_eq!((a.hits(), b.hits()), (1, 1));

    let r = post(&p);
    assert!(window.open(), "the second request took longer than the 2 s cooldown; nothing can be checked");
    assert_eq!(r.status, 429, "{}", r.text());
    assert_eq!((a.hits(), b.hits()), (1, 1), "no instance is called while all cool down");
    let secs: u64 = r.header("retry-after").expect("Retry-After").parse().expect("Retry-After in seconds");
    assert!((1..=2).contains(&secs), "Retry-After {secs}");
    assert_eq!(r.header("content-type"), Some("application/json"));
    let e = &r.json()["error"];
    assert_eq!(e["attempts"], json!([]), "{e}");
    assert_eq!(e["type"], "rate_limit_error", "{e}");
    assert_eq!(e["code"], "all_instances_cooling_down", "{e}");
    assert!(e["message"].as_str().is_some_and(|m| !m.is_empty()), "{e}");
    assert_eq!(e["request_id"], r.header("x-request-id").expect("request id"), "{e}");
}

// ---------------------------------------------------------------------------------------------------------
// 5–6. Tiers and weights
// ---------------------------------------------------------------------------------------------------------

#[test]
fn the_lower_priority_tier_gets_traffic_only_while_the_better_one_cools_down() {
    let throttled = Arc::new(AtomicBool::new(false));
    let a = switchable("A", &throttled, || error_reply(429, &[("retry-after-ms", "300")]));
    let b = ok_mock("B");
    let p = proxy::start_with(
        vec![inst(&a, "A", json!({"priority": 0})), inst(&b, "B", json!({"priority": 1}))],
        json!({}),
    );
    for n in 0..10 {
        assert_eq!(served(&p), "A", "request {n}: the best tier takes everything");
    }
    assert_eq!((a.hits(), b.hits()), (10, 0));

    throttled.store(true, Ordering::SeqCst);
    let window = Window::starting_now(Duration::from_millis(300));
    assert_eq!(served(&p), "B", "A throttles: the request falls through to the next tier");
    assert_eq!((a.hits(), b.hits()), (11, 1));
    throttled.store(false, Ordering::SeqCst);
    for n in 0..4 {
        let who = served(&p);
        if !window.open() {
            break;
        }
        assert_eq!(who, "B", "request {n} during A's cooldown");
        assert_eq!(a.hits(), 11, "A is not tried while it cools down");
    }

    eventually("requests return to the better tier", || served(&p) == "A");
    for n in 0..5 {
        assert_eq!(served(&p), "A", "request {n} after A's cooldown");
    }
}

#[test]
fn weights_split_requests_three_to_one_in_smooth_order() {
    let a = ok_mock("A");
    let b = ok_mock("B");
    let p =
        proxy::start_with(vec![inst(&a, "A", json!({"weight": 3})), inst(&b, "B", json!({"weight": 1}))], json!({}));
    let order: Vec<String> = (0..40).map(|_| served(&p)).collect();
    assert_eq!((a.hits(), b.hits()), (30, 10));
    // Smooth weighted round-robin for 3:1 gives A A B A, every cycle.
    for (n, window) in order.chunks(4).enumerate() {
        assert_eq!(window, ["A", "A", "B", "A"], "cycle {n} of {order:?}");
    }
}

// ---------------------------------------------------------------------------------------------------------
// 7–9. What goes on the wire: deployment mapping, deployments_only, api-version pinning
// ---------------------------------------------------------------------------------------------------------

#[test]
fn deployment_names_are_mapped_per_instance_in_the_path_and_in_v1_bodies() {
    let a = ok_mock("A");
    let b = ok_mock("B");
    let p = proxy::start_with(
        vec![inst(&a, "A", json!({"deployments": {"gpt-4o": "gpt4o-eastus-prod"}})), inst(&b, "B", json!({}))],
        json!({}),
    );
    let target = "/openai/deployments/gpt-4o/chat/completions?api-version=2024-06-01&foo=bar%20baz";
    let body = br#"{"messages":[{"role":"user","content":"hi"}],"temperature":0.5}"#;
    // Round-robin: A, then B.
    for _ in 0..2 {
        let r = post_to(&p, target, body);
        assert_eq!(r.status, 200, "{}", r.text());
    }
    let seen = a.last_request().expect("A saw a request");
    assert_eq!(
        seen.target,
        "/openai/deployments/gpt4o-eastus-prod/chat/completions?api-version=2024-06-01&foo=bar%20baz"
    );
    assert!(seen.body == body, "the body of a deployments route is not touched");
    let seen = b.last_request().expect("B saw a request");
    assert_eq!(seen.target, target, "B has no mapping: the path is unchanged");

    // v1 routes carry the deployment in the body's `model`.
    let v1 = "/openai/v1/chat/completions";
    let body = br#"{"model":"gpt-4o","messages":[{"role":"user","content":"h\u00e9llo \"w\""}],"temperature":0.5,"stream":false}"#;
    for _ in 0..2 {
        let r = post_to(&p, v1, body);
        assert_eq!(r.status, 200, "{}", r.text());
    }
    assert_eq!((a.hits(), b.hits()), (2, 2));
    let seen = a.last_request().expect("A saw the v1 request");
    assert_eq!(seen.target, v1);
    let mut expected: Value = serde_json::from_slice(body).expect("json");
    expected["model"] = "gpt4o-eastus-prod".into();
    assert_eq!(seen.json(), Some(expected), "A gets its own model name, every other field intact");
    assert_eq!(seen.header("content-length"), Some(seen.body.len().to_string().as_str()));
    let seen = b.last_request().expect("B saw the v1 request");
    assert_eq!(seen.target, v1);
    assert!(seen.body == body, "B has no mapping: the body is byte-identical: {}", String::from_utf8_lossy(&seen.body));
}

#[test]
fn deployments_only_instances_get_only_the_deployments_they_list() {
    let a = ok_mock("A");
    let b = ok_mock("B");
    let p = proxy::start_with(
        vec![
            inst(&a, "A", json!({"deployments": {"gpt-4o": "gpt4o-a"}, "deployments_only": true})),
            inst(&b, "B", json!({})),
        ],
        json!({}),
    );
    let other = "/openai/deployments/other/chat/completions?api-version=2024-06-01";
    for n in 0..6 {
        let r = post_to(&p, other, b"{}");
        assert_eq!((r.status, served_by(&r).as_str()), (200, "B"), "request {n} for \"other\"");
    }
    assert_eq!((a.hits(), b.hits()), (0, 6), "A never sees a deployment it does not list");
    // The same for a v1 route naming the model in the body.
    let r = post_to(&p, "/openai/v1/chat/completions", br#"{"model":"other"}"#);
    assert_eq!((r.status, served_by(&r).as_str()), (200, "B"));
    let r = post_to(&p, "/openai/v1/chat/completions", br#"{"model":"other"}"#);
    assert_eq!((r.status, served_by(&r).as_str()), (200, "B"));
    assert_eq!(a.hits(), 0);

    let served_gpt4o: Vec<String> = (0..4).map(|_| served(&p)).collect();
    assert_eq!(served_gpt4o.iter().filter(|s| *s == "A").count(), 2, "{served_gpt4o:?}");
    assert_eq!(served_gpt4o.iter().filter(|s| *s == "B").count(), 2, "{served_gpt4o:?}");
    assert_eq!(a.last_request().expect("seen").path(), "/openai/deployments/gpt4o-a/chat/completions");

    // Every instance restricted, none lists the name: 404 from the proxy, no instance called.
    let c = ok_mock("C");
    let d = ok_mock("D");
    let p = proxy::start_with(
        vec![
            inst(&c, "C", json!({"deployments": {"gpt-4o": "gpt-4o"}, "deployments_only": true})),
            inst(&d, "D", json!({"deployments": {"gpt-35": "gpt-35-turbo"}, "deployments_only": true})),
        ],
        json!({}),
    );
    let r = post_to(&p, other, b"{}");
    assert_eq!(r.status, 404, "{}", r.text());
    assert_eq!(r.header("content-type"), Some("application/json"));
    let e = &r.json()["error"];
    assert!(e["code"].is_string() && e["type"].is_string(), "{e}");
    assert!(e["message"].as_str().is_some_and(|m| m.contains("other")), "{e}");
    assert_eq!((c.hits(), d.hits()), (0, 0));
}

#[test]
fn api_version_pinning_replaces_the_clients_version_and_keeps_other_parameters() {
    let a = ok_mock("A");
    let b = ok_mock("B");
    let p = proxy::start_with(
        vec![inst(&a, "A", json!({"api_version": "2024-10-21"})), inst(&b, "B", json!({}))],
        json!({}),
    );
    let target = "/openai/deployments/gpt-4o/chat/completions?foo=1&api-version=2024-06-01&bar=x%20y";
    for _ in 0..2 {
        let r = post_to(&p, target, b"{}");
        assert_eq!(r.status, 200, "{}", r.text());
    }
    let seen = a.last_request().expect("A saw the request");
    assert_eq!(seen.path(), "/openai/deployments/gpt-4o/chat/completions");
    let params: Vec<&str> = seen.query().expect("a query").split('&').collect();
    let versions: Vec<&&str> = params.iter().filter(|p| p.starts_with("api-version=")).collect();
    assert_eq!(versions, [&"api-version=2024-10-21"], "{}", seen.target);
    let others: Vec<&&str> = params.iter().filter(|p| !p.starts_with("api-version=")).collect();
    assert_eq!(others, [&"foo=1", &"bar=x%20y"], "{}", seen.target);
    assert_eq!(b.last_request().expect("B saw the request").target, target, "B is not pinned");
}

// ---------------------------------------------------------------------------------------------------------
// 10. Circuit breaker
// ---------------------------------------------------------------------------------------------------------

#[test]
fn circuit_breaker_opens_probes_once_backs_off_and_closes() {
    let broken = Arc::new(AtomicBool::new(true));
    let a = switchable("A", &broken, || Reply::ResetBeforeHead);
    let b = ok_mock("B");
    let p = proxy::start_with(
        vec![inst(&a, "A", json!({})), inst(&b, "B", json!({}))],
        json!({"circuit_failures": 2, "circuit_open_ms": 200, "circuit_max_open_ms": 1000}),
    );
    // Round-robin: requests 1 and 3 start at A, which fails; request 2 starts at B.
    assert_eq!(served(&p), "B");
    assert_eq!(a.hits(), 1);
    assert_eq!(served(&p), "B");
    assert_eq!(a.hits(), 1, "request 2 starts at B, which serves it");
    let window = Window::starting_now(Duration::from_millis(200));
    assert_eq!(served(&p), "B");
    assert_eq!(a.hits(), 2, "second consecutive failure: the circuit opens");
    for n in 0..4 {
        let who = served(&p);
        if !window.open() {
            break;
        }
        assert_eq!(who, "B");
        assert_eq!(a.hits(), 2, "request {n} while open: A is not tried");
    }

    // Half-open after 200 ms: the first request that reaches A is the one probe; it fails.
    let mut probe = None;
    eventually("one request probes A", || {
        let sent = Instant::now();
        assert_eq!(served(&p), "B");
        if a.hits() > 2 {
            probe = Some((sent, Instant::now()));
        }
        probe.is_some()
    });
    assert_eq!(a.hits(), 3, "exactly one probe");
    let (sent, done) = probe.expect("probe seen");

    // The failed probe reopens the circuit for twice as long (400 ms). A 200 ms interval would be over by
    // `done + 200 ms`; the doubled one lasts until `sent + 400 ms` at least. Check in between.
    let from = done + Duration::from_millis(200) + MARGIN;
    let until = Window(sent + Duration::from_millis(400) - MARGIN);
    let now = Instant::now();
    if from > now {
        thread::sleep(from - now);
    }
    let mut checked = 0;
    for n in 0..2 {
        // Two requests: one of them starts at A.
        let who = served(&p);
        if !until.open() {
            break;
        }
        assert_eq!(who, "B");
        assert_eq!(a.hits(), 3, "request {n} 200 ms after the failed probe: the interval has doubled");
        checked += 1;
    }
    assert!(checked > 0, "no request fitted inside the doubled open interval; nothing was checked");

    // A recovers: the next probe gets an answer and closes the circuit.
    broken.store(false, Ordering::SeqCst);
    eventually("a probe succeeds and A serves again", || served(&p) == "A");
    let next: Vec<String> = (0..4).map(|_| served(&p)).collect();
    assert_eq!(next.iter().filter(|s| *s == "A").count(), 2, "closed: A has its round-robin share again: {next:?}");
}

// ---------------------------------------------------------------------------------------------------------
// 11–12. Attempt limits
// ---------------------------------------------------------------------------------------------------------

#[test]
fn max_attempts_limits_how_many_instances_one_request_tries() {
    let mocks: Vec<MockAzure> = (0..3).map(|_| MockAzure::start(|_: &Recorded| error_reply(500, &[]))).collect();
    let p = proxy::start_with(proxy::instances_for(&mocks.iter().collect::<Vec<_>>()), json!({"max_attempts": 2}));
    let r = post(&p);
    assert_eq!(r.status, 502, "{}", r.text());
    let list = attempts(&r);
    assert_eq!(list.len(), 2, "{}", r.text());
    assert!(list.iter().all(|a| a["status"] == 500), "{}", r.text());
    assert_eq!(mocks.iter().map(MockAzure::hits).sum::<usize>(), 2);
    assert_eq!(mocks.iter().filter(|m| m.hits() == 1).count(), 2, "two different instances, once each");
}

#[test]
fn attempt_deadline_stops_retrying_after_a_per_instance_timeout() {
    // Only A has short timeouts; the global ones are the 300 s defaults. Were the per-instance overrides
    // ignored, the request would outlast the test client's 20 s read timeout.
    let hung = || Reply::Hang { for_at_most: Duration::from_secs(30) };
    let short = json!({"upstream_response_timeout_ms": 300, "upstream_read_timeout_ms": 300});

    let a = MockAzure::start(move |_: &Recorded| hung());
    let b = ok_mock("B");
    let p = proxy::start_with(
        vec![inst(&a, "A", short.clone()), inst(&b, "B", json!({}))],
        json!({"attempt_deadline_ms": 100}),
    );
    let r = post(&p);
    assert_eq!(r.status, 504, "{}", r.text());
    let list = attempts(&r);
    assert_eq!(list.len(), 1, "{}", r.text());
    assert_eq!(list[0]["instance"], "A");
    assert!(list[0]["error"].as_str().is_some_and(|s| !s.is_empty()), "{}", r.text());
    assert_eq!((a.hits(), b.hits()), (1, 0), "the deadline passed while A hung: B is not tried");

    // Without the deadline the same timeout moves the request on to B.
    let a = MockAzure::start(move |_: &Recorded| hung());
    let b = ok_mock("B");
    let p = proxy::start_with(vec![inst(&a, "A", short), inst(&b, "B", json!({}))], json!({}));
    assert_eq!(served(&p), "B");
    assert_eq!((a.hits(), b.hits()), (1, 1));
}

// ---------------------------------------------------------------------------------------------------------
// 13. /readyz
// ---------------------------------------------------------------------------------------------------------

#[test]
fn readyz_reports_each_instance_and_fails_when_none_can_take_requests() {
    let throttled = Arc::new(AtomicBool::new(false));
    let bad = || error_reply(429, &[("retry-after-ms", "5000")]);
    let a = switchable("A", &throttled, bad);
    let b = switchable("B", &throttled, bad);
    let p = proxy::start_with(vec![inst(&a, "A", json!({})), inst(&b, "B", json!({}))], json!({}));

    let r = readyz(&p);
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.header("content-type"), Some("application/json"));
    let v = r.json();
    let states: Vec<(String, String)> = v["instances"]
        .as_array()
        .unwrap_or_else(|| panic!("no instances list: {v}"))
        .iter()
        .map(|i| (i["name"].as_str().unwrap_or("?").to_string(), i["state"].as_str().unwrap_or("?").to_string()))
        .collect();
    assert_eq!(states, [("A".into(), "available".into()), ("B".into(), "available".into())], "{v}");

    throttled.store(true, Ordering::SeqCst);
    let window = Window::starting_now(Duration::from_secs(5));
    assert_eq!(post(&p).status, 429);
    assert_eq!((a.hits(), b.hits()), (1, 1));
    let r = readyz(&p);
    assert!(window.open(), "too slow to see both instances cooling down");
    assert_eq!(r.status, 503, "{}", r.text());
    let v = r.json();
    assert!(v["reason"].as_str().is_some_and(|s| !s.is_empty()), "a reason: {v}");
    let list = v["instances"].as_array().unwrap_or_else(|| panic!("no instances list: {v}"));
    assert_eq!(list.len(), 2, "{v}");
    for (i, name) in list.iter().zip(["A", "B"]) {
        assert_eq!(i["name"], name, "{v}");
        assert_eq!(i["state"], "cooling_down", "{v}");
    }
    assert_eq!((a.hits(), b.hits()), (1, 1), "/readyz never calls an instance");
}

// ---------------------------------------------------------------------------------------------------------
// 14. The original proxy's behaviour
// ---------------------------------------------------------------------------------------------------------

#[test]
fn with_cooldowns_and_breaker_off_a_failing_instance_stays_in_plain_round_robin() {
    let off = json!({"max_cooldown_ms": 0, "circuit_failures": 0});
    let throttling = || MockAzure::start(|_: &Recorded| error_reply(429, &[("retry-after-ms", "5000")]));

    // Cooldowns off: A is tried by every request that starts at it, despite its 5 s hint.
    let a = throttling();
    let b = ok_mock("B");
    let p = proxy::start_with(vec![inst(&a, "A", json!({})), inst(&b, "B", json!({}))], off.clone());
    for n in 0..6 {
        assert_eq!(served(&p), "B", "request {n}");
    }
    assert_eq!((a.hits(), b.hits()), (3, 6), "A tried by requests 1, 3 and 5; B serves every request");

    // The same with the defaults: after its first 429, A sits out its 5 s cooldown.
    let a = throttling();
    let b = ok_mock("B");
    let p = proxy::start_with(vec![inst(&a, "A", json!({})), inst(&b, "B", json!({}))], json!({}));
    let window = Window::starting_now(Duration::from_secs(5));
    for n in 0..6 {
        assert_eq!(served(&p), "B", "request {n}");
    }
    if window.open() {
        assert_eq!((a.hits(), b.hits()), (1, 6), "by default A cools down after one 429");
    }

    // Breaker off: an instance that resets every connection is still tried by every request that starts at
    // it (with the default breaker, three failures would open its circuit for a second).
    let a = MockAzure::start(|_: &Recorded| Reply::ResetBeforeHead);
    let b = ok_mock("B");
    let p = proxy::start_with(vec![inst(&a, "A", json!({})), inst(&b, "B", json!({}))], off);
    for n in 0..8 {
        assert_eq!(served(&p), "B", "request {n}");
    }
    assert_eq!((a.hits(), b.hits()), (4, 8));
}
