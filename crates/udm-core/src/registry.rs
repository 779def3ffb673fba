//! The registry of every device: disks, partitions and mapped devices, their names and device
//! numbers, who holds them (claims), and the control operations of `udmsetup`.
//!
//! Control operations are serialised by one lock; the data path never takes it. Nothing waits
//! for I/O under it: suspends and table switches drain without it (see `switch`), marking the
//! devices they work on so that conflicting operations are refused with EBUSY meanwhile.

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
mod disks;
mod implicit;
mod query;
mod switch;
mod unavailable;

use build::BuildCtx;

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

/// A partition as listed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PartitionSummary {
    /// Name (`disk` + number).
    pub name: String,
    /// Device number.
    pub id: DevId,
    /// Partition number.
    pub number: u32,
    /// First sector on the disk.
    pub start: u64,
    /// Length in sectors.
    pub sectors: u64,
}

/// A disk as listed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DiskInfo {
    /// Name.
    pub name: String,
    /// Device number.
    pub id: DevId,
    /// Backing path (None for memory disks).
    pub path: Option<PathBuf>,
    /// Size in sectors.
    pub sectors: u64,
    /// Read-only.
    pub read_only: bool,
    /// O_DIRECT.
    pub direct: bool,
    /// Partitions found.
    pub partitions: Vec<PartitionSummary>,
    /// Who holds the disk or its partitions.
    pub holders: Vec<String>,
    /// Why the disk cannot be served now (its backing file could not be opened); `None` when
    /// it is available.
    pub unavailable: Option<String>,
    /// Opened on demand because a table names its path (released when no table uses it).
    pub implicit: bool,
}

/// An attached (or pending) interposer of a mapped device.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct InterposerInfo {
    /// Interposed device name.
    pub device: String,
    /// Interposed device number.
    pub id: DevId,
    /// First sector covered.
    pub start: u64,
    /// Sectors covered.
    pub len: u64,
    /// Attached now (the table is live).
    pub attached: bool,
}

/// What `info` reports about a mapped device.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MdInfo {
    /// Name.
    pub name: String,
    /// UUID.
    pub uuid: Option<String>,
    /// Device number.
    pub id: DevId,
    /// Suspended.
    pub suspended: bool,
    /// Live table is read-only.
    pub read_only: bool,
    /// A live table is present.
    pub live_present: bool,
    /// An inactive table is present.
    pub inactive_present: bool,
    /// Open count (tables and exports using it).
    pub open_count: i32,
    /// Event number.
    pub event_nr: u32,
    /// Targets in the live table.
    pub target_count: u32,
    /// Deferred removal pending.
    pub deferred_remove: bool,
    /// Size in sectors (live table).
    pub sectors: u64,
    /// Interposers of the live (or else inactive) table.
    pub interposers: Vec<InterposerInfo>,
    /// Requests redirected into this device by its interposers.
    pub redirected: u64,
    /// The live table was loaded with `--interpose`.
    pub interposed: bool,
    /// Why a recorded table could not be rebuilt (a device it names is unavailable); `None`
    /// when the device is complete.
    pub unavailable: Option<String>,
    /// No table was ever loaded: the kernel adds a mapped device's block device (gendisk) at
    /// its first table load, so until then it has no read-ahead and no `dm-N` name.
    pub no_block_device: bool,
}

/// Kind of device in a listing.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DeviceKind {
    /// A disk.
    Disk,
    /// A partition.
    Partition,
    /// A mapped device.
    Mapped,
}

/// A device as listed in `ls --tree`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DeviceSummary {
    /// Name.
    pub name: String,
    /// Device number.
    pub id: DevId,
    /// Kind.
    pub kind: DeviceKind,
    /// Devices this one uses (live table deps; a partition's disk).
    pub deps: Vec<DevId>,
    /// Devices this one interposes.
    pub interposes: Vec<DevId>,
    /// Why the device is unavailable, if it is.
    pub unavailable: Option<String>,
    /// A mapped device that never had a table (see [`MdInfo::no_block_device`]).
    pub no_block_device: bool,
}

#[derive(Clone)]
struct DevUse {
    dev: DevId,
    access: Arc<NodeAccess>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct HookSpec {
    dev: DevId,
    start: u64,
    len: u64,
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

fn nodev(name: &str) -> CoreError {
    CoreError::NoDevice(name.to_string())
}

fn holder_text(inner: &Inner, h: &Holder) -> String {
    match h {
        Holder::Table(id) => match inner.entries.get(id) {
            Some(e) => format!("mapped device {}", e.node.name()),
            None => format!("mapped device {id}"),
        },
        Holder::Export(x) => format!("export {x}"),
    }
}

/// EINVAL unless `uuid` has dm's length (1 to 128 characters).
fn check_uuid(uuid: &str) -> Result<()> {
    if uuid.is_empty() || uuid.len() > 128 {
        return Err(CoreError::invalid(format!(
            "uuid {uuid:?} must be 1 to 128 characters"
        )));
    }
    Ok(())
}

impl Inner {
    fn id_of(&self, name: &str) -> Result<DevId> {
        self.names.get(name).copied().ok_or_else(|| nodev(name))
    }

    fn entry(&self, name: &str) -> Result<&Entry> {
        let id = self.id_of(name)?;
        self.entries.get(&id).ok_or_else(|| nodev(name))
    }

    fn md_entry(&self, name: &str) -> Result<(DevId, &MdState)> {
        let id = self.id_of(name)?;
        match self.entries.get(&id).and_then(|e| e.md()) {
            Some(m) => Ok((id, m)),
            None => Err(nodev(name)),
        }
    }

    /// EEXIST when a mapped device already has `uuid`.
    fn uuid_free(&self, uuid: &str) -> Result<()> {
        if self
            .entries
            .values()
            .any(|e| e.md().is_some_and(|m| m.uuid.as_deref() == Some(uuid)))
        {
            return Err(CoreError::Exists(format!(
                "a device with uuid {uuid} already exists"
            )));
        }
        Ok(())
    }

    fn md_mut(&mut self, id: DevId) -> Result<&mut MdState> {
        self.entries
            .get_mut(&id)
            .and_then(|e| e.md_mut())
            .ok_or_else(|| nodev(&id.to_string()))
    }

    fn free_minor(&self, major: u32, step: u32) -> u32 {
        let mut m = 0;
        while self.entries.contains_key(&DevId::new(major, m)) {
            m += step;
        }
        m
    }

    /// Resolves a device named in a table: udm name, `major:minor`, `/dev/mapper/NAME`,
    /// `/dev/udm/NAME`, or the backing path of a disk.
    fn resolve(&self, path: &str) -> Option<DevId> {
        if let Some(id) = self.names.get(path) {
            return Some(*id);
        }
        if let Ok(id) = path.parse::<DevId>() {
            return self.entries.contains_key(&id).then_some(id);
        }
        for prefix in ["/dev/mapper/", "/dev/udm/"] {
            if let Some(n) = path.strip_prefix(prefix) {
                return self.names.get(n).copied();
            }
        }
        let p = Path::new(path);
        let canon = std::fs::canonicalize(p).ok();
        self.entries.iter().find_map(|(id, e)| match &e.kind {
            EntryKind::Disk { path: Some(dp), .. }
                if dp == p || canon.as_deref().is_some_and(|c| c == dp) =>
            {
                Some(*id)
            }
            _ => None,
        })
    }

    /// Hooks currently attached to `dev`, derived from the live tables of every mapped device.
    fn live_hooks_on(&self, dev: DevId) -> Vec<Hook> {
        let mut out = Vec::new();
        for e in self.entries.values() {
            if let Some(m) = e.md() {
                if let Some(l) = &m.live {
                    for h in l.hooks.iter().filter(|h| h.dev == dev) {
                        out.push(Hook {
                            start: h.start,
                            end: h.start + h.len,
                            md: m.md.clone(),
                        });
                    }
                }
            }
        }
        out
    }

    /// Which mapped device's live interposer overlaps `[start, start+len)` of `dev`, other than `me`.
    fn overlapping_hook(&self, dev: DevId, start: u64, len: u64, me: DevId) -> Option<String> {
        self.entries.iter().find_map(|(id, e)| {
            let m = e.md()?;
            if *id == me {
                return None;
            }
            let l = m.live.as_ref()?;
            l.hooks
                .iter()
                .any(|h| h.dev == dev && h.start < start + len && start < h.start + h.len)
                .then(|| e.node.name())
        })
    }

    fn holders_of(&self, id: DevId) -> Vec<String> {
        let mut ids = vec![id];
        if let Some(Entry {
            kind: EntryKind::Disk { partitions, .. },
            ..
        }) = self.entries.get(&id)
        {
            ids.extend(partitions.iter().copied());
        }
        let mut out: Vec<String> = Vec::new();
        for i in ids {
            if let Some(e) = self.entries.get(&i) {
                for h in &e.holders {
                    let t = holder_text(self, h);
                    if !out.contains(&t) {
                        out.push(t);
                    }
                }
                if e.shared > 0 {
                    out.push(format!("{} shared open(s) by interposed tables", e.shared));
                }
                let name = e.node.name();
                for (h, _) in self.expected.iter().filter(|(_, d)| **d == name) {
                    out.push(format!("export {h} (recorded, not served yet)"));
                }
            }
        }
        out
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

    // ----- lookups for exports -----

    /// The node of a device, for an export: claims it like a mount does. EBUSY when mapped
    /// devices hold it (their tables claim it).
    pub fn open_export(&self, name: &str, holder: &str) -> Result<Arc<DeviceNode>> {
        let mut inner = self.inner.lock();
        let id = inner.id_of(name)?;
        inner.usable(id, name)?;
        inner.not_removing(id, name)?;
        let holders = inner
            .entries
            .get(&id)
            .map(|e| e.holders.clone())
            .unwrap_or_default();
        if let Some(h) = holders.iter().find(|h| matches!(h, Holder::Table(_))) {
            return Err(CoreError::Busy(format!(
                "device {name} is held by {}; export that mapped device instead",
                holder_text(&inner, h)
            )));
        }
        if let Some(m) = inner.entries.get(&id).and_then(|e| e.md()) {
            if m.deferred_remove && inner.expected.get(holder).is_none_or(|d| d != name) {
                return Err(CoreError::Busy(format!(
                    "device {name} is scheduled for deferred removal"
                )));
            }
        }
        let e = inner.entries.get_mut(&id).ok_or_else(|| nodev(name))?;
        e.holders.push(Holder::Export(holder.to_string()));
        let node = e.node.clone();
        inner.expected.remove(holder);
        Ok(node)
    }

    /// Releases an export's hold. Completes a deferred removal when it was the last user.
    pub fn close_export(&self, id: DevId, holder: &str) {
        let mut inner = self.inner.lock();
        if let Some(e) = inner.entries.get_mut(&id) {
            if let Some(i) = e
                .holders
                .iter()
                .position(|h| *h == Holder::Export(holder.to_string()))
            {
                e.holders.remove(i);
            }
        }
        self.run_deferred(inner);
    }

    /// The node of any device, without claiming it (status, tests).
    pub fn node(&self, name: &str) -> Result<Arc<DeviceNode>> {
        let inner = self.inner.lock();
        let id = inner.id_of(name)?;
        inner.usable(id, name)?;
        Ok(inner.entry(name)?.node.clone())
    }

    /// Every device (disks, partitions, mapped), for `ls --tree`.
    pub fn devices(&self) -> Vec<DeviceSummary> {
        let inner = self.inner.lock();
        inner
            .entries
            .iter()
            .map(|(id, e)| {
                let no_block_device = e.md().is_some_and(MdState::no_block_device);
                let (kind, deps, interposes) = match &e.kind {
                    EntryKind::Disk { .. } => (DeviceKind::Disk, vec![], vec![]),
                    EntryKind::Partition { parent } => {
                        (DeviceKind::Partition, vec![*parent], vec![])
                    }
                    EntryKind::Mapped(m) => {
                        let deps = m
                            .live
                            .as_ref()
                            // The kernel's deps order (see `deps`): newest first.
                            .map(|l| l.uses.iter().rev().map(|u| u.dev).collect())
                            .unwrap_or_default();
                        let ip = m
                            .live
                            .as_ref()
                            .map(|l| l.hooks.iter().map(|h| h.dev).collect())
                            .unwrap_or_default();
                        (DeviceKind::Mapped, deps, ip)
                    }
                };
                DeviceSummary {
                    name: e.node.name(),
                    id: *id,
                    kind,
                    deps,
                    interposes,
                    unavailable: e.unavailable_reason(),
                    no_block_device,
                }
            })
            .collect()
    }

    // ----- mapped devices -----

    /// `create`: a device with no table, then load + resume if a table is given (removing the
    /// device again if either fails, as libdm does).
    pub fn create(
        &self,
        name: &str,
        uuid: Option<&str>,
        minor: Option<u32>,
        table: Option<(&TableSpec, LoadFlags)>,
        opts: &ResumeOptions,
    ) -> Result<MdInfo> {
        DevName::new(name).map_err(|e| CoreError::invalid(e.to_string()))?;
        if let Some(u) = uuid {
            check_uuid(u)?;
        }
        {
            let mut inner = self.inner.lock();
            if inner.names.contains_key(name) {
                return Err(CoreError::Exists(format!("device {name} already exists")));
            }
            if let Some(u) = uuid {
                inner.uuid_free(u)?;
            }
            let minor = match minor {
                Some(m) if inner.entries.contains_key(&DevId::new(DM_MAJOR, m)) => {
                    return Err(CoreError::Exists(format!("minor {m} is in use")))
                }
                Some(m) => m,
                None => inner.free_minor(DM_MAJOR, 1),
            };
            let id = DevId::new(DM_MAJOR, minor);
            let md = Arc::new(MappedDevice::new(id, name));
            let node = Arc::new(DeviceNode::new(id, name, NodeKind::Mapped, md.clone()));
            inner.entries.insert(
                id,
                Entry::new(
                    node,
                    EntryKind::Mapped(Box::new(MdState {
                        md,
                        uuid: uuid.map(str::to_string),
                        live: None,
                        inactive: None,
                        deferred_remove: false,
                        pending: None,
                        loaded_once: false,
                    })),
                ),
            );
            inner.names.insert(name.to_string(), id);
            inner.order.push(id);
        }
        if let Some((spec, flags)) = table {
            let r = self
                .load(name, spec, flags)
                .and_then(|_| self.resume(name, opts));
            if let Err(e) = r {
                if let Err(e2) = self.remove(name, false, false) {
                    tracing::error!(
                        device = name,
                        "could not remove device after failed create: {e2}"
                    );
                }
                return Err(e);
            }
        }
        self.info(name)
    }

    fn release_slot(inner: &mut Inner, me: DevId, slot: &TableSlot) {
        for u in &slot.uses {
            if let Some(e) = inner.entries.get_mut(&u.dev) {
                if slot.interposed {
                    e.shared = e.shared.saturating_sub(1);
                } else if let Some(i) = e.holders.iter().position(|h| *h == Holder::Table(me)) {
                    e.holders.remove(i);
                }
            }
        }
        implicit::release_unused(inner);
    }

    /// `clear`: destroys the inactive table.
    pub fn clear(&self, name: &str) -> Result<()> {
        let mut inner = self.inner.lock();
        let (id, _) = inner.md_entry(name)?;
        inner.available(id, name)?;
        inner.not_switching(id, name)?;
        if let Some(old) = inner.md_mut(id)?.inactive.take() {
            Self::release_slot(&mut inner, id, &old);
        }
        self.run_deferred(inner);
        Ok(())
    }

    /// `rename`.
    pub fn rename(&self, name: &str, new: &str) -> Result<()> {
        DevName::new(new).map_err(|e| CoreError::invalid(e.to_string()))?;
        let mut inner = self.inner.lock();
        let (id, m) = inner.md_entry(name)?;
        let md = m.md.clone();
        inner.available(id, name)?;
        if inner.names.contains_key(new) {
            return Err(CoreError::Exists(format!("device {new} already exists")));
        }
        inner.names.remove(name);
        inner.names.insert(new.to_string(), id);
        if let Some(e) = inner.entries.get(&id) {
            e.node.set_name(new);
        }
        md.set_name(new);
        md.events().raise();
        Ok(())
    }

    /// `rename --setuuid`: only when the device has no uuid yet.
    pub fn set_uuid(&self, name: &str, uuid: &str) -> Result<()> {
        let mut inner = self.inner.lock();
        let (id, m) = inner.md_entry(name)?;
        inner.available(id, name)?;
        if m.uuid.is_some() {
            return Err(CoreError::invalid(format!(
                "device {name} already has a uuid; it cannot be changed"
            )));
        }
        check_uuid(uuid)?;
        inner.uuid_free(uuid)?;
        let md = inner.md_mut(id)?;
        md.uuid = Some(uuid.to_string());
        md.md.events().raise();
        Ok(())
    }
}
