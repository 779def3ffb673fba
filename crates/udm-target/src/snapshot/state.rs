//! One snapshot's state, shared by its `snapshot` target, its origin's copy engine and the
//! merge worker: the exceptions, the store, the chunk locks and the merge thread's handle.

use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::thread::JoinHandle;

use parking_lot::{Mutex, RwLock};

use super::exception::{ChunkLocks, ChunkMap, StoreCell};
use super::OriginEntry;
use crate::args::SnapshotStatus;
use crate::target::{DevRef, EventSink};

/// Mutable state of a snapshot, swapped wholesale by a handover.
pub struct SnapState {
    /// False once invalidated (`Invalid`): all I/O fails.
    pub valid: bool,
    /// `PO` store full: writes fail, reads work (`Overflow`).
    pub overflowed: bool,
    /// Resumed at least once: origin writes copy into it.
    pub active: bool,
    /// A merge step failed (`Merge failed`).
    pub merge_failed: bool,
    /// Chunk size in sectors (0 for a handover destination before its resume).
    pub chunk_size: u64,
    /// Completed exceptions: origin chunk -> COW chunk.
    pub exceptions: ChunkMap<u64>,
    /// The exception store.
    pub store: Arc<StoreCell>,
}

/// One snapshot (or merging snapshot), shared between its target and its origin's registry.
pub struct Snap {
    /// `snapshot-merge`.
    pub merge: bool,
    /// The origin device.
    pub origin: DevRef,
    /// The COW device.
    pub cow: DevRef,
    /// First sector of the target (sectors are mapped device sectors, as in the kernel).
    pub begin: u64,
    /// End of the target: origin writes beyond it do not concern this snapshot.
    pub table_end: u64,
    /// `discard_zeroes_cow`.
    pub discard_zeroes_cow: bool,
    /// `discard_passdown_origin`.
    pub discard_passdown_origin: bool,
    /// `PO` from this target's own table line.
    pub overflow_flag: bool,
    /// Where invalidation and merge completion are announced.
    pub events: EventSink,
    /// State (see [`SnapState`]).
    pub state: RwLock<SnapState>,
    /// Chunks with a copy or a conflicting read in progress.
    pub locks: ChunkLocks,
    /// The target is suspended (handover source check).
    pub suspended: AtomicBool,
    /// The target is being destroyed: off the origin's list, its pending copies still
    /// completing. A transient (`N`) store's are then completed without copying: nobody can
    /// read the snapshot any more, and nothing of it outlives the table.
    pub dropping: AtomicBool,
    /// The origin's registry entry.
    pub entry: Arc<OriginEntry>,
    /// The merge worker (`snapshot-merge` only).
    pub merge_ctl: Mutex<MergeCtl>,
}

/// The merge worker thread and its stop flag (`snapshot-merge` only; see `merge.rs`).
#[derive(Default)]
pub struct MergeCtl {
    pub(super) stop: Arc<std::sync::atomic::AtomicBool>,
    pub(super) handle: Option<JoinHandle<()>>,
}

impl Snap {
    /// `__invalidate_snapshot`: marks the store invalid on disk, fails all further I/O and
    /// raises an event.
    pub fn invalidate(&self, st: &mut SnapState, why: &str) {
        if !st.valid {
            return;
        }
        tracing::error!("Invalidating snapshot: {why}");
        st.store.with(|s| s.drop_snapshot());
        st.valid = false;
        self.events.raise();
    }

    /// `pending_complete`: installs a committed exception, or invalidates on failure.
    pub fn finish(&self, chunk: u64, new_chunk: u64, valid: bool) -> bool {
        self.install(&mut self.state.write(), chunk, new_chunk, valid)
    }

    /// [`Snap::finish`] for several exceptions `(chunk, new_chunk, valid)` under one lock.
    pub fn finish_many(&self, done: &[(u64, u64, bool)]) {
        let mut st = self.state.write();
        for &(chunk, new_chunk, valid) in done {
            self.install(&mut st, chunk, new_chunk, valid);
        }
    }

    fn install(&self, st: &mut SnapState, chunk: u64, new_chunk: u64, valid: bool) -> bool {
        if !valid {
            self.invalidate(st, "Error reading/writing.");
            return false;
        }
        if !st.valid {
            return false;
        }
        st.exceptions.insert(chunk, new_chunk);
        true
    }

    /// COW sector of `sector` in exception chunk `new_chunk` (saturating: a corrupt store with
    /// an absurd chunk number gets an out-of-range error from the device, not a panic).
    pub(super) fn remap(new_chunk: u64, cs: u64, sector: u64) -> u64 {
        new_chunk
            .saturating_mul(cs)
            .saturating_add(sector & (cs - 1))
    }

    /// The `dmsetup status` of the snapshot.
    pub fn status(&self) -> SnapshotStatus {
        let st = self.state.read();
        if !st.valid {
            SnapshotStatus::Invalid
        } else if st.merge_failed {
            SnapshotStatus::MergeFailed
        } else if st.overflowed {
            SnapshotStatus::Overflow
        } else {
            let (allocated, total, metadata) = st.store.with(|s| s.usage());
            SnapshotStatus::Usage {
                allocated,
                total,
                metadata,
            }
        }
    }
}
