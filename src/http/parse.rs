//! Request heads: `parse_head` turns buffered bytes into an owned [`Head`] once the head is complete, refusing
//! heads that break the limits; `Framing::of` decides how the body is delimited and refuses the ambiguous
//! combinations that enable request smuggling.

use std::mem::MaybeUninit;

/// One request head, owned, so that it can cross from the front thread to a worker.
#[derive(Debug, Clone)]
pub struct Head {
    pub method: String,
    pub target: String,
    /// 0 for HTTP/1.0, 1 for HTTP/1.1.
    pub minor_version: u8,
    /// Names lowercased; values as received (they may hold obs-text bytes).
    pub headers: Vec<(String, Vec<u8>)>,
    /// Bytes of the buffer that the head took.
    pub len: usize,
}

/// Why a head was refused; each maps to one status code.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HeadError {
    /// The request line alone is longer than the head limit: 414.
    UriTooLong,
    /// The head is longer than the limit: 431.
    TooLarge,
    /// More header fields than allowed: 431.
    TooManyHeaders,
    /// Not HTTP/1.0 or HTTP/1.1: 505.
    Version,
    /// Anything else httparse refuses: 400.
    Malformed(&'static str),
}

impl HeadError {
    pub fn status(self) -> u16 {
        match self {
            HeadError::UriTooLong => 414,
            HeadError::TooLarge | HeadError::TooManyHeaders => 431,
            HeadError::Version => 505,
            HeadError::Malformed(_) => 400,
        }
    }

    pub fn message(self) -> &'static str {
        match self {
            HeadError::UriTooLong => "request line too long",
            HeadError::TooLarge => "request head too large",
            HeadError::TooManyHeaders => "too many header fields",
            HeadError::Version => "only HTTP/1.0 and HTTP/1.1 are supported",
            HeadError::Malformed(what) => what,
        }
    }
}

/// Header slots kept on the stack by `parse_head` (the default `max_headers` is 100; 32 bytes each).
const STACK_HEADERS: usize = 128;

/// Parses `buf` as a request head. `Ok(None)`: not complete yet and still within `max_bytes`.
pub fn parse_head(buf: &[u8], max_bytes: usize, max_headers: usize) -> Result<Option<Head>, HeadError> {
    // RFC 9112 §2.2: a server SHOULD ignore at least one empty line before the request line.
    let skip = leading_empty_lines(buf);
    let data = &buf[skip..];
    // Up to `STACK_HEADERS` header slots live on the stack, uninitialised (httparse writes each one before it is
    // read): the parse runs on every read of a head, and a zeroed heap array of `max_headers` slots was 3 % of a
    // proxied request's instructions (callgrind).
    let mut on_stack = [const { MaybeUninit::<httparse::Header>::uninit() }; STACK_HEADERS];
    let mut on_heap = Vec::new();
    let slots = if max_headers <= STACK_HEADERS {
        &mut on_stack[..max_headers]
    } else {
        on_heap.resize_with(max_headers, MaybeUninit::uninit);
        &mut on_heap[..]
    };
    let mut req = httparse::Request::new(&mut []);
    match req.parse_with_uninit_headers(data, slots) {
        Ok(httparse::Status::Complete(n)) => {
            if skip + n > max_bytes {
                return Err(too_large(data, max_bytes));
            }
            let method = req.method.unwrap_or_default().to_string();
            let target = req.path.unwrap_or_default().to_string();
            let minor_version = req.version.unwrap_or(1);
            let mut owned = Vec::with_capacity(req.headers.len());
            for h in req.headers.iter() {
                owned.push((h.name.to_ascii_lowercase(), h.value.to_vec()));
            }
            Ok(Some(Head { method, target, minor_version, headers: owned, len: skip + n }))
        }
        Ok(httparse::Status::Partial) if buf.len() > max_bytes => Err(too_large(data, max_bytes)),
        Ok(httparse::Status::Partial) => Ok(None),
        Err(httparse::Error::TooManyHeaders) => Err(HeadError::TooManyHeaders),
        Err(httparse::Error::Version) => Err(HeadError::Version),
        Err(httparse::Error::HeaderName) => Err(HeadError::Malformed("invalid header name")),
        Err(httparse::Error::HeaderValue) => Err(HeadError::Malformed("invalid byte in a header value")),
        Err(httparse::Error::Token) => Err(HeadError::Malformed("invalid method or request target")),
        Err(httparse::Error::NewLine) | Err(httparse::Error::Status) => {
            Err(HeadError::Malformed("malformed request line or header line"))
        }
    }
}

fn leading_empty_lines(buf: &[u8]) -> usize {
    let mut i = 0;
    while i < buf.len().min(8) {
        match (buf[i], buf.get(i + 1)) {
            (b'\r', Some(b'\n')) => i += 2,
            (b'\n', _) => i += 1,
            _ => break,
        }
    }
    i
}

/// 414 when the request line alone is over the limit, 431 when the headers are.
fn too_large(data: &[u8], max_bytes: usize) -> HeadError {
    match data.iter().position(|b| *b == b'\n') {
        Some(nl) if nl <= max_bytes => HeadError::TooLarge,
        _ => HeadError::UriTooLong,
    }
}

impl Head {
    /// The first value of `name` (lowercase).
    pub fn header(&self, name: &str) -> Option<&[u8]> {
        self.headers.iter().find(|(n, _)| n == name).map(|(_, v)| v.as_slice())
    }

    /// RFC 9112 §3.2: an HTTP/1.1 request carries exactly one `Host`, an HTTP/1.0 one at most, and its value is
    /// empty or `host[:port]`. Anything else is answered 400.
    pub fn check_host(&self) -> Result<(), &'static str> {
        let mut hosts = self.headers.iter().filter(|(n, _)| n == "host").map(|(_, v)| v.as_slice());
        match (hosts.next(), hosts.next()) {
            (None, _) if self.minor_version == 1 => Err("an HTTP/1.1 request needs a Host header"),
            (Some(_), Some(_)) => Err("more than one Host header"),
            (Some(v), None) if !is_host_value(v) => Err("invalid Host header"),
            _ => Ok(()),
        }
    }

    /// Every comma-separated element of every `name` header, trimmed, lowercased.
    pub fn tokens(&self, name: &str) -> Vec<String> {
        self.headers
            .iter()
            .filter(|(n, _)| n == name)
            .flat_map(|(_, v)| v.split(|b| *b == b','))
            .map(|t| String::from_utf8_lossy(t).trim().to_ascii_lowercase())
            .filter(|t| !t.is_empty())
            .collect()
    }

    /// Whether the client asked to keep the connection open after this exchange.
    pub fn wants_keep_alive(&self) -> bool {
        let conn = self.tokens("connection");
        if self.minor_version == 0 {
            conn.iter().any(|t| t == "keep-alive")
        } else {
            !conn.iter().any(|t| t == "close")
        }
    }

    /// Path part of the target (before `?`).
    pub fn path(&self) -> &str {
        self.target.split('?').next().unwrap_or_default()
    }
}

/// How a request body is delimited.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Framing {
    None,
    Length(u64),
    Chunked,
}

/// Why the body framing was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FramingError {
    /// 400: ambiguous or malformed framing (both CL and TE, differing lengths, a non-number).
    Bad(&'static str),
    /// 501: a transfer coding we do not implement.
    Unsupported(String),
    /// 413: the declared length is larger than the limit.
    TooLarge(u64),
}

impl Framing {
    /// RFC 9112 §6: Transfer-Encoding must be exactly `chunked`; with Content-Length as well, refuse (smuggling);
    /// several Content-Length values must all agree.
    pub fn of(head: &Head, max_body: u64) -> Result<Framing, FramingError> {
        let te = head.tokens("transfer-encoding");
        let has_cl = head.header("content-length").is_some();
        if !te.is_empty() {
            if has_cl {
                return Err(FramingError::Bad("both Content-Length and Transfer-Encoding"));
            }
            if head.minor_version == 0 {
                return Err(FramingError::Bad("Transfer-Encoding in an HTTP/1.0 request"));
            }
            if te.len() != 1 || te[0] != "chunked" {
                return Err(FramingError::Unsupported(te.join(", ")));
            }
            return Ok(Framing::Chunked);
        }
        let mut length: Option<u64> = None;
        for (_, v) in head.headers.iter().filter(|(n, _)| n == "content-length") {
            for part in v.split(|b| *b == b',') {
                let part = trim_ascii(part);
                if part.is_empty() || part.len() > 20 || !part.iter().all(u8::is_ascii_digit) {
                    return Err(FramingError::Bad("invalid Content-Length"));
                }
                // 20 digits can exceed u64: saturate, it is over any limit anyway.
                let n = part.iter().fold(0u64, |acc, d| acc.saturating_mul(10).saturating_add(u64::from(d - b'0')));
                match length {
                    Some(prev) if prev != n => return Err(FramingError::Bad("conflicting Content-Length values")),
                    _ => length = Some(n),
                }
            }
        }
        // An explicit `Content-Length: 0` stays a length: a POST must reach Azure with its length, not without one.
        match length {
            None => Ok(Framing::None),
            Some(n) if n > max_body => Err(FramingError::TooLarge(n)),
            Some(n) => Ok(Framing::Length(n)),
        }
    }
}

fn trim_ascii(mut s: &[u8]) -> &[u8] {
    while let [first, rest @ ..] = s {
        if first.is_ascii_whitespace() {
            s = rest;
        } else {
            break;
        }
    }
    while let [rest @ .., last] = s {
        if last.is_ascii_whitespace() {
            s = rest;
        } else {
            break;
        }
    }
    s
}

/// `uri-host [ ":" port ]` (RFC 9110 §7.2), or empty: reg-name and IP-literal characters only, so that no
/// space, `/`, `@` or control byte can pass for a host.
fn is_host_value(v: &[u8]) -> bool {
    v.iter().all(|b| b.is_ascii_alphanumeric() || b"-._~!$&'()*+,;=:[]%".contains(b))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn head(text: &str) -> Head {
        parse_head(text.as_bytes(), 65536, 100).expect("parses").expect("complete")
    }

    #[test]
    fn complete_and_partial_heads() {
        let h = head("POST /openai/x?a=1 HTTP/1.1\r\nHost: h\r\nAPI-Key: k\r\n\r\nBODY");
        assert_eq!((h.method.as_str(), h.target.as_str(), h.minor_version), ("POST", "/openai/x?a=1", 1));
        assert_eq!(h.header("api-key"), Some(&b"k"[..]));
        assert_eq!(h.len, "POST /openai/x?a=1 HTTP/1.1\r\nHost: h\r\nAPI-Key: k\r\n\r\n".len());
        assert!(matches!(parse_head(b"GET / HTTP/1.1\r\nHost:", 100, 10), Ok(None)));
    }

    #[test]
    fn limits_map_to_statuses() {
        let long_line = format!("GET /{} HTTP/1.1", "a".repeat(200));
        assert_eq!(parse_head(long_line.as_bytes(), 100, 10).unwrap_err(), HeadError::UriTooLong);
        let whole = format!("GET /{} HTTP/1.1\r\nHost: a\r\n\r\n", "a".repeat(200));
        assert_eq!(parse_head(whole.as_bytes(), 100, 10).unwrap_err(), HeadError::UriTooLong);
        let big = format!("GET / HTTP/1.1\r\nx: {}\r\n", "a".repeat(200));
        assert_eq!(parse_head(big.as_bytes(), 100, 10).unwrap_err(), HeadError::TooLarge);
        let many: String = (0..20).map(|i| format!("h{i}: v\r\n")).collect();
        let many = format!("GET / HTTP/1.1\r\n{many}\r\n");
        assert_eq!(parse_head(many.as_bytes(), 10_000, 10).unwrap_err(), HeadError::TooManyHeaders);
        assert_eq!(parse_head(b"GET / HTTP/2.0\r\n\r\n", 100, 10).unwrap_err(), HeadError::Version);
        assert_eq!(parse_head(b"GET / HTTP/1.1\r\nx: a\0b\r\n\r\n", 100, 10).unwrap_err().status(), 400);
    }

    #[test]
    fn header_slots_on_the_stack_and_past_it() {
        let with = |n: usize| {
            let lines: String = (0..n).map(|i| format!("h{i}: v{i}\r\n")).collect();
            format!("GET / HTTP/1.1\r\n{lines}\r\n")
        };
        for max in [STACK_HEADERS, STACK_HEADERS + 72] {
            let h = parse_head(with(max).as_bytes(), 1 << 20, max).expect("parses").expect("complete");
            assert_eq!(h.headers.len(), max);
            assert_eq!(h.header(&format!("h{}", max - 1)), Some(format!("v{}", max - 1).as_bytes()));
            assert_eq!(parse_head(with(max + 1).as_bytes(), 1 << 20, max).unwrap_err(), HeadError::TooManyHeaders);
        }
    }

    #[test]
    fn framing_rules() {
        let f = |extra: &str| Framing::of(&head(&format!("POST / HTTP/1.1\r\n{extra}\r\n")), 1000);
        assert_eq!(f(""), Ok(Framing::None));
        assert_eq!(f("Content-Length: 5\r\n"), Ok(Framing::Length(5)));
        assert_eq!(f("Content-Length: 0\r\n"), Ok(Framing::Length(0)));
        assert_eq!(f("Content-Length: 5\r\nContent-Length: 5\r\n"), Ok(Framing::Length(5)));
        assert_eq!(f("Content-Length: 5, 5\r\n"), Ok(Framing::Length(5)));
        assert!(matches!(f("Content-Length: 5\r\nContent-Length: 6\r\n"), Err(FramingError::Bad(_))));
        assert!(matches!(f("Content-Length: -1\r\n"), Err(FramingError::Bad(_))));
        assert!(matches!(f("Content-Length: 0x10\r\n"), Err(FramingError::Bad(_))));
        assert_eq!(f("Content-Length: 100000000000\r\n"), Err(FramingError::TooLarge(100_000_000_000)));
        assert_eq!(f("Content-Length: 99999999999999999999\r\n"), Err(FramingError::TooLarge(u64::MAX)));
        assert_eq!(f("Transfer-Encoding: chunked\r\n"), Ok(Framing::Chunked));
        assert!(matches!(f("Transfer-Encoding: chunked\r\nContent-Length: 3\r\n"), Err(FramingError::Bad(_))));
        assert!(matches!(f("Transfer-Encoding: gzip, chunked\r\n"), Err(FramingError::Unsupported(_))));
    }

    #[test]
    fn keep_alive_by_version() {
        assert!(head("GET / HTTP/1.1\r\n\r\n").wants_keep_alive());
        assert!(!head("GET / HTTP/1.1\r\nConnection: close\r\n\r\n").wants_keep_alive());
        assert!(!head("GET / HTTP/1.0\r\n\r\n").wants_keep_alive());
        assert!(head("GET / HTTP/1.0\r\nConnection: Keep-Alive\r\n\r\n").wants_keep_alive());
    }

    #[test]
    fn host_rules() {
        let host = |text: &str| head(text).check_host();
        assert!(host("GET / HTTP/1.1\r\nHost: a.example:8000\r\n\r\n").is_ok());
        assert!(host("GET / HTTP/1.1\r\nHost: [::1]:80\r\n\r\n").is_ok());
        assert!(host("GET / HTTP/1.1\r\nHost:\r\n\r\n").is_ok());
        assert!(host("GET / HTTP/1.0\r\n\r\n").is_ok());
        assert!(host("GET / HTTP/1.1\r\n\r\n").is_err());
        assert!(host("GET / HTTP/1.1\r\nHost: a\r\nHost: a\r\n\r\n").is_err());
        assert!(host("GET / HTTP/1.0\r\nHost: a\r\nHost: b\r\n\r\n").is_err());
        assert!(host("GET / HTTP/1.1\r\nHost: a b\r\n\r\n").is_err());
        assert!(host("GET / HTTP/1.1\r\nHost: u@a\r\n\r\n").is_err());
        assert!(host("GET / HTTP/1.1\r\nHost: a/b\r\n\r\n").is_err());
    }
}
