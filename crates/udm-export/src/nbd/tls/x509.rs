//! X.509 credentials with rustls, from a directory in the layout qemu, libnbd and nbdkit use:
//! `ca-cert.pem`, `server-cert.pem`, `server-key.pem`.

use super::stream::Engine;
use super::TlsError;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::WebPkiClientVerifier;
use rustls::{RootCertStore, ServerConfig, ServerConnection};
use std::io::{self, Read, Write};
use std::path::Path;
use std::sync::Arc;

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let pem = |why: String| TlsError::Pem {
        path: path.to_path_buf(),
        why,
    };
    let data = std::fs::read(path).map_err(|source| TlsError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    let v = CertificateDer::pem_slice_iter(&data)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| pem(e.to_string()))?;
    if v.is_empty() {
        return Err(pem("no CERTIFICATE in the file".into()));
    }
    Ok(v)
}

/// Loads `dir` as a server configuration; with `verify_peer` clients must present a
/// certificate signed by `ca-cert.pem`.
pub(crate) fn load(dir: &Path, verify_peer: bool) -> Result<Arc<ServerConfig>, TlsError> {
    let chain = certs(&dir.join("server-cert.pem"))?;
    let key_path = dir.join("server-key.pem");
    let key_data = std::fs::read(&key_path).map_err(|source| TlsError::Read {
        path: key_path.clone(),
        source,
    })?;
    let key = PrivateKeyDer::from_pem_slice(&key_data).map_err(|e| TlsError::Pem {
        path: key_path.clone(),
        why: e.to_string(),
    })?;
    let builder = ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(TlsError::Rustls)?;
    let builder = if verify_peer {
        let ca_path = dir.join("ca-cert.pem");
        let mut roots = RootCertStore::empty();
        for c in certs(&ca_path)? {
            roots.add(c).map_err(|e| TlsError::Pem {
                path: ca_path.clone(),
                why: e.to_string(),
            })?;
        }
        let v = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider())
            .build()
            .map_err(|e| TlsError::Pem {
                path: ca_path.clone(),
                why: e.to_string(),
            })?;
        builder.with_client_cert_verifier(v)
    } else {
        builder.with_no_client_auth()
    };
    let mut cfg = builder
        .with_single_cert(chain, key)
        .map_err(TlsError::Rustls)?;
    // No resumption state to keep per client.
    cfg.send_tls13_tickets = 0;
    Ok(Arc::new(cfg))
}

/// A rustls server session as an [`Engine`].
pub(crate) struct RustlsEngine(ServerConnection);

impl RustlsEngine {
    pub(crate) fn new(cfg: &Arc<ServerConfig>) -> io::Result<RustlsEngine> {
        ServerConnection::new(cfg.clone())
            .map(RustlsEngine)
            .map_err(io::Error::other)
    }
}

impl Engine for RustlsEngine {
    fn feed(&mut self, mut data: &[u8]) -> io::Result<usize> {
        let before = data.len();
        self.0.read_tls(&mut data)?;
        if let Err(e) = self.0.process_new_packets() {
            // Tell the client why (the alert is queued) before failing.
            return Err(io::Error::new(io::ErrorKind::InvalidData, e));
        }
        Ok(before - data.len())
    }

    fn read_plain(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.0.reader().read(buf)
    }

    fn write_plain(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.0.writer().write(buf)
    }

    fn drain(&mut self, out: &mut Vec<u8>) -> io::Result<()> {
        while self.0.wants_write() {
            self.0.write_tls(out)?;
        }
        Ok(())
    }

    fn handshaking(&self) -> bool {
        self.0.is_handshaking()
    }

    fn peer(&self) -> Option<String> {
        None
    }

    fn suite(&self) -> String {
        format!(
            "{:?} {:?}",
            self.0.protocol_version(),
            self.0.negotiated_cipher_suite().map(|s| s.suite())
        )
    }
}
