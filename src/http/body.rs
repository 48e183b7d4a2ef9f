//! Request bodies: read whole into one buffer (so that every upstream attempt can replay it), bounded by
//! `max_body_bytes`, from a `Content-Length` or a chunked body. Nothing is allocated in proportion to what a
//! client merely claims: lengths are checked against the limit before reading, chunk sizes before copying.

use std::io;

use super::conn::Conn;
use super::parse::Framing;

/// Longest chunk-size line or trailer line accepted (chunk extensions included).
const MAX_CHUNK_LINE: usize = 4096;
/// Total bytes of trailer fields accepted after the last chunk (they are read and dropped).
const MAX_TRAILER_BYTES: usize = 16 * 1024;

#[derive(Debug)]
pub enum BodyError {
    /// 413: the body is larger than the limit.
    TooLarge,
    /// 400: broken chunked framing.
    Malformed(&'static str),
    /// The client closed before the whole body arrived.
    Closed,
    /// A read failed; a timeout (`WouldBlock`/`TimedOut`) is answered 408.
    Io(io::Error),
}

impl BodyError {
    pub fn is_timeout(&self) -> bool {
        matches!(self, BodyError::Io(e) if matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut))
    }
}

/// Reads the body that `framing` describes out of `conn` (its buffer first, then the socket). On success the
/// buffer holds only what follows the body: the start of a pipelined request, if any.
pub fn read_body(conn: &mut Conn, framing: Framing, max: u64) -> Result<Vec<u8>, BodyError> {
    match framing {
        Framing::None => Ok(Vec::new()),
        Framing::Length(n) => read_length(conn, n, max),
        Framing::Chunked => read_chunked(conn, max),
    }
}

fn fill(conn: &mut Conn) -> Result<(), BodyError> {
    match conn.read_more() {
        Ok(0) => Err(BodyError::Closed),
        Ok(_) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::Interrupted => Ok(()),
        Err(e) => Err(BodyError::Io(e)),
    }
}

fn read_length(conn: &mut Conn, n: u64, max: u64) -> Result<Vec<u8>, BodyError> {
    if n > max {
        return Err(BodyError::TooLarge);
    }
    let n = usize::try_from(n).map_err(|_| BodyError::TooLarge)?;
    conn.buf.reserve(n.saturating_sub(conn.buf.len()));
    while conn.buf.len() < n {
        fill(conn)?;
    }
    let rest = conn.buf.split_off(n);
    Ok(std::mem::replace(&mut conn.buf, rest))
}

fn read_chunked(conn: &mut Conn, max: u64) -> Result<Vec<u8>, BodyError> {
    let mut body = Vec::new();
    loop {
        let line = read_line(conn)?;
        let size = parse_chunk_size(&line)?;
        if size == 0 {
            break;
        }
        if (body.len() as u64).saturating_add(size) > max {
            return Err(BodyError::TooLarge);
        }
        let size = size as usize; // fits: it is at most `max`, which fits in memory
        while conn.buf.len() < size + 2 {
            fill(conn)?;
        }
        if &conn.buf[size..size + 2] != b"\r\n" {
            return Err(BodyError::Malformed("chunk data not followed by CRLF"));
        }
        body.extend_from_slice(&conn.buf[..size]);
        conn.consume(size + 2);
    }
    let mut trailer_bytes = 0;
    loop {
        let line = read_line(conn)?;
        if line.is_empty() {
            return Ok(body);
        }
        trailer_bytes += line.len();
        if trailer_bytes > MAX_TRAILER_BYTES {
            return Err(BodyError::Malformed("chunked trailer too large"));
        }
    }
}

/// Takes one line (without its CRLF or LF) off the front of the buffer, reading more as needed.
fn read_line(conn: &mut Conn) -> Result<Vec<u8>, BodyError> {
    loop {
        if let Some(nl) = conn.buf.iter().position(|b| *b == b'\n') {
            let mut line: Vec<u8> = conn.buf[..nl].to_vec();
            conn.consume(nl + 1);
            if line.last() == Some(&b'\r') {
                line.pop();
            }
            return Ok(line);
        }
        if conn.buf.len() > MAX_CHUNK_LINE {
            return Err(BodyError::Malformed("chunk-size line too long"));
        }
        fill(conn)?;
    }
}

/// `1a;ext=1` → 26. At most 16 hex digits, so the value always fits in a u64.
fn parse_chunk_size(line: &[u8]) -> Result<u64, BodyError> {
    let digits = line.split(|b| *b == b';').next().unwrap_or_default();
    let digits = std::str::from_utf8(digits).map_err(|_| BodyError::Malformed("bad chunk size"))?.trim();
    if digits.is_empty() || digits.len() > 16 || !digits.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(BodyError::Malformed("bad chunk size"));
    }
    u64::from_str_radix(digits, 16).map_err(|_| BodyError::Malformed("bad chunk size"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
    use std::net::{TcpListener, TcpStream};
    use std::sync::atomic::AtomicUsize;
    use std::sync::Arc;

    /// A Conn whose peer has sent `bytes` and closed.
    fn conn_with(bytes: &[u8]) -> Conn {
        let l = TcpListener::bind("127.0.0.1:0").expect("bind");
        let mut c = TcpStream::connect(l.local_addr().expect("addr")).expect("connect");
        let (s, peer) = l.accept().expect("accept");
        c.write_all(bytes).expect("write");
        drop(c);
        Conn::new(s, peer, &Arc::new(AtomicUsize::new(0)))
    }

    #[test]
    fn length_body_leaves_pipelined_bytes() {
        let mut c = conn_with(b"helloGET / HTTP/1.1\r\n\r\n");
        assert_eq!(read_body(&mut c, Framing::Length(5), 100).expect("body"), b"hello");
        while c.read_more().expect("read") > 0 {}
        assert_eq!(c.buf, b"GET / HTTP/1.1\r\n\r\n");
    }

    #[test]
    fn chunked_body_with_extensions_and_trailers() {
        let mut c = conn_with(b"5;x=y\r\nhello\r\n6\r\n world\r\n0\r\nTrailer: 1\r\n\r\nNEXT");
        assert_eq!(read_body(&mut c, Framing::Chunked, 100).expect("body"), b"hello world");
        assert_eq!(&c.buf[..], b"NEXT");
    }

    #[test]
    fn chunked_limits_and_errors() {
        let mut c = conn_with(b"ffffffffffffffff\r\nabc");
        assert!(matches!(read_body(&mut c, Framing::Chunked, 100), Err(BodyError::TooLarge)));
        let mut c = conn_with(b"10000000000000000\r\n");
        assert!(matches!(read_body(&mut c, Framing::Chunked, 100), Err(BodyError::Malformed(_))));
        let mut c = conn_with(b"-5\r\nhello\r\n0\r\n\r\n");
        assert!(matches!(read_body(&mut c, Framing::Chunked, 100), Err(BodyError::Malformed(_))));
        let mut c = conn_with(b"5\r\nhelloXX0\r\n\r\n");
        assert!(matches!(read_body(&mut c, Framing::Chunked, 100), Err(BodyError::Malformed(_))));
        let mut c = conn_with(b"5\r\nhel");
        assert!(matches!(read_body(&mut c, Framing::Chunked, 100), Err(BodyError::Closed)));
        let mut c = conn_with(&[b'1'; 5000]);
        assert!(matches!(read_body(&mut c, Framing::Chunked, 100), Err(BodyError::Malformed(_))));
    }

    #[test]
    fn length_over_limit_reads_nothing() {
        let mut c = conn_with(b"abc");
        assert!(matches!(read_body(&mut c, Framing::Length(100_000_000_000), 100), Err(BodyError::TooLarge)));
        let mut c = conn_with(b"abc");
        assert!(matches!(read_body(&mut c, Framing::Length(10), 100), Err(BodyError::Closed)));
    }
}
