//! One exchange between a client and the proxy, as the layers share it: the request as a worker has it
//! ([`Exchange`]), what became of it ([`Relayed`], for the access log and the keep-alive decision), and the small
//! answers the proxy writes itself (errors, local routes). A leaf: `serve`, `relay`, `stream`, `upstream`,
//! `rejection` and `front` all use it, and it uses none of them.

use std::time::Instant;

use crate::http::parse::{Framing, Head};
use crate::http::write::{self, Persist};
use crate::http::ClientStream;
use crate::quota::Quota;

/// The request as the worker has it: head, whole body, and its ID.
pub struct Exchange<'a> {
    pub head: &'a Head,
    pub framing: Framing,
    pub body: &'a [u8],
    pub request_id: &'a str,
    /// When the request head was complete (for latency metrics).
    pub started: Instant,
    /// The deployment the request names (path or body `model`), if any.
    pub deployment: Option<String>,
    pub caller: Caller<'a>,
}

/// Who sent a request, as far as the proxy knows: the name of the client key the guard accepted, and that key's
/// rate limits.
#[derive(Clone, Copy)]
pub struct Caller<'a> {
    /// The key's name from `client_keys`; `-` before the key check or without an allowlist.
    pub name: &'a str,
    pub quota: Option<&'a Quota>,
}

impl Caller<'_> {
    pub const UNKNOWN: Caller<'static> = Caller { name: "-", quota: None };
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

impl Relayed {
    pub fn gone(mut self) -> Relayed {
        self.reusable = false;
        self.note = Some("client_gone");
        self
    }
}

/// Writes a small JSON answer produced by the proxy itself (not relayed from an instance).
pub fn respond_json(
    client: &mut ClientStream,
    rid: &str,
    status: u16,
    body: &serde_json::Value,
    extra: &[(&str, &str)],
    persist: Persist,
) -> Relayed {
    let body = serde_json::to_vec(body).unwrap_or_default();
    respond_bytes(client, rid, status, "application/json", &body, extra, persist)
}

/// Writes a small answer produced by the proxy itself, head and body in one write.
pub fn respond_bytes(
    client: &mut ClientStream,
    rid: &str,
    status: u16,
    content_type: &str,
    body: &[u8],
    extra: &[(&str, &str)],
    persist: Persist,
) -> Relayed {
    let mut relayed =
        Relayed { status, instance: None, attempts: 0, bytes: 0, reusable: persist != Persist::Close, note: None };
    match write::write_small(client, status, rid, content_type, body, extra, persist) {
        Ok(n) => relayed.bytes = n,
        Err(_) => relayed = relayed.gone(),
    }
    relayed
}

/// An error answer in the OpenAI envelope; `code` is the status as a string, as Azure's own errors do.
pub fn respond_error(
    client: &mut ClientStream,
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
