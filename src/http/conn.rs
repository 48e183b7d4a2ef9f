//! A client connection as it moves between the front thread and the workers: the socket, the peer address, and
//! the bytes already received but not yet consumed (the rest of a head, a body's start, a pipelined request).

use std::cell::RefCell;
use std::io::{self, Read};
use std::net::{SocketAddr, TcpStream};

use super::client_stream::ClientStream;
use super::write::CHUNK_BUF;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

/// Bytes asked for per `read` call.
const READ_SIZE: usize = 4 * 1024;

thread_local! {
    /// One buffer per thread for reading requests and copying answers, allocated on first use and reused: a fresh
    /// zeroed one per call was measurable (per response at 20k req/s; per read, 5 % of a proxied request's
    /// instructions in callgrind). Shared by both so that a streaming worker holds one, not two.
    static SCRATCH: RefCell<Vec<u8>> = RefCell::new(vec![0u8; CHUNK_BUF]);
}

/// Runs `f` on this thread's scratch buffer (`CHUNK_BUF` bytes, contents unspecified). Not reentrant by design;
/// should it ever be, the inner call gets a buffer of its own instead of a panic.
pub fn with_scratch<R>(f: impl FnOnce(&mut [u8]) -> R) -> R {
    SCRATCH.with(|cell| match cell.try_borrow_mut() {
        Ok(mut buf) => f(&mut buf),
        Err(_) => f(&mut vec![0u8; CHUNK_BUF]),
    })
}

pub struct Conn {
    pub stream: ClientStream,
    pub peer: SocketAddr,
    pub buf: Vec<u8>,
    /// Whether a worker has already set this socket's read timeout (it is set once per connection).
    pub worker_ready: bool,
    /// Whether the socket is in the front thread's epoll set (armed while it waits there, silent while a worker
    /// serves it): a connection coming back is armed again with one call instead of added and later removed.
    pub watched: bool,
    /// Keeps the open-connection count right however the connection ends.
    _slot: Slot,
}

impl Conn {
    pub fn new(stream: ClientStream, peer: SocketAddr, open: &Arc<AtomicUsize>) -> Conn {
        open.fetch_add(1, Ordering::Relaxed);
        Conn { stream, peer, buf: Vec::new(), worker_ready: false, watched: false, _slot: Slot(Arc::clone(open)) }
    }

    /// Reads once from the socket onto the end of `buf`. `Ok(0)` means the peer closed its side.
    ///
    /// Reads go through the thread's scratch buffer so that `buf` grows only by what arrived: an idle connection
    /// holding a few head bytes must not hold a 16 KiB allocation (thousands of slow clients are thousands of
    /// buffers).
    pub fn read_more(&mut self) -> io::Result<usize> {
        with_scratch(|tmp| {
            let n = self.stream.read(&mut tmp[..READ_SIZE])?;
            self.buf.extend_from_slice(&tmp[..n]);
            Ok(n)
        })
    }

    /// Drops the first `n` buffered bytes (a consumed head or body).
    pub fn consume(&mut self, n: usize) {
        self.buf.drain(..n.min(self.buf.len()));
    }
}

struct Slot(Arc<AtomicUsize>);

impl Drop for Slot {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Makes the coming close of `stream` a reset (RST) instead of a clean FIN: the only way to tell a client
/// reading a close-delimited body that it did not get all of it. The caller must drop the socket next.
pub fn abort(stream: &TcpStream) {
    crate::sys::reset_on_close(stream);
    // No shutdown() here: it would send a FIN at once, and a client that saw the FIN reads a clean EOF. The
    // reset goes out when the caller drops the socket, which it does right after.
}
