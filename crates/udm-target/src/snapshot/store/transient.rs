//! The transient exception store (`N`): exceptions live in memory only, the COW device is plain
//! data space allocated from sector 0, nothing survives a reload (`dm-snap-transient.c`).

use std::sync::Arc;

use udm_io::{BlockDevice, IoError};

use super::{ExceptionStore, LoadState, MetaWrite, StoreKind};
use crate::target::TargetError;

/// Next free sector and chunk size; that is all a transient store knows (plus whether the
/// current commit batch holds a failed copy).
pub struct Transient {
    cow: Arc<dyn BlockDevice>,
    chunk_size: u64,
    next_free: u64,
    /// False once a copy recorded since the last [`ExceptionStore::finish_write`] failed.
    valid: bool,
}

impl Transient {
    /// A store with nothing allocated.
    pub fn new(cow: Arc<dyn BlockDevice>, chunk_size: u64) -> Self {
        Transient {
            cow,
            chunk_size,
            next_free: 0,
            valid: true,
        }
    }
}

impl ExceptionStore for Transient {
    fn chunk_size(&self) -> u64 {
        self.chunk_size
    }

    fn overflow_supported(&self) -> bool {
        false
    }

    fn set_overflow_supported(&mut self, _on: bool) {}

    fn read_metadata(&mut self, _add: &mut dyn FnMut(u64, u64)) -> Result<LoadState, TargetError> {
        Ok(LoadState::Valid)
    }

    fn prepare(&mut self) -> Option<u64> {
        let size = self.cow.size();
        if self.chunk_size == 0 || size < self.next_free.checked_add(self.chunk_size)? {
            return None;
        }
        let new = self.next_free / self.chunk_size;
        self.next_free += self.chunk_size;
        Some(new)
    }

    fn record(&mut self, _old: u64, _new: u64, valid: bool) -> bool {
        if !valid {
            self.valid = false;
        }
        true
    }

    fn take_write(&mut self) -> MetaWrite {
        MetaWrite::none(std::mem::replace(&mut self.valid, true))
    }

    fn finish_write(&mut self, w: MetaWrite, r: Result<(), IoError>) -> bool {
        w.valid() && r.is_ok()
    }

    fn drop_snapshot(&mut self) {}

    fn usage(&self) -> (u64, u64, u64) {
        (self.next_free, self.cow.size(), 0)
    }

    fn kind(&self) -> StoreKind {
        StoreKind::Transient
    }
}
