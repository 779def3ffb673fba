//! Errors of the control operations on the registry, each with the kernel's errno.

use udm_types::errno::HasErrno;
use udm_types::Errno;

/// A failed control operation.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CoreError {
    /// The named device does not exist (dm: ENXIO "Device does not exist").
    #[error("device {0} does not exist")]
    NoDevice(String),
    /// A name or uuid is taken.
    #[error("{0}")]
    Exists(String),
    /// A device is open or held.
    #[error("{0}")]
    Busy(String),
    /// A table failed to parse or construct.
    #[error("{0}")]
    Table(#[from] udm_target::table::TableError),
    /// Any other refusal with an explicit errno and message.
    #[error("{msg}")]
    Other {
        /// errno.
        errno: Errno,
        /// Message naming the problem.
        msg: String,
    },
}

impl CoreError {
    /// An error with an explicit errno.
    pub fn new(errno: Errno, msg: impl Into<String>) -> Self {
        CoreError::Other {
            errno,
            msg: msg.into(),
        }
    }

    /// An EINVAL.
    pub fn invalid(msg: impl Into<String>) -> Self {
        Self::new(Errno::EINVAL, msg)
    }
}

impl HasErrno for CoreError {
    fn errno(&self) -> Errno {
        match self {
            CoreError::NoDevice(_) => Errno::ENXIO,
            CoreError::Exists(_) => Errno::EBUSY,
            CoreError::Busy(_) => Errno::EBUSY,
            CoreError::Table(e) => e.errno(),
            CoreError::Other { errno, .. } => *errno,
        }
    }
}

/// Result of control operations.
pub type Result<T> = std::result::Result<T, CoreError>;
