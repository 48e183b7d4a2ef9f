//! A cheap SSE upstream for the concurrent-streams benchmark (`bench/streams.sh`): one thread, one epoll set,
//! any number of listening ports, tens of thousands of streams open at once.
//!
//! `sse_upstream --listen 127.0.0.1:PORT [--listen ...] [--events 20] [--event-delay-ms 500] [--backlog 4096]`
//!
//! `POST /openai/deployments/<any>/chat/completions` with a non-empty `api-key` header gets `200`,
//! `text/event-stream`, chunked: `--events` `data:` events (Azure-style chat.completion.chunk objects), the first
//! at once and the others `--event-delay-ms` apart, timed from the request so that delays never add up; then
//! `data: [DONE]` in the same write as the last event, then the terminating chunk. The connection stays open for
//! the next request (the proxies under test pool their upstream connections). Anything else: 401 or 404.
//!
//! Why not `mock_azure`: that mock spends a thread per connection (`tests/support/mock.rs`), so 10,000 streams
//! would be 10,000 sleeping threads competing with the servers under test on a 2-core machine, and the "direct"
//! baseline would measure the mock's scheduler load instead of the load generator's. This one holds a stream in
//! a few hundred bytes and wakes once per due event. What it does not do: request bodies other than
//! `Content-Length` (a chunked body is skipped up to its `0\r\n\r\n`), TLS, non-streamed answers.
//!
//! Prints `sse_upstream listening on http://ADDR` per port once bound, then serves until killed.

use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::io::{self, ErrorKind, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::fd::{AsRawFd, RawFd};
use std::process::exit;
use std::time::{Duration, Instant};

const USAGE: &str = "usage: sse_upstream --listen 127.0.0.1:PORT [--listen ...] [--events N (default 20)] \
                     [--event-delay-ms MS (default 500)] [--backlog N (default 4096)]";
/// A request head larger than this is answered 431 and closed (the benchmark's heads are ~300 bytes).
const MAX_HEAD_BYTES: usize = 16 * 1024;
const READ_BUF_BYTES: usize = 16 * 1024;

struct Args {
    listen: Vec<String>,
    events: usize,
    delay: Duration,
    backlog: i32,
}

fn parse_args() -> Result<Args, String> {
    let mut args = Args { listen: Vec::new(), events: 20, delay: Duration::from_millis(500), backlog: 4096 };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        if flag == "-h" || flag == "--help" {
            println!("{USAGE}");
            exit(0);
        }
        let value = it.next().ok_or_else(|| format!("missing value for {flag}"))?;
        let number = |v: &str| v.parse::<u64>().map_err(|_| format!("{flag}: not a number: {v:?}"));
        match flag.as_str() {
            "--listen" => args.listen.push(value),
            "--events" => args.events = number(&value)?.max(1) as usize,
            "--event-delay-ms" => args.delay = Duration::from_millis(number(&value)?),
            "--backlog" => args.backlog = i32::try_from(number(&value)?).map_err(|_| "--backlog: too large")?,
            other => return Err(format!("unknown argument {other:?}")),
        }
    }
    if args.listen.is_empty() {
        return Err("--listen is required".into());
    }
    Ok(args)
}

/// Where a connection is in its request/response cycle.
enum Phase {
    /// Waiting for (the rest of) a request head and body.
    Reading,
    /// Answering: `sent` events written so far (an error answer counts as all of them), started at `start`;
    /// `id` names the stream in its events.
    Streaming { start: Instant, sent: usize, close_after: bool, id: u64 },
}

struct Conn {
    stream: TcpStream,
    inbuf: Vec<u8>,
    /// Bytes accepted for the client but not yet taken by the kernel.
    out: Vec<u8>,
    phase: Phase,
    /// Bumped whenever the slot is reused, so that stale timer entries for an earlier occupant are ignored.
    generation: u64,
    want_write: bool,
}

struct Server {
    epoll: RawFd,
    listeners: Vec<TcpListener>,
    /// Indexed by fd: fds are small, dense integers.
    conns: Vec<Option<Conn>>,
    /// Due events: (when, fd, generation).
    timers: BinaryHeap<Reverse<(Instant, RawFd, u64)>>,
    next_generation: u64,
    events: usize,
    delay: Duration,
    next_id: u64,
}

fn main() {
    let args = match parse_args() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("sse_upstream: {e}\n{USAGE}");
            exit(2);
        }
    };
    azure_proxy::sys::raise_fd_limit();
    if let Err(e) = run(args) {
        eprintln!("sse_upstream: {e}");
        exit(1);
    }
}

fn run(args: Args) -> io::Result<()> {
    // SAFETY: plain syscall, no pointers.
    let epoll = unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) };
    if epoll < 0 {
        return Err(io::Error::last_os_error());
    }
    let mut server = Server {
        epoll,
        listeners: Vec::new(),
        conns: Vec::new(),
        timers: BinaryHeap::new(),
        next_generation: 0,
        events: args.events,
        delay: args.delay,
        next_id: 0,
    };
    for addr in &args.listen {
        let l =
            TcpListener::bind(addr).map_err(|e| io::Error::new(e.kind(), format!("cannot listen on {addr}: {e}")))?;
        // std listens with a backlog of 128; a burst of thousands of connects needs more. A second listen(2) on a
        // listening socket only changes its backlog (capped by net.core.somaxconn).
        // SAFETY: a valid listening socket fd owned by `l`.
        if unsafe { libc::listen(l.as_raw_fd(), args.backlog) } != 0 {
            return Err(io::Error::last_os_error());
        }
        l.set_nonblocking(true)?;
        epoll_ctl(epoll, libc::EPOLL_CTL_ADD, l.as_raw_fd(), libc::EPOLLIN as u32)?;
        println!("sse_upstream listening on http://{}", l.local_addr()?);
        server.listeners.push(l);
    }
    io::stdout().flush()?;
    server.serve()
}

impl Server {
    fn serve(&mut self) -> io::Result<()> {
        let mut ready = vec![libc::epoll_event { events: 0, u64: 0 }; 1024];
        loop {
            let timeout_ms = match self.timers.peek() {
                None => -1,
                Some(Reverse((when, _, _))) => {
                    // Round up: waking a little late is better than spinning on a not-yet-due timer.
                    let left = when.saturating_duration_since(Instant::now());
                    i32::try_from(left.as_micros().div_ceil(1000)).unwrap_or(i32::MAX)
                }
            };
            // SAFETY: `ready` is a valid buffer of `ready.len()` epoll_events for the duration of the call.
            let n = unsafe { libc::epoll_wait(self.epoll, ready.as_mut_ptr(), ready.len() as i32, timeout_ms) };
            if n < 0 {
                let e = io::Error::last_os_error();
                if e.kind() == ErrorKind::Interrupted {
                    continue;
                }
                return Err(e);
            }
            for ev in &ready[..n as usize] {
                let fd = ev.u64 as RawFd;
                let flags = ev.events;
                if self.listeners.iter().any(|l| l.as_raw_fd() == fd) {
                    self.accept_all(fd);
                    continue;
                }
                if flags & (libc::EPOLLERR | libc::EPOLLHUP) as u32 != 0 {
                    self.close(fd);
                    continue;
                }
                if flags & libc::EPOLLOUT as u32 != 0 {
                    self.flush(fd);
                }
                if flags & libc::EPOLLIN as u32 != 0 {
                    self.read(fd);
                }
            }
            self.fire_timers();
        }
    }

    fn accept_all(&mut self, listen_fd: RawFd) {
        let Some(l) = self.listeners.iter().find(|l| l.as_raw_fd() == listen_fd) else { return };
        let mut accepted = Vec::new();
        loop {
            match l.accept() {
                Ok((s, _)) => accepted.push(s),
                Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == ErrorKind::Interrupted || e.kind() == ErrorKind::ConnectionAborted => {}
                Err(e) => {
                    eprintln!("sse_upstream: accept: {e}");
                    break;
                }
            }
        }
        for s in accepted {
            if s.set_nonblocking(true).is_err() || s.set_nodelay(true).is_err() {
                continue;
            }
            let fd = s.as_raw_fd();
            if epoll_ctl(self.epoll, libc::EPOLL_CTL_ADD, fd, libc::EPOLLIN as u32).is_err() {
                continue;
            }
            self.next_generation += 1;
            let idx = fd as usize;
            if self.conns.len() <= idx {
                self.conns.resize_with(idx + 1, || None);
            }
            self.conns[idx] = Some(Conn {
                stream: s,
                inbuf: Vec::new(),
                out: Vec::new(),
                phase: Phase::Reading,
                generation: self.next_generation,
                want_write: false,
            });
        }
    }

    fn conn(&mut self, fd: RawFd) -> Option<&mut Conn> {
        self.conns.get_mut(fd as usize).and_then(Option::as_mut)
    }

    fn close(&mut self, fd: RawFd) {
        if let Some(slot) = self.conns.get_mut(fd as usize) {
            // Dropping the TcpStream closes the fd, which also removes it from the epoll set.
            *slot = None;
        }
    }

    fn read(&mut self, fd: RawFd) {
        let mut buf = [0u8; READ_BUF_BYTES];
        let mut closed = false;
        {
            let Some(c) = self.conn(fd) else { return };
            loop {
                match c.stream.read(&mut buf) {
                    Ok(0) => {
                        closed = true;
                        break;
                    }
                    Ok(n) => c.inbuf.extend_from_slice(&buf[..n]),
                    Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                    Err(e) if e.kind() == ErrorKind::Interrupted => {}
                    Err(_) => {
                        closed = true;
                        break;
                    }
                }
            }
        }
        if closed {
            self.close(fd);
            return;
        }
        self.handle_request(fd);
    }

    /// If the connection is between streams and holds a complete request, answer it.
    fn handle_request(&mut self, fd: RawFd) {
        let events = self.events;
        let Some(c) = self.conn(fd) else { return };
        if !matches!(c.phase, Phase::Reading) {
            return; // a pipelined request waits until the stream in progress ends
        }
        let Some(head_end) = find(&c.inbuf, b"\r\n\r\n") else {
            if c.inbuf.len() > MAX_HEAD_BYTES {
                c.out.extend_from_slice(&plain(431, "request head too large", true));
                c.phase = Phase::Streaming { start: Instant::now(), sent: events, close_after: true, id: 0 };
                self.flush(fd);
            }
            return;
        };
        let head = String::from_utf8_lossy(&c.inbuf[..head_end]).into_owned();
        let body = &c.inbuf[head_end + 4..];
        let req = Request::parse(&head);
        let body_len = match req.content_length {
            Some(n) => n,
            None if req.chunked => match find(body, b"0\r\n\r\n") {
                Some(i) => i + 5,
                None => return,
            },
            None => 0,
        };
        if body.len() < body_len {
            return; // the rest of the body is still on its way
        }
        c.inbuf.drain(..head_end + 4 + body_len);
        let close_after = req.close;
        if !req.is_chat() {
            c.out.extend_from_slice(&plain(404, "no such route", close_after));
        } else if !req.has_key {
            c.out.extend_from_slice(&plain(401, "missing api-key", close_after));
        } else {
            self.next_id += 1;
            let id = self.next_id;
            let c = self.conn(fd).expect("looked up above");
            c.out.extend_from_slice(
                b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ncache-control: no-cache\r\n\
                  transfer-encoding: chunked\r\n",
            );
            if close_after {
                c.out.extend_from_slice(b"connection: close\r\n");
            }
            c.out.extend_from_slice(b"\r\n");
            c.phase = Phase::Streaming { start: Instant::now(), sent: 0, close_after, id };
            let generation = c.generation;
            self.send_next_event(fd, generation);
            return;
        }
        let c = self.conn(fd).expect("looked up above");
        c.phase = Phase::Streaming { start: Instant::now(), sent: events, close_after, id: 0 };
        self.flush(fd);
        self.after_stream(fd);
    }

    /// Writes the next event of the stream on `fd` (the last one with `[DONE]` and the terminating chunk) and
    /// schedules the one after it.
    fn send_next_event(&mut self, fd: RawFd, generation: u64) {
        let (events, delay) = (self.events, self.delay);
        let Some(c) = self.conn(fd) else { return };
        if c.generation != generation {
            return;
        }
        let Phase::Streaming { start, sent, id, .. } = &mut c.phase else { return };
        let id = *id;
        let i = *sent;
        let mut data = event(id, i, events);
        if i + 1 == events {
            data.push_str("data: [DONE]\n\n");
        }
        chunk(&mut c.out, data.as_bytes());
        *sent += 1;
        let (start, sent) = (*start, *sent);
        if sent == events {
            c.out.extend_from_slice(b"0\r\n\r\n");
        } else {
            self.timers.push(Reverse((start + delay * sent as u32, fd, generation)));
        }
        self.flush(fd);
        if sent == events {
            self.after_stream(fd);
        }
    }

    /// A finished answer: close if asked to, otherwise serve a request that is already buffered.
    fn after_stream(&mut self, fd: RawFd) {
        let events = self.events;
        let Some(c) = self.conn(fd) else { return };
        let Phase::Streaming { sent, close_after, .. } = c.phase else { return };
        if sent < events {
            return;
        }
        if close_after {
            if c.out.is_empty() {
                self.close(fd);
            }
            return; // flush() closes once the rest is out
        }
        c.phase = Phase::Reading;
        if !c.inbuf.is_empty() {
            self.handle_request(fd);
        }
    }

    fn fire_timers(&mut self) {
        let now = Instant::now();
        while let Some(Reverse((when, fd, generation))) = self.timers.peek().copied() {
            if when > now {
                break;
            }
            self.timers.pop();
            self.send_next_event(fd, generation);
        }
    }

    /// Writes what the kernel takes; asks for EPOLLOUT while something is left.
    fn flush(&mut self, fd: RawFd) {
        let events = self.events;
        let epoll = self.epoll;
        let Some(c) = self.conn(fd) else { return };
        let mut failed = false;
        while !c.out.is_empty() {
            match c.stream.write(&c.out) {
                Ok(0) => {
                    failed = true;
                    break;
                }
                Ok(n) => {
                    c.out.drain(..n);
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(_) => {
                    failed = true;
                    break;
                }
            }
        }
        let done_closing = matches!(c.phase, Phase::Streaming { sent, close_after: true, .. } if sent >= events);
        if failed || (c.out.is_empty() && done_closing) {
            self.close(fd);
            return;
        }
        let want = !c.out.is_empty();
        if want != c.want_write {
            c.want_write = want;
            let flags = libc::EPOLLIN as u32 | if want { libc::EPOLLOUT as u32 } else { 0 };
            if epoll_ctl(epoll, libc::EPOLL_CTL_MOD, fd, flags).is_err() {
                self.close(fd);
            }
        }
    }
}

/// The parts of a request head this server looks at.
struct Request {
    method_post: bool,
    path: String,
    has_key: bool,
    content_length: Option<usize>,
    chunked: bool,
    close: bool,
}

impl Request {
    fn parse(head: &str) -> Request {
        let mut lines = head.split("\r\n");
        let mut first = lines.next().unwrap_or("").split(' ');
        let method_post = first.next() == Some("POST");
        let target = first.next().unwrap_or("");
        let http10 = first.next() == Some("HTTP/1.0");
        let path = target.split('?').next().unwrap_or("").to_string();
        let mut r = Request { method_post, path, has_key: false, content_length: None, chunked: false, close: http10 };
        for line in lines {
            let Some((name, value)) = line.split_once(':') else { continue };
            let (name, value) = (name.trim().to_ascii_lowercase(), value.trim());
            match name.as_str() {
                "api-key" => r.has_key = !value.is_empty(),
                "content-length" => r.content_length = value.parse().ok(),
                "transfer-encoding" => r.chunked = value.to_ascii_lowercase().contains("chunked"),
                "connection" => r.close = value.eq_ignore_ascii_case("close"),
                _ => {}
            }
        }
        r
    }

    fn is_chat(&self) -> bool {
        self.method_post && self.path.starts_with("/openai/deployments/") && self.path.ends_with("/chat/completions")
    }
}

/// Event `i` of `n`: the role first, the stop reason last, one word of content in between.
fn event(id: u64, i: usize, n: usize) -> String {
    let delta = if i == 0 {
        r#"{"role":"assistant","content":""}"#.to_string()
    } else if i + 1 == n {
        "{}".to_string()
    } else {
        format!(r#"{{"content":" word{i}"}}"#)
    };
    let finish = if i + 1 == n && n > 1 { r#""stop""# } else { "null" };
    format!(
        "data: {{\"id\":\"chatcmpl-sse{id}\",\"object\":\"chat.completion.chunk\",\"created\":1730000000,\
         \"model\":\"gpt-4o-2024-08-06\",\"system_fingerprint\":\"fp_bench\",\"choices\":[{{\"index\":0,\
         \"delta\":{delta},\"finish_reason\":{finish},\"logprobs\":null}}]}}\n\n"
    )
}

fn chunk(out: &mut Vec<u8>, data: &[u8]) {
    out.extend_from_slice(format!("{:x}\r\n", data.len()).as_bytes());
    out.extend_from_slice(data);
    out.extend_from_slice(b"\r\n");
}

fn plain(status: u16, msg: &str, close: bool) -> Vec<u8> {
    let reason = match status {
        401 => "Unauthorized",
        404 => "Not Found",
        _ => "Request Header Fields Too Large",
    };
    let body = format!("{{\"error\":{{\"code\":\"{status}\",\"message\":\"{msg}\"}}}}");
    let conn = if close { "connection: close\r\n" } else { "" };
    format!(
        "HTTP/1.1 {status} {reason}\r\ncontent-type: application/json\r\ncontent-length: {}\r\n{conn}\r\n{body}",
        body.len()
    )
    .into_bytes()
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

fn epoll_ctl(epoll: RawFd, op: i32, fd: RawFd, events: u32) -> io::Result<()> {
    let mut ev = libc::epoll_event { events, u64: fd as u64 };
    // SAFETY: `ev` is a valid epoll_event for the duration of the call; epoll and fd are open descriptors.
    if unsafe { libc::epoll_ctl(epoll, op, fd, &mut ev) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}
