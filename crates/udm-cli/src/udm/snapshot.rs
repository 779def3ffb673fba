//! `udm snapshot`: live snapshots of devices in use, for backup.
//!
//! `take` runs the kernel's LVM sequence on top of an interposer (DESIGN.md): interpose a
//! `snapshot-origin` on the device (attached, passing through), freeze the filesystem if asked,
//! suspend the origin (the point in time: the device's I/O is held), create the snapshot with
//! shared opens, resume the origin (its writes now copy to the snapshot's COW), thaw, and
//! optionally export the snapshot read-only. `merge` hands the COW over to a `snapshot-merge`
//! interposer and follows its progress; `drop` removes the snapshot and, with the last one, the
//! origin interposer — neither interrupts the device's clients.

use crate::error::CliError;
use crate::session::{unexpected, Session};
use clap::{Args, Subcommand};
use serde::Serialize;
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};
use std::time::Duration;
use udm_proto::{DeviceLines, DeviceRecord, ExportKind, Request, Response};
use udm_table::params::{OriginParams, SnapshotParams, SnapshotStatus, StoreKind};
use udm_table::TableLine;

/// `udm snapshot ...`.
#[derive(Debug, Subcommand)]
pub enum SnapshotCommand {
    /// Take a point-in-time snapshot of a device that stays in use.
    #[command(after_help = "Examples:
  udm snapshot take vol --cow /srv/vol.cow --size 1G --export nbd
  udm snapshot take vol --cow /srv/vol.cow --size 1G --freeze /mnt/data --export fuse --fuse-dir /run/udm/snaps")]
    Take(TakeArgs),
    /// List snapshots with their usage and state.
    List,
    /// Show one snapshot (or a merging origin) in detail.
    Status {
        /// Snapshot name (or origin name while merging).
        name: String,
    },
    /// Drop a snapshot; the device's clients are not interrupted.
    Drop {
        /// Snapshot name.
        name: String,
    },
    /// Merge a snapshot back into its origin while the origin stays in use.
    Merge {
        /// Snapshot name.
        name: String,
        /// Start the merge and return (follow it with `udm snapshot status ORIGIN`).
        #[arg(long)]
        no_wait: bool,
    },
}

/// `udm snapshot take`.
#[derive(Debug, Args)]
pub struct TakeArgs {
    /// Device to snapshot (a udm disk, partition or mapped device; may be exported and in use).
    pub device: String,
    /// COW store: a file or block device holding the snapshot's exceptions.
    #[arg(long, value_name = "PATH")]
    pub cow: PathBuf,
    /// Create the COW file with this size (e.g. 1G) when it does not exist. An existing file
    /// or device is reused as a new, empty store (its first 4 KiB are zeroed, as lvcreate
    /// does).
    #[arg(long, value_name = "SIZE")]
    pub size: Option<String>,
    /// Chunk size in sectors (power of two).
    #[arg(long, value_name = "SECTORS", default_value_t = 8)]
    pub chunk: u64,
    /// Snapshot device name (default DEVICE-snap, DEVICE-snap2, ...).
    #[arg(long)]
    pub name: Option<String>,
    /// Store type: P (persistent), PO (persistent, overflow instead of invalidation), N (transient).
    #[arg(long, default_value = "P", value_parser = ["P", "PO", "N"])]
    pub store: String,
    /// Freeze the filesystem mounted here (FIFREEZE/FITHAW) around the point in time.
    #[arg(long, value_name = "MOUNTPOINT")]
    pub freeze: Option<PathBuf>,
    /// Export the snapshot read-only for backup.
    #[arg(long, value_parser = ["nbd", "fuse"])]
    pub export: Option<String>,
    /// Directory for `--export fuse` (default: RUNTIME_DIR/snapshots).
    #[arg(long, value_name = "DIR")]
    pub fuse_dir: Option<PathBuf>,
}

/// One snapshot as listed.
#[derive(Clone, Debug, Serialize, PartialEq, Eq)]
pub struct SnapshotInfo {
    /// Snapshot device.
    pub name: String,
    /// Origin device (the device that stays in use).
    pub origin: String,
    /// The interposing origin device.
    pub origin_interposer: Option<String>,
    /// COW device.
    pub cow: String,
    /// Store type.
    pub store: String,
    /// Chunk size in sectors.
    pub chunk: u64,
    /// Sectors allocated in the COW (header and metadata included).
    pub allocated: Option<u64>,
    /// COW size in sectors.
    pub total: Option<u64>,
    /// `active`, `invalid`, `overflow`, `merging`, `merge failed`.
    pub state: String,
    /// The raw status line.
    pub status: String,
    /// The snapshot's table arguments as udmd prints them (devices by number).
    #[serde(skip)]
    pub params: SnapshotParams,
}

pub(crate) fn lines(
    s: &mut Session,
    name: Option<String>,
    status: bool,
) -> Result<Vec<DeviceLines>, CliError> {
    let req = if status {
        Request::Status {
            name,
            inactive: false,
        }
    } else {
        Request::Table {
            name,
            inactive: false,
            concise: false,
        }
    };
    match s.call(if status { "status" } else { "table" }, "", req)? {
        Response::Lines(l) => Ok(l),
        other => Err(unexpected("table", &other)),
    }
}

pub(crate) fn devices(s: &mut Session) -> Result<Vec<DeviceRecord>, CliError> {
    match s.call("ls", "", Request::List)? {
        Response::Devices(d) => Ok(d),
        other => Err(unexpected("ls", &other)),
    }
}

fn name_of(devs: &[DeviceRecord], id: &str) -> String {
    devs.iter()
        .find(|d| format!("{}:{}", d.major, d.minor) == id)
        .map_or_else(|| id.to_string(), |d| d.name.clone())
}

pub(crate) fn size_of(s: &mut Session, dev: &str) -> Result<u64, CliError> {
    if let Ok(Response::Info(i)) = s.call(
        "info",
        dev,
        Request::Info {
            name: Some(dev.into()),
        },
    ) {
        if let Some(i) = i.first() {
            return Ok(i.sectors);
        }
    }
    if let Response::Disks(disks) = s.call("disk list", "", Request::DiskList)? {
        for d in disks {
            if d.name == dev {
                return Ok(d.sectors);
            }
            if let Some(p) = d.partitions.iter().find(|p| p.name == dev) {
                return Ok(p.sectors);
            }
        }
    }
    Err(CliError::Usage(format!(
        "device {dev} does not exist (see `udmsetup ls` and `udmsetup disk list`)"
    )))
}

pub(crate) fn done(
    s: &mut Session,
    command: &str,
    device: &str,
    req: Request,
) -> Result<(), CliError> {
    s.call(command, device, req).map(|_| ())
}

/// Removes the mapped device `name`.
pub(crate) fn remove(s: &mut Session, name: &str) -> Result<(), CliError> {
    done(
        s,
        "remove",
        name,
        Request::Remove {
            name: name.into(),
            force: false,
            deferred: false,
        },
    )
}

/// Removes the disk `name`.
pub(crate) fn disk_remove(s: &mut Session, name: &str) -> Result<(), CliError> {
    done(
        s,
        "disk remove",
        name,
        Request::DiskRemove { name: name.into() },
    )
}

/// Creates `name` with the interposed `table` (shared opens of the devices it interposes).
pub(crate) fn create_interposed(
    s: &mut Session,
    name: &str,
    table: String,
) -> Result<(), CliError> {
    done(
        s,
        "create",
        name,
        Request::Create {
            name: name.into(),
            uuid: None,
            table: Some(table),
            read_only: false,
            interpose: true,
            freeze: None,
        },
    )
}

/// Loads an interposed table into `device` and makes it live (one quiesced switch).
fn reload(s: &mut Session, device: &str, table: String) -> Result<(), CliError> {
    let load = Request::Load {
        name: device.into(),
        table,
        read_only: false,
        interpose: true,
    };
    done(s, "load", device, load)?;
    done(
        s,
        "resume",
        device,
        Request::Resume {
            name: device.into(),
            freeze: None,
        },
    )
}

/// Every snapshot, with its state.
pub fn list(s: &mut Session) -> Result<Vec<SnapshotInfo>, CliError> {
    let devs = devices(s)?;
    let tables = lines(s, None, false)?;
    let statuses = lines(s, None, true)?;
    let mut out = Vec::new();
    for t in &tables {
        for l in &t.lines {
            let merging = l.target_type == "snapshot-merge";
            if l.target_type != "snapshot" && !merging {
                continue;
            }
            let p: SnapshotParams = parse_reply(&t.name, "table", &l.params)?;
            let status = statuses
                .iter()
                .find(|x| x.name == t.name)
                .and_then(|x| x.lines.iter().find(|y| y.start == l.start))
                .map(|y| y.params.clone());
            let typed = match &status {
                Some(st) => Some(parse_reply::<SnapshotStatus>(&t.name, "status", st)?),
                None => None,
            };
            let (allocated, total) = match typed {
                Some(SnapshotStatus::Usage {
                    allocated, total, ..
                }) => (Some(allocated), Some(total)),
                _ => (None, None),
            };
            let state = match typed {
                Some(SnapshotStatus::Invalid) => "invalid",
                Some(SnapshotStatus::Overflow) => "overflow",
                Some(SnapshotStatus::MergeFailed) => "merge failed",
                _ if merging => "merging",
                _ => "active",
            };
            let origin_interposer = tables
                .iter()
                .find(|o| {
                    o.lines
                        .iter()
                        .any(|x| origin_of(&x.target_type, &x.params) == Some(p.origin.clone()))
                })
                .map(|o| o.name.clone());
            out.push(SnapshotInfo {
                name: t.name.clone(),
                origin: name_of(&devs, &p.origin),
                origin_interposer,
                cow: name_of(&devs, &p.cow),
                store: p.store.to_string(),
                chunk: p.chunk_sectors,
                allocated,
                total,
                state: state.to_string(),
                status: status.unwrap_or_default(),
                params: p,
            });
        }
    }
    Ok(out)
}

/// `what` (a table or status line of `device`) read as `T`; udmd printed it, so a line that
/// does not parse is a reply udm does not understand.
pub(crate) fn parse_reply<T>(device: &str, what: &str, text: &str) -> Result<T, CliError>
where
    T: std::str::FromStr<Err = udm_table::args::ArgError>,
{
    text.parse().map_err(|e| CliError::Unexpected {
        command: format!("{what} {device}"),
        got: format!("{text:?}: {e}"),
    })
}

/// The origin device of a `snapshot-origin` or `snapshot-merge` line, as printed.
fn origin_of(target_type: &str, params: &str) -> Option<String> {
    match target_type {
        "snapshot-origin" => params.parse::<OriginParams>().ok().map(|p| p.dev),
        "snapshot-merge" => params.parse::<SnapshotParams>().ok().map(|p| p.origin),
        _ => None,
    }
}

/// One table line covering `[0, sectors)`.
pub(crate) fn whole_line(
    sectors: u64,
    target_type: &str,
    params: &dyn std::fmt::Display,
) -> String {
    TableLine {
        start: 0,
        len: sectors,
        target_type: target_type.into(),
        params: params.to_string(),
    }
    .to_string()
}

/// The `snapshot-origin` line of `dev`.
fn origin_line(sectors: u64, dev: &str) -> String {
    whole_line(
        sectors,
        "snapshot-origin",
        &OriginParams { dev: dev.into() },
    )
}

/// The human form of `list`.
pub fn format_list(v: &[SnapshotInfo]) -> String {
    if v.is_empty() {
        return "No snapshots\n".into();
    }
    let mut o = format!(
        "{:<16} {:<12} {:<16} {:<5} {:>5} {:>22} {}\n",
        "Name", "Origin", "COW", "Store", "Chunk", "Used (sectors)", "State"
    );
    for s in v {
        let used = match (s.allocated, s.total) {
            (Some(a), Some(t)) if t > 0 => format!("{a}/{t} ({:.1}%)", 100.0 * a as f64 / t as f64),
            _ => "-".into(),
        };
        o.push_str(&format!(
            "{:<16} {:<12} {:<16} {:<5} {:>5} {:>22} {}\n",
            s.name, s.origin, s.cow, s.store, s.chunk, used, s.state
        ));
    }
    o
}

struct Frozen(std::fs::File);

const FIFREEZE: libc::c_ulong = 0xC004_5877;
const FITHAW: libc::c_ulong = 0xC004_5878;

fn freeze(mp: &Path) -> Result<Frozen, CliError> {
    let f = std::fs::File::open(mp)
        .map_err(|e| CliError::Usage(format!("cannot open {}: {e}", mp.display())))?;
    // SAFETY: FIFREEZE takes an ignored int argument; the fd is valid.
    if unsafe { libc::ioctl(f.as_raw_fd(), FIFREEZE as _, 0) } != 0 {
        return Err(CliError::Usage(format!(
            "cannot freeze {}: {}",
            mp.display(),
            std::io::Error::last_os_error()
        )));
    }
    Ok(Frozen(f))
}

impl Drop for Frozen {
    fn drop(&mut self) {
        // SAFETY: FITHAW takes an ignored int argument; the fd is valid.
        if unsafe { libc::ioctl(self.0.as_raw_fd(), FITHAW as _, 0) } != 0 {
            eprintln!("udm: FITHAW failed: {}", std::io::Error::last_os_error());
        }
    }
}

/// Creates the COW file fully allocated, so the snapshot cannot be invalidated halfway by the
/// backing filesystem running out of space (the COW's size is the only limit, as for a COW
/// block device).
fn preallocate(path: &Path, bytes: u64) -> Result<(), CliError> {
    let err = |e: std::io::Error| CliError::Usage(format!("cannot create {}: {e}", path.display()));
    let f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(path)
        .map_err(err)?;
    let len = libc::off_t::try_from(bytes)
        .map_err(|_| CliError::Usage(format!("--size {bytes} is too large")))?;
    // SAFETY: fallocate only reads its integer arguments; the fd is owned by `f`.
    if unsafe { libc::fallocate(f.as_raw_fd(), 0, 0, len) } != 0 {
        // Filesystems without fallocate get a sparse file.
        f.set_len(bytes).map_err(err)?;
    }
    Ok(())
}

/// Bytes zeroed at the start of a reused COW (lvcreate zeroes as much of a new snapshot's COW).
const WIPE_BYTES: u64 = 4096;

/// Discards the store an existing COW file or device may hold by zeroing its header (the first
/// 4 KiB, as lvcreate does for a new snapshot): `take` makes a new point in time, and a
/// persistent store left by an earlier snapshot would otherwise be loaded with its
/// exceptions, which hold the origin's data of that earlier point.
fn wipe_store_header(path: &Path) -> Result<(), CliError> {
    use std::io::{Seek, SeekFrom};
    use std::os::unix::fs::FileExt;
    let err = |e: std::io::Error| {
        CliError::Usage(format!(
            "cannot wipe the old store header of {}: {e}",
            path.display()
        ))
    };
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .open(path)
        .map_err(err)?;
    let len = f.seek(SeekFrom::End(0)).map_err(err)?.min(WIPE_BYTES);
    f.write_all_at(&[0u8; WIPE_BYTES as usize][..len as usize], 0)
        .map_err(err)?;
    f.sync_data().map_err(err)
}

/// `take`: returns the snapshot's name and, when exported, where to reach it.
pub fn take(s: &mut Session, a: &TakeArgs) -> Result<(String, Option<String>), CliError> {
    let dev = &a.device;
    let sectors = size_of(s, dev)?;
    let existing: Vec<String> = devices(s)?.into_iter().map(|d| d.name).collect();
    let name = match &a.name {
        Some(n) => n.clone(),
        None => (1..)
            .map(|i| {
                if i == 1 {
                    format!("{dev}-snap")
                } else {
                    format!("{dev}-snap{i}")
                }
            })
            .find(|n| !existing.contains(n))
            .unwrap_or_else(|| format!("{dev}-snap")),
    };
    if existing.contains(&name) {
        return Err(CliError::Usage(format!(
            "a device named {name} exists already; choose another with --name"
        )));
    }
    let cow_disk = format!("{name}-cow");
    let cow = std::path::absolute(&a.cow).unwrap_or_else(|_| a.cow.clone());
    let reused = cow.exists();
    if !reused {
        let sz = a.size.as_deref().ok_or_else(|| {
            CliError::Usage(format!(
                "{} does not exist: give --size to create it",
                cow.display()
            ))
        })?;
        let bytes = udm_types::units::parse_size(sz)
            .filter(|b| b % 512 == 0 && *b > 0)
            .ok_or_else(|| {
                CliError::Usage(format!("bad --size {sz}: a positive multiple of 512 bytes"))
            })?;
        preallocate(&cow, bytes)?;
    }
    done(
        s,
        "disk add",
        &cow_disk,
        Request::DiskAdd {
            name: cow_disk.clone(),
            path: cow.clone(),
            create: None,
            read_only: false,
            direct: false,
        },
    )?;
    let cleanup_cow = |s: &mut Session| {
        let _ = s.call(
            "disk remove",
            &cow_disk,
            Request::DiskRemove {
                name: cow_disk.clone(),
            },
        );
    };
    // Only now, once udmd has accepted the path (it refuses one it serves already, such as
    // another snapshot's live COW).
    if reused {
        if let Err(e) = wipe_store_header(&cow) {
            cleanup_cow(s);
            return Err(e);
        }
    }
    // The origin interposer: reuse one already on this device.
    let origin = format!("{dev}-origin");
    let have_origin = lines(s, Some(origin.clone()), false)
        .map(|l| {
            l.iter()
                .any(|d| d.lines.iter().any(|x| x.target_type == "snapshot-origin"))
        })
        .unwrap_or(false);
    if !have_origin {
        let table = origin_line(sectors, dev);
        if let Err(e) = create_interposed(s, &origin, table) {
            cleanup_cow(s);
            return Err(e);
        }
    }
    let frozen = match &a.freeze {
        Some(mp) => Some(freeze(mp)?),
        None => None,
    };
    done(
        s,
        "suspend",
        &origin,
        Request::Suspend {
            name: origin.clone(),
            noflush: false,
            nolockfs: true,
        },
    )?;
    let store: StoreKind = a
        .store
        .parse()
        .map_err(|e| CliError::Usage(format!("--store {}: {e}", a.store)))?;
    let params = SnapshotParams {
        origin: dev.clone(),
        cow: cow_disk.clone(),
        store,
        chunk_sectors: a.chunk,
        features: Default::default(),
    };
    let table = whole_line(sectors, "snapshot", &params);
    let created = create_interposed(s, &name, table);
    let resumed = done(
        s,
        "resume",
        &origin,
        Request::Resume {
            name: origin.clone(),
            freeze: None,
        },
    );
    drop(frozen);
    if let Err(e) = created {
        if !have_origin {
            let _ = s.call(
                "remove",
                &origin,
                Request::Remove {
                    name: origin.clone(),
                    force: false,
                    deferred: false,
                },
            );
        }
        cleanup_cow(s);
        return Err(e);
    }
    resumed?;
    let location = match a.export.as_deref() {
        None => None,
        Some(kind) => {
            let export = if kind == "nbd" {
                ExportKind::Nbd {
                    name: None,
                    insecure_tcp: false,
                    bitmaps: Vec::new(),
                }
            } else {
                let dir = a
                    .fuse_dir
                    .clone()
                    .unwrap_or_else(|| udm_proto::paths::runtime_dir().join("snapshots"));
                std::fs::create_dir_all(&dir).map_err(|e| {
                    CliError::Usage(format!("cannot create {}: {e}", dir.display()))
                })?;
                ExportKind::Fuse {
                    dir: std::path::absolute(&dir).unwrap_or(dir),
                }
            };
            match s.call(
                "export add",
                &name,
                Request::ExportAdd {
                    device: name.clone(),
                    export,
                    read_only: true,
                },
            )? {
                Response::Exports(list) => list
                    .into_iter()
                    .find(|e| e.device == name)
                    .map(|e| e.location),
                _ => None,
            }
        }
    };
    Ok((name, location))
}

fn remove_exports_of(s: &mut Session, dev: &str) -> Result<(), CliError> {
    if let Response::Exports(list) = s.call("export list", "", Request::ExportList)? {
        for e in list.into_iter().filter(|e| e.device == dev) {
            done(
                s,
                "export remove",
                &e.id,
                Request::ExportRemove { id: e.id.clone() },
            )?;
        }
    }
    Ok(())
}

fn find(s: &mut Session, name: &str) -> Result<SnapshotInfo, CliError> {
    list(s)?
        .into_iter()
        .find(|x| x.name == name)
        .ok_or_else(|| {
            CliError::Usage(format!(
                "{name} is not a snapshot (see `udm snapshot list`)"
            ))
        })
}

/// `drop`: removes the snapshot, its COW disk, and the origin interposer when it was the last
/// snapshot of that origin.
pub fn drop_snapshot(s: &mut Session, name: &str) -> Result<(), CliError> {
    let snap = find(s, name)?;
    remove_exports_of(s, name)?;
    remove(s, name)?;
    let others = list(s)?
        .into_iter()
        .filter(|x| x.origin == snap.origin)
        .count();
    if others == 0 {
        if let Some(o) = &snap.origin_interposer {
            remove(s, o)?;
        }
    }
    disk_remove(s, &snap.cow)
}

/// Merge progress of the merging origin `origin` (merging `what`): sectors still to merge.
fn merge_left(s: &mut Session, origin: &str, what: &str) -> Result<u64, CliError> {
    let st = lines(s, Some(origin.into()), true)?;
    let line = st
        .first()
        .and_then(|d| d.lines.first())
        .map(|l| l.params.clone())
        .unwrap_or_default();
    match line.parse::<SnapshotStatus>() {
        Ok(SnapshotStatus::Usage {
            allocated,
            metadata,
            ..
        }) => Ok(allocated.saturating_sub(metadata)),
        Ok(SnapshotStatus::MergeFailed) => Err(CliError::Usage(format!("merge of {what} failed"))),
        _ => Err(CliError::Usage(format!("merge of {origin}: {line}"))),
    }
}

/// `merge`: hands the snapshot's COW to a `snapshot-merge` interposer on the origin device and
/// (unless `no_wait`) follows the merge to its end, then detaches.
pub fn merge(
    s: &mut Session,
    name: &str,
    no_wait: bool,
    progress: &mut dyn FnMut(u64, u64),
) -> Result<String, CliError> {
    let snap = find(s, name)?;
    let origin = snap.origin_interposer.clone().ok_or_else(|| {
        CliError::Usage(format!(
            "{name}: its origin has no interposer to merge through"
        ))
    })?;
    let sectors = size_of(s, &snap.origin)?;
    remove_exports_of(s, name)?;
    done(
        s,
        "suspend",
        name,
        Request::Suspend {
            name: name.into(),
            noflush: false,
            nolockfs: true,
        },
    )?;
    let params = SnapshotParams {
        origin: format!("[interpose]{}", snap.origin),
        cow: snap.cow.clone(),
        ..snap.params.clone()
    };
    let table = whole_line(sectors, "snapshot-merge", &params);
    reload(s, &origin, table)?;
    remove(s, name)?;
    if no_wait {
        return Ok(origin);
    }
    let what = format!("{name} into {}", snap.origin);
    let first = merge_left(s, &origin, &what)?;
    loop {
        let left = merge_left(s, &origin, &what)?;
        progress(first.saturating_sub(left), first);
        if left == 0 {
            break;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    // Merged: the origin needs no interposer any more unless other snapshots remain.
    let others = list(s)?
        .into_iter()
        .filter(|x| x.origin == snap.origin && x.name != origin)
        .count();
    if others == 0 {
        remove(s, &origin)?;
    } else {
        let table = origin_line(sectors, &snap.origin);
        reload(s, &origin, table)?;
    }
    disk_remove(s, &snap.cow)?;
    Ok(origin)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_are_built_from_the_types() {
        let p: SnapshotParams = "253:0 253:1 PO 16".parse().unwrap();
        let merge = SnapshotParams {
            origin: "[interpose]vol".into(),
            cow: "vol-snap-cow".into(),
            ..p.clone()
        };
        assert_eq!(
            whole_line(2048, "snapshot-merge", &merge),
            "0 2048 snapshot-merge [interpose]vol vol-snap-cow PO 16"
        );
        assert_eq!(origin_line(2048, "vol"), "0 2048 snapshot-origin vol");
        assert_eq!(origin_of("snapshot-origin", "253:0"), Some("253:0".into()));
        assert_eq!(
            origin_of("snapshot-merge", "253:0 253:1 P 8"),
            Some("253:0".into())
        );
        assert_eq!(origin_of("linear", "253:0 0"), None);
    }

    #[test]
    fn replies_udm_cannot_read_are_errors() {
        let e = parse_reply::<SnapshotParams>("s", "table", "253:0 253:1 P x").unwrap_err();
        assert!(matches!(e, CliError::Unexpected { .. }), "{e}");
        assert!(e.to_string().contains("Invalid chunk size x"), "{e}");
        let st: SnapshotStatus = parse_reply("s", "status", "24/2048 16").unwrap();
        assert_eq!(
            st,
            SnapshotStatus::Usage {
                allocated: 24,
                total: 2048,
                metadata: 16
            }
        );
    }
}
