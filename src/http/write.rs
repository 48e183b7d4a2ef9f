//! Writing responses: heads we build ourselves (canonical reason phrase, our headers), small local answers with
//! a JSON body, and the chunked framing used while copying an upstream body. Every write goes straight to the
//! socket (no buffering layer), so what is written is on the wire when the call returns.

use std::io::{self, Write};
use std::ops::Range;

/// Room before a chunk's data for its size line: up to 16 hex digits and CRLF.
pub const CHUNK_PREFIX: usize = 18;
/// Upstream bytes read per chunk; each read becomes one chunk, written and flushed at once. ureq hands a body
/// over from its per-connection input buffer (4 KiB, see `state::build_agent`), so no read returns more: a larger
/// buffer here would only be memory every streaming worker holds. An SSE event is well under 1 KiB.
pub const CHUNK_DATA: usize = 4 * 1024;
/// Size of a buffer for [`frame_chunk`]: prefix, data, trailing CRLF.
pub const CHUNK_BUF: usize = CHUNK_PREFIX + CHUNK_DATA + 2;

/// `HTTP/1.1 <status> <reason>` plus header lines, ended by [`ResponseHead::finish`].
pub struct ResponseHead {
    buf: Vec<u8>,
}

impl ResponseHead {
    pub fn new(status: u16) -> ResponseHead {
        let reason = ureq::http::StatusCode::from_u16(status).ok().and_then(|s| s.canonical_reason()).unwrap_or("");
        let mut buf = Vec::with_capacity(512);
        // Always 1.1: RFC 9110 §6.2, a server sends its own highest version even to a 1.0 client.
        let _ = write!(buf, "HTTP/1.1 {status} {reason}\r\n");
        ResponseHead { buf }
    }

    pub fn header(&mut self, name: &str, value: &[u8]) -> &mut ResponseHead {
        self.buf.extend_from_slice(name.as_bytes());
        self.buf.extend_from_slice(b": ");
        self.buf.extend_from_slice(value);
        self.buf.extend_from_slice(b"\r\n");
        self
    }

    pub fn finish(mut self) -> Vec<u8> {
        self.buf.extend_from_slice(b"\r\n");
        self.buf
    }
}

/// How the connection is left after a response, as told to the client.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Persist {
    /// Close after this response (`Connection: close`).
    Close,
    /// Keep open; an HTTP/1.0 client needs to be told (`Connection: keep-alive`).
    KeepAlive { http10: bool },
}

impl Persist {
    pub fn apply(self, head: &mut ResponseHead) {
        match self {
            Persist::Close => {
                head.header("Connection", b"close");
            }
            Persist::KeepAlive { http10: true } => {
                head.header("Connection", b"keep-alive");
            }
            Persist::KeepAlive { http10: false } => {}
        }
    }
}

/// The OpenAI error envelope: `{"error": {"message", "type", "code", "request_id"}}`.
pub fn error_json(message: &str, kind: &str, code: &str, request_id: &str) -> serde_json::Value {
    serde_json::json!({ "error": { "message": message, "type": kind, "code": code, "request_id": request_id } })
}

/// Writes a complete small response (head and body in one write). Returns the body size.
pub fn write_small(
    stream: &mut impl Write,
    status: u16,
    request_id: &str,
    content_type: &str,
    body: &[u8],
    extra: &[(&str, &str)],
    persist: Persist,
) -> io::Result<u64> {
    let mut head = ResponseHead::new(status);
    head.header("Content-Type", content_type.as_bytes())
        .header("Content-Length", body.len().to_string().as_bytes())
        .header("x-request-id", request_id.as_bytes());
    for (name, value) in extra {
        head.header(name, value.as_bytes());
    }
    persist.apply(&mut head);
    let mut out = head.finish();
    out.extend_from_slice(body);
    stream.write_all(&out)?;
    stream.flush()?;
    Ok(body.len() as u64)
}

/// Frames `buf[CHUNK_PREFIX..CHUNK_PREFIX + n]` as one HTTP chunk in place and returns the range to write.
/// The data is never copied: the size line goes into the room left before it, the CRLF after it.
pub fn frame_chunk(buf: &mut [u8], n: usize) -> Range<usize> {
    debug_assert!(n > 0 && buf.len() >= CHUNK_PREFIX + n + 2);
    let size_line = format!("{n:x}\r\n");
    let start = CHUNK_PREFIX - size_line.len();
    buf[start..CHUNK_PREFIX].copy_from_slice(size_line.as_bytes());
    buf[CHUNK_PREFIX + n..CHUNK_PREFIX + n + 2].copy_from_slice(b"\r\n");
    start..CHUNK_PREFIX + n + 2
}

/// The end of a chunked body.
pub const LAST_CHUNK: &[u8] = b"0\r\n\r\n";
/// Written when the upstream fails mid-body: not a valid chunk-size line, so every client reports an error
/// instead of taking a truncated completion for a whole one (`0\r\n\r\n` here would be silent truncation).
pub const BROKEN_CHUNK: &[u8] = b"!\r\n";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunk_framing_in_place() {
        let mut buf = vec![0u8; CHUNK_BUF];
        buf[CHUNK_PREFIX..CHUNK_PREFIX + 26].copy_from_slice(b"abcdefghijklmnopqrstuvwxyz");
        let r = frame_chunk(&mut buf, 26);
        assert_eq!(&buf[r], b"1a\r\nabcdefghijklmnopqrstuvwxyz\r\n");
        let r = frame_chunk(&mut buf, CHUNK_DATA);
        let size_line = format!("{CHUNK_DATA:x}\r\n");
        assert!(buf[r].starts_with(size_line.as_bytes()));
    }

    #[test]
    fn head_has_canonical_reason() {
        let mut h = ResponseHead::new(429);
        h.header("Retry-After", b"3");
        Persist::KeepAlive { http10: true }.apply(&mut h);
        assert_eq!(h.finish(), b"HTTP/1.1 429 Too Many Requests\r\nRetry-After: 3\r\nConnection: keep-alive\r\n\r\n");
    }
}
