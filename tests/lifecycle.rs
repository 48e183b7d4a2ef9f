//! The process lifecycle, on the real binary: SIGHUP reloads the configuration (or keeps the running one when
//! the new one is invalid), SIGTERM drains (no new connections, requests in flight finish, exit 0).

use std::net::TcpStream;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use crate::support::client::{call, Client};
use crate::support::eventually;
use crate::support::mock::{azure_like, MockAzure, Recorded, Reply};
use crate::support::process::{write_config, Running};
use crate::support::proxy::CHAT;

fn signal(p: &Running, sig: i32) {
    // SAFETY: kill(2) on the pid of a child we spawned and have not reaped.
    let rc = unsafe { libc::kill(p.child.id() as i32, sig) };
    assert_eq!(rc, 0, "kill failed");
}

fn config(mock: &MockAzure, client_key: &str, extra: &str) -> String {
    format!(
        r#"{{"instances": [{{"endpoint": "{}", "api_key": "k", "name": "east"}}], "client_keys": ["{client_key}"] {extra}}}"#,
        mock.url()
    )
}

fn status_with(p: &Running, key: &str) -> u16 {
    call(p.addr, "POST", CHAT, &[("api-key", key)], b"{}").status
}

fn wait_exit(p: &mut Running) -> Option<i32> {
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        if let Some(status) = p.child.try_wait().expect("wait") {
            return status.code();
        }
        assert!(Instant::now() < deadline, "the proxy did not exit");
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn sighup_reloads_a_valid_config_and_keeps_the_running_one_otherwise() {
    let m = MockAzure::start(azure_like("east", "k", Duration::from_millis(1)));
    let path = write_config("reload.json", &config(&m, "old-key", ""));
    let p = Running::start(&path, &[]);
    assert_eq!(status_with(&p, "old-key"), 200);
    assert_eq!(status_with(&p, "new-key"), 401);

    std::fs::write(&path, config(&m, "new-key", "")).expect("rewrite config");
    signal(&p, libc::SIGHUP);
    eventually("the new key is accepted", || status_with(&p, "new-key") == 200);
    assert_eq!(status_with(&p, "old-key"), 401, "the old allowlist is gone");
    assert!(p.log_when(|l| l.contains("configuration reloaded")).iter().any(|l| l.contains("configuration reloaded")));

    std::fs::write(&path, r#"{"instances": [], "client_keys": ["x"]}"#).expect("break config");
    signal(&p, libc::SIGHUP);
    let log = p.log_when(|l| l.contains("reload failed"));
    let failed = log.iter().find(|l| l.contains("reload failed")).expect("a log line says the reload failed");
    assert!(failed.contains("instances"), "it says why: {failed}");
    assert_eq!(status_with(&p, "new-key"), 200, "the running configuration stays");
}

#[test]
fn a_reload_keeps_the_cooldown_of_an_unchanged_instance() {
    let throttled = MockAzure::start(|_: &Recorded| {
        Reply::json(429, serde_json::json!({"error": {"code": "429"}})).with_header("Retry-After", "30")
    });
    let ok = MockAzure::start(azure_like("west", "k1", Duration::from_millis(1)));
    let text = |keys: &str| {
        format!(
            r#"{{"instances": [{{"endpoint": "{}", "api_key": "k0", "name": "east"}},
                              {{"endpoint": "{}", "api_key": "k1", "name": "west"}}], "client_keys": [{keys}]}}"#,
            throttled.url(),
            ok.url()
        )
    };
    let path = write_config("cooldown-reload.json", &text(r#""ck""#));
    let p = Running::start(&path, &[]);
    assert_eq!(status_with(&p, "ck"), 200, "east throttles, west serves");
    assert_eq!(throttled.hits(), 1);
    std::fs::write(&path, text(r#""ck", "ck2""#)).expect("rewrite");
    signal(&p, libc::SIGHUP);
    eventually("the reload is applied", || status_with(&p, "ck2") == 200);
    for _ in 0..4 {
        assert_eq!(status_with(&p, "ck"), 200);
    }
    assert_eq!(throttled.hits(), 1, "east is still cooling down after the reload");
}

#[test]
fn sigterm_lets_a_stream_in_flight_finish_refuses_new_clients_and_exits_0() {
    let (open_gate, gate) = mpsc::channel::<()>();
    let gate = std::sync::Mutex::new(Some(gate));
    let events: Vec<String> = (0..3).map(|i| format!("data: {{\"n\":{i}}}\n\n")).collect();
    let m = MockAzure::start(move |_: &Recorded| Reply::Sse {
        events: events.clone(),
        pause: Duration::ZERO,
        gate: gate.lock().expect("gate").take(),
    });
    let path = write_config("drain.json", &config(&m, "ck", r#", "drain_seconds": 20"#));
    let mut p = Running::start(&path, &[]);
    let mut c = Client::connect(p.addr);
    c.send("POST", CHAT, &[("api-key", "ck")], br#"{"stream": true}"#);
    let (status, _) = c.read_head().expect("head");
    assert_eq!(status, 200);
    c.read_chunks_until(b"\"n\":0").expect("first event");

    signal(&p, libc::SIGTERM);
    eventually("new connections are refused", || TcpStream::connect(p.addr).is_err());
    assert!(p.child.try_wait().expect("wait").is_none(), "still running while the stream is open");

    open_gate.send(()).expect("gate");
    open_gate.send(()).expect("gate");
    let rest = c.read_chunks_until(b"\"n\":2").expect("the rest of the stream");
    assert!(String::from_utf8_lossy(&rest).contains("\"n\":1"));
    assert_eq!(c.read_line().expect("last chunk"), "0", "the stream ends cleanly");
    assert_eq!(wait_exit(&mut p), Some(0));
    let log = p.log_when(|l| l.contains("stopped"));
    assert!(log.iter().any(|l| l.contains("stopping")), "{log:#?}");
}

#[test]
fn sigterm_gives_up_on_a_stream_after_drain_seconds() {
    let m = MockAzure::start(|_: &Recorded| Reply::Sse {
        events: vec!["data: {}\n\n".into(); 2],
        pause: Duration::from_secs(600),
        gate: None,
    });
    let path = write_config("drain-limit.json", &config(&m, "ck", r#", "drain_seconds": 1"#));
    let mut p = Running::start(&path, &[]);
    let mut c = Client::connect(p.addr);
    c.send("POST", CHAT, &[("api-key", "ck")], br#"{"stream": true}"#);
    assert_eq!(c.read_head().expect("head").0, 200);
    signal(&p, libc::SIGTERM);
    assert_eq!(wait_exit(&mut p), Some(0), "exits after the drain period even with a stream open");
}

#[test]
fn sigterm_with_only_idle_connections_exits_at_once() {
    let m = MockAzure::start(azure_like("east", "k", Duration::from_millis(1)));
    let path = write_config("drain-idle.json", &config(&m, "ck", ""));
    let mut p = Running::start(&path, &[]);
    let mut idle = Client::connect(p.addr);
    idle.send("POST", CHAT, &[("api-key", "ck")], b"{}");
    assert_eq!(idle.read_response(false).expect("response").status, 200);
    signal(&p, libc::SIGINT);
    assert_eq!(wait_exit(&mut p), Some(0));
    assert!(idle.is_closed(), "the idle keep-alive connection was closed");
}

#[test]
fn stopping_one_in_process_server_leaves_another_serving() {
    // The stop flag belongs to each server: two in one process (the tests' own situation) stop separately.
    let m = MockAzure::start(azure_like("east", "key0", Duration::from_millis(1)));
    let first = crate::support::proxy::start(&[&m]);
    let second = crate::support::proxy::start(&[&m]);
    assert_eq!(call(first.addr, "GET", "/healthz", &[], b"").status, 200);
    let first_addr = first.addr;
    first.server.stop();
    eventually("the stopped server closes its listener", || std::net::TcpStream::connect(first_addr).is_err());
    drop(first); // joins its front thread: returns once it has drained
    assert_eq!(call(second.addr, "GET", "/healthz", &[], b"").status, 200, "the other server still serves");
}
