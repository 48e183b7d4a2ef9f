//! TLS pieces the tests share: the certificate fixtures (made with openssl, see tests/fixtures/README.md), the
//! crypto provider, and a server configuration with the localhost certificate of the private test CA.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};

pub fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures").join(name)
}

pub fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// A TLS server configuration for `localhost`, signed by the private test CA (`private-ca.pem`).
pub fn localhost_server_config() -> Arc<rustls::ServerConfig> {
    let cert = CertificateDer::from_pem_file(fixture("localhost-cert.pem")).expect("cert");
    let key = PrivateKeyDer::from_pem_file(fixture("localhost-key.pem")).expect("key");
    let config = rustls::ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .expect("versions")
        .with_no_client_auth()
        .with_single_cert(vec![cert], key)
        .expect("server config");
    Arc::new(config)
}
