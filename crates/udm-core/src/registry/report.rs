//! Reports: what `info`, `ls --tree` and `disk list` show, built under the lock from the
//! registry state (never waiting for I/O).

use super::*;

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

impl Registry {
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
}
