//! The registry of every device: disks, partitions and mapped devices, their names and device
//! numbers, who holds them (claims), and the control operations of `udmsetup`.
//!
//! Control operations are serialised by one lock; the data path never takes it.

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
use udm_target::registry::TargetRegistry;
use udm_target::table::{Table, TableContext, TableSpec};
use udm_target::{DevRef, EventSink, TargetEnv, TargetError};
use udm_types::errno::HasErrno;
use udm_types::{DevId, DevName, Errno};

mod implicit;
mod switch;
mod unavailable;

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
}

/// One line of `table` or `status`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TargetLine {
    /// Start sector.
    pub start: u64,
    /// Length.
    pub len: u64,
    /// Target type.
    pub target_type: String,
    /// Parameters (table) or status text.
    pub params: String,
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
}

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

struct TableSlot {
    config: TableConfig,
    live: Arc<LiveTable>,
    uses: Vec<DevUse>,
    hooks: Vec<HookSpec>,
    interposed: bool,
}

struct MdState {
    md: Arc<MappedDevice>,
    uuid: Option<String>,
    live: Option<TableSlot>,
    inactive: Option<TableSlot>,
    deferred_remove: bool,
    /// Recorded tables not rebuilt yet (a device they name is unavailable).
    pending: Option<Pending>,
}

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

struct Entry {
    node: Arc<DeviceNode>,
    holders: Vec<Holder>,
    /// Shared (non-claiming) opens by interposed tables.
    shared: u32,
    kind: EntryKind,
}

impl Entry {
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

#[derive(Default)]
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
    targets: TargetRegistry,
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

impl BuildCtx<'_> {
    /// Records that the table uses `node` for `[begin, begin+len)`.
    fn use_device(
        &mut self,
        id: DevId,
        node: Arc<DeviceNode>,
        begin: u64,
        len: u64,
        marked: bool,
    ) -> DevRef {
        let idx = match self.uses.iter().position(|u| u.dev == id) {
            Some(i) => i,
            None => {
                self.uses.push(DevUse {
                    dev: id,
                    access: Arc::new(NodeAccess::new(node.clone())),
                });
                self.uses.len() - 1
            }
        };
        self.opens.push((idx, begin, len, marked));
        DevRef {
            id,
            name: node.name(),
            dev: self.uses[idx].access.clone(),
        }
    }
}

/// The table-construction context: resolves devices, checks claims, records uses.
struct BuildCtx<'a> {
    inner: &'a Inner,
    me: DevId,
    me_name: String,
    read_only: bool,
    interposed: bool,
    events: EventSink,
    env: Arc<TargetEnv>,
    uses: Vec<DevUse>,
    /// (use index, target begin, target len, marked with `[interpose]`)
    opens: Vec<(usize, u64, u64, bool)>,
    /// Disks opened on demand for absolute paths; entered into the registry when the table is.
    implicit: Vec<implicit::ImplicitDisk>,
}

impl TableContext for BuildCtx<'_> {
    fn get_device(
        &mut self,
        begin: u64,
        len: u64,
        path: &str,
    ) -> std::result::Result<DevRef, TargetError> {
        let (marked, path) = match path.strip_prefix('[') {
            Some(rest) => match rest.split_once(']') {
                Some(("interpose", p)) => (true, p),
                Some((opt, _)) => {
                    return Err(TargetError::invalid(format!(
                        "unknown device path option [{opt}] (only [interpose] is known)"
                    )))
                }
                None => {
                    return Err(TargetError::invalid(format!(
                        "unterminated '[' in device path {path:?}"
                    )))
                }
            },
            None => (false, path),
        };
        if marked {
            self.interposed = true;
        }
        let id = match self.inner.resolve(path) {
            Some(id) => id,
            None => self.open_implicit(path)?,
        };
        if let Some(node) = self.implicit_node(id) {
            return Ok(self.use_device(id, node, begin, len, marked));
        }
        if id == self.me {
            return Err(TargetError::invalid(format!(
                "table of {} references its own device",
                self.me_name
            )));
        }
        let entry =
            self.inner.entries.get(&id).ok_or_else(|| {
                TargetError::new(Errno::ENODEV, format!("device {path} not found"))
            })?;
        self.inner
            .usable(id, path)
            .and_then(|()| self.inner.not_switching(id, path))
            .map_err(|e| TargetError::new(e.errno(), e.to_string()))?;
        if !self.interposed {
            if let Some(h) = entry
                .holders
                .iter()
                .find(|h| matches!(h, Holder::Export(_)))
            {
                return Err(TargetError::new(
                    Errno::EBUSY,
                    format!(
                        "device {} ({id}) is in use by {}; use --interpose to attach a mapped device to a device in use",
                        entry.node.name(),
                        holder_text(self.inner, h)
                    ),
                ));
            }
        }
        Ok(self.use_device(id, entry.node.clone(), begin, len, marked))
    }

    fn events(&self) -> EventSink {
        self.events.clone()
    }

    fn env(&self) -> Arc<TargetEnv> {
        self.env.clone()
    }

    fn read_only(&self) -> bool {
        self.read_only
    }
}

impl Registry {
    /// An empty registry with the built-in targets.
    pub fn new() -> Self {
        Registry {
            stalls: Mutex::new(std::collections::VecDeque::new()),
            inner: Mutex::new(Inner::default()),
            targets: TargetRegistry::with_builtins(),
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

    // ----- disks -----

    /// Adds a disk backed by a file or block device, and its partitions.
    pub fn add_disk(&self, name: &str, path: &Path, opts: &DiskOptions) -> Result<DiskInfo> {
        DevName::new(name).map_err(|e| CoreError::invalid(e.to_string()))?;
        // `disk add` of an unavailable disk's name and path brings it (and its dependents) back.
        if let Some(info) = self.add_disk_again(name, path)? {
            return Ok(info);
        }
        if let Some(bytes) = opts.create {
            udm_io::backend::file::FileDevice::create(path, bytes).map_err(|e| {
                CoreError::new(
                    Errno::from_io(&e),
                    format!("cannot create {}: {e}", path.display()),
                )
            })?;
        }
        let path = std::fs::canonicalize(path).map_err(|e| {
            CoreError::new(
                Errno::from_io(&e),
                format!("cannot open {}: {e}", path.display()),
            )
        })?;
        {
            let inner = self.inner.lock();
            if inner.names.contains_key(name) {
                return Err(CoreError::Exists(format!("device {name} already exists")));
            }
            if let Some(id) = inner.resolve(&path.to_string_lossy()) {
                return Err(CoreError::Exists(format!(
                    "{} is already served as {}",
                    path.display(),
                    inner
                        .entries
                        .get(&id)
                        .map(|e| e.node.name())
                        .unwrap_or_default()
                )));
            }
        }
        let oo = OpenOptions {
            read_only: opts.read_only,
            direct: opts.direct,
            engine: Engine::Auto,
        };
        let backend =
            open_backend(&path, &oo).map_err(|e| CoreError::new(e.errno(), e.to_string()))?;
        let flags = DiskFlags {
            read_only: opts.read_only,
            direct: opts.direct,
            implicit: false,
        };
        self.insert_disk(name, Some(path), backend, flags, None)
    }

    /// Adds a disk from any block device (memory devices in tests, embedders' own backends).
    pub fn add_disk_device(&self, name: &str, dev: Arc<dyn BlockDevice>) -> Result<DiskInfo> {
        DevName::new(name).map_err(|e| CoreError::invalid(e.to_string()))?;
        let ro = dev.read_only();
        let flags = DiskFlags {
            read_only: ro,
            ..DiskFlags::default()
        };
        self.insert_disk(name, None, dev, flags, None)
    }

    fn insert_disk(
        &self,
        name: &str,
        path: Option<PathBuf>,
        backend: Arc<dyn BlockDevice>,
        flags: DiskFlags,
        minor: Option<u32>,
    ) -> Result<DiskInfo> {
        let DiskFlags {
            read_only,
            direct,
            implicit,
        } = flags;
        // A file a table names by path is used whole: its partitions are not served.
        let parts = if implicit {
            Vec::new()
        } else {
            udm_io::partition::read_partitions(backend.as_ref()).unwrap_or_else(|e| {
                tracing::warn!(disk = name, "partition table ignored: {e}");
                Vec::new()
            })
        };
        let mut inner = self.inner.lock();
        if inner.names.contains_key(name) {
            return Err(CoreError::Exists(format!("device {name} already exists")));
        }
        let minor = minor
            .filter(|m| !inner.entries.contains_key(&DevId::new(DISK_MAJOR, *m)))
            .unwrap_or_else(|| inner.free_minor(DISK_MAJOR, 16));
        let id = DevId::new(DISK_MAJOR, minor);
        let node = Arc::new(DeviceNode::new(id, name, NodeKind::Disk, backend));
        let mut part_ids = Vec::new();
        for p in &parts {
            let pid = if p.number < 16 {
                DevId::new(DISK_MAJOR, minor + p.number)
            } else {
                DevId::new(EXT_MAJOR, inner.free_minor(EXT_MAJOR, 1))
            };
            let pname = udm_io::slice::partition_name(name, p.number);
            if inner.names.contains_key(&pname) {
                tracing::warn!("partition name {pname} is taken; partition skipped");
                continue;
            }
            let slice = match udm_io::slice::SliceDevice::for_partition(node.clone(), name, p) {
                Ok(s) => s,
                Err(e) => {
                    tracing::warn!("partition {pname} skipped: {e}");
                    continue;
                }
            };
            let pnode = Arc::new(DeviceNode::new(
                pid,
                &pname,
                NodeKind::Partition {
                    parent: id,
                    number: p.number,
                    start: p.start,
                },
                Arc::new(slice),
            ));
            inner.entries.insert(
                pid,
                Entry {
                    node: pnode,
                    holders: Vec::new(),
                    shared: 0,
                    kind: EntryKind::Partition { parent: id },
                },
            );
            inner.names.insert(pname, pid);
            part_ids.push(pid);
        }
        inner.entries.insert(
            id,
            Entry {
                node,
                holders: Vec::new(),
                shared: 0,
                kind: EntryKind::Disk {
                    path,
                    read_only,
                    direct,
                    partitions: part_ids,
                    implicit,
                    unavailable: None,
                },
            },
        );
        inner.names.insert(name.to_string(), id);
        // A revived disk keeps its place in the creation order.
        if !inner.order.contains(&id) {
            inner.order.push(id);
        }
        tracing::info!(disk = name, %id, partitions = parts.len(), "disk added");
        Self::disk_info(&inner, id).ok_or_else(|| nodev(name))
    }

    fn disk_info(inner: &Inner, id: DevId) -> Option<DiskInfo> {
        let e = inner.entries.get(&id)?;
        let EntryKind::Disk {
            path,
            read_only,
            direct,
            partitions,
            implicit,
            unavailable,
        } = &e.kind
        else {
            return None;
        };
        let parts = partitions
            .iter()
            .filter_map(|p| {
                let pe = inner.entries.get(p)?;
                let NodeKind::Partition { number, start, .. } = pe.node.kind() else {
                    return None;
                };
                Some(PartitionSummary {
                    name: pe.node.name(),
                    id: *p,
                    number: *number,
                    start: *start,
                    sectors: pe.node.size(),
                })
            })
            .collect();
        Some(DiskInfo {
            name: e.node.name(),
            id,
            path: path.clone(),
            sectors: e.node.size(),
            read_only: *read_only,
            direct: *direct,
            partitions: parts,
            holders: inner.holders_of(id),
            unavailable: unavailable.clone(),
            implicit: *implicit,
        })
    }

    /// Removes a disk: EBUSY while it or a partition is held, open or interposed.
    pub fn remove_disk(&self, name: &str) -> Result<()> {
        let mut inner = self.inner.lock();
        let id = inner.id_of(name)?;
        let Some(Entry {
            kind: EntryKind::Disk { partitions, .. },
            ..
        }) = inner.entries.get(&id)
        else {
            return Err(CoreError::invalid(format!(
                "{name} is not a disk (use `udmsetup remove` for mapped devices)"
            )));
        };
        let partitions = partitions.clone();
        let holders = inner.holders_of(id);
        if !holders.is_empty() {
            return Err(CoreError::Busy(format!(
                "disk {name} is in use by {}",
                holders.join(", ")
            )));
        }
        for d in std::iter::once(id).chain(partitions.iter().copied()) {
            if !inner.live_hooks_on(d).is_empty() {
                return Err(CoreError::Busy(format!("disk {name} is interposed")));
            }
        }
        for d in std::iter::once(id).chain(partitions) {
            if let Some(e) = inner.entries.remove(&d) {
                inner.names.remove(&e.node.name());
            }
        }
        inner.order.retain(|x| *x != id);
        Ok(())
    }

    /// Every disk.
    pub fn disks(&self) -> Vec<DiskInfo> {
        let inner = self.inner.lock();
        inner
            .order
            .iter()
            .filter_map(|id| Self::disk_info(&inner, *id))
            .collect()
    }

    // ----- lookups for exports -----

    /// The node of a device, for an export: claims it like a mount does. EBUSY when mapped
    /// devices hold it (their tables claim it).
    pub fn open_export(&self, name: &str, holder: &str) -> Result<Arc<DeviceNode>> {
        let mut inner = self.inner.lock();
        let id = inner.id_of(name)?;
        inner.usable(id, name)?;
        inner.not_switching(id, name)?;
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
                let (kind, deps, interposes) = match &e.kind {
                    EntryKind::Disk { .. } => (DeviceKind::Disk, vec![], vec![]),
                    EntryKind::Partition { parent } => {
                        (DeviceKind::Partition, vec![*parent], vec![])
                    }
                    EntryKind::Mapped(m) => {
                        let deps = m
                            .live
                            .as_ref()
                            .map(|l| l.uses.iter().map(|u| u.dev).collect())
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
                Entry {
                    node,
                    holders: Vec::new(),
                    shared: 0,
                    kind: EntryKind::Mapped(Box::new(MdState {
                        md,
                        uuid: uuid.map(str::to_string),
                        live: None,
                        inactive: None,
                        deferred_remove: false,
                        pending: None,
                    })),
                },
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

    /// `load`/`reload`: constructs the table into the inactive slot (replacing any previous one).
    pub fn load(&self, name: &str, spec: &TableSpec, flags: LoadFlags) -> Result<()> {
        let mut inner = self.inner.lock();
        let (id, m) = inner.md_entry(name)?;
        let md = m.md.clone();
        inner.available(id, name)?;
        inner.not_switching(id, name)?;
        let (slot, opened) = self.build(&inner, id, name, &md, spec, flags)?;
        implicit::enter(&mut inner, opened);
        // Claims and shared opens of the new table.
        for u in &slot.uses {
            if let Some(e) = inner.entries.get_mut(&u.dev) {
                if slot.interposed {
                    e.shared += 1;
                } else {
                    e.holders.push(Holder::Table(id));
                }
            }
        }
        let old = inner.md_mut(id)?.inactive.replace(slot);
        if let Some(old) = old {
            Self::release_slot(&mut inner, id, &old);
        }
        drop(inner);
        tracing::info!(device = name, "table loaded into the inactive slot");
        Ok(())
    }

    fn build(
        &self,
        inner: &Inner,
        id: DevId,
        name: &str,
        md: &Arc<MappedDevice>,
        spec: &TableSpec,
        flags: LoadFlags,
    ) -> Result<(TableSlot, Vec<implicit::ImplicitDisk>)> {
        let events = md.events().clone();
        let mut ctx = BuildCtx {
            inner,
            me: id,
            me_name: name.to_string(),
            read_only: flags.read_only,
            interposed: flags.interpose,
            events: EventSink::new(move || events.raise()),
            env: self.env.clone(),
            uses: Vec::new(),
            opens: Vec::new(),
            implicit: Vec::new(),
        };
        let table = Table::build(spec, &self.targets, &mut ctx)?;
        let interposed = ctx.interposed;
        let mut hooks: Vec<(usize, HookSpec)> = Vec::new();
        if interposed {
            let any_marked = ctx.opens.iter().any(|o| o.3);
            if any_marked {
                for &(idx, begin, len, marked) in &ctx.opens {
                    if marked {
                        hooks.push((
                            idx,
                            HookSpec {
                                dev: ctx.uses[idx].dev,
                                start: begin,
                                len,
                            },
                        ));
                    }
                }
            } else {
                // Unmarked: the one device of each target that names a single device.
                let mut by_target: BTreeMap<u64, Vec<(usize, u64)>> = BTreeMap::new();
                for &(idx, begin, len, _) in &ctx.opens {
                    let devs = by_target.entry(begin).or_default();
                    // A target may open one device several times (delay: once per class).
                    if !devs.iter().any(|(i, _)| *i == idx) {
                        devs.push((idx, len));
                    }
                }
                for (begin, devs) in by_target {
                    if let [(idx, len)] = devs[..] {
                        hooks.push((
                            idx,
                            HookSpec {
                                dev: ctx.uses[idx].dev,
                                start: begin,
                                len,
                            },
                        ));
                    }
                }
            }
            if hooks.len() > 1 {
                return Err(CoreError::new(
                    Errno::EALREADY,
                    format!("{name}: a mapped device can have only one interposer; the table would attach {}", hooks.len()),
                ));
            }
            for (idx, h) in &hooks {
                let size = ctx.uses[*idx].access.size();
                if h.start.checked_add(h.len).is_none_or(|end| end > size) {
                    return Err(CoreError::new(
                        Errno::ERANGE,
                        format!(
                            "{name}: interposer range {}+{} is beyond the end of {} ({size} sectors)",
                            h.start,
                            h.len,
                            ctx.uses[*idx].access.node().name()
                        ),
                    ));
                }
                if let Some(other) = inner.overlapping_hook(h.dev, h.start, h.len, id) {
                    return Err(CoreError::Busy(format!(
                        "{name}: interposer range {}+{} of {} overlaps the interposer of {other}",
                        h.start,
                        h.len,
                        ctx.uses[*idx].access.node().name()
                    )));
                }
                ctx.uses[*idx].access.set_bypass(true);
            }
        }
        let mut text = String::new();
        for l in &spec.lines {
            text.push_str(&format!(
                "{} {} {} {}\n",
                l.start, l.len, l.target_type, l.params
            ));
        }
        let slot = TableSlot {
            config: TableConfig {
                text,
                read_only: flags.read_only,
                interposed,
            },
            live: Arc::new(LiveTable {
                table,
                read_only: flags.read_only,
            }),
            uses: ctx.uses,
            hooks: hooks.into_iter().map(|(_, h)| h).collect(),
            interposed,
        };
        Ok((slot, ctx.implicit))
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

    /// Looks a mapped device up by uuid.
    pub fn name_by_uuid(&self, uuid: &str) -> Option<String> {
        let inner = self.inner.lock();
        inner
            .entries
            .values()
            .find(|e| e.md().is_some_and(|m| m.uuid.as_deref() == Some(uuid)))
            .map(|e| e.node.name())
    }

    /// `info`.
    pub fn info(&self, name: &str) -> Result<MdInfo> {
        let inner = self.inner.lock();
        let (id, m) = inner.md_entry(name)?;
        let e = inner.entries.get(&id).ok_or_else(|| nodev(name))?;
        let live = m.live.as_ref();
        let shown = live.or(m.inactive.as_ref());
        let interposers = shown
            .map(|s| {
                s.hooks
                    .iter()
                    .map(|h| InterposerInfo {
                        device: inner
                            .entries
                            .get(&h.dev)
                            .map(|e| e.node.name())
                            .unwrap_or_default(),
                        id: h.dev,
                        start: h.start,
                        len: h.len,
                        attached: live.is_some(),
                    })
                    .collect()
            })
            .unwrap_or_default();
        Ok(MdInfo {
            name: e.node.name(),
            uuid: m.uuid.clone(),
            id,
            suspended: m.md.is_suspended(),
            read_only: live.is_some_and(|l| l.config.read_only),
            live_present: live.is_some(),
            inactive_present: m.inactive.is_some(),
            open_count: e.open_count(),
            event_nr: m.md.events().current(),
            target_count: live.map_or(0, |l| l.live.table.target_count() as u32),
            deferred_remove: m.deferred_remove,
            sectors: m.md.size(),
            interposers,
            redirected: m.md.redirected(),
            interposed: live.is_some_and(|l| l.interposed),
            unavailable: m.pending.as_ref().map(|p| p.reason.clone()),
        })
    }

    /// Mapped devices sorted by name (`ls`).
    pub fn list_mapped(&self) -> Vec<(String, DevId)> {
        let inner = self.inner.lock();
        let mut v: Vec<(String, DevId)> = inner
            .entries
            .iter()
            .filter(|(_, e)| e.md().is_some())
            .map(|(id, e)| (e.node.name(), *id))
            .collect();
        v.sort();
        v
    }

    fn slot(m: &MdState, inactive: bool) -> Option<&TableSlot> {
        if inactive {
            m.inactive.as_ref()
        } else {
            m.live.as_ref()
        }
    }

    /// `table` (`--inactive` for the inactive slot). Empty when the slot is empty.
    pub fn table(&self, name: &str, inactive: bool) -> Result<Vec<TargetLine>> {
        if let Some(recorded) = self.pending_lines(name, inactive) {
            return Ok(recorded);
        }
        self.lines(name, inactive, Table::table_lines)
    }

    /// `status`.
    pub fn status(&self, name: &str, inactive: bool) -> Result<Vec<TargetLine>> {
        self.lines(name, inactive, Table::status_lines)
    }

    /// Lines of one slot's table; the registry lock is released before the targets are asked
    /// (status may take a target's own locks).
    fn lines(
        &self,
        name: &str,
        inactive: bool,
        get: fn(&Table) -> Vec<udm_target::table::TableLine>,
    ) -> Result<Vec<TargetLine>> {
        let table = {
            let inner = self.inner.lock();
            let (_, m) = inner.md_entry(name)?;
            Self::slot(m, inactive).map(|s| s.live.clone())
        };
        Ok(table
            .map(|t| {
                get(&t.table)
                    .into_iter()
                    .map(|(start, len, target_type, params)| TargetLine {
                        start,
                        len,
                        target_type,
                        params,
                    })
                    .collect()
            })
            .unwrap_or_default())
    }

    /// `deps`: devices the table uses, as (number, name).
    pub fn deps(&self, name: &str, inactive: bool) -> Result<Vec<(DevId, String)>> {
        let inner = self.inner.lock();
        let (_, m) = inner.md_entry(name)?;
        Ok(Self::slot(m, inactive)
            .map(|s| {
                s.uses
                    .iter()
                    .map(|u| {
                        (
                            u.dev,
                            inner
                                .entries
                                .get(&u.dev)
                                .map(|e| e.node.name())
                                .unwrap_or_default(),
                        )
                    })
                    .collect()
            })
            .unwrap_or_default())
    }

    /// `message`: to the target at `sector` of the live table, or to the core for `@` messages.
    pub fn message(&self, name: &str, sector: u64, argv: &[String]) -> Result<Option<String>> {
        let (id, table) = {
            let inner = self.inner.lock();
            let (id, m) = inner.md_entry(name)?;
            inner.available(id, name)?;
            (id, m.live.as_ref().map(|s| s.live.clone()))
        };
        match argv.first().map(String::as_str) {
            Some("@cancel_deferred_remove") => {
                let mut inner = self.inner.lock();
                inner.not_switching(id, name)?;
                let m = inner.md_mut(id)?;
                if !m.deferred_remove {
                    return Err(CoreError::new(
                        Errno::ENXIO,
                        format!("device {name} is not scheduled for deferred removal"),
                    ));
                }
                m.deferred_remove = false;
                return Ok(None);
            }
            Some(s) if s.starts_with('@') => {
                return Err(CoreError::invalid(format!("unsupported core message {s}")));
            }
            None => return Err(CoreError::invalid("empty message")),
            _ => {}
        }
        let table =
            table.ok_or_else(|| CoreError::invalid(format!("device {name} has no live table")))?;
        table
            .table
            .message(sector, argv)
            .map_err(|e| CoreError::new(e.errno, e.msg))
    }

    /// The event counter of a device (`wait` sleeps on it without holding the registry).
    pub fn events(&self, name: &str) -> Result<Arc<Events>> {
        let inner = self.inner.lock();
        Ok(inner.md_entry(name)?.1.md.events().clone())
    }

    /// Waits until the event number of `name` differs from `seen` (or `timeout`).
    pub fn wait_event(&self, name: &str, seen: u32, timeout: Duration) -> Result<u32> {
        let ev = self.events(name)?;
        Ok(ev.wait(seen, timeout))
    }
}
