//! Shared vocabulary of udm: sectors, device identities (`major:minor`), validated names and the
//! single errno table that every error in the project maps onto (control protocol, NBD wire
//! codes, FUSE replies, ublk completions).

pub mod bitmap;
pub mod errno;
pub mod name;
pub mod units;

pub use bitmap::{BitmapError, DirtyBitmap};
pub use errno::Errno;
pub use name::{DevName, NameError};
pub use units::{DevId, SECTOR_SHIFT, SECTOR_SIZE};
