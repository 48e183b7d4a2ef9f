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
//! Measured (release builds, `strace -f -c` over `wrk -c4 -d3s` with bench/post.lua, HTTPS nginx upstream on
//! loopback, 2 cores): 17.2 → 9.7 syscalls per request, sendto 2 → 1, ioctl 4 → 0, setsockopt 0.96 → 0. After
//! a lull with 64 pooled connections: 8 of 64 reconnects resumed TLS before, 64 of 64 now.
//!
//! It deliberately does not: speak SOCKS (ureq is built without it; the configuration only accepts
//! `http://` egress proxies), do happy-eyeballs (addresses are tried in order, as ureq does), or send TLS
//! `close_notify` when a connection is dropped (ureq does not either).

pub mod agents;
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
    use std::io::{Read, Write};
    use std::net::TcpListener;

    /// A streamed (chunked) request body of many output buffers goes out whole through the coalescing transport,
    /// and the upstream sees it arrive in several pieces, not held back to the end.
    #[test]
    fn a_streamed_body_goes_out_in_pieces_and_whole() {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = listener.local_addr().expect("addr");
        let server = std::thread::spawn(move || {
            let (mut s, _) = listener.accept().expect("accept");
            let (mut got, mut reads, mut buf) = (Vec::new(), 0, [0u8; 64 * 1024]);
            while !got.ends_with(b"\r\n0\r\n\r\n") {
                let n = s.read(&mut buf).expect("read");
                assert!(n > 0, "EOF before the end of the body");
                got.extend_from_slice(&buf[..n]);
                reads += 1;
            }
            s.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n").expect("answer");
            (got, reads)
        });
        let config = ureq::Agent::config_builder().proxy(None).output_buffer_size(4096).build();
        let tls = TlsClient::new(None, 4).expect("tls");
        let agent = ureq::Agent::with_parts(
            config,
            Upstream::new(tls),
            ureq::unversioned::resolver::DefaultResolver::default(),
        );
        let body: Vec<u8> = (0..200_000u32).map(|i| (i % 251) as u8).collect();
        let mut reader = &body[..];
        let r = agent.post(format!("http://{addr}/up")).send(ureq::SendBody::from_reader(&mut reader)).expect("sent");
        assert_eq!(r.status(), 200);
        let (got, reads) = server.join().expect("server");
        assert!(reads > 1, "the body went out in pieces");
        let end = got.windows(4).position(|w| w == b"\r\n\r\n").expect("head") + 4;
        assert!(String::from_utf8_lossy(&got[..end]).to_ascii_lowercase().contains("transfer-encoding: chunked"));
        // Undo the chunked framing.
        let (mut rest, mut decoded) = (&got[end..], Vec::new());
        loop {
            let line = rest.windows(2).position(|w| w == b"\r\n").expect("chunk size line");
            let size = usize::from_str_radix(std::str::from_utf8(&rest[..line]).expect("hex"), 16).expect("size");
            if size == 0 {
                break;
            }
            decoded.extend_from_slice(&rest[line + 2..line + 2 + size]);
            rest = &rest[line + 2 + size + 2..];
        }
        assert_eq!(decoded, body);
    }

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
