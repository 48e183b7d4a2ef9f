//! A worker's handling of one request, top to bottom: validate the head, answer local routes, check the client
//! (`guard`), read the body, `relay` it, write the access log line, and decide whether the connection can carry
//! another request. Everything here runs on a worker thread with a blocking socket.

use std::io::Write;
use std::net::IpAddr;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use crate::access_log;
use crate::admin;
use crate::client_ip;
use crate::config::ClientKey;
use crate::exchange::{respond_bytes, respond_error, Caller, Exchange, Relayed};
use crate::guard::{self, Verdict};
use crate::http::body::{self, BodyError};
use crate::http::parse::{Framing, FramingError, Head};
use crate::http::target::{self, TargetError};
use crate::http::write::Persist;
use crate::http::Conn;
use crate::metrics;
use crate::rejection::{self, Rejection};
use crate::relay;
use crate::request_id;
use crate::state::State;
use crate::upstream;

/// Serves the request whose head is `head` (already consumed from `conn.buf`). Returns the connection when it
/// may carry another request, `None` when it must be closed.
/// While `draining`, every answer says `Connection: close` and the connection is not kept.
pub fn serve(state: &State, mut conn: Conn, head: Head, draining: bool) -> Option<Conn> {
    let started = Instant::now();
    let rid = request_id::accept_or_generate(head.header("x-request-id"));
    let wants_keep_alive = head.wants_keep_alive() && !draining;
    let http10 = head.minor_version == 0;
    let persist = if wants_keep_alive { Persist::KeepAlive { http10 } } else { Persist::Close };

    let client = client_of(state, &conn, &head);
    state.metrics.in_flight.fetch_add(1, Ordering::Relaxed);
    let (relayed, caller) = handle(state, &mut conn, &head, &rid, client, persist, started);
    state.metrics.in_flight.fetch_sub(1, Ordering::Relaxed);
    record(state, &head, &rid, client, caller.name, &relayed, started.elapsed());
    if relayed.reusable && wants_keep_alive {
        Some(conn)
    } else {
        None
    }
}

/// The client's address: the peer, or the last untrusted `X-Forwarded-For` hop behind `trusted_proxies`.
fn client_of(state: &State, conn: &Conn, head: &Head) -> IpAddr {
    let forwarded = head.headers.iter().filter(|(n, _)| n == "x-forwarded-for").map(|(_, v)| v.as_slice());
    client_ip::client_ip(conn.peer.ip(), forwarded, &state.config.trusted_proxies)
}

/// Counts an answered request and writes its access line.
fn record(state: &State, head: &Head, rid: &str, client: IpAddr, client_name: &str, relayed: &Relayed, took: Duration) {
    state.metrics.request(metrics::route_class(head.path()), relayed.status, client_name, took);
    let entry = access_log::Entry {
        request_id: rid,
        client,
        client_name,
        method: &head.method,
        path: head.path(),
        status: relayed.status,
        instance: relayed.instance.as_deref(),
        attempts: relayed.attempts,
        duration: took,
        bytes: relayed.bytes,
        note: relayed.note,
    };
    access_log::write(&entry, state.config.access_log_json);
}

/// Answers the request; also says who sent it, as far as the key check got.
fn handle<'s>(
    state: &'s State,
    conn: &mut Conn,
    head: &Head,
    rid: &str,
    client: IpAddr,
    persist: Persist,
    started: Instant,
) -> (Relayed, Caller<'s>) {
    let max_body = state.config.max_body_bytes;
    let framing = match Framing::of(head, max_body) {
        Ok(f) => f,
        Err(e) => {
            if let FramingError::TooLarge(n) = e {
                log::warn!("{rid} body of {n} bytes refused (max_body_bytes={max_body})");
            }
            let refused = rejection::from_framing(e, max_body).respond(&mut conn.stream, rid, Persist::Close);
            return (refused, Caller::UNKNOWN);
        }
    };
    // Until the body has been read, an early answer must close the connection: unread body bytes would
    // otherwise be taken for the next request.
    let unread = if matches!(framing, Framing::None | Framing::Length(0)) { persist } else { Persist::Close };
    let mut caller = Caller::UNKNOWN;
    let relayed = match admit(state, conn, head, rid, client, framing, &mut caller) {
        Ok(Admitted::Local(a)) => respond_bytes(&mut conn.stream, rid, a.status, a.content_type, &a.body, &[], unread),
        Ok(Admitted::Proxy { body, deployment }) => {
            let ex = Exchange { head, framing, body: &body, request_id: rid, started, deployment, caller };
            relay::relay(state, &ex, &mut conn.stream, persist)
        }
        Err(Some(refusal)) => {
            let then = if refusal.after_body() { persist } else { unread };
            refusal.respond(&mut conn.stream, rid, then)
        }
        Err(None) => {
            Relayed { status: 499, instance: None, attempts: 0, bytes: 0, reusable: false, note: Some("client_gone") }
        }
    };
    (relayed, caller)
}

/// What an admitted request is: a local route's answer, or a request to relay with its whole body and the
/// deployment it names.
enum Admitted {
    Local(admin::Answer),
    Proxy { body: Vec<u8>, deployment: Option<String> },
}

/// The checks in order: target, `Host`, local routes, `/openai/`, the client's key, `Expect`, the body, then
/// the key's deployment allowlist and rate limits. `caller` is set once the key is known.
/// `Err(None)`: the client went away while sending the body (nothing to answer).
fn admit<'s>(
    state: &'s State,
    conn: &mut Conn,
    head: &Head,
    rid: &str,
    client: IpAddr,
    framing: Framing,
    caller: &mut Caller<'s>,
) -> Result<Admitted, Option<Rejection>> {
    let cfg = &state.config;
    // Checked before anything else looks at the path: what passes can be forwarded byte for byte, and nothing
    // that an upstream could resolve outside /openai/ passes (see http::target).
    let target_ok =
        if head.method == "CONNECT" { Err(TargetError::NotOriginForm) } else { target::check(&head.target) };
    target_ok
        .inspect_err(|why| log::info!("{rid} request target refused: {}", why.message()))
        .map_err(Rejection::Target)?;
    head.check_host().map_err(Rejection::Host)?;
    let path = head.path();
    if cfg.admin_listen.is_none() {
        if let Some(a) = admin::answer(state, &head.method, path) {
            return Ok(Admitted::Local(a));
        }
    }
    if !path.starts_with("/openai/") {
        return Err(Rejection::NotFound.into());
    }
    let keys = guard::presented_keys(head, &cfg.client_header_name).map_err(|_| {
        log::warn!(
            "{rid} two different client keys from {client} (header {} and Authorization)",
            cfg.client_header_name
        );
        Rejection::TwoKeys
    })?;
    let verdict = state.guard.check(client, &keys);
    if verdict == Verdict::BadKey {
        log::warn!("{rid} invalid client key from {client}");
    }
    rejection::from_verdict(verdict, &cfg.client_header_name)?;
    let key = match verdict {
        Verdict::Allowed { key: Some(i) } => {
            *caller = Caller { name: &cfg.client_keys[i].name, quota: state.quotas.get(i) };
            Some(&cfg.client_keys[i])
        }
        _ => None,
    };
    if let Some(expect) = head.header("expect") {
        if !expect.eq_ignore_ascii_case(b"100-continue") {
            return Err(Rejection::Expectation.into());
        }
        // Only now, after the key check: a rejected client never gets to send its body.
        let has_body = !matches!(framing, Framing::None | Framing::Length(0));
        if has_body && head.minor_version == 1 && conn.buf.is_empty() {
            let _ = conn.stream.write_all(b"HTTP/1.1 100 Continue\r\n\r\n");
        }
    }
    let body = body::read_body(conn, framing, cfg.max_body_bytes).map_err(|e| {
        match &e {
            BodyError::TooLarge => log::warn!("{rid} chunked body over max_body_bytes={}", cfg.max_body_bytes),
            BodyError::Closed | BodyError::Io(_) if !e.is_timeout() => {
                log::info!("{rid} client left while sending the body: {e:?}")
            }
            _ => {}
        }
        rejection::from_body_error(e, cfg.max_body_bytes)
    })?;
    let deployment = upstream::requested_deployment(head, &body);
    within_key_limits(key, *caller, deployment.as_deref(), &body, rid)?;
    Ok(Admitted::Proxy { body, deployment })
}

/// The client key's own limits, checked once the body is read: its `deployments` allowlist (403), then its rate
/// limits (429; a request refused for its deployment takes nothing from them).
fn within_key_limits(
    key: Option<&ClientKey>,
    caller: Caller,
    deployment: Option<&str>,
    body: &[u8],
    rid: &str,
) -> Result<(), Rejection> {
    if let Some(allowed) = key.and_then(|k| k.deployments.as_ref()) {
        // A request that names no deployment is let through only when it has no body (listing models, reading
        // a file): a body whose deployment cannot be read (a multipart upload) could name any.
        let permitted = match deployment {
            Some(d) => allowed.contains(d),
            None => body.is_empty(),
        };
        if !permitted {
            log::info!("{rid} client key {} may not use deployment {:?}", caller.name, deployment.unwrap_or("-"));
            return Err(Rejection::DeploymentNotAllowed { deployment: deployment.map(str::to_string) });
        }
    }
    if let Some(quota) = caller.quota {
        quota.admit().map_err(|limited| {
            log::info!("{rid} client key {} over its limit: {limited:?}", caller.name);
            Rejection::ClientLimit(limited)
        })?;
    }
    Ok(())
}

/// Why a request was turned away for lack of a worker.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Busy {
    /// Every worker busy and the queue full when the head arrived.
    QueueFull,
    /// Waited `queue_timeout` in the queue (never served late).
    QueueTimeout,
}

/// A request no worker can take: 503 + `Retry-After`, the connection closed (its body, if any, was never read),
/// counted as shed, and logged like every other request (a WARN line and its access line).
pub fn refuse_busy(state: &State, mut conn: Conn, head: &Head, queued_at: Instant, why: Busy) {
    state.metrics.shed.fetch_add(1, Ordering::Relaxed);
    let rid = request_id::accept_or_generate(head.header("x-request-id"));
    let workers = state.config.workers;
    let note = match why {
        Busy::QueueFull => {
            log::warn!("{rid} all {workers} workers busy and the queue full; answering 503");
            "queue_full"
        }
        Busy::QueueTimeout => {
            let waited = state.config.queue_timeout.as_millis();
            log::warn!("{rid} all {workers} workers busy for queue_timeout_ms={waited}; answering 503");
            "queue_timeout"
        }
    };
    let msg = "every worker is busy; retry shortly";
    let mut relayed =
        respond_error(&mut conn.stream, &rid, 503, "server_error", msg, &[("Retry-After", "1")], Persist::Close);
    let _ = conn.stream.tcp().shutdown(std::net::Shutdown::Write);
    relayed.note = Some(note);
    let client = client_of(state, &conn, head);
    record(state, head, &rid, client, Caller::UNKNOWN.name, &relayed, queued_at.elapsed());
}
