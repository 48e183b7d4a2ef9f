//! Writing the chosen upstream answer to the client: our own head (filtered headers, framing, request ID),
//! then the body, one write per upstream read, so that SSE events reach the client as the model emits them.
//! When the upstream breaks mid-body the client sees an error, never a clean end; when the client goes away,
//! the upstream reader is dropped at once.

use std::io::{self, Read, Write};
use std::time::{Duration, Instant};

use ureq::http;

use crate::exchange::{Caller, Exchange, Relayed};
use crate::http::conn::abort;
use crate::http::write::{self, Persist, ResponseHead, BROKEN_CHUNK, CHUNK_DATA, CHUNK_PREFIX, LAST_CHUNK};
use crate::http::ClientStream;
use crate::http::HOP_BY_HOP;
use crate::metrics::{Metrics, UsageTail};
use crate::redact::{Secrets, StreamMask};

/// How the response body is delimited towards the client.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Out {
    Empty,
    Length(u64),
    Chunked,
    UntilClose,
}

/// What the copy reports to the metrics (which instance and deployment, when the request started), and how long
/// one write to the client may take in all.
pub struct Tally<'a> {
    pub metrics: &'a Metrics,
    pub instance: &'a str,
    pub deployment: Option<&'a str>,
    pub started: Instant,
    pub write_limit: Duration,
    /// Keys to mask in relayed headers and non-2xx bodies.
    pub secrets: &'a Secrets,
    /// Who asked: the tokens used are counted under its name and taken from its quota.
    pub caller: Caller<'a>,
}

/// What is watched while a body is copied: the first byte of a stream, the token usage at the end.
struct Watch<'a> {
    tally: Tally<'a>,
    sse: bool,
    /// Only for 200 JSON and SSE bodies, the ones that carry a `usage` object.
    tail: Option<UsageTail>,
    seen_first_byte: bool,
    /// For error bodies: the keys an upstream may echo, masked as the body streams.
    mask: Option<StreamMask<'a>>,
}

impl Watch<'_> {
    fn on_bytes(&mut self, bytes: &[u8]) {
        if !self.seen_first_byte {
            self.seen_first_byte = true;
            if self.sse {
                self.tally.metrics.stream_first_byte_seconds.observe(self.tally.started.elapsed());
            }
        }
        if let Some(tail) = &mut self.tail {
            tail.push(bytes);
        }
    }

    fn on_complete(&self) {
        if let Some(usage) = self.tail.as_ref().and_then(UsageTail::usage) {
            let (tally, caller) = (&self.tally, self.tally.caller);
            tally.metrics.tokens(tally.instance, tally.deployment.unwrap_or("-"), caller.name, usage);
            if let Some(quota) = caller.quota {
                quota.spend_tokens(usage.total());
            }
        }
    }
}

/// Writes the upstream response head, then copies its body: one read, one write, as soon as bytes arrive.
pub fn stream_response(
    resp: http::Response<ureq::Body>,
    ex: &Exchange,
    client: &mut ClientStream,
    persist: Persist,
    tally: Tally,
) -> Relayed {
    let (parts, body) = resp.into_parts();
    let status = parts.status.as_u16();
    let content_type = parts.headers.get("content-type").and_then(|v| v.to_str().ok()).unwrap_or_default();
    let sse = content_type.starts_with("text/event-stream");
    let carries_usage = status == 200 && (sse || content_type.starts_with("application/json"));
    let mut watch =
        Watch { tally, sse, tail: carries_usage.then(UsageTail::default), seen_first_byte: false, mask: None };
    let no_body = ex.head.method == "HEAD" || status == 204 || status == 304 || status < 200;
    let http10 = ex.head.minor_version == 0;
    // The length the client is told is the one ureq decodes the body by, never the header as sent: with
    // `Transfer-Encoding` present, `Content-Length` means nothing (RFC 9112 §6.3) and relaying it would leave
    // the rest of the body to be read as the client's next response.
    let out = match (no_body, body.content_length()) {
        (true, _) => Out::Empty,
        (false, Some(n)) => Out::Length(n),
        (false, None) if !http10 => Out::Chunked,
        (false, None) => Out::UntilClose,
    };
    // A HEAD or 304 answer describes a body it does not carry: its length passes on when it is unambiguous.
    let described_len = if parts.headers.contains_key("transfer-encoding") {
        None
    } else {
        parts.headers.get("content-length").and_then(|v| v.to_str().ok()?.trim().parse::<u64>().ok())
    };
    let persist = if out == Out::UntilClose { Persist::Close } else { persist };
    let mut head = relayed_head(status, &parts.headers, out, described_len, watch.tally.secrets);
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
        let written = client.write_all(&head);
        drop(head); // not held for the stream's life
        if written.is_err() {
            return relayed.gone();
        }
        Vec::new()
    };
    if out == Out::Empty {
        return relayed;
    }
    // An error body may echo the key the upstream received; a 2xx body is the model's and streams untouched.
    if sse {
        // A stream holds this thread for as long as the model writes; it should not also hold the stack pages
        // that connecting to the upstream touched (see `sys`).
        crate::sys::trim_stack();
    }
    watch.mask = (status >= 300).then(|| watch.tally.secrets.stream());
    copy_body(body.into_reader(), client, out, pending_head, &mut relayed, &mut watch);
    relayed
}

/// The client's response head from the upstream's: hop-by-hop headers and those named in `Connection` dropped,
/// keys masked in the values, Azure's request ID renamed, and framing headers for the body as it will be sent.
fn relayed_head(
    status: u16,
    headers: &http::HeaderMap,
    out: Out,
    described_len: Option<u64>,
    secrets: &Secrets,
) -> ResponseHead {
    let mut head = ResponseHead::new(status);
    let named_in_connection: Vec<String> = headers
        .get_all("connection")
        .iter()
        .flat_map(|v| {
            v.as_bytes().split(|b| *b == b',').map(|t| String::from_utf8_lossy(t).trim().to_ascii_lowercase())
        })
        .collect();
    for (name, value) in headers {
        let n = name.as_str();
        if HOP_BY_HOP.contains(&n) || n == "content-length" || named_in_connection.iter().any(|c| c == n) {
            continue;
        }
        // Ours is the client-facing ID; Azure's own is kept under another name for support tickets.
        let n = if n == "x-request-id" { "x-upstream-request-id" } else { n };
        head.header(n, &secrets.masked(value.as_bytes()));
    }
    match out {
        Out::Length(n) => {
            head.header("Content-Length", n.to_string().as_bytes());
        }
        // HEAD and 304 describe the body they stand for; 204 and 1xx must not carry a length (RFC 9110 §8.6).
        Out::Empty if status == 204 || status < 200 => {}
        Out::Empty => {
            if let Some(n) = described_len {
                head.header("Content-Length", n.to_string().as_bytes());
            }
        }
        Out::Chunked => {
            head.header("Transfer-Encoding", b"chunked");
        }
        Out::UntilClose => {}
    }
    head
}

/// Copies the upstream body to the client, one write per read; `pending_head` (possibly empty) goes out with the
/// first write.
fn copy_body(
    reader: impl Read,
    client: &mut ClientStream,
    out: Out,
    pending_head: Vec<u8>,
    relayed: &mut Relayed,
    watch: &mut Watch,
) {
    crate::http::conn::with_scratch(|buf| copy_with(buf, reader, client, out, pending_head, relayed, watch));
}

fn copy_with(
    buf: &mut [u8],
    mut reader: impl Read,
    client: &mut ClientStream,
    out: Out,
    mut pending_head: Vec<u8>,
    relayed: &mut Relayed,
    watch: &mut Watch,
) {
    // A masked body may come out longer than one read (bytes held back from the read before): leave room.
    let room = match &watch.mask {
        Some(m) => CHUNK_DATA.saturating_sub(m.holds_at_most()).max(1),
        None => CHUNK_DATA,
    };
    let mut at_end = false;
    while !at_end {
        let n = match reader.read(&mut buf[CHUNK_PREFIX..CHUNK_PREFIX + room]) {
            Ok(0) => {
                at_end = true;
                0
            }
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return upstream_broke(client, out, relayed, &e),
        };
        let n = match &mut watch.mask {
            Some(m) => {
                let safe = if at_end { m.finish() } else { m.push(&buf[CHUNK_PREFIX..CHUNK_PREFIX + n]) };
                buf[CHUNK_PREFIX..CHUNK_PREFIX + safe.len()].copy_from_slice(&safe);
                safe.len()
            }
            None => n,
        };
        if n == 0 {
            continue;
        }
        watch.on_bytes(&buf[CHUNK_PREFIX..CHUNK_PREFIX + n]);
        let written = match out {
            Out::Chunked => {
                let range = write::frame_chunk(buf, n);
                write_within(client, &buf[range], &[], watch.tally.write_limit)
            }
            _ => {
                let head = std::mem::take(&mut pending_head);
                write_within(client, &head, &buf[CHUNK_PREFIX..CHUNK_PREFIX + n], watch.tally.write_limit)
            }
        };
        if let Err(e) = written {
            // Returning drops `reader`, which closes the upstream connection: the model stops generating for nobody.
            return client_failed(client, relayed, &e);
        }
        relayed.bytes += n as u64;
    }
    if let Out::Length(declared) = out {
        if relayed.bytes != declared {
            // Should the reader ever end a length-framed body short without an error, the client must not take
            // the short body for the whole one, nor its connection for one in sync.
            log::warn!("upstream body ended after {} of {declared} bytes", relayed.bytes);
            relayed.reusable = false;
            relayed.note = Some("upstream_broke");
            return;
        }
    }
    let tail = if out == Out::Chunked { LAST_CHUNK } else { &[][..] };
    let nothing_left = pending_head.is_empty() && tail.is_empty();
    if !nothing_left && write_within(client, &pending_head, tail, watch.tally.write_limit).is_err() {
        relayed.reusable = false;
        relayed.note = Some("client_gone");
        return;
    }
    watch.on_complete();
}

/// The upstream body broke: the client must see an error, never a clean end (a truncated completion that looks
/// whole is worse than a failed one): an invalid chunk line, a short body, or a reset, by framing.
fn upstream_broke(client: &mut ClientStream, out: Out, relayed: &mut Relayed, e: &io::Error) {
    log::warn!("upstream body broke after {} bytes: {e}", relayed.bytes);
    relayed.reusable = false;
    relayed.note = Some("upstream_broke");
    match out {
        Out::Chunked => {
            let _ = client.write_all(BROKEN_CHUNK);
        }
        Out::UntilClose => abort(client.tcp()),
        Out::Length(_) | Out::Empty => {}
    }
}

/// A write to the client failed: it went away, or it reads too slowly.
fn client_failed(client: &mut ClientStream, relayed: &mut Relayed, e: &io::Error) {
    relayed.reusable = false;
    if matches!(e.kind(), io::ErrorKind::TimedOut | io::ErrorKind::WouldBlock) {
        // Too slow, not gone: reset rather than close, so that the megabytes already queued in the kernel for
        // this client are dropped now instead of trickling out (and the client learns it was cut off).
        log::warn!("client too slow after {} bytes (client_write_timeout_ms); cutting it off", relayed.bytes);
        relayed.note = Some("client_too_slow");
        abort(client.tcp());
    } else {
        log::info!("client went away after {} bytes: {e}; dropping the upstream stream", relayed.bytes);
        relayed.note = Some("client_gone");
    }
}

/// Writes `a` then `b` (in one system call when the socket takes it all), failing with `TimedOut` when that takes
/// longer than `limit` in all. The socket's own timeout restarts with every partial write, so without this a
/// client that drains a few bytes at a time would hold its worker (and an upstream stream) for as long as it
/// likes: this sets a floor on its reading rate of one chunk (4 KiB) per `client_write_timeout_ms`.
fn write_within(w: &mut impl Write, a: &[u8], b: &[u8], limit: Duration) -> io::Result<()> {
    let start = Instant::now();
    let mut n = w.write_vectored(&[io::IoSlice::new(a), io::IoSlice::new(b)])?;
    let total = a.len() + b.len();
    while n < total {
        if start.elapsed() > limit {
            return Err(io::Error::new(io::ErrorKind::TimedOut, "client reads too slowly"));
        }
        let rest = if n < a.len() { &a[n..] } else { &b[n - a.len()..] };
        match w.write(rest) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(k) => n += k,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Takes one byte per call, slowly: a client that keeps reading, just not enough.
    struct Trickle(Vec<u8>);
    impl Write for Trickle {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            std::thread::sleep(Duration::from_millis(2));
            self.0.push(buf[0]);
            Ok(1)
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn a_trickling_reader_times_out_and_a_fast_one_gets_everything_in_order() {
        let mut slow = Trickle(Vec::new());
        let err = write_within(&mut slow, &[1; 100], &[2; 100], Duration::from_millis(20)).expect_err("too slow");
        assert_eq!(err.kind(), io::ErrorKind::TimedOut);
        let mut fast = Vec::new();
        write_within(&mut fast, b"head", b"body", Duration::from_millis(20)).expect("fast");
        assert_eq!(fast, b"headbody");
        let mut slow_but_enough = Trickle(Vec::new());
        write_within(&mut slow_but_enough, b"ab", b"cd", Duration::from_secs(5)).expect("in time");
        assert_eq!(slow_but_enough.0, b"abcd");
    }
}
