//! The admin endpoints: `/healthz` (the process serves), `/readyz` (at least one instance can take a request now)
//! and `/metrics` (Prometheus text format). They need no client key. Each can be turned off with
//! `admin_endpoints`, and all can be moved off the proxy port to `admin_listen`, which serves nothing else.

use std::io::{self, Read};
use std::net::{TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use crate::balancer::Unavailable;
use crate::http::parse::parse_head;
use crate::http::write::{self, Persist};
use crate::metrics::Gauges;
use crate::request_id;
use crate::state::{Shared, State};
use crate::sys;

/// A ready answer: status, content type, body.
pub struct Answer {
    pub status: u16,
    pub content_type: &'static str,
    pub body: Vec<u8>,
}

/// The answer for an admin route, or None when `path` is not an enabled admin endpoint.
pub fn answer(state: &State, method: &str, path: &str) -> Option<Answer> {
    let name = path.strip_prefix('/')?;
    if method != "GET" || !state.config.admin_endpoints.iter().any(|e| e == name) {
        return None;
    }
    let json = |status, v: serde_json::Value| Answer {
        status,
        content_type: "application/json",
        body: serde_json::to_vec(&v).unwrap_or_default(),
    };
    match name {
        "healthz" => Some(json(200, serde_json::json!({"status": "ok"}))),
        "readyz" => {
            let (status, body) = readiness(state);
            Some(json(status, body))
        }
        "metrics" => Some(Answer {
            status: 200,
            content_type: "text/plain; version=0.0.4; charset=utf-8",
            body: scrape(state).into_bytes(),
        }),
        _ => None,
    }
}

fn scrape(state: &State) -> String {
    let m = &state.metrics;
    let gauges = Gauges {
        blocked_clients: state.guard.blocked_clients(),
        instances: state.balancer.snapshot().into_iter().map(|(n, why)| (n, why.is_none())).collect(),
    };
    let mut text = m.render(&gauges);
    state.agents.dns.metrics().render(&mut text);
    state.tokens.render(&mut text);
    text
}

/// 200 while at least one instance can take a request now, else 503 with each instance's state (and each
/// Entra ID identity's token state). An instance whose identity has no token and whose last token request
/// failed is `no_token`.
fn readiness(state: &State) -> (u16, serde_json::Value) {
    // `failing` is only ever the state of an identity with no valid token.
    let no_token = |i: usize| state.tokens.for_instance(i).is_some_and(|c| c.status().state == "failing");
    let instances: Vec<serde_json::Value> = state
        .balancer
        .snapshot()
        .into_iter()
        .enumerate()
        .map(|(i, (name, why))| match why {
            None if no_token(i) => serde_json::json!({"name": name, "state": "no_token"}),
            None => serde_json::json!({"name": name, "state": "available"}),
            Some(Unavailable::CoolingDown(d)) => {
                serde_json::json!({"name": name, "state": "cooling_down", "retry_after_ms": d.as_millis() as u64})
            }
            Some(Unavailable::CircuitOpen(d)) => {
                serde_json::json!({"name": name, "state": "circuit_open", "retry_after_ms": d.as_millis() as u64})
            }
        })
        .collect();
    let ready = instances.iter().any(|i| i["state"] == "available");
    let mut body = if ready {
        serde_json::json!({"status": "ready", "instances": instances})
    } else {
        serde_json::json!({"status": "unavailable", "reason": "every instance is cooling down, has its circuit open or has no token", "instances": instances})
    };
    let identities = state.tokens.readiness();
    if !identities.is_empty() {
        body["identities"] = serde_json::Value::Array(identities);
    }
    (if ready { 200 } else { 503 }, body)
}

/// How often the admin thread looks whether its server has stopped.
const STOP_CHECK: Duration = Duration::from_millis(250);

/// Serves the admin endpoints on their own listener: one thread, one request per connection, short timeouts.
/// Admin traffic is a probe every few seconds; it never competes with the proxy's workers. Returns, closing the
/// listener, once the server has stopped (an embedding program may bind the address again).
pub fn serve_admin(listener: TcpListener, shared: Arc<Shared>) {
    let mut waiting = [libc::pollfd { fd: listener.as_raw_fd(), events: libc::POLLIN, revents: 0 }];
    if let Err(e) = listener.set_nonblocking(true) {
        log::error!("admin_listen: cannot set up the listener ({e}); the admin endpoints are not served there");
        return;
    }
    let stop_check_ms = STOP_CHECK.as_millis() as i32;
    while !shared.stopped.load(Ordering::Acquire) {
        if !matches!(sys::poll(&mut waiting, stop_check_ms), Ok(n) if n > 0) {
            continue;
        }
        match listener.accept() {
            Ok((stream, _)) => serve_one(stream, &shared),
            Err(e) if matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted) => {}
            Err(e) => {
                // Out of descriptors, most likely: a pause, not a busy loop.
                log::warn!("admin_listen: accept failed: {e}");
                std::thread::sleep(STOP_CHECK);
            }
        }
    }
}

/// Reads one request head (2 s at most) and answers it; the connection is closed after.
fn serve_one(mut stream: TcpStream, shared: &Shared) {
    // Linux does not pass the listener's O_NONBLOCK on to accepted sockets; the timeouts below need blocking mode.
    let _ = stream.set_nonblocking(false);
    let _ = stream.set_read_timeout(Some(Duration::from_secs(2)));
    let _ = stream.set_write_timeout(Some(Duration::from_secs(2)));
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    let head = loop {
        match stream.read(&mut chunk) {
            Ok(0) | Err(_) => break None,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
        match parse_head(&buf, 8192, 64) {
            Ok(Some(head)) => break Some(head),
            Ok(None) => continue,
            Err(_) => break None,
        }
    };
    let Some(head) = head else { return };
    let state = shared.state();
    let rid = request_id::accept_or_generate(None);
    let answer = answer(&state, &head.method, head.path()).unwrap_or(Answer {
        status: 404,
        content_type: "application/json",
        body: br#"{"error":{"message":"not an admin endpoint","type":"not_found_error","code":"404"}}"#.to_vec(),
    });
    let _ =
        write::write_small(&mut stream, answer.status, &rid, answer.content_type, &answer.body, &[], Persist::Close);
}
