//! Jobs for driving the write-back (udm-target/src/writeback.rs) directly: a batch's commit
//! waits at a gate the test opens, so held writes stay held for as long as the test needs.

use std::sync::{Arc, Condvar, Mutex};

use udm_io::BlockDevice;
use udm_target::writeback::Jobs;

/// Opens when the test says so; commits wait for it.
#[derive(Default)]
pub struct Gate {
    open: Mutex<bool>,
    cv: Condvar,
}

impl Gate {
    pub fn open(&self) {
        *self.open.lock().unwrap_or_else(|e| e.into_inner()) = true;
        self.cv.notify_all();
    }
    fn wait(&self) {
        let mut o = self.open.lock().unwrap_or_else(|e| e.into_inner());
        while !*o {
            o = self.cv.wait(o).unwrap_or_else(|e| e.into_inner());
        }
    }
}

/// A held write's work: nothing to prepare, a commit that waits for the gate (if any).
#[derive(Default)]
pub struct Held(pub Option<Arc<Gate>>);

impl Jobs for Held {
    fn append(&mut self, other: Self) {
        if self.0.is_none() {
            self.0 = other.0;
        }
    }
    fn prepare(&mut self, _dev: &dyn BlockDevice) {}
    fn commit(self) -> Result<(), String> {
        if let Some(g) = self.0 {
            g.wait();
        }
        Ok(())
    }
}
