//! Exception stores: where a snapshot keeps its `old chunk -> COW chunk` table.
//!
//! Two kinds, as in the kernel: [`persistent::Persistent`] (`P`/`PO`, the on-disk format of
//! `dm-snap-persistent.c`, byte for byte) and [`transient::Transient`] (`N`, memory only).

mod check;
pub mod persistent;
pub mod transient;

use std::sync::Arc;

use udm_io::{Bio, BioFlags, BlockDevice, IoError};
use udm_types::{Errno, SECTOR_SIZE};

pub use udm_table::params::StoreKind;

use crate::target::TargetError;

/// The kernel's `DM_CHUNK_SIZE_DEFAULT_SECTORS`: chunk size of a new persistent store whose
/// table says 0.
pub const DEFAULT_CHUNK_SECTORS: u64 = 32;

/// Outcome of reading a store's metadata at construction.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LoadState {
    /// The snapshot is usable.
    Valid,
    /// The header says the snapshot was invalidated (`valid = 0`).
    Invalid,
}

/// The operations dm-snapshot asks of an exception store (`struct dm_exception_store_type`).
pub trait ExceptionStore: Send {
    /// Chunk size in sectors (0 = not known yet: a handover destination before its resume).
    fn chunk_size(&self) -> u64;
    /// Whether `PO` was given: a full snapshot overflows instead of being invalidated.
    fn overflow_supported(&self) -> bool;
    /// Sets the `PO` flag (a handover keeps the destination table's flag).
    fn set_overflow_supported(&mut self, on: bool);
    /// Reads the metadata, reporting every committed exception as `(old, new)`.
    fn read_metadata(&mut self, add: &mut dyn FnMut(u64, u64)) -> Result<LoadState, TargetError>;
    /// Allocates a COW chunk for a new exception; `None` when the COW device is full.
    fn prepare(&mut self) -> Option<u64>;
    /// Records a finished copy (`valid` = the copy succeeded) in the in-memory metadata only.
    /// Returns true when the metadata should now be written (the kernel's rule: no other
    /// exception is pending, or the current area became full).
    fn record(&mut self, old: u64, new: u64, valid: bool) -> bool;
    /// Takes the metadata write that makes everything recorded so far durable, in on-disk
    /// order (full areas first, each after zeroing its successor). It is run without the
    /// store's lock ([`MetaWrite::run`]), one at a time, then handed to
    /// [`ExceptionStore::finish_write`].
    fn take_write(&mut self) -> MetaWrite;
    /// Ends a write taken by [`ExceptionStore::take_write`]: an error invalidates the store.
    /// Returns the validity every exception covered by the write completes with.
    fn finish_write(&mut self, w: MetaWrite, r: Result<(), IoError>) -> bool;
    /// Records a finished copy and, when the kernel would, writes the metadata in place.
    /// Returns `Some(valid)` when the metadata was written (or abandoned) and every commit
    /// recorded since the last write may complete with that validity, `None` while the
    /// commit is only queued.
    fn commit(&mut self, old: u64, new: u64, valid: bool) -> Option<bool> {
        if !self.record(old, new, valid) {
            return None;
        }
        let w = self.take_write();
        let r = w.run();
        Some(self.finish_write(w, r))
    }
    /// Marks the store invalid on disk (`drop_snapshot`).
    fn drop_snapshot(&mut self);
    /// `(sectors_allocated, total_sectors, metadata_sectors)`.
    fn usage(&self) -> (u64, u64, u64);
    /// The store type, for the table line.
    fn kind(&self) -> StoreKind;
    /// True when the store can merge (only the persistent one).
    fn supports_merge(&self) -> bool {
        false
    }
    /// The last run of consecutive exceptions `(last_old, last_new, count)`, `None` when the
    /// merge is finished.
    fn prepare_merge(&mut self) -> Result<Option<(u64, u64, u64)>, IoError> {
        Ok(None)
    }
    /// Forgets the last `n` exceptions returned by [`ExceptionStore::prepare_merge`] on disk.
    fn commit_merge(&mut self, n: u64) -> Result<(), IoError> {
        let _ = n;
        Ok(())
    }
}

/// Metadata I/O taken from a store under its lock and performed outside it, so copies and
/// commits of other exceptions proceed while the COW device flushes (group commit).
pub struct MetaWrite {
    dev: Option<Arc<dyn BlockDevice>>,
    steps: Vec<MetaStep>,
    valid: bool,
}

/// One write of a [`MetaWrite`]: a whole chunk at `sector`.
pub struct MetaStep {
    /// First sector on the COW device.
    pub sector: u64,
    /// Chunk contents.
    pub buf: Vec<u8>,
    /// `PREFLUSH | FUA` for the area that makes the others reachable, none otherwise.
    pub flags: BioFlags,
}

impl MetaWrite {
    /// A write with nothing to do (transient store, invalid store); `valid` is what the
    /// exceptions it covers complete with.
    pub fn none(valid: bool) -> Self {
        MetaWrite {
            dev: None,
            steps: Vec::new(),
            valid,
        }
    }

    /// `steps` on `dev`, in order, by a valid store.
    pub fn new(dev: Arc<dyn BlockDevice>, steps: Vec<MetaStep>) -> Self {
        MetaWrite {
            dev: Some(dev),
            steps,
            valid: true,
        }
    }

    /// Whether the store was valid when the write was taken.
    pub fn valid(&self) -> bool {
        self.valid
    }

    /// Number of chunk writes it performs.
    pub fn len(&self) -> usize {
        self.steps.len()
    }

    /// True when there is nothing to write.
    pub fn is_empty(&self) -> bool {
        self.steps.is_empty()
    }

    /// Gives the buffers back (for reuse).
    pub fn into_steps(self) -> Vec<MetaStep> {
        self.steps
    }

    /// Performs the writes in order, stopping at the first error.
    pub fn run(&self) -> Result<(), IoError> {
        let Some(dev) = &self.dev else {
            return Ok(());
        };
        for s in &self.steps {
            dev.submit(Bio::write(s.sector, &s.buf).with_flags(s.flags))?;
        }
        Ok(())
    }
}

/// The store of a `snapshot` line: its type and its table chunk size, checked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StoreSpec {
    /// `N`, `P` or `PO`.
    pub kind: StoreKind,
    /// Chunk size from the table (0 = from the header / default).
    pub chunk_size: u64,
}

impl StoreSpec {
    /// `set_chunk_size`: a non-zero table chunk size checked against both devices' block
    /// sizes.
    pub fn new(
        kind: StoreKind,
        chunk_size: u64,
        cow_lbs: u64,
        origin_lbs: u64,
    ) -> Result<StoreSpec, TargetError> {
        if chunk_size != 0 {
            check_chunk_size(chunk_size, cow_lbs, origin_lbs).map_err(|m| {
                TargetError::invalid(format!("Couldn't create exception store: {m}"))
            })?;
        }
        Ok(StoreSpec { kind, chunk_size })
    }
}

/// `dm_exception_store_set_chunk_size`: power of 2, a multiple of both logical block sizes
/// (in sectors), at most `INT_MAX >> 9`.
pub fn check_chunk_size(chunk: u64, cow_lbs: u64, origin_lbs: u64) -> Result<(), &'static str> {
    if !chunk.is_power_of_two() {
        return Err("Chunk size is not a power of 2");
    }
    if chunk % cow_lbs.max(1) != 0 || chunk % origin_lbs.max(1) != 0 {
        return Err("Chunk size is not a multiple of device blocksize");
    }
    if chunk > (i32::MAX as u64) >> 9 {
        return Err("Chunk size is too high");
    }
    Ok(())
}

/// Logical block size of a device in sectors.
pub fn lbs_sectors(dev: &dyn BlockDevice) -> u64 {
    u64::from(dev.limits().logical_block_size / 512).max(1)
}

/// Builds the store named by `spec` over `cow`.
pub fn create(spec: StoreSpec, cow: Arc<dyn BlockDevice>) -> Box<dyn ExceptionStore> {
    if spec.kind.persistent() {
        Box::new(persistent::Persistent::new(
            cow,
            spec.chunk_size,
            spec.kind.overflow(),
        ))
    } else {
        Box::new(transient::Transient::new(cow, spec.chunk_size))
    }
}

/// One whole-chunk I/O on the COW device (`chunk_io`).
pub(crate) fn chunk_io(
    dev: &dyn BlockDevice,
    chunk: u64,
    chunk_size: u64,
    buf: &mut [u8],
    write: bool,
    flags: BioFlags,
) -> Result<(), IoError> {
    let sector = chunk.checked_mul(chunk_size).ok_or_else(|| {
        IoError::errno(
            if write {
                udm_io::BioKind::Write
            } else {
                udm_io::BioKind::Read
            },
            u64::MAX,
            Errno::EINVAL,
            "chunk number overflows",
        )
    })?;
    debug_assert_eq!(buf.len() as u64, chunk_size * SECTOR_SIZE);
    if write {
        dev.submit(Bio::write(sector, buf).with_flags(flags))
    } else {
        dev.submit(Bio::read(sector, buf).with_flags(flags))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use udm_io::backend::mem::MemDevice;
    use udm_io::Limits;

    #[test]
    fn chunk_size_rules_are_the_kernels() {
        assert_eq!(check_chunk_size(8, 1, 1), Ok(()));
        assert_eq!(
            check_chunk_size(12, 1, 1),
            Err("Chunk size is not a power of 2")
        );
        let blocksize = Err("Chunk size is not a multiple of device blocksize");
        assert_eq!(
            check_chunk_size(4, 8, 1),
            blocksize,
            "below the COW's block"
        );
        assert_eq!(
            check_chunk_size(4, 1, 8),
            blocksize,
            "below the origin's block"
        );
        assert_eq!(check_chunk_size(8, 8, 8), Ok(()));
        // INT_MAX >> 9 = 4194303 sectors: 2^21 is allowed, 2^22 not.
        assert_eq!(check_chunk_size(1 << 21, 1, 1), Ok(()));
        assert_eq!(
            check_chunk_size(1 << 22, 1, 1),
            Err("Chunk size is too high")
        );
    }

    #[test]
    fn logical_block_sizes_in_sectors() {
        let with = |lbs| {
            MemDevice::with_limits(
                64,
                Limits {
                    logical_block_size: lbs,
                    ..Limits::default()
                },
            )
        };
        assert_eq!(lbs_sectors(&with(4096)), 8);
        assert_eq!(lbs_sectors(&with(512)), 1);
        assert_eq!(
            lbs_sectors(&with(0)),
            1,
            "an unknown size counts as one sector"
        );
    }
}
