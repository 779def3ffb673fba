//! Block I/O core of udm.
//!
//! A request ([`Bio`]) is a sector range plus an operation; a device ([`BlockDevice`]) executes
//! requests synchronously and may be called from many threads at once. Mapped devices implement the
//! same trait, which is what lets devices stack. Backends live one per module under
//! [`backend`]; partition tables are read by [`partition`]; [`zeroes`] emulates write-zeroes
//! with plain writes for every issuer above a device without it.

pub mod backend;
pub mod bio;
pub mod device;
pub mod error;
pub mod lent;
pub mod partition;
pub mod slice;
pub mod thread;
pub mod zeroes;

pub use bio::{Bio, BioFlags, BioKind, BioOp};
pub use device::{BlockDevice, Extent, ExtentKind, Limits};
pub use error::IoError;
pub use lent::{release, take_spare, KeptBuf, LentBuf};
pub use zeroes::write_zeroes_fallback;
