//! The registry of every device: disks, partitions and mapped devices, their names and device
//! numbers, who holds them (claims), and the control operations of `udmsetup`.
//!
//! Control operations are serialised by one lock; the data path never takes it. Nothing waits
//! for I/O under it: suspends and table switches drain without it (see `switch`), marking the
//! devices they work on so that conflicting operations are refused with EBUSY meanwhile.
//!
//! This file holds the state (entries, names, slots) and the public option types; each concern
//! is a module: `lookup` (names, numbers, paths), `claims` (holders, exports' holds),
//! `interpose` (the interposer rules, pure), `build` (table construction and `load`),
//! `lifecycle` (create, clear, rename), `switch` (the planned-then-unlocked switch, suspend,
//! resume, remove), `disks` and `implicit` (disks, path-opened disks), `report` (what
//! `info`/`ls` show) and `query` (info, table, status, deps, messages), `persist` (config and
//! restore) and `unavailable` (devices kept while their file is missing).

use crate::config::TableConfig;
use crate::error::{CoreError, Result};
use crate::mapped::{Events, LiveTable, MappedDevice};
use crate::node::{DeviceNode, Hook, NodeAccess, NodeKind};
use parking_lot::Mutex;
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;
use udm_io::backend::open::{open_backend, Engine, OpenOptions};
use udm_io::BlockDevice;
use udm_target::catalog::TargetCatalog;
/// Lines of `table` and `status` (one line type for parser, daemon, protocol and CLI).
pub use udm_target::table::TableLine;
use udm_target::table::{Table, TableContext, TableSpec};
use udm_target::{DevRef, EventSink, TargetEnv, TargetError};
use udm_types::errno::HasErrno;
use udm_types::{DevId, DevName, Errno};

mod build;
mod claims;
mod disks;
mod implicit;
mod interpose;
mod lifecycle;
mod lookup;
mod persist;
mod query;
mod report;
mod switch;
mod unavailable;

use build::BuildCtx;
use claims::holder_text;
use interpose::HookSpec;
use lookup::{check_uuid, nodev};
pub use report::{
    DeviceKindRecord, DeviceRecord, DiskRecord, InfoRecord, InterposerRecord, PartitionRecord,
};
use unavailable::Pending;

/// Major number of disks (16 minors each: the disk and 15 partitions), as sd uses.
pub const DISK_MAJOR: u32 = 8;
/// Major number of partitions beyond the 15th (Linux's blkext).
pub const EXT_MAJOR: u32 = 259;
/// Major number of mapped devices (device-mapper's usual major).
pub const DM_MAJOR: u32 = 253;

/// How to open a disk.
#[derive(Clone, Debug, Default)]
pub struct DiskOptions {
    /// Refuse writes.
    pub read_only: bool,
    /// O_DIRECT.
    pub direct: bool,
    /// Create (or extend) the file to this many bytes first.
    pub create: Option<u64>,
}

/// How a disk is served, as recorded.
#[derive(Clone, Copy, Debug, Default)]
struct DiskFlags {
    read_only: bool,
    direct: bool,
    /// Opened on demand for a table naming its path.
    implicit: bool,
}

/// Flags a table is loaded with.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LoadFlags {
    /// `-r`: the table is read-only.
    pub read_only: bool,
    /// `--interpose` (DM_INTERPOSED_FLAG): shared opens and interposers attached at resume.
    pub interpose: bool,
}

/// Flags of suspend.
#[derive(Clone, Copy, Debug, Default)]
pub struct SuspendFlags {
    /// `--noflush`.
    pub noflush: bool,
    /// `--nolockfs`.
    pub nolockfs: bool,
}

/// Options of resume (and of create, which resumes).
#[derive(Clone, Debug, Default)]
pub struct ResumeOptions {
    /// Freeze the filesystem at this mount point around an interposer switch.
    pub freeze: Option<PathBuf>,
}

/// Who holds a device.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Holder {
    /// A (non-interposed) table of a mapped device: the device-mapper holder class.
    Table(DevId),
    /// An export (like a mount): the id names it, e.g. `nbd:vol0`.
    Export(String),
}

#[derive(Clone)]
struct DevUse {
    dev: DevId,
    access: Arc<NodeAccess>,
}

#[derive(Clone)]
struct TableSlot {
    config: TableConfig,
    live: Arc<LiveTable>,
    uses: Vec<DevUse>,
    hooks: Vec<HookSpec>,
    interposed: bool,
}

#[derive(Clone)]
struct MdState {
    md: Arc<MappedDevice>,
    uuid: Option<String>,
    live: Option<TableSlot>,
    inactive: Option<TableSlot>,
    deferred_remove: bool,
    /// Recorded tables not rebuilt yet (a device they name is unavailable).
    pending: Option<Pending>,
    /// A table has been loaded at least once (the kernel's gendisk exists).
    loaded_once: bool,
}

impl MdState {
    /// The kernel's "no block device yet": no table was ever loaded (and none is recorded).
    fn no_block_device(&self) -> bool {
        !self.loaded_once
            && self.live.is_none()
            && self.inactive.is_none()
            && self.pending.is_none()
    }
}

#[derive(Clone)]
enum EntryKind {
    Disk {
        path: Option<PathBuf>,
        read_only: bool,
        direct: bool,
        partitions: Vec<DevId>,
        /// Opened on demand for a table naming its path.
        implicit: bool,
        /// Why the backing file could not be opened (the node is a placeholder meanwhile).
        unavailable: Option<String>,
    },
    Partition {
        parent: DevId,
    },
    Mapped(Box<MdState>),
}

#[derive(Clone)]
struct Entry {
    node: Arc<DeviceNode>,
    holders: Vec<Holder>,
    /// Shared (non-claiming) opens by interposed tables.
    shared: u32,
    kind: EntryKind,
}

impl Entry {
    /// A new entry: nothing holds or shares the device yet.
    fn new(node: Arc<DeviceNode>, kind: EntryKind) -> Entry {
        Entry {
            node,
            holders: Vec::new(),
            shared: 0,
            kind,
        }
    }

    fn md(&self) -> Option<&MdState> {
        match &self.kind {
            EntryKind::Mapped(m) => Some(m),
            _ => None,
        }
    }
    fn md_mut(&mut self) -> Option<&mut MdState> {
        match &mut self.kind {
            EntryKind::Mapped(m) => Some(m),
            _ => None,
        }
    }
    fn open_count(&self) -> i32 {
        (self.holders.len() as u32 + self.shared) as i32
    }
}

/// Cloned (a view) to build a table without the lock.
#[derive(Clone, Default)]
struct Inner {
    entries: BTreeMap<DevId, Entry>,
    names: HashMap<String, DevId>,
    /// Creation order of disks and mapped devices (for config and listings).
    order: Vec<DevId>,
    /// Recorded exports not opened yet (holder id -> device name): they count as openers for
    /// deferred removal, which they may also join.
    expected: HashMap<String, String>,
    /// Switches running without the lock.
    switches: switch::Switches,
}

/// The registry of devices.
pub struct Registry {
    /// How long each interposer switch held the interposed devices' I/O (most recent last,
    /// bounded), for benchmarks and tests.
    stalls: Mutex<std::collections::VecDeque<Duration>>,
    inner: Mutex<Inner>,
    targets: TargetCatalog,
    env: Arc<TargetEnv>,
}

impl Default for Registry {
    fn default() -> Self {
        Self::new()
    }
}

impl Registry {
    /// An empty registry with the built-in targets.
    pub fn new() -> Self {
        Registry {
            stalls: Mutex::new(std::collections::VecDeque::new()),
            inner: Mutex::new(Inner::default()),
            targets: TargetCatalog::with_builtins(),
            env: Arc::new(TargetEnv::default()),
        }
    }

    /// How long recent interposer switches held I/O at the interposed devices (oldest first).
    pub fn switch_stalls(&self) -> Vec<Duration> {
        self.stalls.lock().iter().copied().collect()
    }

    fn record_stall(&self, d: Duration) {
        let mut s = self.stalls.lock();
        if s.len() >= 4096 {
            s.pop_front();
        }
        s.push_back(d);
    }

    /// The target types (`udmsetup targets`).
    pub fn targets(&self) -> Vec<(String, [u32; 3])> {
        self.targets.list()
    }

    /// The node of any device, without claiming it (status, tests).
    pub fn node(&self, name: &str) -> Result<Arc<DeviceNode>> {
        let inner = self.inner.lock();
        let id = inner.id_of(name)?;
        inner.usable(id, name)?;
        Ok(inner.entry(name)?.node.clone())
    }
}
