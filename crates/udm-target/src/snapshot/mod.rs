//! Snapshots, as the kernel's dm-snapshot: `snapshot-origin` (the origin's writes copy the old
//! data into every snapshot first), `snapshot` (a point-in-time view over origin + COW, with a
//! persistent `P`/`PO` or transient `N` exception store) and `snapshot-merge` (merges a snapshot
//! back into its origin while the origin is in use).
//!
//! The snapshots of one origin find each other through [`Origins`], a slot of the shared
//! [`crate::TargetEnv`] keyed by the origin's device number (the kernel's `_origins` hash).
//! The data path is synchronous: where the kernel queues a bio behind a pending exception, the
//! writing thread here copies the chunk itself, or waits on a per-chunk lock held by the thread
//! that does. The commit of an origin write's copies is the exception: see [`crate::writeback`].
//!
//! Modules, each importing only those listed before it: [`store`] (the exception stores),
//! [`exception`] (chunk locks, the store's commit slot), [`state`] (one snapshot's shared
//! state), [`cow`] (the copy engine of origin writes, and its jobs for the write-back), [`merge`] (the merge
//! worker), then the targets [`origin`] (`snapshot-origin`) and [`snap`] (`snapshot`,
//! `snapshot-merge`).

pub mod cow;
pub mod exception;
pub mod merge;
pub mod origin;
pub mod snap;
pub mod state;
pub mod store;

use std::collections::HashMap;
use std::sync::Arc;

use parking_lot::{Mutex, RwLock};
use udm_types::DevId;

use crate::writeback::WriteBack;

pub use state::Snap;

/// Every origin device that has snapshots or a `snapshot-origin` target, by device number.
#[derive(Default)]
pub struct Origins {
    map: Mutex<HashMap<DevId, Arc<OriginEntry>>>,
}

impl Origins {
    /// The entry of `origin`, created on first use.
    pub fn entry(&self, origin: DevId) -> Arc<OriginEntry> {
        self.map.lock().entry(origin).or_default().clone()
    }
}

/// The snapshots of one origin (the kernel's `struct origin`), largest chunk size first.
///
/// Origin writes hold the read side for their whole duration (check, copy, write), so taking the
/// write side (registration, activation, handover) waits for in-flight origin writes, as the
/// kernel's origin suspension does.
#[derive(Default)]
pub struct OriginEntry {
    /// Registered snapshots (active or not).
    pub snaps: RwLock<Vec<Arc<Snap>>>,
    /// Origin writes acknowledged before their copies were committed. Registration changes
    /// settle it under the write side of `snaps`, so a snapshot never becomes active (or
    /// changes hands) while the origin holds writes copied for the old set of snapshots.
    pub writeback: Arc<WriteBack<cow::Copies>>,
}

/// Smallest non-zero chunk size among `snaps` (the origin's split boundary), `None` if none.
pub fn min_chunk(snaps: &[Arc<Snap>]) -> Option<u64> {
    snaps
        .iter()
        .map(|s| s.state.read().chunk_size)
        .filter(|&c| c != 0)
        .min()
}
