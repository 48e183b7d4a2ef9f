//! One proxied request: try the instances in the balancer's order, retrying on transient failures, then hand
//! the chosen answer to `stream`; or, when every attempt failed, answer with the fallback error JSON that lists
//! the attempts.
//!
//! What is retried: 429, 500, 502, 503, 504, and 401/403/404 (an auth or missing-deployment error on one
//! instance may succeed on another), plus connection, DNS and TLS errors and timeouts before the response head.
//! Once the head has been written to the client nothing is retried: the client sees the stream or an error.

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use ureq::http::header::HeaderMap;
use ureq::http::{self, Method};

use crate::balancer::{Observation, Plan};
use crate::exchange::{respond_error, respond_json, Exchange, Relayed};
use crate::http::write::{self, Persist};
use crate::http::ClientStream;
use crate::state::State;
use crate::stream::{stream_response, Tally};
use crate::upstream::{self, classify, error_snippet, retry_after, FailureKind, Outgoing};

const INVALID: &str = "invalid_request_error";

const RETRYABLE: &[u16] = &[429, 500, 502, 503, 504, 401, 403, 404];

/// How one attempt ended (for logs and the fallback body).
#[derive(Debug, Clone)]
pub struct Attempt {
    pub instance: String,
    pub outcome: Outcome,
    pub elapsed: Duration,
}

#[derive(Debug, Clone)]
pub enum Outcome {
    Status { status: u16, retry_after: Option<Duration> },
    Failed { kind: FailureKind, detail: String },
}

/// Runs the attempts and writes the answer to `client`. Never fails: every outcome becomes a response (or, if
/// the client is gone, a note in the access log).
pub fn relay(state: &State, ex: &Exchange, client: &mut ClientStream, persist: Persist) -> Relayed {
    let rid = ex.request_id;
    let method = match Method::from_bytes(ex.head.method.as_bytes()) {
        Ok(m) => m,
        Err(_) => return respond_error(client, rid, 400, INVALID, "invalid method", &[], persist),
    };
    let headers = match upstream::forward_headers(state, ex) {
        Ok(h) => h,
        Err(name) => {
            let msg = format!("header {name} cannot be forwarded");
            return respond_error(client, rid, 400, INVALID, &msg, &[], persist);
        }
    };
    let instances = &state.config.instances;
    let deployment = ex.deployment.as_deref();
    let order = match state.balancer.plan(|i| upstream::eligible(&instances[i], deployment)) {
        Plan::Try(order) => order,
        Plan::NoneEligible => {
            let msg = format!("no instance serves deployment {:?}", deployment.unwrap_or_default());
            return respond_error(client, rid, 404, "not_found_error", &msg, &[], persist);
        }
        Plan::NoneAvailable { retry_after, all_cooling } => {
            return unavailable(client, rid, retry_after, all_cooling, persist);
        }
    };
    let run = Run { state, ex, method, headers, total: order.len() };
    let started = Instant::now();
    let mut attempts: Vec<Attempt> = Vec::new();
    for (n, &idx) in order.iter().enumerate() {
        if let Some(deadline) = state.config.routing.attempt_deadline.filter(|d| n > 0 && started.elapsed() >= *d) {
            log::warn!("{rid} attempt_deadline_ms={} reached after {n} attempt(s)", deadline.as_millis());
            break;
        }
        // It may have started cooling down, or be half-open with its one probe taken, since the plan was made.
        if !state.balancer.acquire(idx) {
            continue;
        }
        match run.attempt(idx, n + 1, &mut attempts) {
            Step::Next => {}
            Step::Answer(resp) => return run.deliver(resp, idx, attempts.len() + 1, client, persist),
            Step::Unsendable(msg) => return respond_error(client, rid, 400, INVALID, &msg, &[], persist),
        }
    }
    if attempts.is_empty() {
        // Every planned instance became unavailable before its attempt could start.
        return unavailable(client, rid, Duration::from_secs(1), false, persist);
    }
    fallback(client, ex, &attempts, persist)
}

/// What is the same for every attempt of one request.
struct Run<'a> {
    state: &'a State,
    ex: &'a Exchange<'a>,
    method: Method,
    headers: HeaderMap,
    total: usize,
}

/// What one attempt came to.
enum Step {
    /// Failed or answered with a retryable status (recorded): try the next instance.
    Next,
    /// The answer to relay.
    Answer(http::Response<ureq::Body>),
    /// The request cannot be put on the wire at all (the same on every instance).
    Unsendable(String),
}

impl Run<'_> {
    /// Sends the request to instance `idx` (the `nth` attempt) and sorts out what came back.
    fn attempt(&self, idx: usize, nth: usize, attempts: &mut Vec<Attempt>) -> Step {
        let (state, ex, rid, total) = (self.state, self.ex, self.ex.request_id, self.total);
        let inst = &state.config.instances[idx];
        let target = upstream::target_for(inst, &ex.head.target, self.ex.deployment.as_deref());
        let body = upstream::body_for(inst, ex.head, ex.body, self.ex.deployment.as_deref());
        if !attempts.is_empty() {
            state.metrics.retries.fetch_add(1, Ordering::Relaxed);
        }
        let t0 = Instant::now();
        let credential = match state.credential(idx) {
            Ok(c) => c,
            Err(why) => {
                // No token for this instance's identity: the next instance may have one.
                self.failed(idx, nth, t0.elapsed(), FailureKind::Auth, why, attempts);
                return Step::Next;
            }
        };
        let out = Outgoing {
            method: &self.method,
            headers: &self.headers,
            target: &target,
            body: &body,
            framing: ex.framing,
            credential: &credential,
        };
        let result = upstream::send(state, idx, out);
        let elapsed = t0.elapsed();
        match result {
            Ok(resp) if resp.status().is_informational() => {
                // ureq consumes 100 and 103 itself; what reaches here is an unsolicited 101 (or a 1xx it let
                // through): the proxy never asked to switch protocols, and a bare 1xx is no answer to relay.
                let detail =
                    format!("unexpected {} {}", resp.status().as_u16(), resp.status().canonical_reason().unwrap_or(""));
                self.failed(idx, nth, elapsed, FailureKind::Protocol, detail, attempts);
                Step::Next
            }
            Ok(resp) => {
                let status = resp.status().as_u16();
                state.metrics.attempt(&inst.name, status_class(status), elapsed);
                if status == 401 {
                    if let Some(cell) = state.tokens.for_instance(idx) {
                        cell.rejected(&credential.1);
                    }
                }
                // Only a status that can be retried (429 and 503 among them) makes use of it.
                let retry_after = if RETRYABLE.contains(&status) { retry_after(resp.headers()) } else { None };
                state.balancer.observe(idx, Observation::Answered { status, retry_after });
                let last = nth == total;
                if !RETRYABLE.contains(&status) || (last && is_unanimous_client_error(status, attempts)) {
                    return Step::Answer(resp);
                }
                let secrets = state.secrets_for(idx);
                let snippet = state.error_excerpt(&secrets, error_snippet(resp, state.error_read_bytes(&secrets)));
                log::warn!(
                    "{rid} attempt {nth}/{total} instance={} status={status} elapsed_ms={} body={snippet:?}",
                    inst.name,
                    elapsed.as_millis(),
                );
                let outcome = Outcome::Status { status, retry_after };
                attempts.push(Attempt { instance: inst.name.clone(), outcome, elapsed });
                Step::Next
            }
            Err(e) => {
                let (kind, detail) = classify(&e);
                let detail = state.secrets_for(idx).redact(&detail);
                if kind == FailureKind::Request {
                    // The same request would fail the same way on every instance, and none of them is to blame.
                    state.balancer.release(idx);
                    state.metrics.attempts_not_sent.fetch_add(1, Ordering::Relaxed);
                    log::warn!("{rid} request cannot be sent upstream: {detail}");
                    return Step::Unsendable(format!("the request cannot be forwarded: {detail}"));
                }
                self.failed(idx, nth, elapsed, kind, detail, attempts);
                Step::Next
            }
        }
    }

    /// Logs and records a failed attempt. Only a failure that says something about the instance counts against
    /// its circuit and in its attempt metrics; running out of descriptors here is not the instance's fault.
    fn failed(
        &self,
        idx: usize,
        nth: usize,
        elapsed: Duration,
        kind: FailureKind,
        detail: String,
        attempts: &mut Vec<Attempt>,
    ) {
        let state = self.state;
        let name = &state.config.instances[idx].name;
        if kind.is_instance_fault() {
            state.metrics.attempt(name, kind.label(), elapsed);
            state.balancer.observe(idx, Observation::Unreachable);
        } else if kind == FailureKind::Auth {
            // The identity's fault, not the instance's: no circuit (token requests back off on their own, and
            // the instance is skipped at once while there is no token).
            state.metrics.attempt(name, kind.label(), elapsed);
            state.balancer.release(idx);
        } else {
            state.metrics.attempts_not_sent.fetch_add(1, Ordering::Relaxed);
            state.balancer.release(idx);
        }
        let (rid, total) = (self.ex.request_id, self.total);
        log::warn!(
            "{rid} attempt {nth}/{total} instance={name} error={kind:?} elapsed_ms={} detail={detail:?}",
            elapsed.as_millis()
        );
        attempts.push(Attempt { instance: name.clone(), outcome: Outcome::Failed { kind, detail }, elapsed });
    }

    /// Relays instance `idx`'s answer to the client.
    fn deliver(
        &self,
        resp: http::Response<ureq::Body>,
        idx: usize,
        attempts: usize,
        client: &mut ClientStream,
        persist: Persist,
    ) -> Relayed {
        let state = self.state;
        let inst = &state.config.instances[idx];
        let secrets = state.secrets_for(idx);
        let tally = Tally {
            metrics: &state.metrics,
            instance: &inst.name,
            deployment: self.ex.deployment.as_deref(),
            started: self.ex.started,
            write_limit: state.config.client_write_timeout,
            secrets: &secrets,
            caller: self.ex.caller,
        };
        let mut relayed = stream_response(resp, self.ex, client, persist, tally);
        relayed.instance = Some(inst.name.clone());
        relayed.attempts = attempts;
        relayed
    }
}

/// Nothing can take the request now: 429 when every instance is cooling down after throttling (the client should
/// wait as Azure asked), 503 when circuits are open; `Retry-After` says when the first one is back. No instance
/// is called: answering at once beats a round trip that is known to fail.
fn unavailable(
    client: &mut ClientStream,
    rid: &str,
    retry_after: Duration,
    all_cooling: bool,
    persist: Persist,
) -> Relayed {
    let secs = retry_after.as_secs() + u64::from(retry_after.subsec_nanos() > 0);
    let secs = secs.max(1).to_string();
    let (status, kind, code, message) = if all_cooling {
        (
            429,
            "rate_limit_error",
            "all_instances_cooling_down",
            "every instance is throttled; retry after the time given",
        )
    } else {
        (
            503,
            "upstream_unavailable",
            "no_instance_available",
            "no instance is available now; retry after the time given",
        )
    };
    let mut body = write::error_json(message, kind, code, rid);
    body["error"]["attempts"] = serde_json::Value::Array(Vec::new());
    log::warn!("{rid} no instance available; answering {status} with Retry-After {secs}");
    respond_json(client, rid, status, &body, &[("Retry-After", &secs)], persist)
}

/// The outcome label of an attempt that got an answer.
fn status_class(status: u16) -> &'static str {
    match status {
        429 => "429",
        200..=299 => "2xx",
        300..=399 => "3xx",
        400..=499 => "4xx",
        500..=599 => "5xx",
        _ => "other",
    }
}

/// When every instance gave the same 401, 403 or 404, that answer is the truth about the request (a deployment
/// that exists nowhere, a key rejected everywhere): the client gets Azure's own response rather than a 502.
fn is_unanimous_client_error(status: u16, earlier: &[Attempt]) -> bool {
    matches!(status, 401 | 403 | 404)
        && earlier.iter().all(|a| matches!(a.outcome, Outcome::Status { status: s, .. } if s == status))
}

/// Every attempt failed: 429 with the shortest `Retry-After` when all were throttled, 504 when the last failure
/// was a timeout, 502 otherwise. The body names instances and outcomes, never a key.
fn fallback(client: &mut ClientStream, ex: &Exchange, attempts: &[Attempt], persist: Persist) -> Relayed {
    let all_throttled =
        !attempts.is_empty() && attempts.iter().all(|a| matches!(a.outcome, Outcome::Status { status: 429, .. }));
    let last_timeout =
        attempts.last().is_some_and(|a| matches!(a.outcome, Outcome::Failed { kind: FailureKind::Timeout, .. }));
    let (status, kind, code, message) = if all_throttled {
        (429, "rate_limit_error", "all_instances_throttled", "every instance is throttling requests; retry later")
    } else if last_timeout {
        (504, "upstream_timeout", "upstream_timeout", "no instance answered in time")
    } else {
        (502, "upstream_error", "all_instances_failed", "no instance could serve the request")
    };
    let listed: Vec<serde_json::Value> = attempts
        .iter()
        .map(|a| {
            let mut v = serde_json::json!({ "instance": a.instance, "elapsed_ms": a.elapsed.as_millis() as u64 });
            match &a.outcome {
                Outcome::Status { status, .. } => v["status"] = (*status).into(),
                Outcome::Failed { kind, detail } => {
                    v["error"] = detail.as_str().into();
                    v["kind"] = kind.label().into();
                }
            }
            v
        })
        .collect();
    let mut body = write::error_json(message, kind, code, ex.request_id);
    body["error"]["attempts"] = listed.into();
    let retry_secs = attempts
        .iter()
        .filter_map(|a| match a.outcome {
            Outcome::Status { retry_after, .. } => retry_after,
            _ => None,
        })
        .min()
        .map(|d| d.as_secs() + u64::from(d.subsec_nanos() > 0))
        .unwrap_or(1)
        .max(1)
        .to_string();
    let extra: &[(&str, &str)] = if status == 429 { &[("Retry-After", &retry_secs)] } else { &[] };
    log::warn!("{} all {} attempts failed; answering {status}", ex.request_id, attempts.len());
    let mut relayed = respond_json(client, ex.request_id, status, &body, extra, persist);
    relayed.attempts = attempts.len();
    relayed
}
