//! TLS to upstreams with rustls. Every upstream connection of the proxy starts from one `ClientConfig`
//! (`TlsClient`, shared by both agents), so every connection sees the same session store: after a lull that
//! emptied the pool, the reconnects resume their sessions instead of making full handshakes. The store keeps
//! more TLS 1.3 tickets per host than rustls's own (8, each used once), enough for a pool of connections.
//!
//! The transport coalesces plaintext (see `Coalescing`): the request head and a small body are encrypted as one
//! record instead of one per piece ureq hands over.

use std::collections::{HashMap, VecDeque};
use std::fmt;
use std::io::{Read, Write};
use std::sync::{Arc, Mutex, MutexGuard};

use rustls::client::{ClientSessionStore, Resumption, Tls12ClientSessionValue, Tls13ClientSessionValue};
use rustls::pki_types::{CertificateDer, ServerName};
use rustls::{ClientConfig, ClientConnection, HandshakeKind, NamedGroup, RootCertStore};
use ureq::unversioned::transport::{Buffers, ConnectionDetails, NextTimeout, Transport, TransportAdapter};

use super::Coalescing;

/// Hosts whose sessions are kept at most: the configured instances' (and an HTTPS egress proxy's), so this only
/// bounds a configuration with very many endpoints.
const MAX_HOSTS: usize = 256;

/// The TLS side of every upstream connection: roots and session store, in one `ClientConfig` built once per
/// configuration of roots and pool size. Cheap to clone (an `Arc`).
#[derive(Clone)]
pub struct TlsClient {
    config: Arc<ClientConfig>,
}

impl TlsClient {
    /// Trusts `roots` (a `ca_bundle`) or, without them, the built-in Mozilla roots (what ureq uses by default);
    /// TLS 1.2 and 1.3, as ureq offers. Keeps up to `tickets_per_host` TLS 1.3 tickets per upstream host.
    pub fn new(
        roots: Option<&[ureq::tls::Certificate<'static>]>,
        tickets_per_host: usize,
    ) -> Result<TlsClient, String> {
        let mut store = RootCertStore::empty();
        match roots {
            Some(certs) => {
                let (_, ignored) = store.add_parsable_certificates(certs.iter().map(|c| CertificateDer::from(c.der())));
                if ignored > 0 {
                    log::warn!("ca_bundle: {ignored} certificates could not be used as roots and are ignored");
                }
            }
            None => store.roots = webpki_roots::TLS_SERVER_ROOTS.to_vec(),
        }
        // The crypto provider as ureq picks it: the process default if one is installed, else ring.
        let provider = rustls::crypto::CryptoProvider::get_default()
            .cloned()
            .unwrap_or_else(|| Arc::new(rustls::crypto::ring::default_provider()));
        let mut config = ClientConfig::builder_with_provider(provider)
            .with_protocol_versions(rustls::ALL_VERSIONS)
            .map_err(|e| format!("upstream TLS settings: {e}"))?
            .with_root_certificates(store)
            .with_no_client_auth();
        config.resumption = Resumption::store(Arc::new(Tickets::new(tickets_per_host)));
        Ok(TlsClient { config: Arc::new(config) })
    }

    /// Makes the TLS handshake over `transport` (TCP, or a tunnel through the egress proxy), within what is left
    /// of the connect budget.
    pub(super) fn wrap(
        &self,
        transport: Box<dyn Transport>,
        details: &ConnectionDetails,
    ) -> Result<TlsTransport, ureq::Error> {
        let host = details.uri.host().unwrap_or_default();
        let host = host.strip_prefix('[').and_then(|h| h.strip_suffix(']')).unwrap_or(host);
        let name = ServerName::try_from(host).map_err(|_| ureq::Error::Tls("invalid upstream host name for TLS"))?;
        let mut conn = ClientConnection::new(Arc::clone(&self.config), name.to_owned())?;
        let mut sock = TransportAdapter::new(transport, details.current_time.clone());
        sock.set_timeout(super::connect_budget(details));
        conn.complete_io(&mut sock)?;
        let resumed = conn.handshake_kind() == Some(HandshakeKind::Resumed);
        log::debug!("upstream TLS to {host}: {} handshake", if resumed { "resumed" } else { "full" });
        let config = details.config;
        let buffers = Coalescing::new(config.input_buffer_size(), config.output_buffer_size());
        Ok(TlsTransport { conn, sock, buffers })
    }
}

impl fmt::Debug for TlsClient {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TlsClient").finish_non_exhaustive()
    }
}

/// One TLS connection: rustls over the adapted inner transport, with ureq's buffers holding plaintext.
pub struct TlsTransport {
    conn: ClientConnection,
    sock: TransportAdapter,
    buffers: Coalescing,
}

impl TlsTransport {
    /// Encrypts the pending plaintext (one record for up to 16 KiB) and hands the records to the inner
    /// transport, which sends them with whatever else it holds when ureq next waits for input.
    fn flush(&mut self) -> Result<(), ureq::Error> {
        if self.buffers.pending().is_empty() {
            return Ok(());
        }
        self.sock.set_timeout(self.buffers.pending_timeout);
        let result = self.conn.writer().write_all(self.buffers.pending());
        self.buffers.sent();
        result?;
        while self.conn.wants_write() {
            self.conn.write_tls(&mut self.sock)?;
        }
        Ok(())
    }
}

impl Transport for TlsTransport {
    fn buffers(&mut self) -> &mut dyn Buffers {
        &mut self.buffers
    }

    fn transmit_output(&mut self, amount: usize, timeout: NextTimeout) -> Result<(), ureq::Error> {
        if self.buffers.queue(amount, timeout) {
            self.flush()?;
        }
        Ok(())
    }

    fn await_input(&mut self, timeout: NextTimeout) -> Result<bool, ureq::Error> {
        self.flush()?;
        self.sock.set_timeout(timeout);
        let input = self.buffers.input_append_buf();
        let amount = rustls::Stream::new(&mut self.conn, &mut self.sock).read(input)?;
        self.buffers.input_appended(amount);
        Ok(amount > 0)
    }

    fn is_open(&mut self) -> bool {
        self.sock.get_mut().is_open()
    }

    fn is_tls(&self) -> bool {
        true
    }
}

impl fmt::Debug for TlsTransport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TlsTransport").field("inner", &self.sock.inner()).finish()
    }
}

/// The session store: per upstream host, the last key-exchange group, the last TLS 1.2 session, and up to
/// `per_host` TLS 1.3 tickets (each usable once; the newest is used first). Invariant: at most `MAX_HOSTS`
/// hosts.
struct Tickets {
    per_host: usize,
    hosts: Mutex<HashMap<ServerName<'static>, HostSessions>>,
}

#[derive(Default)]
struct HostSessions {
    kx_hint: Option<NamedGroup>,
    tls12: Option<Tls12ClientSessionValue>,
    tls13: VecDeque<Tls13ClientSessionValue>,
}

impl Tickets {
    fn new(per_host: usize) -> Tickets {
        Tickets { per_host: per_host.max(1), hosts: Mutex::new(HashMap::new()) }
    }

    fn hosts(&self) -> MutexGuard<'_, HashMap<ServerName<'static>, HostSessions>> {
        self.hosts.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn with_host(&self, name: ServerName<'static>, f: impl FnOnce(&mut HostSessions)) {
        let mut hosts = self.hosts();
        if hosts.len() >= MAX_HOSTS && !hosts.contains_key(&name) {
            // Any one: only a configuration with hundreds of TLS endpoints gets here, and a lost session costs
            // one full handshake.
            if let Some(old) = hosts.keys().next().cloned() {
                hosts.remove(&old);
            }
        }
        f(hosts.entry(name).or_default());
    }
}

impl ClientSessionStore for Tickets {
    fn set_kx_hint(&self, name: ServerName<'static>, group: NamedGroup) {
        self.with_host(name, |h| h.kx_hint = Some(group));
    }

    fn kx_hint(&self, name: &ServerName<'_>) -> Option<NamedGroup> {
        self.hosts().get(name).and_then(|h| h.kx_hint)
    }

    fn set_tls12_session(&self, name: ServerName<'static>, value: Tls12ClientSessionValue) {
        self.with_host(name, |h| h.tls12 = Some(value));
    }

    fn tls12_session(&self, name: &ServerName<'_>) -> Option<Tls12ClientSessionValue> {
        self.hosts().get(name).and_then(|h| h.tls12.clone())
    }

    fn remove_tls12_session(&self, name: &ServerName<'static>) {
        if let Some(h) = self.hosts().get_mut(name) {
            h.tls12 = None;
        }
    }

    fn insert_tls13_ticket(&self, name: ServerName<'static>, value: Tls13ClientSessionValue) {
        let per_host = self.per_host;
        self.with_host(name, |h| {
            if h.tls13.len() >= per_host {
                h.tls13.pop_front();
            }
            h.tls13.push_back(value);
        });
    }

    fn take_tls13_ticket(&self, name: &ServerName<'static>) -> Option<Tls13ClientSessionValue> {
        self.hosts().get_mut(name).and_then(|h| h.tls13.pop_back())
    }
}

impl fmt::Debug for Tickets {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Tickets").field("per_host", &self.per_host).finish_non_exhaustive()
    }
}
