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
    let mut decoder = ChunkedDecoder::new(max);
    loop {
        let used = decoder.feed(&conn.buf)?;
        conn.consume(used);
        if decoder.is_done() {
            return Ok(decoder.into_body());
        }
        fill(conn)?;
    }
}

/// An incremental decoder for a chunked body: it takes bytes as they arrive, in any split, copies chunk data
/// straight into the body (a huge chunk is never buffered twice), and checks every size against the limit before
/// taking a byte of it. Kept free of I/O so that it can be fuzzed.
pub struct ChunkedDecoder {
    state: Decoding,
    body: Vec<u8>,
    max: u64,
    trailer_bytes: usize,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Decoding {
    /// Expecting a chunk-size line.
    Size,
    /// Inside a chunk's data, with this many bytes still to come.
    Data(u64),
    /// Expecting the CRLF that ends a chunk's data.
    DataEnd,
    /// After the last chunk: trailer lines until an empty one.
    Trailer,
    Done,
}

impl ChunkedDecoder {
    pub fn new(max: u64) -> ChunkedDecoder {
        ChunkedDecoder { state: Decoding::Size, body: Vec::new(), max, trailer_bytes: 0 }
    }

    /// Consumes as much of `input` as it can and returns how many bytes it used; the rest (a partial line, or
    /// what follows the body) is for the caller to keep.
    pub fn feed(&mut self, input: &[u8]) -> Result<usize, BodyError> {
        let mut pos = 0;
        loop {
            let rest = &input[pos..];
            match self.state {
                Decoding::Size | Decoding::Trailer => {
                    let Some(nl) = rest.iter().position(|b| *b == b'\n') else {
                        if rest.len() > MAX_CHUNK_LINE {
                            return Err(BodyError::Malformed("chunk-size or trailer line too long"));
                        }
                        return Ok(pos);
                    };
                    if nl > MAX_CHUNK_LINE {
                        return Err(BodyError::Malformed("chunk-size or trailer line too long"));
                    }
                    let line = rest[..nl].strip_suffix(b"\r").unwrap_or(&rest[..nl]);
                    pos += nl + 1;
                    if self.state == Decoding::Trailer {
                        if line.is_empty() {
                            self.state = Decoding::Done;
                            return Ok(pos);
                        }
                        self.trailer_bytes += line.len();
                        if self.trailer_bytes > MAX_TRAILER_BYTES {
                            return Err(BodyError::Malformed("chunked trailer too large"));
                        }
                        continue;
                    }
                    let size = parse_chunk_size(line)?;
                    if size == 0 {
                        self.state = Decoding::Trailer;
                    } else if (self.body.len() as u64).saturating_add(size) > self.max {
                        return Err(BodyError::TooLarge);
                    } else {
                        self.state = Decoding::Data(size);
                    }
                }
                Decoding::Data(left) => {
                    let take = rest.len().min(usize::try_from(left).unwrap_or(usize::MAX));
                    if take == 0 {
                        return Ok(pos);
                    }
                    self.body.extend_from_slice(&rest[..take]);
                    pos += take;
                    let left = left - take as u64;
                    self.state = if left == 0 { Decoding::DataEnd } else { Decoding::Data(left) };
                }
                Decoding::DataEnd => {
                    if rest.len() < 2 {
                        return Ok(pos);
                    }
                    if &rest[..2] != b"\r\n" {
                        return Err(BodyError::Malformed("chunk data not followed by CRLF"));
                    }
                    pos += 2;
                    self.state = Decoding::Size;
                }
                Decoding::Done => return Ok(pos),
            }
        }
    }

    pub fn is_done(&self) -> bool {
        self.state == Decoding::Done
    }

    pub fn into_body(self) -> Vec<u8> {
        self.body
    }
}

/// `1a;ext=1` → 26. At most 16 hex digits, so the value always fits in a u64.
fn parse_chunk_size(line: &[u8]) -> Result<u64, BodyError> {
    let digits = line.split(|b| *b == b';').next().unwrap_or_default();
    // Only spaces and tabs may pad it (RFC 9112 BWS); anything else, a stray CR included, is refused.
    let digits = std::str::from_utf8(digits)
        .map_err(|_| BodyError::Malformed("bad chunk size"))?
        .trim_matches(|c| c == ' ' || c == '\t');
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
        Conn::new(crate::http::ClientStream::Plain(s), peer, &Arc::new(AtomicUsize::new(0)))
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
        let mut c = conn_with(b"5\r\r\nhello\r\n0\r\n\r\n");
        assert!(matches!(read_body(&mut c, Framing::Chunked, 100), Err(BodyError::Malformed(_))), "stray CR");
        let mut c = conn_with("\u{a0}5\r\nhello\r\n0\r\n\r\n".as_bytes());
        assert!(matches!(read_body(&mut c, Framing::Chunked, 100), Err(BodyError::Malformed(_))), "unicode space");
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
    fn decoder_gives_the_same_body_for_every_split() {
        let input = b"5;x=y\r\nhello\r\n6\r\n world\r\n0\r\nTrailer: 1\r\n\r\nNEXT";
        for split in 0..input.len() {
            let mut d = ChunkedDecoder::new(100);
            let mut used = d.feed(&input[..split]).expect("first part");
            let mut rest = input[used..].to_vec();
            used = d.feed(&rest).expect("second part");
            rest.drain(..used);
            assert!(d.is_done(), "split at {split}");
            assert_eq!(rest, b"NEXT", "split at {split}");
            assert_eq!(d.into_body(), b"hello world", "split at {split}");
        }
    }

    #[test]
    fn length_over_limit_reads_nothing() {
        let mut c = conn_with(b"abc");
        assert!(matches!(read_body(&mut c, Framing::Length(100_000_000_000), 100), Err(BodyError::TooLarge)));
        let mut c = conn_with(b"abc");
        assert!(matches!(read_body(&mut c, Framing::Length(10), 100), Err(BodyError::Closed)));
    }
}
