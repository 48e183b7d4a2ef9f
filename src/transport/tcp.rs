//! TCP to an upstream (or to the egress proxy): the connect over the resolved addresses, and the transport that
//! probes a pooled connection with one peek, sends pending output in one write, and sets socket timeouts only
//! when they need to change.

use std::io::{self, Read, Write};
use std::net::TcpStream;
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

use ureq::unversioned::transport::{Buffers, ConnectionDetails, NextTimeout, ShutdownHandle, Transport};
use ureq::Timeout;

use super::Coalescing;
use crate::sys::{self, Peeked};

/// The least time any one address is given when a host has several and the budget is shared among them
/// (ureq's own floor).
const MIN_PER_ADDRESS: Duration = Duration::from_millis(10);
/// A socket timeout already in place is kept while it is at most the wanted one and within 1/16 of it. A
/// deadline (the wait for a response head) is a little nearer on every request, so an exact match would mean a
/// `setsockopt` per request; a timeout that fires early is not an error here, the read waits out the rest.
const SLACK_DIVISOR: u32 = 16;

/// Opens TCP to the first of `details.addrs` that answers, within the connect budget shared among them as ureq
/// does (half to the first, a quarter to the second, ...), and registers the socket for the agent's shutdown.
pub fn connect(details: &ConnectionDetails) -> Result<TcpTransport, ureq::Error> {
    let stream = connect_any(details)?;
    if details.config.no_delay() {
        stream.set_nodelay(true)?;
    }
    let config = details.config;
    let transport = TcpTransport {
        stream: Arc::new(stream),
        buffers: Coalescing::new(config.input_buffer_size(), config.output_buffer_size()),
        read_timeout: SocketTimeout::default(),
        write_timeout: SocketTimeout::default(),
        used_since_probe: false,
    };
    (details.register_shutdown)(Arc::downgrade(&transport.stream) as Weak<dyn ShutdownHandle>)?;
    Ok(transport)
}

fn connect_any(details: &ConnectionDetails) -> Result<TcpStream, ureq::Error> {
    let budget = super::connect_budget(details);
    let total = budget.not_zero().map(|d| *d);
    let started = Instant::now();
    let count = details.addrs.len();
    let total_weight = 2.0 * (1.0 - 0.5_f64.powi(i32::try_from(count).unwrap_or(i32::MAX)));
    let mut weight = 1.0;
    let mut last = None;
    for addr in details.addrs.iter() {
        let share = total.map(|t| t.mul_f64(weight / total_weight).max(MIN_PER_ADDRESS));
        weight /= 2.0;
        let result = match share {
            Some(t) => TcpStream::connect_timeout(addr, t),
            None => TcpStream::connect(addr),
        };
        match result {
            Ok(stream) => return Ok(stream),
            // This address refused or is unroutable: another one may work.
            Err(e) if address_specific(&e) => last = Some(ureq::Error::Io(e)),
            Err(e) if is_timeout(&e) => {
                if total.is_some_and(|t| started.elapsed() >= t) {
                    return Err(ureq::Error::Timeout(budget.reason));
                }
                last = Some(ureq::Error::Timeout(Timeout::Connect));
            }
            Err(e) => return Err(e.into()),
        }
    }
    Err(last.unwrap_or_else(|| io::Error::new(io::ErrorKind::ConnectionRefused, "no address to connect to").into()))
}

fn address_specific(e: &io::Error) -> bool {
    use io::ErrorKind::*;
    matches!(e.kind(), ConnectionRefused | HostUnreachable | NetworkUnreachable | NetworkDown | AddrNotAvailable)
}

fn is_timeout(e: &io::Error) -> bool {
    matches!(e.kind(), io::ErrorKind::TimedOut | io::ErrorKind::WouldBlock)
}

/// One TCP connection. `stream` is shared (weakly) with the agent's shutdown handle, which may shut it down from
/// another thread; all I/O goes through `&TcpStream`.
#[derive(Debug)]
pub struct TcpTransport {
    stream: Arc<TcpStream>,
    buffers: Coalescing,
    read_timeout: SocketTimeout,
    write_timeout: SocketTimeout,
    /// Bytes moved since the last `is_open`: see there.
    used_since_probe: bool,
}

impl TcpTransport {
    /// Sends what is pending, in one write (more only if the kernel takes it in parts).
    fn flush(&mut self) -> Result<(), ureq::Error> {
        if self.buffers.pending().is_empty() {
            return Ok(());
        }
        let timeout = self.buffers.pending_timeout.for_write();
        let result = match timeout.after.is_zero() {
            true => Err(io::ErrorKind::TimedOut.into()),
            false => self.write_timeout.write_all(&self.stream, self.buffers.pending(), timeout.not_zero().map(|d| *d)),
        };
        // Sent or failed, the bytes are done with: after a failure ureq drops the connection.
        self.buffers.sent();
        result.map_err(|e| ureq_error(e, timeout))
    }
}

impl Transport for TcpTransport {
    fn buffers(&mut self) -> &mut dyn Buffers {
        &mut self.buffers
    }

    fn transmit_output(&mut self, amount: usize, timeout: NextTimeout) -> Result<(), ureq::Error> {
        self.used_since_probe = true;
        // Held back until ureq waits for the answer (or the buffer fills): the head and a small body, or TLS
        // records written one after another, leave in one send.
        if self.buffers.queue(amount, timeout) {
            self.flush()?;
        }
        Ok(())
    }

    fn await_input(&mut self, timeout: NextTimeout) -> Result<bool, ureq::Error> {
        self.used_since_probe = true;
        self.flush()?;
        let timeout = timeout.for_read();
        if timeout.after.is_zero() {
            return Err(ureq::Error::Timeout(timeout.reason));
        }
        let wanted = timeout.not_zero().map(|d| *d);
        let input = self.buffers.input_append_buf();
        let amount = self.read_timeout.read(&self.stream, input, wanted).map_err(|e| ureq_error(e, timeout))?;
        self.buffers.input_appended(amount);
        Ok(amount > 0)
    }

    /// ureq asks twice per request: when it takes the connection from the pool, and when it puts it back after
    /// reading a whole response. The second answer is the one just seen (ureq puts a connection back only after
    /// a complete response without `Connection: close`); anything the upstream sends or closes afterwards is
    /// found by the peek at the next checkout, which is the one that decides before a request goes out.
    fn is_open(&mut self) -> bool {
        if std::mem::take(&mut self.used_since_probe) {
            return true;
        }
        match sys::peek(&self.stream) {
            Ok(Peeked::Nothing) => true,
            Ok(Peeked::Closed) => false,
            Ok(Peeked::Bytes) => {
                // Not an answer to anything we asked: the connection's framing can no longer be trusted.
                log::debug!("upstream connection had unexpected bytes waiting; not reusing it");
                false
            }
            Err(_) => false,
        }
    }
}

/// An I/O error as ureq reports it: a socket timeout is ureq's timeout of the phase it happened in.
fn ureq_error(e: io::Error, timeout: NextTimeout) -> ureq::Error {
    match is_timeout(&e) {
        true => ureq::Error::Timeout(timeout.reason),
        false => ureq::Error::Io(e),
    }
}

/// What one direction's socket timeout (`SO_RCVTIMEO` or `SO_SNDTIMEO`) is set to, so that it is changed only
/// when the wanted one is not already (nearly) in place. Invariant: `set` is the value the socket has; `None`
/// (no timeout) is a new socket's.
#[derive(Debug, Default)]
struct SocketTimeout {
    set: Option<Duration>,
}

#[derive(Clone, Copy)]
enum Direction {
    Read,
    Write,
}

impl SocketTimeout {
    /// Makes the socket's timeout fit `wanted`: at most it, and not much less (see `SLACK_DIVISOR`). A change
    /// aims at the middle of that window, so that a deadline drawing a little nearer still fits next time.
    fn fit(&mut self, stream: &TcpStream, dir: Direction, wanted: Option<Duration>) -> io::Result<()> {
        let fits = match (self.set, wanted) {
            (None, None) => true,
            (Some(set), Some(w)) => set <= w && set >= w - w / SLACK_DIVISOR,
            _ => false,
        };
        if !fits {
            self.apply(stream, dir, wanted.map(|w| w - w / (2 * SLACK_DIVISOR)))?;
        }
        Ok(())
    }

    fn apply(&mut self, stream: &TcpStream, dir: Direction, timeout: Option<Duration>) -> io::Result<()> {
        match dir {
            Direction::Read => stream.set_read_timeout(timeout)?,
            Direction::Write => stream.set_write_timeout(timeout)?,
        }
        self.set = timeout;
        Ok(())
    }

    /// After an interrupted call or a timeout that fired before `wanted` (measured from `since`) was over: the
    /// socket gets exactly what is left, or the wait is over.
    fn rest(&mut self, stream: &TcpStream, dir: Direction, wanted: Duration, since: Instant) -> io::Result<()> {
        let left = wanted.saturating_sub(since.elapsed());
        if left.is_zero() {
            return Err(io::ErrorKind::TimedOut.into());
        }
        self.apply(stream, dir, Some(left))
    }

    /// One read, waiting at most `wanted` (no limit: `None`).
    fn read(&mut self, stream: &TcpStream, buf: &mut [u8], wanted: Option<Duration>) -> io::Result<usize> {
        self.fit(stream, Direction::Read, wanted)?;
        let started = Instant::now();
        loop {
            match (&*stream).read(buf) {
                Ok(n) => return Ok(n),
                Err(e) if e.kind() == io::ErrorKind::Interrupted || (is_timeout(&e) && wanted.is_some()) => {
                    if let Some(w) = wanted {
                        self.rest(stream, Direction::Read, w, started)?;
                    }
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// Writes all of `data`, each write waiting at most `wanted` for progress (as ureq's own transport does).
    fn write_all(&mut self, stream: &TcpStream, mut data: &[u8], wanted: Option<Duration>) -> io::Result<()> {
        self.fit(stream, Direction::Write, wanted)?;
        let mut started = Instant::now();
        while !data.is_empty() {
            match (&*stream).write(data) {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(n) => {
                    data = &data[n..];
                    started = Instant::now();
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted || (is_timeout(&e) && wanted.is_some()) => {
                    if let Some(w) = wanted {
                        self.rest(stream, Direction::Write, w, started)?;
                    }
                }
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::TcpListener;

    fn pair() -> (TcpStream, TcpStream) {
        let l = TcpListener::bind("127.0.0.1:0").expect("bind");
        let c = TcpStream::connect(l.local_addr().expect("addr")).expect("connect");
        let (s, _) = l.accept().expect("accept");
        (c, s)
    }

    #[test]
    fn a_timeout_in_place_is_kept_while_it_fits_and_changed_when_it_does_not() {
        let (c, _s) = pair();
        let mut t = SocketTimeout::default();
        let secs = Duration::from_secs;
        t.fit(&c, Direction::Read, Some(secs(300))).expect("set");
        let first = t.set.expect("set");
        assert!(first <= secs(300) && first >= secs(300) - secs(300) / SLACK_DIVISOR);
        // The kernel keeps it in clock ticks (rounded up by a few milliseconds).
        let actual = c.read_timeout().expect("read").expect("a timeout");
        assert!(actual >= first && actual - first < Duration::from_millis(20), "{actual:?} for {first:?}");
        // A deadline a little nearer, then the full per-read value again: both fit, nothing is set.
        for wanted in [secs(300) - Duration::from_micros(50), secs(300), secs(299)] {
            t.fit(&c, Direction::Read, Some(wanted)).expect("fit");
            assert_eq!(t.set, Some(first), "{wanted:?}");
        }
        // Much shorter, or longer than the window: changed; none: cleared.
        t.fit(&c, Direction::Read, Some(secs(5))).expect("fit");
        assert!(t.set.is_some_and(|s| s <= secs(5)));
        t.fit(&c, Direction::Read, Some(secs(400))).expect("fit");
        assert!(t.set.is_some_and(|s| s > secs(300)));
        t.fit(&c, Direction::Read, None).expect("fit");
        assert_eq!((t.set, c.read_timeout().expect("read")), (None, None));
    }

    #[test]
    fn a_read_waits_out_the_whole_timeout_even_when_the_socket_fires_early() {
        let (c, _s) = pair();
        let mut t = SocketTimeout::default();
        // The socket's own timeout is 30 ms; the read wants 200 ms: it waits at least that long, then times out.
        t.apply(&c, Direction::Read, Some(Duration::from_millis(30))).expect("apply");
        t.set = Some(Duration::from_millis(195)); // pretend it fits, as after a slightly longer earlier wait
        let started = Instant::now();
        let e = t.read(&c, &mut [0u8; 8], Some(Duration::from_millis(200))).expect_err("nothing to read");
        assert!(is_timeout(&e), "{e}");
        assert!(started.elapsed() >= Duration::from_millis(200), "{:?}", started.elapsed());
    }

    #[test]
    fn the_peek_tells_quiet_from_closed_from_unexpected_bytes() {
        let (c, s) = pair();
        assert_eq!(sys::peek(&c).expect("peek"), Peeked::Nothing);
        (&s).write_all(b"x").expect("write");
        let mut ready = [libc::pollfd { fd: std::os::fd::AsRawFd::as_raw_fd(&c), events: libc::POLLIN, revents: 0 }];
        sys::poll(&mut ready, 5000).expect("poll");
        assert_eq!(sys::peek(&c).expect("peek"), Peeked::Bytes);
        assert_eq!(sys::peek(&c).expect("peek"), Peeked::Bytes, "a peek takes nothing");
        let (c, s) = pair();
        drop(s);
        sys::poll(
            &mut [libc::pollfd { fd: std::os::fd::AsRawFd::as_raw_fd(&c), events: libc::POLLIN, revents: 0 }],
            5000,
        )
        .expect("poll");
        assert_eq!(sys::peek(&c).expect("peek"), Peeked::Closed);
    }
}
