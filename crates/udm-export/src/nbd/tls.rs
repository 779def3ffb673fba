//! NBD over TLS: `NBD_OPT_STARTTLS` (fixed newstyle; after it the option haggling starts again
//! inside TLS) with X.509 certificates (rustls) or pre-shared keys (OpenSSL, see [`psk`]), and
//! the policy of who sees which export.
//!
//! A TCP listener is given a [`TcpSecurity`]: with credentials, TLS is required before any
//! other option (`NBD_REP_ERR_TLS_REQD`, and `NBD_OPT_LIST`/`INFO`/`GO` reveal nothing). Plain
//! TCP is only possible when the listener allows it explicitly, and then only for exports added
//! with [`NbdExportOptions::insecure_tcp`](super::NbdExportOptions); other exports look absent
//! (or, when TLS is also offered, answer `NBD_REP_ERR_TLS_REQD`). Unix sockets are trusted
//! (the daemon makes them 0600) and stay plain, without extra copies or locks.

mod psk;
mod stream;
mod x509;

use super::proto::{REP_ERR_INVALID, REP_ERR_TLS_REQD, REP_ERR_UNKNOWN, REP_ERR_UNSUP};
use super::NbdExportOptions;
use parking_lot::Mutex;
use std::io::{self, Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use udm_types::errno::HasErrno;
use udm_types::Errno;

/// Why TLS credentials cannot be loaded.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TlsError {
    /// A credentials file cannot be read.
    #[error("cannot read {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// A PEM file holds nothing usable.
    #[error("{path}: {why}")]
    Pem {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        why: String,
    },
    /// A PSK key file line is malformed.
    #[error("{path}:{line}: {why}")]
    PskFile {
        /// The file.
        path: PathBuf,
        /// 1-based line (0: the whole file).
        line: usize,
        /// What is wrong.
        why: String,
    },
    /// rustls refused the configuration (key does not match the certificate, ...).
    #[error("TLS configuration: {0}")]
    Rustls(rustls::Error),
    /// OpenSSL refused the PSK configuration.
    #[error("TLS-PSK configuration: {0}")]
    OpenSsl(openssl::error::ErrorStack),
}

impl HasErrno for TlsError {
    fn errno(&self) -> Errno {
        match self {
            TlsError::Read { source, .. } => Errno::from_io(source),
            _ => Errno::EINVAL,
        }
    }
}

enum Creds {
    X509(Arc<rustls::ServerConfig>),
    Psk(Arc<openssl::ssl::SslContext>),
}

/// Server credentials offered with `NBD_OPT_STARTTLS`.
pub struct TlsCreds {
    creds: Creds,
    what: String,
}

impl std::fmt::Debug for TlsCreds {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.what)
    }
}

impl TlsCreds {
    /// X.509 from `dir` (`server-cert.pem` with its chain, `server-key.pem`, and with
    /// `verify_peer` also `ca-cert.pem`, whose signature client certificates must carry).
    pub fn x509_dir(dir: &Path, verify_peer: bool) -> Result<TlsCreds, TlsError> {
        Ok(TlsCreds {
            creds: Creds::X509(x509::load(dir, verify_peer)?),
            what: format!(
                "X.509 from {}{}",
                dir.display(),
                if verify_peer {
                    ", client certificates required"
                } else {
                    ""
                }
            ),
        })
    }

    /// Pre-shared keys from a psktool/nbdkit file of `username:hexkey` lines.
    pub fn psk_file(path: &Path) -> Result<TlsCreds, TlsError> {
        let text = std::fs::read_to_string(path).map_err(|source| TlsError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        let keys = psk::parse_keys(path, &text)?;
        let n = keys.len();
        Ok(TlsCreds {
            creds: Creds::Psk(Arc::new(psk::context(keys)?)),
            what: format!("PSK from {} ({n} users)", path.display()),
        })
    }

    /// Runs the server side of the TLS handshake on `sock` and splits the session.
    #[allow(clippy::type_complexity)]
    fn start(
        &self,
        sock: TcpStream,
    ) -> io::Result<(
        Box<dyn Read + Send>,
        Box<dyn Write + Send>,
        Option<String>,
        String,
    )> {
        let mut engine: Box<dyn stream::Engine> = match &self.creds {
            Creds::X509(cfg) => Box::new(x509::RustlsEngine::new(cfg)?),
            Creds::Psk(ctx) => Box::new(psk::OpensslEngine::new(ctx)?),
        };
        let leftover = stream::handshake(engine.as_mut(), &sock)?;
        let peer = engine.peer();
        let suite = engine.suite();
        let (r, w) = stream::split(engine, sock, leftover);
        Ok((r, w, peer, suite))
    }
}

/// How a TCP listener treats its clients.
#[derive(Clone, Debug, Default)]
pub struct TcpSecurity {
    /// Credentials: TLS is offered, and required for every export not marked `insecure_tcp`.
    pub tls: Option<Arc<TlsCreds>>,
    /// Serve exports marked `insecure_tcp` without TLS. Without `tls` this must be set, or the
    /// listener is refused.
    pub allow_insecure: bool,
}

enum Kind {
    /// Unix socket or a stream the embedder vouches for: everything visible, no TLS.
    Local,
    Tcp {
        policy: TcpSecurity,
        /// The socket the TLS session will run on (taken at STARTTLS).
        sock: Mutex<Option<TcpStream>>,
    },
}

/// What the handshake may show a connection, and its TLS upgrade.
pub struct ConnSecurity {
    kind: Kind,
    encrypted: AtomicBool,
}

impl ConnSecurity {
    /// A trusted local connection (Unix socket): every export, no TLS.
    pub fn local() -> ConnSecurity {
        ConnSecurity {
            kind: Kind::Local,
            encrypted: AtomicBool::new(false),
        }
    }

    /// A TCP connection under `policy`.
    pub(crate) fn tcp(sock: &TcpStream, policy: &TcpSecurity) -> io::Result<ConnSecurity> {
        let sock = match policy.tls {
            Some(_) => Some(sock.try_clone()?),
            None => None,
        };
        Ok(ConnSecurity {
            kind: Kind::Tcp {
                policy: policy.clone(),
                sock: Mutex::new(sock),
            },
            encrypted: AtomicBool::new(false),
        })
    }

    fn encrypted(&self) -> bool {
        self.encrypted.load(Ordering::SeqCst)
    }

    /// True while every option but `NBD_OPT_STARTTLS` and `NBD_OPT_ABORT` must be refused
    /// with `NBD_REP_ERR_TLS_REQD` (TLS configured, plain TCP not allowed, not yet upgraded).
    pub(crate) fn tls_required(&self) -> bool {
        match &self.kind {
            Kind::Local => false,
            Kind::Tcp { policy, .. } => {
                policy.tls.is_some() && !policy.allow_insecure && !self.encrypted()
            }
        }
    }

    /// Whether an export with `opts` may be listed, described or served now.
    pub(crate) fn shown(&self, opts: &NbdExportOptions) -> bool {
        match &self.kind {
            Kind::Local => true,
            Kind::Tcp { policy, .. } => {
                self.encrypted() || (policy.allow_insecure && opts.insecure_tcp)
            }
        }
    }

    /// The answer to `NBD_OPT_INFO`/`GO` for a name that is not [`shown`](Self::shown): before
    /// STARTTLS on a listener with TLS, "TLS required" whether or not the export exists (a
    /// plain client learns no names); otherwise "unknown export".
    pub(crate) fn not_shown(&self, name: &str) -> (u32, String) {
        match &self.kind {
            Kind::Tcp {
                policy: TcpSecurity { tls: Some(_), .. },
                ..
            } if !self.encrypted() => (
                REP_ERR_TLS_REQD,
                "TLS required: send NBD_OPT_STARTTLS first".into(),
            ),
            _ => (REP_ERR_UNKNOWN, format!("no export named {name:?}")),
        }
    }

    /// Why `NBD_OPT_STARTTLS` is refused here, if it is (reply type and message).
    pub(crate) fn starttls_refusal(&self, has_data: bool) -> Option<(u32, &'static str)> {
        if has_data {
            return Some((REP_ERR_INVALID, "NBD_OPT_STARTTLS takes no data"));
        }
        if self.encrypted() {
            return Some((REP_ERR_INVALID, "TLS is already active"));
        }
        match &self.kind {
            Kind::Tcp {
                policy: TcpSecurity { tls: Some(_), .. },
                ..
            } => None,
            // As a server without TLS support answers (clients then report "TLS not supported").
            _ => Some((REP_ERR_UNSUP, "TLS is not configured on this socket")),
        }
    }

    /// Runs the TLS handshake (after the server acknowledged `NBD_OPT_STARTTLS`) and returns
    /// the new reader and writer halves. The old halves must not be used afterwards; the
    /// connection's [`StreamControl`](super::StreamControl) still works (it shuts the socket).
    #[allow(clippy::type_complexity)]
    pub(crate) fn upgrade(&self) -> io::Result<(Box<dyn Read + Send>, Box<dyn Write + Send>)> {
        let Kind::Tcp {
            policy: TcpSecurity {
                tls: Some(creds), ..
            },
            sock,
        } = &self.kind
        else {
            return Err(io::Error::other("TLS is not configured"));
        };
        let sock = sock
            .lock()
            .take()
            .ok_or_else(|| io::Error::other("TLS was already started"))?;
        let peer = sock.peer_addr().ok();
        let (r, w, user, suite) = creds.start(sock).inspect_err(|e| {
            tracing::warn!(peer = ?peer, error = %e, "NBD TLS handshake failed");
        })?;
        self.encrypted.store(true, Ordering::SeqCst);
        tracing::info!(peer = ?peer, user = ?user, %suite, "NBD connection upgraded to TLS");
        Ok((r, w))
    }
}

/// An accepted TCP connection with its listener's policy.
pub(crate) struct TcpConn {
    pub sock: TcpStream,
    pub policy: Arc<TcpSecurity>,
}

impl super::NbdStream for TcpConn {
    fn split(
        self,
    ) -> io::Result<(
        Box<dyn Read + Send>,
        Box<dyn Write + Send>,
        Box<dyn super::StreamControl>,
    )> {
        super::NbdStream::split(self.sock)
    }

    fn security(&self) -> io::Result<ConnSecurity> {
        ConnSecurity::tcp(&self.sock, &self.policy)
    }
}

impl super::SetBlocking for TcpConn {
    fn set_blocking(&self) -> io::Result<()> {
        super::SetBlocking::set_blocking(&self.sock)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A credentials file that cannot be read carries the OS's errno (the daemon's reply says
    /// ENOENT, not EINVAL); a malformed one is EINVAL.
    #[test]
    fn credential_errors_carry_their_errno() {
        let missing = |r: Result<TlsCreds, TlsError>| r.err().map(|e| e.errno());
        let dir = std::env::temp_dir().join("udm-tls-test-no-such-dir");
        assert_eq!(
            missing(TlsCreds::x509_dir(&dir, false)),
            Some(Errno::ENOENT)
        );
        assert_eq!(
            missing(TlsCreds::psk_file(&dir.join("keys.psk"))),
            Some(Errno::ENOENT)
        );
        let bad = tempfile::NamedTempFile::new().unwrap_or_else(|e| panic!("{e}"));
        std::fs::write(bad.path(), "no colon here\n").unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(missing(TlsCreds::psk_file(bad.path())), Some(Errno::EINVAL));
        // What the daemon logs and shows of loaded credentials.
        std::fs::write(bad.path(), "alice:00ff\n").unwrap_or_else(|e| panic!("{e}"));
        let creds = TlsCreds::psk_file(bad.path()).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(
            format!("{creds:?}"),
            format!("PSK from {} (1 users)", bad.path().display())
        );
    }
}
