//! The exports of a server: each one's device, options, request counters and connected
//! clients.

use super::ctl::ConnCtl;
use super::NbdExportOptions;
use parking_lot::Mutex;
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use udm_io::BlockDevice;

/// Request counters of one export, summed over all its connections (past and present).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct NbdStats {
    /// `NBD_CMD_READ` requests.
    pub reads: u64,
    /// `NBD_CMD_WRITE` requests.
    pub writes: u64,
    /// `NBD_CMD_FLUSH` requests.
    pub flushes: u64,
    /// `NBD_CMD_TRIM` requests.
    pub trims: u64,
    /// `NBD_CMD_WRITE_ZEROES` requests.
    pub write_zeroes: u64,
    /// `NBD_CMD_CACHE` requests.
    pub caches: u64,
    /// `NBD_CMD_BLOCK_STATUS` requests.
    pub block_status: u64,
    /// Requests with an unknown command type.
    pub unknown: u64,
    /// Requests answered with an error.
    pub errors: u64,
    /// Bytes returned by successful reads.
    pub bytes_read: u64,
    /// Bytes stored by successful writes.
    pub bytes_written: u64,
    /// Connections that entered transmission on this export.
    pub connections: u64,
}

/// What `exports()` reports for one export.
#[derive(Clone, Debug)]
pub struct NbdExportInfo {
    /// Export name.
    pub name: String,
    /// Whether writes are refused.
    pub read_only: bool,
    /// Description, if any.
    pub description: Option<String>,
    /// Size in bytes as advertised.
    pub size_bytes: u64,
    /// Connections currently in transmission on it.
    pub clients: usize,
    /// Counters.
    pub stats: NbdStats,
}

#[derive(Default)]
pub(crate) struct Counters {
    pub by_cmd: [AtomicU64; 8],
    pub unknown: AtomicU64,
    pub errors: AtomicU64,
    pub bytes_read: AtomicU64,
    pub bytes_written: AtomicU64,
    pub connections: AtomicU64,
}

impl Counters {
    pub(super) fn snapshot(&self) -> NbdStats {
        let g = |a: &AtomicU64| a.load(Ordering::Relaxed);
        NbdStats {
            reads: g(&self.by_cmd[0]),
            writes: g(&self.by_cmd[1]),
            flushes: g(&self.by_cmd[3]),
            trims: g(&self.by_cmd[4]),
            caches: g(&self.by_cmd[5]),
            write_zeroes: g(&self.by_cmd[6]),
            block_status: g(&self.by_cmd[7]),
            unknown: g(&self.unknown),
            errors: g(&self.errors),
            bytes_read: g(&self.bytes_read),
            bytes_written: g(&self.bytes_written),
            connections: g(&self.connections),
        }
    }
}

pub(crate) struct ExportConns {
    pub map: HashMap<u64, Arc<ConnCtl>>,
    pub removed: bool,
}

/// One export: the device and its options, counters and connected clients.
pub(crate) struct Export {
    pub name: String,
    pub dev: Arc<dyn BlockDevice>,
    pub opts: NbdExportOptions,
    pub counters: Counters,
    pub conns: Mutex<ExportConns>,
}

impl Export {
    pub fn read_only(&self) -> bool {
        self.opts.read_only || self.dev.read_only()
    }

    /// Registers a connection entering transmission; false if the export is being removed.
    pub fn attach(&self, ctl: &Arc<ConnCtl>) -> bool {
        let mut c = self.conns.lock();
        if c.removed {
            return false;
        }
        c.map.insert(ctl.id, ctl.clone());
        self.counters.connections.fetch_add(1, Ordering::Relaxed);
        true
    }

    pub fn detach(&self, id: u64) {
        self.conns.lock().map.remove(&id);
    }
}
