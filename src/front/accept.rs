//! Accepting connections: admission within `max_connections`, TLS set-up, and the answer to a client that
//! arrives while the process is out of file descriptors (the spare-descriptor trick), so that no client waits
//! in the backlog without an answer.

use std::io;
use std::net::TcpStream;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use super::{canned, Front, ACCEPT_PAUSE};
use crate::http::{ClientStream, Conn};

impl Front {
    /// Accepts every connection waiting in the backlog.
    pub(super) fn accept_all(&mut self) {
        loop {
            let Some(listener) = &self.listener else { return };
            match listener.accept() {
                Ok((stream, peer)) => self.admit(stream, peer),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    let out_of_fds = matches!(e.raw_os_error(), Some(libc::EMFILE) | Some(libc::ENFILE));
                    if out_of_fds && self.refuse_one_with_reserve() {
                        continue;
                    }
                    let now = Instant::now();
                    if self.last_fd_warning.is_none_or(|t| now.duration_since(t) >= Duration::from_secs(1)) {
                        log::warn!("accept failed: {e}; pausing accepts for {} ms", ACCEPT_PAUSE.as_millis());
                        self.last_fd_warning = Some(now);
                    }
                    if out_of_fds || e.kind() != io::ErrorKind::ConnectionAborted {
                        self.accept_paused_until = Some(now + ACCEPT_PAUSE);
                        return;
                    }
                }
            }
        }
    }

    /// Out of file descriptors, a waiting client would sit in the backlog with no answer. The classic remedy:
    /// give up the spare descriptor kept for this, accept the client, tell it 503, close it, take the spare back.
    /// Returns false when there is no spare (it could not be re-opened last time) or nothing to accept.
    fn refuse_one_with_reserve(&mut self) -> bool {
        let Some(spare) = self.reserve_fd.take() else {
            self.reserve_fd = std::fs::File::open("/dev/null").ok();
            return false;
        };
        drop(spare);
        let accepted = match &self.listener {
            Some(listener) => listener.accept().ok(),
            None => None,
        };
        let answered = accepted.is_some();
        if let Some((stream, peer)) = accepted {
            self.shared.state().metrics.shed.fetch_add(1, Ordering::Relaxed);
            log::warn!("out of file descriptors; answering {} with 503", peer.ip());
            // Plain text even on a TLS listener: there is no descriptor to spare for a handshake; the client sees
            // a failed connection either way, and this at least frees the backlog slot at once.
            let conn = Conn::new(ClientStream::Plain(stream), peer, &self.open);
            canned(conn, 503, "the proxy is out of file descriptors; retry shortly", &[("Retry-After", "1")]);
        }
        // Only now, with the client's socket closed, is there a descriptor to take the spare back with.
        self.reserve_fd = std::fs::File::open("/dev/null").ok();
        answered
    }

    fn admit(&mut self, stream: TcpStream, peer: std::net::SocketAddr) {
        let state = self.shared.state();
        let cfg = &state.config;
        let _ = stream.set_nodelay(true);
        let ok =
            stream.set_nonblocking(true).is_ok() && stream.set_write_timeout(Some(cfg.client_write_timeout)).is_ok();
        if !ok {
            return;
        }
        let stream = match &cfg.client_tls {
            None => ClientStream::Plain(stream),
            Some(tls) => match ClientStream::tls(stream, tls) {
                Ok(s) => s,
                Err(e) => {
                    log::warn!("cannot start TLS for {}: {e}", peer.ip());
                    return;
                }
            },
        };
        let conn = Conn::new(stream, peer, &self.open);
        if self.open.load(Ordering::Relaxed) > cfg.max_connections {
            state.metrics.shed.fetch_add(1, Ordering::Relaxed);
            log::warn!("max_connections={} reached; refusing {}", cfg.max_connections, peer.ip());
            canned(conn, 503, "too many open connections; retry shortly", &[("Retry-After", "1")]);
            return;
        }
        let deadline = Instant::now() + cfg.head_timeout;
        self.waiting.insert(conn, deadline);
    }
}
