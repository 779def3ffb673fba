//! Errors of the block I/O layer. Each carries the operation and sector it failed at, and maps to
//! one errno, which is what clients finally see.

use crate::bio::BioKind;
use udm_types::errno::HasErrno;
use udm_types::Errno;

/// A failed block request.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum IoError {
    /// The operating system refused the request.
    #[error("{op} at sector {sector} failed: {source}")]
    Os {
        /// Operation that failed.
        op: BioKind,
        /// First sector of the failed request.
        sector: u64,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// The request runs past the end of the device.
    #[error(
        "{op} of {sectors} sectors at sector {sector} is beyond the device end ({size} sectors)"
    )]
    OutOfRange {
        /// Operation.
        op: BioKind,
        /// First sector.
        sector: u64,
        /// Length in sectors.
        sectors: u64,
        /// Device size in sectors.
        size: u64,
    },
    /// The device cannot do this operation (no discard, no write-zeroes, fast-zero refused...).
    #[error("{op} is not supported by {device}")]
    Unsupported {
        /// Operation.
        op: BioKind,
        /// Which device or target refused.
        device: String,
    },
    /// A write to a read-only device.
    #[error("{op} to read-only device {device}")]
    ReadOnly {
        /// Operation.
        op: BioKind,
        /// Device.
        device: String,
    },
    /// A buffer that is not a whole number of sectors or not aligned as the device needs.
    #[error("misaligned {op} at sector {sector}: {why}")]
    Misaligned {
        /// Operation.
        op: BioKind,
        /// Sector.
        sector: u64,
        /// What is wrong.
        why: &'static str,
    },
    /// Any other failure with an explicit errno: injected faults, error targets, targets that
    /// fail a request on purpose.
    #[error("{op} at sector {sector}: {what} ({errno})")]
    Errno {
        /// Operation.
        op: BioKind,
        /// Sector.
        sector: u64,
        /// The errno to report.
        errno: Errno,
        /// Why, for logs.
        what: String,
    },
}

impl IoError {
    /// Builds an [`IoError::Errno`].
    pub fn errno(op: BioKind, sector: u64, errno: Errno, what: impl Into<String>) -> Self {
        IoError::Errno {
            op,
            sector,
            errno,
            what: what.into(),
        }
    }

    /// Builds an [`IoError::Os`].
    pub fn os(op: BioKind, sector: u64, source: std::io::Error) -> Self {
        IoError::Os { op, sector, source }
    }
}

impl HasErrno for IoError {
    fn errno(&self) -> Errno {
        match self {
            IoError::Os { source, .. } => Errno::from_io(source),
            IoError::OutOfRange { op, .. } => {
                if op.is_write_like() {
                    Errno::ENOSPC
                } else {
                    Errno::EINVAL
                }
            }
            IoError::Unsupported { .. } => Errno::EOPNOTSUPP,
            IoError::ReadOnly { .. } => Errno::EROFS,
            IoError::Misaligned { .. } => Errno::EINVAL,
            IoError::Errno { errno, .. } => *errno,
        }
    }
}
