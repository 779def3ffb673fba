//! Requests, responses and the records they carry.

use serde::{Deserialize, Serialize};
use std::path::PathBuf;

/// A request with the protocol version it was written for.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct RequestEnvelope {
    /// Protocol version of the sender.
    pub version: u32,
    /// The request.
    pub request: Request,
}

/// A reply: a response or an error.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "snake_case")]
pub enum Reply {
    /// Success.
    Ok(Response),
    /// Failure.
    Err(ErrorReply),
    /// Success with a warning the user must see (e.g. the change could not be recorded).
    Warned {
        /// The response.
        response: Response,
        /// What went wrong besides.
        warning: String,
    },
}

/// A failure, with the errno the kernel would return.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct ErrorReply {
    /// errno value.
    pub errno: i32,
    /// Symbolic errno (`EBUSY`).
    pub errno_name: String,
    /// Message naming the problem.
    pub message: String,
}

/// Which kind of export.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case", tag = "kind")]
pub enum ExportKind {
    /// NBD export (on the daemon's Unix socket and TCP listener).
    Nbd {
        /// Export name (defaults to the device name).
        name: Option<String>,
        /// Also served over plain TCP when udmd runs with `--nbd-insecure-tcp` (otherwise TCP
        /// clients need TLS). Recorded with the export so restarts keep it.
        #[serde(default)]
        insecure_tcp: bool,
        /// Dirty bitmaps offered as `qemu:dirty-bitmap:NAME` metadata contexts.
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        bitmaps: Vec<BitmapSpec>,
    },
    /// FUSE file `DIR/DEV`.
    Fuse {
        /// Directory to mount on.
        dir: PathBuf,
    },
    /// ublk block device `/dev/ublkbN`.
    Ublk {
        /// Device id N. Given by the user or, once the export runs, the id the driver chose:
        /// recorded so that a restart brings back the same `/dev/ublkbN`.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        id: Option<u32>,
        /// Hardware queues (default: one per CPU).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        queues: Option<u16>,
        /// Requests in flight per queue (default 64).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        depth: Option<u16>,
    },
    /// vhost-user-blk socket a VMM attaches to a VM as a virtio-blk disk.
    VhostUser {
        /// Socket path (absolute).
        socket: PathBuf,
        /// Virtqueues offered to the guest.
        #[serde(default = "one_queue")]
        num_queues: u16,
    },
}

/// A dirty bitmap an NBD export serves: `qemu:dirty-bitmap:NAME`, read from FILE (the format of
/// [`udm_types::DirtyBitmap`]; `udm backup` writes it) when the export starts.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct BitmapSpec {
    /// NAME (libvirt's convention for backups: `backup-<DEV>`).
    pub name: String,
    /// The bitmap file (absolute).
    pub file: PathBuf,
}

fn one_queue() -> u16 {
    1
}

/// Every control operation.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "snake_case", tag = "op")]
pub enum Request {
    /// Versions of daemon, protocol and target interface.
    Version,
    /// Add a disk.
    DiskAdd {
        /// Name.
        name: String,
        /// Backing file or block device.
        path: PathBuf,
        /// Create/extend the file to this many bytes first.
        create: Option<u64>,
        /// Read-only.
        read_only: bool,
        /// O_DIRECT.
        direct: bool,
    },
    /// Remove a disk.
    DiskRemove {
        /// Name.
        name: String,
    },
    /// List disks.
    DiskList,
    /// Try again to open unavailable disks (all, or one device) and to bring back what depends
    /// on them (tables, exports).
    DiskRetry {
        /// Name (a disk or mapped device), or every unavailable device.
        name: Option<String>,
    },
    /// Create a mapped device (and load + resume a table if given).
    Create {
        /// Name.
        name: String,
        /// UUID.
        uuid: Option<String>,
        /// Table text; `None` = `--notable`.
        table: Option<String>,
        /// `-r`.
        read_only: bool,
        /// `--interpose`.
        interpose: bool,
        /// Freeze this mount point around the interposer attach.
        freeze: Option<PathBuf>,
    },
    /// Load a table into the inactive slot.
    Load {
        /// Name.
        name: String,
        /// Table text.
        table: String,
        /// `-r`.
        read_only: bool,
        /// `--interpose`.
        interpose: bool,
    },
    /// Resume.
    Resume {
        /// Name.
        name: String,
        /// Freeze this mount point around an interposer switch.
        freeze: Option<PathBuf>,
    },
    /// Suspend.
    Suspend {
        /// Name.
        name: String,
        /// `--noflush`.
        noflush: bool,
        /// `--nolockfs`.
        nolockfs: bool,
    },
    /// Destroy the inactive table.
    Clear {
        /// Name.
        name: String,
    },
    /// Remove a mapped device.
    Remove {
        /// Name.
        name: String,
        /// `-f`.
        force: bool,
        /// `--deferred`.
        deferred: bool,
    },
    /// Rename, or set the uuid.
    Rename {
        /// Name.
        name: String,
        /// New name.
        new_name: Option<String>,
        /// `--setuuid`.
        set_uuid: Option<String>,
    },
    /// Info of one device or of all (`None`).
    Info {
        /// Name.
        name: Option<String>,
    },
    /// Every device with its dependencies (`ls`, `ls --tree`).
    List,
    /// Table lines.
    Table {
        /// Name, or all.
        name: Option<String>,
        /// `--inactive`.
        inactive: bool,
        /// `--concise`: one string in the syntax of the kernel's `dm-mod.create=`.
        concise: bool,
    },
    /// Status lines.
    Status {
        /// Name, or all.
        name: Option<String>,
        /// `--inactive`.
        inactive: bool,
    },
    /// Dependencies.
    Deps {
        /// Name, or all.
        name: Option<String>,
        /// `--inactive`.
        inactive: bool,
    },
    /// Message to a target (or `@` message to the core).
    Message {
        /// Name.
        name: String,
        /// Sector selecting the target.
        sector: u64,
        /// Message words.
        message: Vec<String>,
    },
    /// Registered targets.
    Targets,
    /// Wait for an event number different from `event_nr`.
    Wait {
        /// Name.
        name: String,
        /// Last seen event number.
        event_nr: u32,
        /// Give up after this many milliseconds (`None` = wait forever).
        timeout_ms: Option<u64>,
    },
    /// Look a device name up by uuid (`-u`).
    NameByUuid {
        /// UUID.
        uuid: String,
    },
    /// Add an export.
    ExportAdd {
        /// Device.
        device: String,
        /// Kind.
        export: ExportKind,
        /// Read-only export.
        read_only: bool,
    },
    /// Remove an export by id (`nbd:NAME`, `fuse:DIR/DEV`, `ublk:DEV`, `vhost-user:SOCKET`).
    ExportRemove {
        /// Export id as listed.
        id: String,
    },
    /// List exports.
    ExportList,
}

/// A partition of a disk.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct PartitionRecord {
    /// Name.
    pub name: String,
    /// `major:minor`.
    pub dev: String,
    /// Partition number.
    pub number: u32,
    /// First sector.
    pub start: u64,
    /// Sectors.
    pub sectors: u64,
}

/// A disk.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct DiskRecord {
    /// Name.
    pub name: String,
    /// `major:minor`.
    pub dev: String,
    /// Backing path.
    pub path: Option<PathBuf>,
    /// Size in sectors.
    pub sectors: u64,
    /// Read-only.
    pub read_only: bool,
    /// O_DIRECT.
    pub direct: bool,
    /// Partitions.
    pub partitions: Vec<PartitionRecord>,
    /// Holders (tables, exports).
    pub holders: Vec<String>,
    /// Why the disk is unavailable (its backing file cannot be opened); `null` when available.
    #[serde(default)]
    pub unavailable: Option<String>,
    /// Opened on demand because a table names its path.
    #[serde(default)]
    pub implicit: bool,
}

/// An interposer.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct InterposerRecord {
    /// Interposed device.
    pub device: String,
    /// Its `major:minor`.
    pub dev: String,
    /// First sector.
    pub start: u64,
    /// Sectors.
    pub len: u64,
    /// Attached now.
    pub attached: bool,
}

/// `info` of one mapped device.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct InfoRecord {
    /// Name.
    pub name: String,
    /// UUID.
    pub uuid: Option<String>,
    /// Major.
    pub major: u32,
    /// Minor.
    pub minor: u32,
    /// Suspended.
    pub suspended: bool,
    /// Read-only.
    pub read_only: bool,
    /// Live table present.
    pub live_present: bool,
    /// Inactive table present.
    pub inactive_present: bool,
    /// Open count.
    pub open_count: i32,
    /// Event number.
    pub event_nr: u32,
    /// Targets in the live table.
    pub target_count: u32,
    /// Deferred removal pending.
    pub deferred_remove: bool,
    /// Size in sectors.
    pub sectors: u64,
    /// Live table loaded with `--interpose`.
    pub interposed: bool,
    /// Interposers.
    pub interposers: Vec<InterposerRecord>,
    /// Requests redirected into this device by its interposers.
    pub redirected: u64,
    /// Why recorded tables could not be rebuilt (a device they name is unavailable); `null`
    /// when the device is complete.
    #[serde(default)]
    pub unavailable: Option<String>,
    /// No table was ever loaded, so (as in the kernel) there is no block device yet: `info`
    /// has no read-ahead and the device has no `dm-N` name.
    #[serde(default)]
    pub no_block_device: bool,
}

/// Kind of device in `List`.
#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum DeviceKindRecord {
    /// Disk.
    Disk,
    /// Partition.
    Partition,
    /// Mapped device.
    Mapped,
}

/// A device in `List`.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct DeviceRecord {
    /// Name.
    pub name: String,
    /// Major.
    pub major: u32,
    /// Minor.
    pub minor: u32,
    /// Kind.
    pub kind: DeviceKindRecord,
    /// `major:minor` of the devices it uses.
    pub deps: Vec<String>,
    /// `major:minor` of the devices it interposes.
    pub interposes: Vec<String>,
    /// Why the device is unavailable; `null` when available.
    #[serde(default)]
    pub unavailable: Option<String>,
    /// A mapped device without a block device yet (see [`InfoRecord::no_block_device`]).
    #[serde(default)]
    pub no_block_device: bool,
}

/// One table or status line: udm-table's line type, whose JSON is `{"start", "len",
/// "target_type", "params"}` on the wire.
pub use udm_table::TableLine;

/// Lines of one device.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct DeviceLines {
    /// Device name.
    pub name: String,
    /// Lines.
    pub lines: Vec<TableLine>,
}

/// Dependency of a device.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct DepRecord {
    /// Major.
    pub major: u32,
    /// Minor.
    pub minor: u32,
    /// Name.
    pub name: String,
}

/// Deps of one device.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct DeviceDeps {
    /// Device name.
    pub name: String,
    /// Dependencies.
    pub deps: Vec<DepRecord>,
}

/// A registered target type.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct TargetRecord {
    /// Name.
    pub name: String,
    /// Version.
    pub version: [u32; 3],
}

/// An export.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct ExportRecord {
    /// Id (`nbd:NAME`, `fuse:DIR/DEV`, `ublk:DEV`).
    pub id: String,
    /// Exported device.
    pub device: String,
    /// Kind (`nbd`, `fuse`, `ublk`).
    pub kind: String,
    /// Where clients connect (NBD URI, file path, /dev/ublkbN).
    pub location: String,
    /// Read-only.
    pub read_only: bool,
    /// Connected clients / open handles.
    pub clients: u64,
    /// Requests served.
    pub requests: u64,
    /// Requests that failed.
    pub errors: u64,
    /// Bytes read by clients.
    pub bytes_read: u64,
    /// Bytes written by clients.
    pub bytes_written: u64,
    /// Why the export is not served now (its device is unavailable); it is kept and started
    /// when the device comes back. `null` when served.
    #[serde(default)]
    pub unavailable: Option<String>,
}

/// Versions.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct VersionRecord {
    /// udm package version.
    pub daemon: String,
    /// Protocol version.
    pub protocol: u32,
    /// dm ioctl interface version udm's semantics follow.
    pub dm_interface: String,
}

/// Every successful reply.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "snake_case", tag = "type", content = "data")]
pub enum Response {
    /// Done, nothing to report.
    Done,
    /// A message produced output.
    MessageOutput(Option<String>),
    /// Versions.
    Version(VersionRecord),
    /// Disks.
    Disks(Vec<DiskRecord>),
    /// Info records.
    Info(Vec<InfoRecord>),
    /// Devices.
    Devices(Vec<DeviceRecord>),
    /// Table or status lines.
    Lines(Vec<DeviceLines>),
    /// Deps.
    Deps(Vec<DeviceDeps>),
    /// Targets.
    Targets(Vec<TargetRecord>),
    /// Event number after a wait.
    Event(u32),
    /// A name.
    Name(String),
    /// Exports.
    Exports(Vec<ExportRecord>),
    /// `table --concise` output.
    Concise(String),
}
