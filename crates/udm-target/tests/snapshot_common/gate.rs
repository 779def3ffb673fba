//! A COW device whose metadata writes (PREFLUSH: the exception-area commits) wait while its
//! gate is closed, counting data and area writes, so tests can hold the commit of copied
//! chunks (and with it the write-back of held origin writes) at a point of their choosing.

use parking_lot::{Condvar, Mutex};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};
use udm_io::backend::mem::MemDevice;
use udm_io::{Bio, BioFlags, BioOp, BlockDevice, IoError};

/// See the module doc.
pub struct GateDev {
    pub inner: MemDevice,
    closed: Mutex<bool>,
    cv: Condvar,
    /// Writes without PREFLUSH (chunk data).
    pub data_writes: AtomicU64,
    /// Writes with PREFLUSH (exception-area commits).
    pub area_writes: AtomicU64,
    /// Area writes that found the gate closed.
    pub blocked: AtomicU64,
}

impl GateDev {
    pub fn new(sectors: u64) -> Self {
        GateDev {
            inner: MemDevice::new(sectors),
            closed: Mutex::new(false),
            cv: Condvar::new(),
            data_writes: AtomicU64::new(0),
            area_writes: AtomicU64::new(0),
            blocked: AtomicU64::new(0),
        }
    }

    pub fn set_closed(&self, c: bool) {
        *self.closed.lock() = c;
        self.cv.notify_all();
    }
}

impl BlockDevice for GateDev {
    fn size(&self) -> u64 {
        self.inner.size()
    }

    fn submit(&self, bio: Bio<'_>) -> Result<(), IoError> {
        if matches!(bio.op, BioOp::Write(_)) {
            if bio.flags.contains(BioFlags::PREFLUSH) {
                self.area_writes.fetch_add(1, Ordering::SeqCst);
                let mut closed = self.closed.lock();
                if *closed {
                    self.blocked.fetch_add(1, Ordering::SeqCst);
                }
                while *closed {
                    self.cv.wait(&mut closed);
                }
            } else {
                self.data_writes.fetch_add(1, Ordering::SeqCst);
            }
        }
        self.inner.submit(bio)
    }
}

/// Polls `f` every 2 ms and fails the test after 20 s.
pub fn wait_for(what: &str, f: impl Fn() -> bool) {
    let t = Instant::now();
    while !f() {
        assert!(
            t.elapsed() < Duration::from_secs(20),
            "timed out waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(2));
    }
}
