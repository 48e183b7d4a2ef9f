//! A raw HTTP/1.1 client over a real socket: it writes exactly the bytes a test gives and parses responses
//! strictly, so that framing mistakes (a missing chunk terminator, a wrong length) show up as errors.

use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

/// Generous: only reached when the proxy misbehaves; tests never rely on it for timing.
pub const READ_TIMEOUT: Duration = Duration::from_secs(20);

#[derive(Debug, Clone)]
pub struct Resp {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
    /// Whether the body was framed with chunked encoding.
    pub chunked: bool,
}

impl Resp {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(n, _)| n.eq_ignore_ascii_case(name)).map(|(_, v)| v.as_str())
    }
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).unwrap_or_else(|e| panic!("body is not JSON ({e}): {}", self.text()))
    }
}

/// One connection, possibly carrying several requests.
pub struct Client {
    pub stream: TcpStream,
    buf: Vec<u8>,
}

impl Client {
    pub fn connect(addr: SocketAddr) -> Client {
        let stream = TcpStream::connect(addr).expect("connect to proxy");
        stream.set_read_timeout(Some(READ_TIMEOUT)).expect("timeout");
        stream.set_nodelay(true).expect("nodelay");
        Client { stream, buf: Vec::new() }
    }

    /// Wraps a stream the test connected itself (e.g. from a chosen local address).
    pub fn from_stream(stream: TcpStream) -> Client {
        stream.set_read_timeout(Some(READ_TIMEOUT)).expect("timeout");
        stream.set_nodelay(true).expect("nodelay");
        Client { stream, buf: Vec::new() }
    }

    pub fn send_raw(&mut self, bytes: &[u8]) {
        self.stream.write_all(bytes).expect("write request");
    }

    /// Sends a request with the client key and a body (Content-Length framed).
    pub fn send(&mut self, method: &str, path: &str, headers: &[(&str, &str)], body: &[u8]) {
        let mut req = format!("{method} {path} HTTP/1.1\r\nHost: proxy.test\r\n");
        for (n, v) in headers {
            req.push_str(&format!("{n}: {v}\r\n"));
        }
        if !body.is_empty() || method == "POST" {
            req.push_str(&format!("Content-Length: {}\r\n", body.len()));
        }
        req.push_str("\r\n");
        let mut bytes = req.into_bytes();
        bytes.extend_from_slice(body);
        self.send_raw(&bytes);
    }

    /// Reads more bytes; Ok(0) at EOF.
    fn fill(&mut self) -> io::Result<usize> {
        let mut tmp = [0u8; 16384];
        let n = self.stream.read(&mut tmp)?;
        self.buf.extend_from_slice(&tmp[..n]);
        Ok(n)
    }

    /// Reads one response head (skipping any 1xx) and returns (status, headers).
    pub fn read_head(&mut self) -> io::Result<(u16, Vec<(String, String)>)> {
        loop {
            if let Some(end) = find(&self.buf, b"\r\n\r\n") {
                let text = String::from_utf8_lossy(&self.buf[..end]).into_owned();
                self.buf.drain(..end + 4);
                let mut lines = text.split("\r\n");
                let status_line = lines.next().unwrap_or_default();
                let status: u16 = status_line.split(' ').nth(1).and_then(|s| s.parse().ok()).ok_or_else(|| {
                    io::Error::new(io::ErrorKind::InvalidData, format!("bad status line {status_line:?}"))
                })?;
                let headers = lines
                    .filter_map(|l| l.split_once(':'))
                    .map(|(n, v)| (n.trim().to_ascii_lowercase(), v.trim().to_string()))
                    .collect();
                if (100..200).contains(&status) {
                    continue;
                }
                return Ok((status, headers));
            }
            if self.fill()? == 0 {
                return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "EOF before a response head"));
            }
        }
    }

    /// Reads a whole response. Errors on broken framing (bad chunk line, EOF inside a body).
    pub fn read_response(&mut self, head_request: bool) -> io::Result<Resp> {
        let (status, headers) = self.read_head()?;
        let get = |n: &str| headers.iter().find(|(k, _)| k == n).map(|(_, v)| v.clone());
        let chunked = get("transfer-encoding").is_some_and(|v| v.eq_ignore_ascii_case("chunked"));
        let body = if head_request || status == 204 || status == 304 {
            Vec::new()
        } else if chunked {
            self.read_chunked()?
        } else if let Some(len) = get("content-length") {
            let len: usize = len.parse().map_err(|_| io::Error::new(io::ErrorKind::InvalidData, "bad length"))?;
            while self.buf.len() < len {
                if self.fill()? == 0 {
                    return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "EOF inside a length body"));
                }
            }
            self.buf.drain(..len).collect()
        } else {
            while self.fill()? > 0 {}
            std::mem::take(&mut self.buf)
        };
        Ok(Resp { status, headers, body, chunked })
    }

    fn read_chunked(&mut self) -> io::Result<Vec<u8>> {
        let mut body = Vec::new();
        loop {
            let line = self.read_line()?;
            let size = usize::from_str_radix(line.split(';').next().unwrap_or_default().trim(), 16)
                .map_err(|_| io::Error::new(io::ErrorKind::InvalidData, format!("bad chunk line {line:?}")))?;
            if size == 0 {
                let end = self.read_line()?;
                if !end.is_empty() {
                    return Err(io::Error::new(io::ErrorKind::InvalidData, "trailers not expected"));
                }
                return Ok(body);
            }
            while self.buf.len() < size + 2 {
                if self.fill()? == 0 {
                    return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "EOF inside a chunk"));
                }
            }
            body.extend_from_slice(&self.buf[..size]);
            self.buf.drain(..size + 2);
        }
    }

    /// Reads one CRLF-terminated line (used for chunk sizes and for reading a stream piece by piece).
    pub fn read_line(&mut self) -> io::Result<String> {
        loop {
            if let Some(end) = find(&self.buf, b"\r\n") {
                let line = String::from_utf8_lossy(&self.buf[..end]).into_owned();
                self.buf.drain(..end + 2);
                return Ok(line);
            }
            if self.fill()? == 0 {
                return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "EOF inside a line"));
            }
        }
    }

    /// Reads chunked-body bytes until `needle` has appeared in the decoded data read so far by this call.
    /// Returns the decoded bytes. Used to see a stream's events one by one.
    pub fn read_chunks_until(&mut self, needle: &[u8]) -> io::Result<Vec<u8>> {
        let mut out = Vec::new();
        while find(&out, needle).is_none() {
            let line = self.read_line()?;
            let size = usize::from_str_radix(line.trim(), 16)
                .map_err(|_| io::Error::new(io::ErrorKind::InvalidData, format!("bad chunk line {line:?}")))?;
            if size == 0 {
                return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "stream ended"));
            }
            while self.buf.len() < size + 2 {
                if self.fill()? == 0 {
                    return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "EOF inside a chunk"));
                }
            }
            out.extend_from_slice(&self.buf[..size]);
            self.buf.drain(..size + 2);
        }
        Ok(out)
    }

    /// Reads until EOF and returns everything that was still unread (raw bytes).
    pub fn read_to_end(&mut self) -> io::Result<Vec<u8>> {
        while self.fill()? > 0 {}
        Ok(std::mem::take(&mut self.buf))
    }

    /// True when the server closed the connection (EOF or reset) with nothing more to read.
    pub fn is_closed(&mut self) -> bool {
        matches!(self.fill(), Ok(0) | Err(_)) && self.buf.is_empty()
    }
}

pub fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

/// One request on a fresh connection, with the client key, returning the whole response.
pub fn call(addr: SocketAddr, method: &str, path: &str, headers: &[(&str, &str)], body: &[u8]) -> Resp {
    let mut c = Client::connect(addr);
    c.send(method, path, headers, body);
    c.read_response(method == "HEAD").expect("a complete response")
}

/// POST a chat completion with the client key.
pub fn chat(addr: SocketAddr, body: &str) -> Resp {
    call(
        addr,
        "POST",
        super::proxy::CHAT,
        &[("api-key", "client-key"), ("Content-Type", "application/json")],
        body.as_bytes(),
    )
}

/// Reads one response head byte by byte, 1xx included, so that nothing after it is consumed.
pub fn read_raw_head(s: &mut TcpStream) -> io::Result<(u16, String)> {
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        if s.read(&mut byte)? == 0 {
            return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "EOF before a response head"));
        }
        head.push(byte[0]);
    }
    let text = String::from_utf8_lossy(&head).into_owned();
    let status = text.split(' ').nth(1).and_then(|s| s.parse().ok()).unwrap_or(0);
    Ok((status, text))
}

/// Reads one request (head, then `Content-Length` bytes) from `s`, for upstreams that must take a whole request
/// before answering; `None` at EOF or on an error.
pub fn read_request(s: &mut impl Read) -> Option<Vec<u8>> {
    let mut req = Vec::new();
    let mut buf = [0u8; 16 * 1024];
    loop {
        if let Some(end) = find(&req, b"\r\n\r\n") {
            if req.len() >= end + 4 + request_content_length(&req[..end]) {
                return Some(req);
            }
        }
        match s.read(&mut buf) {
            Ok(0) | Err(_) => return None,
            Ok(n) => req.extend_from_slice(&buf[..n]),
        }
    }
}

/// The `Content-Length` of a request head, 0 without one.
pub fn request_content_length(head: &[u8]) -> usize {
    let head = String::from_utf8_lossy(head).to_ascii_lowercase();
    head.lines().find_map(|l| l.strip_prefix("content-length:").and_then(|v| v.trim().parse().ok())).unwrap_or(0)
}
