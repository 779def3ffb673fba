//! The device trait shared by disks, memory devices, partitions and mapped devices.

use crate::bio::{Bio, BioKind};
use crate::error::IoError;

/// Queue limits of a device, stacked by mapped devices the way the kernel stacks
/// `queue_limits`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    /// Smallest addressable unit in bytes (512 or 4096).
    pub logical_block_size: u32,
    /// Preferred I/O unit in bytes.
    pub physical_block_size: u32,
    /// Largest request the device takes in one piece, in sectors (0 = unlimited).
    pub max_io_sectors: u64,
    /// Discard is supported.
    pub discard: bool,
    /// Write-zeroes is supported natively (otherwise callers write zero buffers).
    pub write_zeroes: bool,
    /// The device has a volatile cache, so flushes matter.
    pub volatile_cache: bool,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            logical_block_size: 512,
            physical_block_size: 4096,
            max_io_sectors: 0,
            discard: true,
            write_zeroes: true,
            volatile_cache: true,
        }
    }
}

/// Allocation state of an extent, as reported for NBD `base:allocation`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ExtentKind {
    /// Allocated data.
    Data,
    /// Unallocated, but reads may return anything (a hole that does not read as zeroes).
    Hole,
    /// Reads as zeroes but is allocated.
    Zero,
    /// Unallocated and reads as zeroes (a sparse-file hole, the zero target).
    HoleZero,
}

/// A run of sectors with one allocation state.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Extent {
    /// Length in sectors.
    pub sectors: u64,
    /// Its state.
    pub kind: ExtentKind,
}

/// A block device: executes requests synchronously; safe to call from many threads at once.
///
/// Mapped devices implement this trait too, so devices stack: a target's underlying device is
/// just another `BlockDevice`.
pub trait BlockDevice: Send + Sync {
    /// Size in sectors.
    fn size(&self) -> u64;

    /// Queue limits.
    fn limits(&self) -> Limits {
        Limits::default()
    }

    /// True when writes are refused.
    fn read_only(&self) -> bool {
        false
    }

    /// Executes one request and returns when it is complete (durable if FUA was set).
    fn submit(&self, bio: Bio<'_>) -> Result<(), IoError>;

    /// Allocation state of `[sector, sector + sectors)`. The extents returned cover at least one
    /// sector and at most the range; the default reports everything as data.
    fn block_status(&self, sector: u64, sectors: u64) -> Result<Vec<Extent>, IoError> {
        let _ = sector;
        Ok(vec![Extent {
            sectors,
            kind: ExtentKind::Data,
        }])
    }

    /// A short description for logs and errors (backing path, mapped-device name...).
    fn describe(&self) -> String {
        String::from("block device")
    }
}

/// Checks a request against a device size: returns `OutOfRange` when it runs past the end.
pub fn check_range(bio: &Bio<'_>, size: u64) -> Result<(), IoError> {
    if bio.is_empty_flush() {
        return Ok(());
    }
    if bio.sector > size || bio.sectors() > size - bio.sector {
        return Err(IoError::OutOfRange {
            op: bio.kind(),
            sector: bio.sector,
            sectors: bio.sectors(),
            size,
        });
    }
    Ok(())
}

/// Refuses writes to a read-only device.
pub fn check_writable(
    bio: &Bio<'_>,
    read_only: bool,
    device: &dyn Fn() -> String,
) -> Result<(), IoError> {
    if read_only && bio.kind() != BioKind::Read && bio.kind() != BioKind::Flush {
        return Err(IoError::ReadOnly {
            op: bio.kind(),
            device: device(),
        });
    }
    Ok(())
}

impl<T: BlockDevice + ?Sized> BlockDevice for std::sync::Arc<T> {
    fn size(&self) -> u64 {
        (**self).size()
    }
    fn limits(&self) -> Limits {
        (**self).limits()
    }
    fn read_only(&self) -> bool {
        (**self).read_only()
    }
    fn submit(&self, bio: Bio<'_>) -> Result<(), IoError> {
        (**self).submit(bio)
    }
    fn block_status(&self, sector: u64, sectors: u64) -> Result<Vec<Extent>, IoError> {
        (**self).block_status(sector, sectors)
    }
    fn describe(&self) -> String {
        (**self).describe()
    }
}
