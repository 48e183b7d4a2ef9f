//! A scriptable mock Azure OpenAI instance over real loopback TCP.
//!
//! `MockAzure::start(handler)` binds `127.0.0.1:0` and serves HTTP/1.1 with keep-alive. Every request is
//! recorded (before the handler runs) and answered with the `Reply` the handler returns. Dropping the mock
//! stops accepting, releases `Hang`/`Sse`/`Delayed` waits and shuts down the connections still open, so it
//! behaves like an instance that went away.
//!
//! This file is also compiled into `examples/mock_azure.rs` via `#[path]`, so it only uses std, `libc`,
//! `serde_json` and the proxy's own `sys` (for the reset).
#![allow(dead_code)]

use std::collections::HashMap;
use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc::{Receiver, RecvTimeoutError};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::{self, JoinHandle};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde_json::{json, Value};

/// Maximum size of a request head (request line + headers).
const MAX_HEAD: usize = 64 * 1024;

type Handler = dyn Fn(&Recorded) -> Reply + Send + Sync + 'static;

/// One request as the mock received it.
#[derive(Clone, Debug)]
pub struct Recorded {
    pub method: String,
    /// Path + query exactly as received.
    pub target: String,
    /// Names lowercased, values as received (lossy UTF-8, surrounding whitespace trimmed).
    pub headers: Vec<(String, String)>,
    /// The decoded body (chunked framing removed).
    pub body: Vec<u8>,
}

impl Recorded {
    /// First header with this name (case-insensitive).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(n, _)| n.eq_ignore_ascii_case(name)).map(|(_, v)| v.as_str())
    }

    /// How many times a header with this name (case-insensitive) appeared.
    pub fn header_count(&self, name: &str) -> usize {
        self.headers.iter().filter(|(n, _)| n.eq_ignore_ascii_case(name)).count()
    }

    /// The body parsed as JSON, if it is JSON.
    pub fn json(&self) -> Option<Value> {
        serde_json::from_slice(&self.body).ok()
    }

    /// The path part of the target (before `?`).
    pub fn path(&self) -> &str {
        self.target.split('?').next().unwrap_or("")
    }

    /// The query part of the target (after `?`), if any.
    pub fn query(&self) -> Option<&str> {
        self.target.split_once('?').map(|(_, q)| q)
    }
}

/// What the mock does with one request.
pub enum Reply {
    /// status + headers + body, framed with Content-Length (unless `headers` already has a content-length,
    /// which is then sent as given — useful to lie about the length).
    Full { status: u16, headers: Vec<(String, String)>, body: Vec<u8> },
    /// status + headers, body sent with Transfer-Encoding: chunked, one chunk per (non-empty) element,
    /// flushed after each.
    Chunked { status: u16, headers: Vec<(String, String)>, chunks: Vec<Vec<u8>> },
    /// 200, content-type text/event-stream, chunked; writes events[0] verbatim, flushes; then before each
    /// further event either waits `pause` or, if `gate` is Some, blocks on `gate.recv()` (a closed gate =
    /// continue without waiting). Ends with the zero chunk.
    Sse { events: Vec<String>, pause: Duration, gate: Option<Receiver<()>> },
    /// Like `Sse` but with extra response headers (what `Reply::Sse.with_header(..)` turns into).
    SseWithHeaders { headers: Vec<(String, String)>, events: Vec<String>, pause: Duration, gate: Option<Receiver<()>> },
    /// Writes the head (Content-Length: declared_len, or chunked if None) plus `partial` body bytes (one
    /// chunk if chunked), flushes, waits `after`, then resets the connection (SO_LINGER 0 + close).
    ResetMidBody {
        status: u16,
        headers: Vec<(String, String)>,
        partial: Vec<u8>,
        declared_len: Option<usize>,
        after: Duration,
    },
    /// Reset the connection (SO_LINGER 0 + close) without writing anything.
    ResetBeforeHead,
    /// Close cleanly (FIN) without writing anything.
    CloseBeforeHead,
    /// Write nothing and hold the connection open until the mock is dropped (or `for_at_most` elapses),
    /// then close it cleanly.
    Hang { for_at_most: Duration },
    /// Sleep `delay` (cut short if the mock is dropped), then behave like the inner reply.
    Delayed { delay: Duration, reply: Box<Reply> },
}

impl Reply {
    /// `Full` with `content-type: application/json`.
    pub fn json(status: u16, body: Value) -> Reply {
        Reply::Full {
            status,
            headers: vec![("content-type".to_string(), "application/json".to_string())],
            body: serde_json::to_vec(&body).expect("serializing a serde_json::Value cannot fail"),
        }
    }

    /// `Full` with `content-type: text/plain`.
    pub fn text(status: u16, body: &str) -> Reply {
        Reply::Full {
            status,
            headers: vec![("content-type".to_string(), "text/plain".to_string())],
            body: body.as_bytes().to_vec(),
        }
    }

    /// An `Sse` reply with a fixed pause between events and no gate.
    pub fn sse(events: Vec<String>, pause: Duration) -> Reply {
        Reply::Sse { events, pause, gate: None }
    }

    /// `Delayed` wrapper.
    pub fn delayed(self, delay: Duration) -> Reply {
        Reply::Delayed { delay, reply: Box::new(self) }
    }

    /// Adds a response header to Full / Chunked / ResetMidBody / Sse (Sse becomes SseWithHeaders);
    /// goes through Delayed; other variants write no head and are returned unchanged.
    pub fn with_header(self, name: &str, value: &str) -> Reply {
        let h = (name.to_string(), value.to_string());
        match self {
            Reply::Full { status, mut headers, body } => {
                headers.push(h);
                Reply::Full { status, headers, body }
            }
            Reply::Chunked { status, mut headers, chunks } => {
                headers.push(h);
                Reply::Chunked { status, headers, chunks }
            }
            Reply::ResetMidBody { status, mut headers, partial, declared_len, after } => {
                headers.push(h);
                Reply::ResetMidBody { status, headers, partial, declared_len, after }
            }
            Reply::Sse { events, pause, gate } => Reply::SseWithHeaders { headers: vec![h], events, pause, gate },
            Reply::SseWithHeaders { mut headers, events, pause, gate } => {
                headers.push(h);
                Reply::SseWithHeaders { headers, events, pause, gate }
            }
            Reply::Delayed { delay, reply } => {
                Reply::Delayed { delay, reply: Box::new(reply.with_header(name, value)) }
            }
            other => other,
        }
    }
}

struct Shared {
    requests: Mutex<Vec<Recorded>>,
    connections: AtomicUsize,
    stopping: AtomicBool,
    stop_flag: Mutex<bool>,
    stop_cv: Condvar,
    /// A dup of every open connection, so Drop can shut them down. A connection thread removes its entry
    /// before closing its own handle (otherwise the dup would keep the socket open / prevent the RST).
    open: Mutex<HashMap<usize, TcpStream>>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Shared {
    fn stopped(&self) -> bool {
        self.stopping.load(Ordering::SeqCst)
    }

    /// Sleeps `d`, cut short by stop. Returns false if the mock is stopping.
    fn sleep(&self, d: Duration) -> bool {
        let guard = lock(&self.stop_flag);
        let (guard, _) =
            self.stop_cv.wait_timeout_while(guard, d, |stopped| !*stopped).unwrap_or_else(|e| e.into_inner());
        !*guard
    }

    fn stop(&self) {
        self.stopping.store(true, Ordering::SeqCst);
        *lock(&self.stop_flag) = true;
        self.stop_cv.notify_all();
    }
}

/// A running mock instance. Dropping it stops it.
pub struct MockAzure {
    addr: SocketAddr,
    shared: Arc<Shared>,
    accept: Option<JoinHandle<()>>,
}

impl MockAzure {
    /// Binds 127.0.0.1:0 and starts serving. Panics if it cannot bind.
    pub fn start<F>(handler: F) -> MockAzure
    where
        F: Fn(&Recorded) -> Reply + Send + Sync + 'static,
    {
        MockAzure::start_on("127.0.0.1:0", handler).expect("bind mock Azure on 127.0.0.1:0")
    }

    /// Binds `addr` (e.g. "127.0.0.1:8081") and starts serving.
    pub fn start_on<F>(addr: &str, handler: F) -> io::Result<MockAzure>
    where
        F: Fn(&Recorded) -> Reply + Send + Sync + 'static,
    {
        let listener = TcpListener::bind(addr)?;
        let addr = listener.local_addr()?;
        let shared = Arc::new(Shared {
            requests: Mutex::new(Vec::new()),
            connections: AtomicUsize::new(0),
            stopping: AtomicBool::new(false),
            stop_flag: Mutex::new(false),
            stop_cv: Condvar::new(),
            open: Mutex::new(HashMap::new()),
        });
        let handler: Arc<Handler> = Arc::new(handler);
        let sh = Arc::clone(&shared);
        let accept = thread::Builder::new()
            .name(format!("mock-accept-{}", addr.port()))
            .spawn(move || accept_loop(listener, sh, handler))?;
        Ok(MockAzure { addr, shared, accept: Some(accept) })
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// "http://127.0.0.1:PORT" (no trailing slash).
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Every request received so far, in arrival order.
    pub fn requests(&self) -> Vec<Recorded> {
        lock(&self.shared.requests).clone()
    }

    /// The most recent request, if any.
    pub fn last_request(&self) -> Option<Recorded> {
        lock(&self.shared.requests).last().cloned()
    }

    /// Number of requests received so far.
    pub fn hits(&self) -> usize {
        lock(&self.shared.requests).len()
    }

    /// TCP connections accepted so far.
    pub fn connections(&self) -> usize {
        self.shared.connections.load(Ordering::SeqCst)
    }

    /// Number of connections currently open (not yet closed by the mock).
    pub fn open_connections(&self) -> usize {
        lock(&self.shared.open).len()
    }
}

impl Drop for MockAzure {
    fn drop(&mut self) {
        self.shared.stop();
        // Wake the accept thread.
        let mut wake = self.addr;
        if wake.ip().is_unspecified() {
            wake.set_ip(if wake.is_ipv4() {
                std::net::Ipv4Addr::LOCALHOST.into()
            } else {
                std::net::Ipv6Addr::LOCALHOST.into()
            });
        }
        let _ = TcpStream::connect_timeout(&wake, Duration::from_secs(1));
        if let Some(h) = self.accept.take() {
            let _ = h.join();
        }
        for (_, s) in lock(&self.shared.open).drain() {
            let _ = s.shutdown(Shutdown::Both);
        }
    }
}

fn accept_loop(listener: TcpListener, shared: Arc<Shared>, handler: Arc<Handler>) {
    let mut next_id = 0usize;
    for conn in listener.incoming() {
        if shared.stopped() {
            break;
        }
        let stream = match conn {
            Ok(s) => s,
            Err(_) => {
                // e.g. EMFILE; don't spin.
                thread::sleep(Duration::from_millis(10));
                continue;
            }
        };
        shared.connections.fetch_add(1, Ordering::SeqCst);
        let _ = stream.set_nodelay(true);
        next_id += 1;
        let id = next_id;
        match stream.try_clone() {
            Ok(dup) => {
                lock(&shared.open).insert(id, dup);
            }
            Err(_) => continue,
        }
        let sh = Arc::clone(&shared);
        let h = Arc::clone(&handler);
        let spawned =
            thread::Builder::new().name(format!("mock-conn-{id}")).spawn(move || serve_connection(stream, id, sh, h));
        if spawned.is_err() {
            lock(&shared.open).remove(&id);
        }
    }
}

/// How a connection ends.
enum Ending {
    Close,
    Reset,
}

fn serve_connection(stream: TcpStream, id: usize, shared: Arc<Shared>, handler: Arc<Handler>) {
    let mut reader = BufReader::new(stream);
    let ending = connection_loop(&mut reader, &shared, &*handler);
    let stream = reader.into_inner();
    lock(&shared.open).remove(&id);
    match ending {
        Ending::Close => {
            let _ = stream.shutdown(Shutdown::Write);
        }
        Ending::Reset => reset(&stream),
    }
    drop(stream);
}

/// Sets SO_LINGER {on, 0} so that closing the socket sends a RST.
fn reset(stream: &TcpStream) {
    azure_proxy::sys::reset_on_close(stream);
}

/// An error while reading a request: either the peer went away (close quietly) or the request is bad
/// (answer with this status, then close).
enum ReadError {
    Gone,
    Bad(u16, &'static str),
}

impl From<io::Error> for ReadError {
    fn from(_: io::Error) -> Self {
        ReadError::Gone
    }
}

struct Request {
    rec: Recorded,
    keep_alive: bool,
}

fn connection_loop(reader: &mut BufReader<TcpStream>, shared: &Shared, handler: &Handler) -> Ending {
    loop {
        if shared.stopped() {
            return Ending::Close;
        }
        let req = match read_request(reader) {
            Ok(Some(r)) => r,
            Ok(None) | Err(ReadError::Gone) => return Ending::Close,
            Err(ReadError::Bad(status, msg)) => {
                let _ = write_full(
                    reader.get_mut(),
                    status,
                    &[("content-type".to_string(), "text/plain".to_string())],
                    msg.as_bytes(),
                    false,
                );
                return Ending::Close;
            }
        };
        lock(&shared.requests).push(req.rec.clone());
        let reply = handler(&req.rec);
        match send_reply(reader.get_mut(), reply, req.keep_alive, shared) {
            Ok(After::KeepAlive) if req.keep_alive => continue,
            Ok(After::KeepAlive) | Ok(After::Close) | Err(_) => return Ending::Close,
            Ok(After::Reset) => return Ending::Reset,
        }
    }
}

/// Reads one line (up to and including '\n') counting against the head budget.
fn read_line(reader: &mut BufReader<TcpStream>, budget: &mut usize) -> Result<Vec<u8>, ReadError> {
    let mut line = Vec::new();
    let n = reader.by_ref().take(*budget as u64 + 1).read_until(b'\n', &mut line)?;
    if n > *budget {
        return Err(ReadError::Bad(431, "request head too large"));
    }
    *budget -= n;
    Ok(line)
}

fn trim_eol(line: &[u8]) -> &[u8] {
    let line = line.strip_suffix(b"\n").unwrap_or(line);
    line.strip_suffix(b"\r").unwrap_or(line)
}

/// Reads one request. Ok(None) = clean EOF before any byte of a new request.
fn read_request(reader: &mut BufReader<TcpStream>) -> Result<Option<Request>, ReadError> {
    let mut budget = MAX_HEAD;
    // Request line (tolerate empty lines before it, RFC 9112 §2.2).
    let request_line = loop {
        let line = read_line(reader, &mut budget)?;
        if line.is_empty() {
            return Ok(None);
        }
        if !line.ends_with(b"\n") {
            return Err(ReadError::Gone);
        }
        let t = trim_eol(&line);
        if !t.is_empty() {
            break String::from_utf8_lossy(t).into_owned();
        }
    };
    let mut parts = request_line.split(' ');
    let (method, target, version) = match (parts.next(), parts.next(), parts.next(), parts.next()) {
        (Some(m), Some(t), Some(v), None) if !m.is_empty() && !t.is_empty() => {
            (m.to_string(), t.to_string(), v.to_string())
        }
        _ => return Err(ReadError::Bad(400, "malformed request line")),
    };
    if !version.starts_with("HTTP/1.") {
        return Err(ReadError::Bad(505, "HTTP version not supported"));
    }

    let mut headers = Vec::new();
    loop {
        let line = read_line(reader, &mut budget)?;
        if !line.ends_with(b"\n") {
            return Err(ReadError::Gone);
        }
        let t = trim_eol(&line);
        if t.is_empty() {
            break;
        }
        let s = String::from_utf8_lossy(t);
        let Some((name, value)) = s.split_once(':') else {
            return Err(ReadError::Bad(400, "malformed header line"));
        };
        if name.is_empty() || name.ends_with(' ') || name.ends_with('\t') {
            return Err(ReadError::Bad(400, "malformed header name"));
        }
        headers.push((name.to_ascii_lowercase(), value.trim().to_string()));
    }

    let mut rec = Recorded { method, target, headers, body: Vec::new() };

    let conn_tokens: Vec<String> = rec
        .headers
        .iter()
        .filter(|(n, _)| n == "connection")
        .flat_map(|(_, v)| v.split(',').map(|t| t.trim().to_ascii_lowercase()))
        .collect();
    let keep_alive = if version == "HTTP/1.0" {
        conn_tokens.iter().any(|t| t == "keep-alive")
    } else {
        !conn_tokens.iter().any(|t| t == "close")
    };

    let chunked = rec
        .headers
        .iter()
        .filter(|(n, _)| n == "transfer-encoding")
        .any(|(_, v)| v.to_ascii_lowercase().contains("chunked"));
    let content_length = if chunked {
        None
    } else {
        match rec.header("content-length") {
            Some(v) => match v.trim().parse::<usize>() {
                Ok(n) => Some(n),
                Err(_) => return Err(ReadError::Bad(400, "bad content-length")),
            },
            None => None,
        }
    };

    let expects_body = chunked || content_length.unwrap_or(0) > 0;
    if expects_body && rec.header("expect").is_some_and(|v| v.eq_ignore_ascii_case("100-continue")) {
        let w = reader.get_mut();
        w.write_all(b"HTTP/1.1 100 Continue\r\n\r\n")?;
        w.flush()?;
    }

    if chunked {
        rec.body = read_chunked_body(reader)?;
    } else if let Some(n) = content_length {
        let mut body = vec![0u8; n];
        reader.read_exact(&mut body)?;
        rec.body = body;
    }

    Ok(Some(Request { rec, keep_alive }))
}

fn read_chunked_body(reader: &mut BufReader<TcpStream>) -> Result<Vec<u8>, ReadError> {
    let mut body = Vec::new();
    let mut budget = MAX_HEAD;
    loop {
        let line = read_line(reader, &mut budget)?;
        if !line.ends_with(b"\n") {
            return Err(ReadError::Gone);
        }
        let line = String::from_utf8_lossy(trim_eol(&line)).into_owned();
        let size_str = line.split(';').next().unwrap_or("").trim();
        let size = usize::from_str_radix(size_str, 16).map_err(|_| ReadError::Bad(400, "bad chunk size"))?;
        if size == 0 {
            // Trailers until an empty line.
            loop {
                let t = read_line(reader, &mut budget)?;
                if !t.ends_with(b"\n") {
                    return Err(ReadError::Gone);
                }
                if trim_eol(&t).is_empty() {
                    return Ok(body);
                }
            }
        }
        let start = body.len();
        body.resize(start + size, 0);
        reader.read_exact(&mut body[start..])?;
        let mut crlf = [0u8; 2];
        reader.read_exact(&mut crlf)?;
        if &crlf != b"\r\n" {
            return Err(ReadError::Bad(400, "missing CRLF after chunk"));
        }
    }
}

/// What to do with the connection after a reply.
enum After {
    KeepAlive,
    Close,
    Reset,
}

fn reason(status: u16) -> &'static str {
    match status {
        100 => "Continue",
        200 => "OK",
        201 => "Created",
        204 => "No Content",
        301 => "Moved Permanently",
        302 => "Found",
        304 => "Not Modified",
        400 => "Bad Request",
        401 => "Unauthorized",
        403 => "Forbidden",
        404 => "Not Found",
        405 => "Method Not Allowed",
        408 => "Request Timeout",
        413 => "Payload Too Large",
        429 => "Too Many Requests",
        431 => "Request Header Fields Too Large",
        500 => "Internal Server Error",
        502 => "Bad Gateway",
        503 => "Service Unavailable",
        504 => "Gateway Timeout",
        505 => "HTTP Version Not Supported",
        _ => "Status",
    }
}

fn has_header(headers: &[(String, String)], name: &str) -> bool {
    headers.iter().any(|(n, _)| n.eq_ignore_ascii_case(name))
}

fn head_bytes(status: u16, headers: &[(String, String)], framing: &str, close: bool) -> Vec<u8> {
    let mut head = format!("HTTP/1.1 {} {}\r\n", status, reason(status));
    for (n, v) in headers {
        head.push_str(n);
        head.push_str(": ");
        head.push_str(v);
        head.push_str("\r\n");
    }
    head.push_str(framing);
    if close && !has_header(headers, "connection") {
        head.push_str("connection: close\r\n");
    }
    head.push_str("\r\n");
    head.into_bytes()
}

fn write_full(
    w: &mut TcpStream,
    status: u16,
    headers: &[(String, String)],
    body: &[u8],
    keep_alive: bool,
) -> io::Result<()> {
    let framing = if has_header(headers, "content-length") {
        String::new()
    } else {
        format!("content-length: {}\r\n", body.len())
    };
    let mut out = head_bytes(status, headers, &framing, !keep_alive);
    out.extend_from_slice(body);
    w.write_all(&out)?;
    w.flush()
}

fn write_chunk(w: &mut TcpStream, data: &[u8]) -> io::Result<()> {
    if data.is_empty() {
        return Ok(());
    }
    let mut out = format!("{:x}\r\n", data.len()).into_bytes();
    out.extend_from_slice(data);
    out.extend_from_slice(b"\r\n");
    w.write_all(&out)?;
    w.flush()
}

fn write_last_chunk(w: &mut TcpStream) -> io::Result<()> {
    w.write_all(b"0\r\n\r\n")?;
    w.flush()
}

const CHUNKED: &str = "transfer-encoding: chunked\r\n";

fn send_reply(w: &mut TcpStream, reply: Reply, keep_alive: bool, shared: &Shared) -> io::Result<After> {
    match reply {
        Reply::Full { status, headers, body } => {
            write_full(w, status, &headers, &body, keep_alive)?;
            Ok(After::KeepAlive)
        }
        Reply::Chunked { status, headers, chunks } => {
            w.write_all(&head_bytes(status, &headers, CHUNKED, !keep_alive))?;
            w.flush()?;
            for c in &chunks {
                write_chunk(w, c)?;
            }
            write_last_chunk(w)?;
            Ok(After::KeepAlive)
        }
        Reply::Sse { events, pause, gate } => send_sse(w, Vec::new(), events, pause, gate, keep_alive, shared),
        Reply::SseWithHeaders { headers, events, pause, gate } => {
            send_sse(w, headers, events, pause, gate, keep_alive, shared)
        }
        Reply::ResetMidBody { status, headers, partial, declared_len, after } => {
            let framing = match declared_len {
                Some(n) => format!("content-length: {n}\r\n"),
                None => CHUNKED.to_string(),
            };
            w.write_all(&head_bytes(status, &headers, &framing, false))?;
            if declared_len.is_some() {
                w.write_all(&partial)?;
                w.flush()?;
            } else {
                w.flush()?;
                write_chunk(w, &partial)?;
            }
            shared.sleep(after);
            Ok(After::Reset)
        }
        Reply::ResetBeforeHead => Ok(After::Reset),
        Reply::CloseBeforeHead => Ok(After::Close),
        Reply::Hang { for_at_most } => {
            shared.sleep(for_at_most);
            Ok(After::Close)
        }
        Reply::Delayed { delay, reply } => {
            if !shared.sleep(delay) {
                return Ok(After::Close);
            }
            send_reply(w, *reply, keep_alive, shared)
        }
    }
}

fn send_sse(
    w: &mut TcpStream,
    mut headers: Vec<(String, String)>,
    events: Vec<String>,
    pause: Duration,
    gate: Option<Receiver<()>>,
    keep_alive: bool,
    shared: &Shared,
) -> io::Result<After> {
    if !has_header(&headers, "content-type") {
        headers.insert(0, ("content-type".to_string(), "text/event-stream".to_string()));
    }
    if !has_header(&headers, "cache-control") {
        headers.push(("cache-control".to_string(), "no-cache".to_string()));
    }
    w.write_all(&head_bytes(200, &headers, CHUNKED, !keep_alive))?;
    w.flush()?;
    for (i, ev) in events.iter().enumerate() {
        if i > 0 {
            let go_on = match &gate {
                Some(g) => wait_gate(g, shared),
                None => shared.sleep(pause),
            };
            if !go_on {
                return Ok(After::Close);
            }
        }
        write_chunk(w, ev.as_bytes())?;
    }
    write_last_chunk(w)?;
    Ok(After::KeepAlive)
}

/// Blocks until the gate yields a value or is closed (true), or the mock stops (false).
fn wait_gate(gate: &Receiver<()>, shared: &Shared) -> bool {
    loop {
        match gate.recv_timeout(Duration::from_millis(50)) {
            Ok(()) | Err(RecvTimeoutError::Disconnected) => return true,
            Err(RecvTimeoutError::Timeout) => {
                if shared.stopped() {
                    return false;
                }
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------------------
// An Azure-like handler.
// ---------------------------------------------------------------------------------------------------------

static NEXT_ID: AtomicU64 = AtomicU64::new(1);

fn now_secs() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

fn azure_error(status: u16, code: &str, message: &str) -> Reply {
    Reply::json(status, json!({"error": {"code": code, "message": message}}))
}

/// 200 naming the instance in the body (`{"served_by": name}`) and in `x-served-by`.
pub fn served_by_reply(name: &str) -> Reply {
    Reply::json(200, json!({"served_by": name})).with_header("x-served-by", name)
}

/// A healthy instance: every request gets `served_by_reply(name)`.
pub fn serving(name: &'static str) -> MockAzure {
    MockAzure::start(move |_: &Recorded| served_by_reply(name))
}

/// The reply text `azure_like(name, ..)` produces.
pub fn reply_text(name: &str) -> String {
    format!("Hello from {name}")
}

/// The SSE events (verbatim, "data: ...\n\n") of a streamed chat completion of `text`, Azure style.
pub fn chat_stream_events(text: &str, model: &str, include_usage: bool) -> Vec<String> {
    let id = format!("chatcmpl-mock{}", NEXT_ID.fetch_add(1, Ordering::Relaxed));
    let created = now_secs();
    let chunk = |choices: Value| {
        json!({
            "id": id,
            "object": "chat.completion.chunk",
            "created": created,
            "model": model,
            "system_fingerprint": "fp_mock",
            "choices": choices,
        })
    };
    let mut events = Vec::new();
    let mut push = |v: Value| events.push(format!("data: {v}\n\n"));
    push(chunk(json!([{
        "index": 0,
        "delta": {"role": "assistant", "content": ""},
        "finish_reason": null,
        "logprobs": null,
    }])));
    let words: Vec<&str> = text.split(' ').collect();
    for (i, w) in words.iter().enumerate() {
        let piece = if i == 0 { (*w).to_string() } else { format!(" {w}") };
        push(chunk(json!([{
            "index": 0,
            "delta": {"content": piece},
            "finish_reason": null,
            "logprobs": null,
        }])));
    }
    push(chunk(json!([{
        "index": 0,
        "delta": {},
        "finish_reason": "stop",
        "logprobs": null,
    }])));
    if include_usage {
        let n = words.len() as u64;
        let mut v = chunk(json!([]));
        v["usage"] = json!({"prompt_tokens": 10, "completion_tokens": n, "total_tokens": 10 + n});
        push(v);
    }
    events.push("data: [DONE]\n\n".to_string());
    events
}

/// A non-streamed chat completion of `text`, Azure style.
pub fn chat_completion_json(text: &str, model: &str) -> Value {
    let n = text.split(' ').count() as u64;
    json!({
        "id": format!("chatcmpl-mock{}", NEXT_ID.fetch_add(1, Ordering::Relaxed)),
        "object": "chat.completion",
        "created": now_secs(),
        "model": model,
        "system_fingerprint": "fp_mock",
        "prompt_filter_results": [{"prompt_index": 0, "content_filter_results": {}}],
        "choices": [{
            "index": 0,
            "message": {"role": "assistant", "content": text},
            "finish_reason": "stop",
            "logprobs": null,
            "content_filter_results": {},
        }],
        "usage": {"prompt_tokens": 10, "completion_tokens": n, "total_tokens": 10 + n},
    })
}

/// An Azure-like handler for instance `name` with key `key`; see the module docs of the brief:
/// 401 on a wrong/missing `api-key`; POST /openai/deployments/{dep}/chat/completions (stream or not);
/// POST /openai/deployments/{dep}/embeddings; anything else → 404 DeploymentNotFound.
pub fn azure_like(name: &str, key: &str, event_pause: Duration) -> impl Fn(&Recorded) -> Reply + Send + Sync + 'static {
    let name = name.to_string();
    let key = key.to_string();
    move |req: &Recorded| {
        if req.header("api-key") != Some(key.as_str()) {
            return azure_error(
                401,
                "401",
                "Access denied due to invalid subscription key or wrong API endpoint. Make sure to provide a \
                 valid key for an active subscription and use a correct regional API endpoint for your resource.",
            );
        }
        let path = req.path();
        // Deployment routes name the deployment in the path; v1 routes (`/openai/v1/chat/completions`) in the
        // body's `model`.
        let route = path
            .strip_prefix("/openai/deployments/")
            .and_then(|rest| rest.split_once('/'))
            .filter(|(dep, _)| !dep.is_empty())
            .or_else(|| path.strip_prefix("/openai/v1/").map(|op| ("v1", op)));
        let not_found = || {
            azure_error(
                404,
                "DeploymentNotFound",
                "The API deployment for this resource does not exist. If you created the deployment within the \
                 last 5 minutes, please wait a moment and try again.",
            )
        };
        let Some((_dep, op)) = route else {
            return not_found();
        };
        if req.method != "POST" || (op != "chat/completions" && op != "embeddings") {
            return not_found();
        }
        let Some(body) = req.json() else {
            return azure_error(400, "BadRequest", "The request body is not valid JSON.")
                .with_header("x-served-by", &name);
        };
        if op == "embeddings" {
            return Reply::json(
                200,
                json!({
                    "object": "list",
                    "data": [{"object": "embedding", "index": 0, "embedding": [0.0123, -0.0456, 0.0789]}],
                    "model": "text-embedding-ada-002",
                    "usage": {"prompt_tokens": 3, "total_tokens": 3},
                }),
            )
            .with_header("x-served-by", &name);
        }
        let text = reply_text(&name);
        if body.get("stream").and_then(Value::as_bool) == Some(true) {
            let include_usage = body.pointer("/stream_options/include_usage").and_then(Value::as_bool) == Some(true);
            Reply::Sse { events: chat_stream_events(&text, "gpt-4o", include_usage), pause: event_pause, gate: None }
                .with_header("x-served-by", &name)
        } else {
            Reply::json(200, chat_completion_json(&text, "gpt-4o")).with_header("x-served-by", &name)
        }
    }
}

/// Like `azure_like`, but the reply text has exactly `n_content_events` words (the first ones from
/// `reply_text(name)`, then `w4`, `w5`, ...), so a streamed reply has `n_content_events` content events (plus
/// the role event, the stop event and `[DONE]`). Used by the benchmark (`mock_azure --events N`).
pub fn azure_like_with(
    name: &str,
    key: &str,
    event_pause: Duration,
    n_content_events: usize,
) -> impl Fn(&Recorded) -> Reply + Send + Sync + 'static {
    let base = reply_text(name);
    let base: Vec<&str> = base.split(' ').collect();
    let text = (0..n_content_events)
        .map(|i| base.get(i).map(|w| (*w).to_string()).unwrap_or_else(|| format!("w{}", i + 1)))
        .collect::<Vec<_>>()
        .join(" ");
    let inner = azure_like(name, key, event_pause);
    let name = name.to_string();
    move |req: &Recorded| {
        let reply = inner(req);
        // Only successful chat completions carry the reply text; everything else is passed on unchanged.
        let is_chat = req.method == "POST" && req.path().ends_with("/chat/completions");
        match reply {
            Reply::SseWithHeaders { .. } if is_chat => {
                let include_usage =
                    req.json().and_then(|b| b.pointer("/stream_options/include_usage").and_then(Value::as_bool))
                        == Some(true);
                Reply::sse(chat_stream_events(&text, "gpt-4o", include_usage), event_pause)
                    .with_header("x-served-by", &name)
            }
            Reply::Full { status: 200, .. } if is_chat => {
                Reply::json(200, chat_completion_json(&text, "gpt-4o")).with_header("x-served-by", &name)
            }
            other => other,
        }
    }
}

/// Splits an SSE byte stream (already de-chunked) into the JSON payloads of its `data:` lines
/// (`[DONE]` excluded).
pub fn sse_data_json(stream: &[u8]) -> Vec<Value> {
    String::from_utf8_lossy(stream)
        .lines()
        .filter_map(|l| l.strip_prefix("data:"))
        .map(str::trim)
        .filter(|d| *d != "[DONE]")
        .filter_map(|d| serde_json::from_str(d).ok())
        .collect()
}
