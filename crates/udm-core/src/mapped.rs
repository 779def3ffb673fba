//! The data-path half of a mapped device: the live table, the suspend gate, event numbers and the
//! counters. Control state (name, uuid, the inactive slot, claims) lives in the registry.

use crate::gate::{Flow, IoGate};
use arc_swap::ArcSwapOption;
use parking_lot::{Condvar, Mutex};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;
use udm_io::device::{check_range, check_writable};
use udm_io::{Bio, BioKind, BlockDevice, Extent, IoError, Limits};
use udm_target::table::Table;
use udm_types::{DevId, Errno};

/// A table that is live on a mapped device, with the flags it was loaded with.
pub struct LiveTable {
    /// The constructed table.
    pub table: Table,
    /// Loaded with `-r`.
    pub read_only: bool,
}

/// The event counter that `udmsetup wait` sleeps on.
#[derive(Default)]
pub struct Events {
    nr: Mutex<u32>,
    cv: Condvar,
}

impl Events {
    /// Raises one event (`dm_table_event`).
    pub fn raise(&self) {
        let mut nr = self.nr.lock();
        *nr = nr.wrapping_add(1);
        self.cv.notify_all();
    }

    /// Current event number.
    pub fn current(&self) -> u32 {
        *self.nr.lock()
    }

    /// Waits until the event number differs from `seen` or `timeout` passes; returns the current
    /// number.
    pub fn wait(&self, seen: u32, timeout: Duration) -> u32 {
        let mut nr = self.nr.lock();
        if *nr == seen {
            self.cv.wait_for(&mut nr, timeout);
        }
        *nr
    }
}

/// A mapped device as the data path sees it.
pub struct MappedDevice {
    id: DevId,
    gate: IoGate,
    live: ArcSwapOption<LiveTable>,
    suspended: AtomicBool,
    events: Arc<Events>,
    redirected: AtomicU64,
    name: parking_lot::RwLock<String>,
}

impl MappedDevice {
    /// A mapped device with no table.
    pub fn new(id: DevId, name: &str) -> Self {
        MappedDevice {
            id,
            gate: IoGate::new(),
            live: ArcSwapOption::empty(),
            suspended: AtomicBool::new(false),
            events: Arc::new(Events::default()),
            redirected: AtomicU64::new(0),
            name: parking_lot::RwLock::new(name.to_string()),
        }
    }

    /// Device number.
    pub fn id(&self) -> DevId {
        self.id
    }

    /// Event counter.
    pub fn events(&self) -> &Arc<Events> {
        &self.events
    }

    /// The live table, if any.
    pub fn live(&self) -> Option<Arc<LiveTable>> {
        self.live.load_full()
    }

    /// Swaps the live table. Callers suspend the device first.
    pub(crate) fn set_live(&self, t: Option<Arc<LiveTable>>) -> Option<Arc<LiveTable>> {
        self.live.swap(t)
    }

    pub(crate) fn set_name(&self, name: &str) {
        *self.name.write() = name.to_string();
    }

    /// True while suspended.
    pub fn is_suspended(&self) -> bool {
        self.suspended.load(Ordering::SeqCst)
    }

    /// Requests redirected into this device by its interposers.
    pub fn redirected(&self) -> u64 {
        self.redirected.load(Ordering::Relaxed)
    }

    /// Holds new I/O and waits for in-flight I/O (after the targets' presuspend hooks), then
    /// runs postsuspend. A no-op on a suspended device.
    pub(crate) fn suspend(&self) {
        if self.suspended.swap(true, Ordering::SeqCst) {
            return;
        }
        let live = self.live();
        if let Some(l) = &live {
            l.table.presuspend();
        }
        self.gate.close();
        self.gate.drain(&[Flow::Direct, Flow::Redirected]);
        if let Some(l) = &live {
            l.table.postsuspend();
        }
    }

    /// Releases held I/O.
    pub(crate) fn unsuspend(&self) {
        self.suspended.store(false, Ordering::SeqCst);
        self.gate.open();
    }

    /// Entry for requests an interposer redirected here.
    pub fn submit_redirected(&self, bio: Bio<'_>) -> Result<(), IoError> {
        self.redirected.fetch_add(1, Ordering::Relaxed);
        self.submit_flow(bio, Flow::Redirected)
    }

    fn submit_flow(&self, bio: Bio<'_>, flow: Flow) -> Result<(), IoError> {
        let _g = self.gate.enter(flow);
        let Some(live) = self.live.load_full() else {
            return Err(IoError::errno(
                bio.kind(),
                bio.sector,
                Errno::EIO,
                format!("{} has no live table", self.name.read()),
            ));
        };
        check_range(&bio, live.table.size())?;
        check_writable(&bio, live.read_only, &|| self.name.read().clone())?;
        if bio.kind() == BioKind::Read && bio.sectors() == 0 {
            return Ok(());
        }
        live.table.submit(bio)
    }
}

impl BlockDevice for MappedDevice {
    fn size(&self) -> u64 {
        self.live.load().as_ref().map_or(0, |l| l.table.size())
    }

    fn limits(&self) -> Limits {
        self.live
            .load()
            .as_ref()
            .map_or_else(Limits::default, |l| l.table.limits())
    }

    fn read_only(&self) -> bool {
        self.live.load().as_ref().is_some_and(|l| l.read_only)
    }

    fn submit(&self, bio: Bio<'_>) -> Result<(), IoError> {
        self.submit_flow(bio, Flow::Direct)
    }

    fn block_status(&self, sector: u64, sectors: u64) -> Result<Vec<Extent>, IoError> {
        let _g = self.gate.enter(Flow::Direct);
        match self.live.load_full() {
            // Like the backends, a range running past the end is cut at the end.
            Some(l) => {
                let size = l.table.size();
                let sectors = if sector < size {
                    sectors.min(size - sector)
                } else {
                    sectors
                };
                l.table.block_status(sector, sectors)
            }
            None => Err(IoError::errno(
                BioKind::Read,
                sector,
                Errno::EIO,
                "no live table",
            )),
        }
    }

    fn describe(&self) -> String {
        format!("{} ({})", self.name.read(), self.id)
    }
}
