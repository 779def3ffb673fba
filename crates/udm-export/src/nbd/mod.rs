//! NBD server: exports udm block devices to any NBD client (qemu, libnbd, fio, the kernel)
//! over Unix and TCP sockets.
//!
//! Fixed newstyle handshake with `NBD_OPT_GO`/`INFO`/`LIST`, structured replies and the
//! `base:allocation` metadata context; requests are pipelined and answered out of order by a
//! per-connection worker pool, so a device that blocks (suspended) stalls only its own
//! requests. [`proto`] is the wire codec, [`client`] a small client for tests and tools.
//!
//! Choices the protocol leaves to the server: the minimum block size is the device's logical
//! block size (512 or 4096) and unaligned requests get `EINVAL` (no read-modify-write); the
//! preferred size is 4096, the maximum 32 MiB (larger writes are skipped and refused up to 64 MiB,
//! beyond that the connection is dropped). Metadata contexts (`meta`): `base:allocation` and
//! one `qemu:dirty-bitmap:NAME` per bitmap given with the export; `NBD_OPT_LIST_META_CONTEXT`
//! accepts `base:`, `qemu:` and `qemu:dirty-bitmap:` as wildcards. Successful non-read replies are simple replies even with structured replies on;
//! errors are structured (with a message) when negotiated.
//!
//! TLS ([`tls`]): TCP listeners take X.509 (rustls) or PSK (OpenSSL) credentials and then
//! require `NBD_OPT_STARTTLS` before anything else (`NBD_REP_ERR_TLS_REQD`, nothing listed or
//! described before it). Plain TCP needs an explicit opt-in on the listener and serves only
//! exports marked `insecure_tcp`. Unix sockets stay plain (`NBD_OPT_STARTTLS` gets
//! `NBD_REP_ERR_UNSUP` there, as on any listener without credentials).
//!
//! Hostile or stuck clients are bounded by [`NbdLimits`]: a connection cap (refused clients are
//! told why), handshake and send timeouts (and an optional idle timeout), a per-connection cap
//! on payload memory (the reader stops reading until replies drain; write payloads are
//! committed as they arrive), bounded and idle-trimmed buffer pools, and export removal that
//! closes sockets after a short drain. [`NbdServer::memory`] reports what connections hold.
//!
//! Modules, top down (none imports one above it): `handle` (one export as a
//! [`crate::Export`]); `listen` (listeners, connection start-up);
//! `conn` (handshake); `transmission` (reader, threads), `exec` (requests, replies), `read` (chunked and
//! sparse READ replies) and
//! `buffers` (payload memory), all on `connection` (a connection's shared state); `server`
//! (export table); `session`, `export`, `ctl` (a connection's control block), `tls`; the
//! leaves `watchdog`, `limits`, `meta`, and `proto` (in udm-nbd). Traits and options they share are in this file.

mod buffers;
mod conn;
mod connection;
mod ctl;
mod exec;
mod export;
mod fuzz;
mod handle;
mod limits;
mod listen;
mod meta;
mod read;
mod server;
mod session;
pub mod tls;
mod transmission;
pub use meta::{META_DIRTY_BITMAP, STATE_DIRTY};
/// The wire format and the test client live in `udm-nbd` (the backup workflow uses the client).
pub use udm_nbd::{client, proto};
mod validate;
mod watchdog;

pub use export::{NbdExportInfo, NbdStats};
pub use fuzz::{fuzz_handshake, fuzz_requests, MemoryStream};
pub use handle::{unix_uri, NbdExport};
pub use limits::{NbdLimits, NbdMemory};
pub use server::NbdServer;
pub use tls::{ConnSecurity, TcpSecurity, TlsCreds, TlsError};

use std::io::{self, Read, Write};
use std::net::{Shutdown, TcpStream};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use udm_types::errno::HasErrno;
use udm_types::Errno;

/// How an export is offered.
#[derive(Clone, Debug, Default)]
pub struct NbdExportOptions {
    /// Refuse writes (advertised as `NBD_FLAG_READ_ONLY`; writes get `EPERM`).
    pub read_only: bool,
    /// Shown by `nbdinfo --list` and `NBD_INFO_DESCRIPTION`.
    pub description: Option<String>,
    /// Also served over plain (unencrypted, unauthenticated) TCP, on listeners that allow it
    /// ([`TcpSecurity::allow_insecure`]). Off: TCP clients need TLS.
    pub insecure_tcp: bool,
    /// Dirty bitmaps served as `qemu:dirty-bitmap:NAME` metadata contexts.
    pub bitmaps: Vec<NbdBitmap>,
}

/// A dirty bitmap an export serves (`qemu:dirty-bitmap:NAME`; flag 1 = changed).
#[derive(Clone, Debug)]
pub struct NbdBitmap {
    /// NAME, the part after `qemu:dirty-bitmap:` (libvirt's `backup-<DEV>`).
    pub name: String,
    /// Which blocks changed.
    pub bitmap: std::sync::Arc<udm_types::DirtyBitmap>,
}

/// Accepted sockets are switched back to blocking mode before serving.
pub(crate) trait SetBlocking {
    fn set_blocking(&self) -> std::io::Result<()>;
}

/// Errors of the NBD server's management API.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum NbdError {
    /// `add_export` with a name already in use.
    #[error("NBD export {name:?} already exists")]
    ExportExists {
        /// The export name.
        name: String,
    },
    /// An export name that does not exist.
    #[error("no NBD export named {name:?}")]
    NoSuchExport {
        /// The export name.
        name: String,
    },
    /// An export name the protocol cannot carry (longer than 4096 bytes or with NUL).
    #[error("invalid NBD export name {name:?}: {why}")]
    InvalidName {
        /// The export name.
        name: String,
        /// What is wrong.
        why: &'static str,
    },
    /// Binding or configuring a listening socket failed.
    #[error("cannot listen on {addr}: {source}")]
    Listen {
        /// Path or address.
        addr: String,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// Preparing a connection's stream (clone, thread spawn) failed.
    #[error("cannot {op} for an NBD connection: {source}")]
    Stream {
        /// What was being done.
        op: &'static str,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// The server was shut down.
    #[error("the NBD server is shut down")]
    ShutDown,
    /// A connection over `NbdLimits::max_connections` while many refusals were already under
    /// way: closed without a word.
    #[error("too many NBD connections (limit {limit})")]
    TooManyConnections {
        /// The configured limit.
        limit: usize,
    },
}

impl From<NbdError> for crate::ExportError {
    fn from(e: NbdError) -> Self {
        crate::ExportError::kind(e)
    }
}

impl HasErrno for NbdError {
    fn errno(&self) -> Errno {
        match self {
            NbdError::ExportExists { .. } => Errno::EEXIST,
            NbdError::NoSuchExport { .. } => Errno::ENOENT,
            NbdError::InvalidName { .. } => Errno::EINVAL,
            NbdError::Listen { source, .. } | NbdError::Stream { source, .. } => {
                Errno::from_io(source)
            }
            NbdError::ShutDown => Errno::ESHUTDOWN,
            NbdError::TooManyConnections { .. } => Errno::EAGAIN,
        }
    }
}

/// Wakes or ends a connection from another thread: `stop_reading` makes the reader see end of
/// stream (in-flight requests still get answered), `close` cuts both directions.
pub trait StreamControl: Send + Sync {
    /// Stops further reads (the blocked reader returns end of stream).
    fn stop_reading(&self);
    /// Shuts both directions.
    fn close(&self);
}

/// A byte stream the server can serve: split into a reader half, a writer half and a control
/// handle, so replies can be written while the next request is read.
pub trait NbdStream: Send + 'static {
    /// Prepares the stream (e.g. `TCP_NODELAY`) and splits it.
    #[allow(clippy::type_complexity)]
    fn split(
        self,
    ) -> io::Result<(
        Box<dyn Read + Send>,
        Box<dyn Write + Send>,
        Box<dyn StreamControl>,
    )>;

    /// What the connection may see and whether it can start TLS; called before `split`. The
    /// default is a trusted local connection (every export, no TLS): right for Unix sockets
    /// and for streams the embedder vouches for. The TCP listener returns its own policy.
    fn security(&self) -> io::Result<ConnSecurity> {
        Ok(ConnSecurity::local())
    }
}

struct SockCtl<S>(S);

impl StreamControl for SockCtl<UnixStream> {
    fn stop_reading(&self) {
        let _ = self.0.shutdown(Shutdown::Read);
    }
    fn close(&self) {
        let _ = self.0.shutdown(Shutdown::Both);
    }
}

impl StreamControl for SockCtl<TcpStream> {
    fn stop_reading(&self) {
        let _ = self.0.shutdown(Shutdown::Read);
    }
    fn close(&self) {
        let _ = self.0.shutdown(Shutdown::Both);
    }
}

impl NbdStream for UnixStream {
    fn split(
        self,
    ) -> io::Result<(
        Box<dyn Read + Send>,
        Box<dyn Write + Send>,
        Box<dyn StreamControl>,
    )> {
        let w = self.try_clone()?;
        let c = self.try_clone()?;
        Ok((Box::new(self), Box::new(w), Box::new(SockCtl(c))))
    }
}

impl NbdStream for TcpStream {
    fn split(
        self,
    ) -> io::Result<(
        Box<dyn Read + Send>,
        Box<dyn Write + Send>,
        Box<dyn StreamControl>,
    )> {
        self.set_nodelay(true)?;
        let w = self.try_clone()?;
        let c = self.try_clone()?;
        Ok((Box::new(self), Box::new(w), Box::new(SockCtl(c))))
    }
}

/// Where a listener is bound, for messages.
#[derive(Clone, Debug)]
pub enum ListenAddr {
    /// A Unix socket path.
    Unix(PathBuf),
    /// A TCP address.
    Tcp(std::net::SocketAddr),
}
