//! One proxied request: try the instances in the balancer's order, retrying on transient failures, then copy
//! the chosen upstream response to the client as it arrives; or, when every attempt failed, answer with the
//! fallback error JSON that lists the attempts.
//!
//! What is retried: 429, 500, 502, 503, 504, and 401/403/404 (an auth or missing-deployment error on one
//! instance may succeed on another), plus connection, DNS and TLS errors and timeouts before the response head.
//! Once the head has been written to the client nothing is retried: the client sees the stream or an error.

use std::cell::RefCell;
use std::io::{self, Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use ureq::http::header::{HeaderMap, HeaderName, HeaderValue};
use ureq::http::{self, Method};

use crate::http::conn::abort;
use crate::http::parse::{Framing, Head};
use crate::http::write::{self, Persist, ResponseHead, BROKEN_CHUNK, CHUNK_BUF, CHUNK_DATA, CHUNK_PREFIX, LAST_CHUNK};
use crate::state::State;

/// Hop-by-hop headers (RFC 9110 §7.6.1) and the ones the proxy sets itself: never copied in either direction.
const HOP_BY_HOP: &[&str] =
    &["connection", "keep-alive", "proxy-connection", "transfer-encoding", "te", "trailer", "upgrade", "host"];
/// Request headers not forwarded besides those: framing (ureq sets it from the body), `Expect` (already
/// answered by us; forwarding it would make ureq wait for a 100), and the ID we set ourselves.
const REQUEST_DROP: &[&str] = &["content-length", "expect", "x-ms-client-request-id"];

const INVALID: &str = "invalid_request_error";

const RETRYABLE: &[u16] = &[429, 500, 502, 503, 504, 401, 403, 404];

/// The request as the worker has it: head, whole body, and its ID.
pub struct Exchange<'a> {
    pub head: &'a Head,
    pub framing: Framing,
    pub body: &'a [u8],
    pub request_id: &'a str,
}

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

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FailureKind {
    Timeout,
    Connect,
    Dns,
    Tls,
    Io,
    Other,
}

/// What happened to the request, for the access log and the keep-alive decision.
#[derive(Debug)]
pub struct Relayed {
    pub status: u16,
    pub instance: Option<String>,
    pub attempts: usize,
    pub bytes: u64,
    /// Whether the client connection may carry another request.
    pub reusable: bool,
    /// Why the exchange ended early, if it did.
    pub note: Option<&'static str>,
}

/// Runs the attempts and writes the answer to `client`. Never fails: every outcome becomes a response (or, if
/// the client is gone, a note in the access log).
pub fn relay(state: &State, ex: &Exchange, client: &mut TcpStream, persist: Persist) -> Relayed {
    let method = match Method::from_bytes(ex.head.method.as_bytes()) {
        Ok(m) => m,
        Err(_) => return respond_error(client, ex.request_id, 400, INVALID, "invalid method", &[], persist),
    };
    let headers = match forward_headers(state, ex) {
        Ok(h) => h,
        Err(name) => {
            let msg = format!("header {name} cannot be forwarded");
            return respond_error(client, ex.request_id, 400, INVALID, &msg, &[], persist);
        }
    };
    let instances = &state.config.instances;
    let mut attempts: Vec<Attempt> = Vec::new();
    let total = instances.len();
    for (n, idx) in state.balancer.order().enumerate() {
        let inst = &instances[idx];
        let started = Instant::now();
        let result = send(state, idx, &method, &headers, ex);
        let elapsed = started.elapsed();
        match result {
            Ok(resp) => {
                let status = resp.status().as_u16();
                let last = n + 1 == total;
                if RETRYABLE.contains(&status) && !(last && is_unanimous_client_error(status, &attempts)) {
                    let retry_after = retry_after(resp.headers());
                    let snippet = error_snippet(resp, state.config.error_body_max_bytes);
                    log::warn!(
                        "{} attempt {}/{total} instance={} status={status} elapsed_ms={} body={:?}",
                        ex.request_id,
                        n + 1,
                        inst.name,
                        elapsed.as_millis(),
                        state.redact(&snippet)
                    );
                    let outcome = Outcome::Status { status, retry_after };
                    attempts.push(Attempt { instance: inst.name.clone(), outcome, elapsed });
                    continue;
                }
                let mut relayed = stream_response(resp, ex, client, persist);
                relayed.instance = Some(inst.name.clone());
                relayed.attempts = n + 1;
                return relayed;
            }
            Err(e) => {
                let (kind, detail) = classify(&e);
                let detail = state.redact(&detail);
                log::warn!(
                    "{} attempt {}/{total} instance={} error={kind:?} elapsed_ms={} detail={detail:?}",
                    ex.request_id,
                    n + 1,
                    inst.name,
                    elapsed.as_millis()
                );
                attempts.push(Attempt {
                    instance: inst.name.clone(),
                    outcome: Outcome::Failed { kind, detail },
                    elapsed,
                });
            }
        }
    }
    fallback(client, ex, &attempts, persist)
}

/// When every instance gave the same 401, 403 or 404, that answer is the truth about the request (a deployment
/// that exists nowhere, a key rejected everywhere): the client gets Azure's own response rather than a 502.
fn is_unanimous_client_error(status: u16, earlier: &[Attempt]) -> bool {
    matches!(status, 401 | 403 | 404)
        && earlier.iter().all(|a| matches!(a.outcome, Outcome::Status { status: s, .. } if s == status))
}

/// The client's headers minus hop-by-hop ones, those named in `Connection`, the client key and any instance-key
/// header the client sent; plus our request ID. The instance key is added per attempt.
fn forward_headers(state: &State, ex: &Exchange) -> Result<HeaderMap, String> {
    let cfg = &state.config;
    let named_in_connection = ex.head.tokens("connection");
    let mut map = HeaderMap::with_capacity(ex.head.headers.len() + 2);
    for (name, value) in &ex.head.headers {
        let n = name.as_str();
        if HOP_BY_HOP.contains(&n)
            || REQUEST_DROP.contains(&n)
            || n == cfg.client_header_name
            || n == cfg.header_name
            || named_in_connection.iter().any(|c| c == n)
        {
            continue;
        }
        let name = HeaderName::from_bytes(n.as_bytes()).map_err(|_| n.to_string())?;
        let value = HeaderValue::from_bytes(value).map_err(|_| n.to_string())?;
        map.append(name, value);
    }
    let id = HeaderValue::from_str(ex.request_id).map_err(|_| "x-request-id".to_string())?;
    map.insert("x-ms-client-request-id", id);
    Ok(map)
}

fn send(
    state: &State,
    idx: usize,
    method: &Method,
    headers: &HeaderMap,
    ex: &Exchange,
) -> Result<http::Response<ureq::Body>, ureq::Error> {
    let mut req = http::Request::builder()
        .method(method.clone())
        .uri(format!("{}{}", state.config.instances[idx].endpoint, ex.head.target))
        .body(())
        .map_err(ureq::Error::from)?;
    *req.headers_mut() = headers.clone();
    req.headers_mut().insert(state.key_header.clone(), state.instance_keys[idx].clone());
    let (parts, ()) = req.into_parts();
    // A request that had no body framing goes out with none; otherwise the exact bytes, with a Content-Length.
    match ex.framing {
        Framing::None => state.agent.run(http::Request::from_parts(parts, ())),
        Framing::Length(_) | Framing::Chunked => state.agent.run(http::Request::from_parts(parts, ex.body)),
    }
}

/// How the response body is delimited towards the client.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Out {
    Empty,
    Length(u64),
    Chunked,
    UntilClose,
}

/// Writes the upstream response head, then copies its body: one read, one write, as soon as bytes arrive.
fn stream_response(
    resp: http::Response<ureq::Body>,
    ex: &Exchange,
    client: &mut TcpStream,
    persist: Persist,
) -> Relayed {
    let (parts, body) = resp.into_parts();
    let status = parts.status.as_u16();
    let no_body = ex.head.method == "HEAD" || status == 204 || status == 304 || status < 200;
    let upstream_len = parts.headers.get("content-length").and_then(|v| v.to_str().ok()?.trim().parse::<u64>().ok());
    let http10 = ex.head.minor_version == 0;
    let out = match (no_body, upstream_len) {
        (true, _) => Out::Empty,
        (false, Some(n)) => Out::Length(n),
        (false, None) if !http10 => Out::Chunked,
        (false, None) => Out::UntilClose,
    };
    let persist = if out == Out::UntilClose { Persist::Close } else { persist };

    let mut head = ResponseHead::new(status);
    let named_in_connection: Vec<String> = parts
        .headers
        .get_all("connection")
        .iter()
        .flat_map(|v| {
            v.as_bytes().split(|b| *b == b',').map(|t| String::from_utf8_lossy(t).trim().to_ascii_lowercase())
        })
        .collect();
    for (name, value) in &parts.headers {
        let n = name.as_str();
        if HOP_BY_HOP.contains(&n) || n == "content-length" || named_in_connection.iter().any(|c| c == n) {
            continue;
        }
        // Ours is the client-facing ID; Azure's own is kept under another name for support tickets.
        let n = if n == "x-request-id" { "x-upstream-request-id" } else { n };
        head.header(n, value.as_bytes());
    }
    match out {
        Out::Length(n) => {
            head.header("Content-Length", n.to_string().as_bytes());
        }
        // HEAD and 304 describe the body they stand for; 204 and 1xx must not carry a length (RFC 9110 §8.6).
        Out::Empty if status == 204 || status < 200 => {}
        Out::Empty => {
            if let Some(n) = upstream_len {
                head.header("Content-Length", n.to_string().as_bytes());
            }
        }
        Out::Chunked => {
            head.header("Transfer-Encoding", b"chunked");
        }
        Out::UntilClose => {}
    }
    head.header("x-request-id", ex.request_id.as_bytes());
    persist.apply(&mut head);
    let mut relayed =
        Relayed { status, instance: None, attempts: 0, bytes: 0, reusable: persist != Persist::Close, note: None };
    let head = head.finish();
    // A body of known length (a non-streamed completion) is normally already here with its head: send both in
    // one write, one packet, one client wake-up. Any other body may take long to start (an SSE stream waits for
    // the first token), so its head goes out at once.
    let pending_head = if matches!(out, Out::Length(_)) {
        head
    } else {
        if client.write_all(&head).is_err() {
            return relayed.gone();
        }
        Vec::new()
    };
    if out == Out::Empty {
        return relayed;
    }
    copy_body(body.into_reader(), client, out, pending_head, &mut relayed);
    relayed
}

impl Relayed {
    fn gone(mut self) -> Relayed {
        self.reusable = false;
        self.note = Some("client_gone");
        self
    }
}

thread_local! {
    /// Each worker's copy buffer, allocated once: a fresh zeroed 16 KiB per response was measurable at 20k req/s.
    static COPY_BUF: RefCell<Vec<u8>> = RefCell::new(vec![0u8; CHUNK_BUF]);
}

/// Copies the upstream body to the client, one write per read; `pending_head` (possibly empty) goes out with the
/// first write.
fn copy_body(reader: impl Read, client: &mut TcpStream, out: Out, pending_head: Vec<u8>, relayed: &mut Relayed) {
    COPY_BUF.with_borrow_mut(|buf| copy_with(buf, reader, client, out, pending_head, relayed));
}

fn copy_with(
    buf: &mut [u8],
    mut reader: impl Read,
    client: &mut TcpStream,
    out: Out,
    mut pending_head: Vec<u8>,
    relayed: &mut Relayed,
) {
    loop {
        let n = match reader.read(&mut buf[CHUNK_PREFIX..CHUNK_PREFIX + CHUNK_DATA]) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => {
                // The client must see an error, never a clean end: a truncated completion that looks whole is
                // worse than a failed one.
                log::warn!("upstream body broke after {} bytes: {e}", relayed.bytes);
                relayed.reusable = false;
                relayed.note = Some("upstream_broke");
                match out {
                    Out::Chunked => {
                        let _ = client.write_all(BROKEN_CHUNK);
                    }
                    Out::UntilClose => abort(client),
                    Out::Length(_) | Out::Empty => {}
                }
                return;
            }
        };
        let written = match out {
            Out::Chunked => {
                let range = write::frame_chunk(buf, n);
                client.write_all(&buf[range])
            }
            _ => write_both(client, &std::mem::take(&mut pending_head), &buf[CHUNK_PREFIX..CHUNK_PREFIX + n]),
        };
        if let Err(e) = written {
            log::info!("client went away after {} bytes: {e}; dropping the upstream stream", relayed.bytes);
            relayed.reusable = false;
            relayed.note = Some("client_gone");
            return; // dropping `reader` closes the upstream connection, so the model stops generating for nobody
        }
        relayed.bytes += n as u64;
    }
    let tail = if out == Out::Chunked { LAST_CHUNK } else { &[][..] };
    if write_both(client, &pending_head, tail).is_err() {
        relayed.reusable = false;
        relayed.note = Some("client_gone");
    }
}

/// Writes `a` then `b`, in one system call when the socket takes it all.
fn write_both(stream: &mut TcpStream, a: &[u8], b: &[u8]) -> io::Result<()> {
    let n = stream.write_vectored(&[io::IoSlice::new(a), io::IoSlice::new(b)])?;
    if n < a.len() {
        stream.write_all(&a[n..])?;
        stream.write_all(b)
    } else {
        stream.write_all(&b[n - a.len()..])
    }
}

/// `retry-after-ms` / `x-ms-retry-after-ms` (milliseconds, Azure's), else `Retry-After` in seconds.
fn retry_after(headers: &HeaderMap) -> Option<Duration> {
    let num = |name: &str| headers.get(name)?.to_str().ok()?.trim().parse::<f64>().ok().filter(|v| *v >= 0.0);
    num("retry-after-ms")
        .or_else(|| num("x-ms-retry-after-ms"))
        .map(|ms| Duration::from_secs_f64(ms / 1000.0))
        .or_else(|| num("retry-after").map(Duration::from_secs_f64))
}

/// The first `max` bytes of an error body, for the log line; the rest is not read.
fn error_snippet(resp: http::Response<ureq::Body>, max: usize) -> String {
    let mut bytes = Vec::new();
    let _ = resp.into_body().into_reader().take(max as u64).read_to_end(&mut bytes);
    String::from_utf8_lossy(&bytes).into_owned()
}

/// Sorts a ureq error into the kind that decides the fallback status, with a detail for humans.
pub fn classify(e: &ureq::Error) -> (FailureKind, String) {
    match e {
        ureq::Error::Timeout(t) => (FailureKind::Timeout, format!("timeout: {t}")),
        ureq::Error::HostNotFound => (FailureKind::Dns, "host not found".into()),
        ureq::Error::Rustls(t) => (FailureKind::Tls, format!("tls: {t}")),
        ureq::Error::Tls(t) => (FailureKind::Tls, format!("tls: {t}")),
        ureq::Error::Io(io) => {
            if let Some(tls) = io.get_ref().and_then(|i| i.downcast_ref::<rustls::Error>()) {
                return (FailureKind::Tls, format!("tls: {tls}"));
            }
            let text = io.to_string();
            let kind = match io.kind() {
                io::ErrorKind::ConnectionRefused => FailureKind::Connect,
                io::ErrorKind::TimedOut | io::ErrorKind::WouldBlock => FailureKind::Timeout,
                _ if text.contains("failed to lookup address") => FailureKind::Dns,
                _ => FailureKind::Io,
            };
            (kind, text)
        }
        other => (FailureKind::Other, other.to_string()),
    }
}

/// Every attempt failed: 429 with the shortest `Retry-After` when all were throttled, 504 when the last failure
/// was a timeout, 502 otherwise. The body names instances and outcomes, never a key.
fn fallback(client: &mut TcpStream, ex: &Exchange, attempts: &[Attempt], persist: Persist) -> Relayed {
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
                Outcome::Failed { detail, .. } => v["error"] = detail.as_str().into(),
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

/// Writes a small JSON answer produced by the proxy itself (not relayed from an instance).
pub fn respond_json(
    client: &mut TcpStream,
    rid: &str,
    status: u16,
    body: &serde_json::Value,
    extra: &[(&str, &str)],
    persist: Persist,
) -> Relayed {
    let mut relayed =
        Relayed { status, instance: None, attempts: 0, bytes: 0, reusable: persist != Persist::Close, note: None };
    match write::write_json(client, status, rid, body, extra, persist) {
        Ok(n) => relayed.bytes = n,
        Err(_) => relayed = relayed.gone(),
    }
    relayed
}

/// An error answer in the OpenAI envelope; `code` is the status as a string, as Azure's own errors do.
pub fn respond_error(
    client: &mut TcpStream,
    rid: &str,
    status: u16,
    kind: &str,
    message: &str,
    extra: &[(&str, &str)],
    persist: Persist,
) -> Relayed {
    let body = write::error_json(message, kind, &status.to_string(), rid);
    respond_json(client, rid, status, &body, extra, persist)
}
