//! One handle for every export kind, so the daemon stops, lists and counts exports without
//! knowing which kind each is. A constructor per kind starts one ([`crate::nbd::NbdExport`],
//! [`crate::fuse::FuseExport`], [`crate::vhost_user::VhostUserExport`], [`crate::start_ublk`]).

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

/// A failed export operation, with the errno the control protocol reports. Each kind's error
/// converts into it (`From`, next to that error), keeping its message and errno.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ExportError {
    /// From one export kind (NBD, FUSE, ublk, vhost-user).
    #[error("{source}")]
    Kind {
        /// The errno of `source`.
        errno: Errno,
        /// The kind's own error.
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// A ublk export asked of a build without the `ublk` feature.
    #[error("this udmd was built without ublk support (cargo feature `ublk`)")]
    UblkUnsupported,
    /// Stopped within its bound with a request still running in the device.
    #[error("{0} stopped with a request still running")]
    StillRunning(String),
}

impl ExportError {
    /// Wraps an export kind's error.
    pub fn kind<E>(e: E) -> ExportError
    where
        E: HasErrno + std::error::Error + Send + Sync + 'static,
    {
        ExportError::Kind {
            errno: e.errno(),
            source: Box::new(e),
        }
    }
}

impl HasErrno for ExportError {
    fn errno(&self) -> Errno {
        match self {
            ExportError::Kind { errno, .. } => *errno,
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
