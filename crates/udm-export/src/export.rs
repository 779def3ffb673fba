//! One handle for every export kind, so the daemon stops, lists and counts exports without
//! knowing which kind each is. A constructor per kind starts one ([`crate::nbd::NbdExport`],
//! [`crate::fuse::FuseExport`], [`crate::vhost_user::VhostUserExport`], [`start_ublk`]); the
//! `ublk` cargo feature is decided here: without it [`start_ublk`] fails with EOPNOTSUPP.

use crate::fuse::FuseError;
use crate::nbd::NbdError;
use crate::vhost_user::VhostUserError;
use std::sync::Arc;
use udm_io::BlockDevice;
use udm_types::errno::HasErrno;
use udm_types::Errno;

/// Traffic of one export, in the units `export list` shows.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ExportStats {
    /// Connected clients (open file handles for FUSE, a VMM for vhost-user; 0 for ublk).
    pub clients: u64,
    /// Requests served.
    pub requests: u64,
    /// Requests that failed.
    pub errors: u64,
    /// Bytes read by clients.
    pub bytes_read: u64,
    /// Bytes written by clients.
    pub bytes_written: u64,
}

/// What is left after the first step of a removal ([`Export::detach`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Detached {
    /// Nothing: the export is gone (FUSE removes its file without waiting for anyone).
    Done,
    /// Its clients must still be disconnected by [`Export::stop`], which may wait for them.
    Stop,
}

/// A served export of one device.
pub trait Export: Send {
    /// The kind as `export list` names it: `nbd`, `fuse`, `ublk`, `vhost-user`.
    fn kind(&self) -> &'static str;
    /// Where clients find it (an NBD URI, a file, a socket, a block device node).
    fn location(&self) -> String;
    /// Live counters.
    fn stats(&self) -> ExportStats;
    /// First step of a removal, run under the caller's lock: must never wait for client I/O,
    /// and may refuse (FUSE: EBUSY while its file is open).
    fn detach(&mut self) -> Result<Detached, ExportError> {
        Ok(Detached::Stop)
    }
    /// Disconnects the clients and releases the device. Bounded: a request parked in a
    /// suspended device is left behind with an error saying so, never waited for without end.
    fn stop(self: Box<Self>) -> Result<(), ExportError>;
}

/// A failed export operation, with the errno the control protocol reports.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ExportError {
    /// From the NBD server.
    #[error(transparent)]
    Nbd(#[from] NbdError),
    /// From the FUSE export.
    #[error(transparent)]
    Fuse(#[from] FuseError),
    /// From the vhost-user export.
    #[error(transparent)]
    VhostUser(#[from] VhostUserError),
    /// From the ublk export.
    #[cfg(feature = "ublk")]
    #[error(transparent)]
    Ublk(#[from] crate::ublk::UblkError),
    /// A ublk export asked of a build without the `ublk` feature.
    #[error("this udmd was built without ublk support (cargo feature `ublk`)")]
    UblkUnsupported,
    /// Stopped within its bound with a request still running in the device.
    #[error("{0} stopped with a request still running")]
    StillRunning(String),
}

impl HasErrno for ExportError {
    fn errno(&self) -> Errno {
        match self {
            ExportError::Nbd(e) => e.errno(),
            ExportError::Fuse(e) => e.errno(),
            ExportError::VhostUser(e) => e.errno(),
            #[cfg(feature = "ublk")]
            ExportError::Ublk(e) => e.errno(),
            ExportError::UblkUnsupported => Errno::EOPNOTSUPP,
            ExportError::StillRunning(_) => Errno::EBUSY,
        }
    }
}

/// How a ublk export is set up.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct UblkOptions {
    /// Wanted device id N (`/dev/ublkbN`); `None`: the driver picks one. A device with this id
    /// left by a udmd that died is deleted first.
    pub dev_id: Option<u32>,
    /// Hardware queues (one serving thread each); `None`: one per CPU.
    pub queues: Option<u16>,
    /// Requests in flight per queue; `None`: 64.
    pub depth: Option<u16>,
    /// Read-only block device.
    pub read_only: bool,
}

/// Starts `/dev/ublkbN` for `dev` (`name` is for logs); returns the export and N, which the
/// caller records so that a restart brings back the same node.
#[cfg(feature = "ublk")]
pub fn start_ublk(
    name: &str,
    dev: Arc<dyn BlockDevice>,
    opts: &UblkOptions,
) -> Result<(Box<dyn Export>, u32), ExportError> {
    let u = crate::ublk::UblkExport::start(name, dev, opts)?;
    let id = u.dev_id();
    Ok((Box::new(u), id))
}

/// Without the `ublk` feature there is no ublk export: EOPNOTSUPP.
#[cfg(not(feature = "ublk"))]
pub fn start_ublk(
    _name: &str,
    _dev: Arc<dyn BlockDevice>,
    _opts: &UblkOptions,
) -> Result<(Box<dyn Export>, u32), ExportError> {
    Err(ExportError::UblkUnsupported)
}
