//! The socket layer under ureq: how upstream connections are opened (TCP, then TLS, or through an egress CONNECT
//! proxy), and how bytes move on them. ureq keeps the HTTP/1.1 work (request heads, bodies, framing, the pool);
//! it hands this module's `Upstream` connector to every connect and calls the returned transport for I/O.
//!
//! ureq's own socket layer (its `DefaultConnector`) costs, per request on a pooled connection, measured with
//! strace (issue 14): six syscalls to probe the connection (on checkout and on return: set non-blocking, read,
//! set blocking), two sends (the request head and the body go out separately: two TLS records over HTTPS), and a
//! `setsockopt` for a read timeout that is nearly the one already set. Here:
//! - the liveness probe is one `recv(MSG_PEEK | MSG_DONTWAIT)`, made when a connection is taken from the pool
//!   (`tcp`);
//! - output is held until ureq waits for input (or the buffer fills), so a request head and a small body leave in
//!   one send and, over TLS, one record (`Coalescing`);
//! - a socket timeout is set only when the wanted one is not already (nearly) in place (`tcp::SocketTimeout`);
//! - every TLS connection of the proxy starts from one rustls `ClientConfig` whose session store keeps enough
//!   tickets for a whole pool to resume after a lull (`tls`).
//!
//! It deliberately does not: speak SOCKS (ureq is built without it; the configuration only accepts
//! `http://` egress proxies), do happy-eyeballs (addresses are tried in order, as ureq does), or send TLS
//! `close_notify` when a connection is dropped (ureq does not either).

mod tcp;
mod tls;

use ureq::unversioned::transport::{
    Buffers, ConnectProxyConnector, ConnectionDetails, Connector, LazyBuffers, NextTimeout, Transport,
};

pub use tls::TlsClient;

/// Output is sent early, before ureq waits for input, once less than this is left free in the output buffer:
/// ureq writes each piece of a body into the free part, so a small remainder would mean small pieces (and a
/// chunked body needs room for its chunk header besides the data).
const MIN_ROOM: usize = 1024;

/// The connector ureq calls for every new upstream connection: through the egress CONNECT proxy if one is
/// configured (ureq's own `ConnectProxyConnector`, which opens its connection to the proxy through this
/// connector again), else TCP; then TLS for `https` targets.
#[derive(Debug)]
pub struct Upstream {
    tls: TlsClient,
}

impl Upstream {
    /// A connector whose TLS connections all use `tls` (its roots and its session store).
    pub fn new(tls: TlsClient) -> Upstream {
        Upstream { tls }
    }
}

impl Connector<()> for Upstream {
    type Out = Box<dyn Transport>;

    fn connect(&self, details: &ConnectionDetails, _: Option<()>) -> Result<Option<Self::Out>, ureq::Error> {
        let tunnel = ConnectProxyConnector::default().connect(details, None::<()>)?;
        let transport: Box<dyn Transport> = match tunnel {
            Some(t) => Box::new(t),
            None => Box::new(tcp::connect(details)?),
        };
        if !details.needs_tls() || transport.is_tls() {
            return Ok(Some(transport));
        }
        Ok(Some(Box::new(self.tls.wrap(transport, details)?)))
    }
}

/// ureq's buffers, with the output buffer shared out in turns: bytes handed to `transmit_output` stay at its
/// start (`pending`) and ureq is given only the free part after them to write the next piece into. Nothing is
/// copied; a flush sends `pending()` in one write.
///
/// Invariant: `pending <= output size`; ureq is never offered less than `MIN_ROOM` bytes, because the owner
/// flushes as soon as `room()` falls below it.
#[derive(Debug)]
struct Coalescing {
    inner: LazyBuffers,
    pending: usize,
    /// The timeout ureq gave with the latest pending piece: the deferred send keeps to it.
    pending_timeout: NextTimeout,
}

impl Coalescing {
    fn new(input_bytes: usize, output_bytes: usize) -> Coalescing {
        Coalescing {
            inner: LazyBuffers::new(input_bytes, output_bytes.max(2 * MIN_ROOM)),
            pending: 0,
            pending_timeout: NextTimeout::default(),
        }
    }

    /// ureq wrote `amount` more bytes into the free part: they join the pending ones. Whether the owner must send
    /// now (too little room is left for the next piece).
    fn queue(&mut self, amount: usize, timeout: NextTimeout) -> bool {
        self.pending += amount;
        self.pending_timeout = timeout;
        self.room() < MIN_ROOM
    }

    fn room(&mut self) -> usize {
        self.inner.output().len() - self.pending
    }

    fn pending(&mut self) -> &[u8] {
        let n = self.pending;
        &self.inner.output()[..n]
    }

    fn sent(&mut self) {
        self.pending = 0;
    }
}

impl Buffers for Coalescing {
    fn output(&mut self) -> &mut [u8] {
        let n = self.pending;
        &mut self.inner.output()[n..]
    }

    fn input(&self) -> &[u8] {
        self.inner.input()
    }

    fn input_append_buf(&mut self) -> &mut [u8] {
        self.inner.input_append_buf()
    }

    fn input_appended(&mut self, amount: usize) {
        self.inner.input_appended(amount)
    }

    fn input_consume(&mut self, amount: usize) {
        self.inner.input_consume(amount)
    }

    fn tmp_and_output(&mut self) -> (&mut [u8], &mut [u8]) {
        let n = self.pending;
        let (tmp, output) = self.inner.tmp_and_output();
        (tmp, &mut output[n..])
    }

    fn can_use_input(&self) -> bool {
        self.inner.can_use_input()
    }
}

/// What is left of a connect's time budget now that part of it went on earlier steps (the TCP connect, the
/// proxy's CONNECT): ureq gives each connector the budget as it was when the connect started.
fn connect_budget(details: &ConnectionDetails) -> NextTimeout {
    use ureq::unversioned::transport::time::{Duration, Instant};
    let mut timeout = details.timeout;
    if let (Duration::Exact(total), Instant::Exact(start), Instant::Exact(now)) =
        (timeout.after, details.now, (details.current_time)())
    {
        timeout.after = Duration::Exact(total.saturating_sub(now.saturating_duration_since(start)));
    }
    timeout
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pending_output_shrinks_what_ureq_may_write_and_a_send_frees_it() {
        let mut b = Coalescing::new(4096, 4096);
        b.output()[..100].fill(b'h');
        assert!(!b.queue(100, NextTimeout::default()), "plenty of room left: keep it");
        assert_eq!(b.output().len(), 3996);
        b.output()[..50].fill(b'b');
        assert!(!b.queue(50, NextTimeout::default()));
        assert_eq!(b.pending().len(), 150);
        assert!(b.pending()[..100].iter().all(|&c| c == b'h') && b.pending()[100..].iter().all(|&c| c == b'b'));
        let room = b.room();
        assert!(b.queue(room - MIN_ROOM + 1, NextTimeout::default()), "less than MIN_ROOM left: send now");
        b.sent();
        assert_eq!(b.output().len(), 4096);
    }
}
