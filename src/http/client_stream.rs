//! The client side of a connection: plain TCP, or TLS (rustls) when the proxy listens with `tls_cert` and
//! `tls_key`. Everything above reads and writes a `ClientStream`; socket options go to the TCP stream under it.
//!
//! TLS needs two extra cares. Writes are flushed through rustls at once, so that an SSE event is on the wire
//! when `write` returns, as with plain TCP. And rustls may hold decrypted bytes that the socket no longer shows
//! as readable: `has_buffered` tells the front thread and the keep-alive fast path not to wait for a readiness event that
//! would never come.

use std::io::{self, IoSlice, Read, Write};
use std::net::TcpStream;
use std::sync::Arc;

pub enum ClientStream {
    Plain(TcpStream),
    Tls(Box<rustls::StreamOwned<rustls::ServerConnection, TcpStream>>),
}

impl ClientStream {
    pub fn tls(tcp: TcpStream, config: &Arc<rustls::ServerConfig>) -> io::Result<ClientStream> {
        let conn = rustls::ServerConnection::new(Arc::clone(config)).map_err(io::Error::other)?;
        Ok(ClientStream::Tls(Box::new(rustls::StreamOwned::new(conn, tcp))))
    }

    /// The TCP stream under it, for socket options, polling and shutdown.
    pub fn tcp(&self) -> &TcpStream {
        match self {
            ClientStream::Plain(s) => s,
            ClientStream::Tls(t) => &t.sock,
        }
    }

    /// Whether decrypted bytes are waiting inside rustls (always false for plain TCP).
    pub fn has_buffered(&mut self) -> bool {
        match self {
            ClientStream::Plain(_) => false,
            ClientStream::Tls(t) => t.conn.process_new_packets().is_ok_and(|s| s.plaintext_bytes_to_read() > 0),
        }
    }
}

impl Read for ClientStream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            ClientStream::Plain(s) => s.read(buf),
            ClientStream::Tls(t) => t.read(buf),
        }
    }
}

impl Write for ClientStream {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            ClientStream::Plain(s) => s.write(buf),
            ClientStream::Tls(t) => {
                let n = t.write(buf)?;
                t.flush()?;
                Ok(n)
            }
        }
    }

    fn write_vectored(&mut self, bufs: &[IoSlice<'_>]) -> io::Result<usize> {
        match self {
            ClientStream::Plain(s) => s.write_vectored(bufs),
            ClientStream::Tls(t) => {
                let n = t.write_vectored(bufs)?;
                t.flush()?;
                Ok(n)
            }
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        match self {
            ClientStream::Plain(s) => s.flush(),
            ClientStream::Tls(t) => t.flush(),
        }
    }
}

/// Loads the listener's certificate chain and key (PEM) into a rustls server configuration. An error names the
/// config field to fix (`tls_cert` or `tls_key`) and what is wrong with it.
pub fn server_config(
    cert_path: &std::path::Path,
    key_path: &std::path::Path,
) -> Result<rustls::ServerConfig, (&'static str, String)> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let cert_error = |e: String| ("tls_cert", e);
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(cert_path)
        .map_err(|e| cert_error(format!("cannot read {}: {e}", cert_path.display())))?
        .collect::<Result<_, _>>()
        .map_err(|e| cert_error(format!("{}: {e}", cert_path.display())))?;
    if certs.is_empty() {
        return Err(cert_error(format!("{} holds no certificate", cert_path.display())));
    }
    let key =
        PrivateKeyDer::from_pem_file(key_path).map_err(|e| ("tls_key", format!("{}: {e}", key_path.display())))?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| cert_error(e.to_string()))?
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .map_err(|e| cert_error(format!("the certificate and tls_key do not go together: {e}")))
}
