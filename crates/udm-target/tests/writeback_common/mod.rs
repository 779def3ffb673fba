//! Jobs for driving the write-back (udm-target/src/writeback.rs) directly: a batch's commit
//! waits at a gate the test opens, so held writes stay held for as long as the test needs.
#![allow(dead_code)] // each test binary uses part of it

use std::sync::{Arc, Condvar, Mutex};

use udm_io::backend::mem::MemDevice;
use udm_io::{BlockDevice, IoError, KeptBuf};
use udm_target::writeback::{Jobs, WriteBack};

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

/// The write-back, the memory device below it (as itself and as a block device), the gate.
pub type Rig = (
    Arc<WriteBack<Held>>,
    Arc<MemDevice>,
    Arc<dyn BlockDevice>,
    Arc<Gate>,
);

/// A write-back over a 1 MiB memory device, and a closed gate.
pub fn setup() -> Rig {
    let mem = Arc::new(MemDevice::new(2048));
    let dev: Arc<dyn BlockDevice> = mem.clone();
    (
        Arc::new(WriteBack::default()),
        mem,
        dev,
        Arc::new(Gate::default()),
    )
}

/// Holds a copy of `data` at `sector`; its commit waits until `gate` opens.
pub fn hold_gated(
    wb: &Arc<WriteBack<Held>>,
    dev: &Arc<dyn BlockDevice>,
    sector: u64,
    data: &[u8],
    gate: &Arc<Gate>,
) -> Result<(), IoError> {
    let g = gate.clone();
    wb.hold(dev, sector, KeptBuf::copy(data), move || Held(Some(g)))
}

/// The first byte of `sector` on the device.
pub fn first_byte(mem: &MemDevice, sector: u64) -> u8 {
    mem.contents()[(sector * 512) as usize]
}
