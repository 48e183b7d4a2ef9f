//! A worker's handling of one request, top to bottom: validate the head, answer local routes, check the client
//! (`guard`), read the body, `relay` it, write the access log line, and decide whether the connection can carry
//! another request. Everything here runs on a worker thread with a blocking socket.

use std::io::Write;
use std::net::IpAddr;
use std::sync::atomic::Ordering;
use std::time::Instant;

use crate::access_log;
use crate::admin;
use crate::client_ip;
use crate::guard::Verdict;
use crate::http::body::{self, BodyError};
use crate::http::parse::{Framing, FramingError, Head};
use crate::http::target;
use crate::http::write::Persist;
use crate::http::Conn;
use crate::metrics;
use crate::relay::{self, Exchange, Relayed};
use crate::request_id;
use crate::state::State;

/// Serves the request whose head is `head` (already consumed from `conn.buf`). Returns the connection when it
/// may carry another request, `None` when it must be closed.
/// While `draining`, every answer says `Connection: close` and the connection is not kept.
pub fn serve(state: &State, mut conn: Conn, head: Head, draining: bool) -> Option<Conn> {
    let started = Instant::now();
    let rid = request_id::accept_or_generate(head.header("x-request-id"));
    let wants_keep_alive = head.wants_keep_alive() && !draining;
    let http10 = head.minor_version == 0;
    let persist = if wants_keep_alive { Persist::KeepAlive { http10 } } else { Persist::Close };

    let forwarded = head.headers.iter().filter(|(n, _)| n == "x-forwarded-for").map(|(_, v)| v.as_slice());
    let client = client_ip::client_ip(conn.peer.ip(), forwarded, &state.config.trusted_proxies);
    state.metrics.in_flight.fetch_add(1, Ordering::Relaxed);
    let relayed = handle(state, &mut conn, &head, &rid, client, persist, started);
    state.metrics.in_flight.fetch_sub(1, Ordering::Relaxed);
    let took = started.elapsed();
    state.metrics.request(metrics::route_class(head.path()), relayed.status, took);
    let entry = access_log::Entry {
        request_id: &rid,
        client,
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
    if relayed.reusable && wants_keep_alive {
        Some(conn)
    } else {
        None
    }
}

fn handle(
    state: &State,
    conn: &mut Conn,
    head: &Head,
    rid: &str,
    client: IpAddr,
    persist: Persist,
    started: Instant,
) -> Relayed {
    let cfg = &state.config;
    // Until the body has been read, an early answer must close the connection: unread body bytes would
    // otherwise be taken for the next request.
    let framing = match Framing::of(head, cfg.max_body_bytes) {
        Ok(f) => f,
        Err(FramingError::Bad(why)) => {
            return relay::respond_error(&mut conn.stream, rid, 400, "invalid_request_error", why, &[], Persist::Close)
        }
        Err(FramingError::Unsupported(te)) => {
            let msg = format!("unsupported transfer-encoding {te:?}; only chunked is accepted");
            return relay::respond_error(
                &mut conn.stream,
                rid,
                501,
                "invalid_request_error",
                &msg,
                &[],
                Persist::Close,
            );
        }
        Err(FramingError::TooLarge(n)) => {
            log::warn!("{rid} body of {n} bytes refused (max_body_bytes={})", cfg.max_body_bytes);
            return too_large(conn, rid, cfg.max_body_bytes);
        }
    };
    let has_body = !matches!(framing, Framing::None | Framing::Length(0));
    let early = if has_body { Persist::Close } else { persist };

    // Checked before anything else looks at the path: what passes can be forwarded byte for byte, and nothing
    // that an upstream could resolve outside /openai/ passes (see http::target).
    let target_ok =
        if head.method == "CONNECT" { Err(target::TargetError::NotOriginForm) } else { target::check(&head.target) };
    if let Err(why) = target_ok {
        log::info!("{rid} request target refused: {}", why.message());
        return relay::respond_error(
            &mut conn.stream,
            rid,
            why.status(),
            "invalid_request_error",
            why.message(),
            &[],
            Persist::Close,
        );
    }
    if let Err(why) = head.check_host() {
        return relay::respond_error(&mut conn.stream, rid, 400, "invalid_request_error", why, &[], Persist::Close);
    }
    let path = head.path();
    if state.config.admin_listen.is_none() {
        if let Some(a) = admin::answer(state, &head.method, path) {
            return relay::respond_bytes(&mut conn.stream, rid, a.status, a.content_type, &a.body, &[], early);
        }
    }
    if !path.starts_with("/openai/") {
        return relay::respond_error(
            &mut conn.stream,
            rid,
            404,
            "not_found_error",
            "not found: only /openai/ routes are proxied",
            &[],
            early,
        );
    }

    match state.guard.check(client, head.header(&cfg.client_header_name)) {
        Verdict::Allowed => {}
        Verdict::Blocked { retry_after_secs } => {
            let secs = retry_after_secs.to_string();
            let msg = "too many invalid keys from this address; blocked for now";
            return relay::respond_error(
                &mut conn.stream,
                rid,
                403,
                "permission_error",
                msg,
                &[("Retry-After", &secs)],
                Persist::Close,
            );
        }
        Verdict::MissingKey => {
            let msg = format!("missing client key in header {}", cfg.client_header_name);
            return relay::respond_error(&mut conn.stream, rid, 401, "authentication_error", &msg, &[], early);
        }
        Verdict::BadKey => {
            log::warn!("{rid} invalid client key from {client}");
            return relay::respond_error(
                &mut conn.stream,
                rid,
                401,
                "authentication_error",
                "invalid client key",
                &[],
                early,
            );
        }
    }

    if let Some(expect) = head.header("expect") {
        if !expect.eq_ignore_ascii_case(b"100-continue") {
            return relay::respond_error(
                &mut conn.stream,
                rid,
                417,
                "invalid_request_error",
                "unsupported Expect value",
                &[],
                Persist::Close,
            );
        }
        // Only now, after the key check: a rejected client never gets to send its body.
        if has_body && head.minor_version == 1 && conn.buf.is_empty() {
            let _ = conn.stream.write_all(b"HTTP/1.1 100 Continue\r\n\r\n");
        }
    }

    let body = match body::read_body(conn, framing, cfg.max_body_bytes) {
        Ok(b) => b,
        Err(BodyError::TooLarge) => {
            log::warn!("{rid} chunked body over max_body_bytes={}", cfg.max_body_bytes);
            return too_large(conn, rid, cfg.max_body_bytes);
        }
        Err(BodyError::Malformed(why)) => {
            return relay::respond_error(&mut conn.stream, rid, 400, "invalid_request_error", why, &[], Persist::Close)
        }
        Err(e) if e.is_timeout() => {
            let msg = "request body not received in time";
            return relay::respond_error(&mut conn.stream, rid, 408, "invalid_request_error", msg, &[], Persist::Close);
        }
        Err(e) => {
            log::info!("{rid} client left while sending the body: {e:?}");
            return Relayed {
                status: 499,
                instance: None,
                attempts: 0,
                bytes: 0,
                reusable: false,
                note: Some("client_gone"),
            };
        }
    };

    let ex = Exchange { head, framing, body: &body, request_id: rid, started };
    relay::relay(state, &ex, &mut conn.stream, persist)
}

/// A request that waited in the queue longer than `queue_timeout` (every worker busy): 503 + `Retry-After`, and
/// the connection closes (its body, if any, was never read). Never served late.
pub fn refuse_queued(state: &State, mut conn: Conn, head: &Head) {
    state.metrics.shed.fetch_add(1, Ordering::Relaxed);
    let rid = request_id::accept_or_generate(head.header("x-request-id"));
    let waited = state.config.queue_timeout.as_millis();
    log::warn!("{rid} all {} workers busy for queue_timeout_ms={waited}; answering 503", state.config.workers);
    let msg = "every worker is busy; retry shortly";
    let _ =
        relay::respond_error(&mut conn.stream, &rid, 503, "server_error", msg, &[("Retry-After", "1")], Persist::Close);
    let _ = conn.stream.tcp().shutdown(std::net::Shutdown::Write);
}

/// 413, and the connection closes: the rest of the body is never read.
fn too_large(conn: &mut Conn, rid: &str, max: u64) -> Relayed {
    let msg = format!("request body larger than {max} bytes");
    relay::respond_error(&mut conn.stream, rid, 413, "invalid_request_error", &msg, &[], Persist::Close)
}
