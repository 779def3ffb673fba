//! `udm track`: change tracking on a device in use, for incremental backup.
//!
//! `start` interposes an `era` target on the device (`era META [interpose]DEV BS`), so every
//! write of the device's clients is recorded in the era metadata (a file added as a udm disk)
//! before it reaches the device; udmd restores the table after a crash and the kernel's format
//! keeps every block that changed, and every write acknowledged and flushed, recorded
//! (DESIGN.md, era). `status` reads the metadata through
//! a metadata snapshot (`take_metadata_snap`, read at the held root, `drop_metadata_snap`), as
//! `era_invalidate --metadata-snapshot` does; `checkpoint` starts a new era (a backup point).

use crate::error::CliError;
use crate::session::Session;
use crate::udm::snapshot::{
    create_interposed, devices, disk_remove, done, lines, parse_reply, remove, size_of, whole_line,
};
use clap::{Args, Subcommand};
use serde::Serialize;
use std::path::{Path, PathBuf};
use udm_proto::{Request, Response};
use udm_table::params::{EraParams, EraStatus};
use udm_types::Errno;

/// `udm track ...`.
#[derive(Debug, Subcommand)]
pub enum TrackCommand {
    /// Start tracking the writes to a device (an interposed era target; clients stay connected).
    #[command(after_help = "Examples:
  udm track start vol
  udm track start vol --meta /srv/vol.era --block-size 64K")]
    Start(StartArgs),
    /// Stop tracking: removes the era device and its metadata disk (the file stays).
    Stop {
        /// The tracked device.
        device: String,
        /// Delete the metadata file too.
        #[arg(long)]
        delete: bool,
    },
    /// Current era, block size, metadata usage and the blocks written since an era.
    Status {
        /// The tracked device.
        device: String,
        /// Count the blocks written in this era or later (default 1: since tracking started).
        #[arg(long, value_name = "ERA", default_value_t = 1)]
        since: u32,
    },
    /// Start a new era (a backup point) and print it.
    Checkpoint {
        /// The tracked device.
        device: String,
    },
}

/// `udm track start`.
#[derive(Debug, Args)]
pub struct StartArgs {
    /// Device to track (a udm disk, partition or mapped device; may be exported and in use).
    pub device: String,
    /// Era metadata file (default: STATE_DIR/track/DEVICE.era; created when missing).
    #[arg(long, value_name = "FILE")]
    pub meta: Option<PathBuf>,
    /// Tracking granularity (a multiple of 4K).
    #[arg(long, value_name = "SIZE", default_value = "64K")]
    pub block_size: String,
    /// Name of the era device (default DEVICE-era).
    #[arg(long)]
    pub name: Option<String>,
}

/// A tracked device as `status` reports it.
#[derive(Clone, Debug, Serialize, PartialEq, Eq)]
pub struct TrackInfo {
    /// The tracked device.
    pub device: String,
    /// The interposed era device.
    pub era_device: String,
    /// The metadata disk.
    pub meta_disk: String,
    /// The metadata file.
    pub meta_file: Option<PathBuf>,
    /// Era block size in sectors.
    pub block_sectors: u32,
    /// Era blocks of the device.
    pub nr_blocks: u64,
    /// The era writes go to now.
    pub current_era: u32,
    /// Metadata blocks (4 KiB) in use.
    pub meta_used: u64,
    /// Metadata blocks in all.
    pub meta_total: u64,
    /// The era counted from.
    pub since: u32,
    /// Blocks written in era `since` or later (up to the metadata snapshot `status` took).
    pub written_blocks: u64,
    /// Those blocks as `[start, end)` ranges.
    pub written: Vec<(u64, u64)>,
}

/// The `[start, end)` ranges of the blocks whose era is `since` or later.
pub fn ranges_since(eras: &[u32], since: u32) -> Vec<(u64, u64)> {
    let mut out: Vec<(u64, u64)> = Vec::new();
    for (b, _) in eras.iter().enumerate().filter(|(_, &e)| e >= since) {
        let b = b as u64;
        match out.last_mut() {
            Some(r) if r.1 == b => r.1 = b + 1,
            _ => out.push((b, b + 1)),
        }
    }
    out
}

fn workflow(errno: Errno, message: String) -> CliError {
    CliError::Workflow { errno, message }
}

/// `major:minor` of a disk, partition or mapped device.
pub(crate) fn dev_id(s: &mut Session, dev: &str) -> Result<Option<String>, CliError> {
    if let Some(d) = devices(s)?.into_iter().find(|d| d.name == dev) {
        return Ok(Some(format!("{}:{}", d.major, d.minor)));
    }
    if let Response::Disks(disks) = s.call("disk list", "", Request::DiskList)? {
        for d in disks {
            if d.name == dev {
                return Ok(Some(d.dev));
            }
            if let Some(p) = d.partitions.into_iter().find(|p| p.name == dev) {
                return Ok(Some(p.dev));
            }
        }
    }
    Ok(None)
}

/// The era device interposed on `dev` and its table arguments, if any.
pub(crate) fn tracker(s: &mut Session, dev: &str) -> Result<Option<(String, EraParams)>, CliError> {
    let Some(id) = dev_id(s, dev)? else {
        return Ok(None);
    };
    let candidates: Vec<String> = devices(s)?
        .into_iter()
        .filter(|d| d.interposes.contains(&id))
        .map(|d| d.name)
        .collect();
    for name in candidates {
        for t in lines(s, Some(name.clone()), false)? {
            if let Some(l) = t.lines.iter().find(|l| l.target_type == "era") {
                let p: EraParams = parse_reply(&name, "table", &l.params)?;
                return Ok(Some((name.clone(), p)));
            }
        }
    }
    Ok(None)
}

pub(crate) fn tracked(s: &mut Session, dev: &str) -> Result<(String, EraParams), CliError> {
    if dev_id(s, dev)?.is_none() {
        return Err(workflow(
            Errno::ENXIO,
            format!("device {dev} does not exist (see `udmsetup ls` and `udmsetup disk list`)"),
        ));
    }
    tracker(s, dev)?.ok_or_else(|| {
        workflow(
            Errno::ENOENT,
            format!("{dev} is not tracked; start with `udm track start {dev}`"),
        )
    })
}

/// The metadata file size for `nr_blocks` era blocks. The kernel has no sizing rule for era;
/// this one is generous: 4 MiB plus 16 bytes per block (the era array's 4 bytes and its
/// shadow copy during a commit, and room for dozens of archived 1-bit writesets waiting for
/// the digest). The file is sparse: only what the metadata uses is allocated.
pub fn meta_bytes(nr_blocks: u64) -> u64 {
    ((4 << 20) + nr_blocks * 16).div_ceil(4096) * 4096
}

/// The default metadata file of `dev`: STATE_DIR/track/DEV.era (the CLI's default state
/// directory, udmd's default too; give `--meta` when udmd runs with another `--state-dir`).
pub fn default_meta(dev: &str) -> PathBuf {
    udm_proto::paths::state_dir()
        .join("track")
        .join(format!("{dev}.era"))
}

fn create_meta(path: &Path, bytes: u64) -> Result<(), CliError> {
    let err = |e: std::io::Error| {
        workflow(
            Errno::from_io(&e),
            format!("cannot create {}: {e}", path.display()),
        )
    };
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(err)?;
    }
    let f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(path)
        .map_err(err)?;
    // All zeroes: era formats it at the first resume (K `metadata_open`).
    f.set_len(bytes).map_err(err)
}

fn message(s: &mut Session, name: &str, words: &str) -> Result<(), CliError> {
    done(
        s,
        "message",
        name,
        Request::Message {
            name: name.into(),
            sector: 0,
            message: words.split(' ').map(String::from).collect(),
        },
    )
}

fn era_status(s: &mut Session, name: &str) -> Result<EraStatus, CliError> {
    let st = lines(s, Some(name.into()), true)?;
    let line = st
        .first()
        .and_then(|d| d.lines.iter().find(|l| l.target_type == "era"))
        .map(|l| l.params.clone())
        .unwrap_or_default();
    parse_reply(name, "status", &line)
}

/// `start`: returns the era device's name and the metadata file.
pub fn start(s: &mut Session, a: &StartArgs) -> Result<(String, PathBuf, u32), CliError> {
    let dev = &a.device;
    if dev_id(s, dev)?.is_none() {
        return Err(workflow(
            Errno::ENXIO,
            format!("device {dev} does not exist (see `udmsetup ls` and `udmsetup disk list`)"),
        ));
    }
    if let Some((name, _)) = tracker(s, dev)? {
        return Err(workflow(
            Errno::EEXIST,
            format!("{dev} is tracked already (by {name}); `udm track status {dev}` shows it"),
        ));
    }
    let sectors = size_of(s, dev)?;
    let bs = udm_types::units::parse_size(&a.block_size)
        .filter(|b| *b > 0 && b % 4096 == 0)
        .and_then(|b| u32::try_from(b / 512).ok())
        .ok_or_else(|| {
            workflow(
                Errno::EINVAL,
                format!(
                    "bad --block-size {}: a positive multiple of 4K",
                    a.block_size
                ),
            )
        })?;
    let nr_blocks = sectors.div_ceil(u64::from(bs));
    let name = a.name.clone().unwrap_or_else(|| format!("{dev}-era"));
    let meta_disk = format!("{name}-meta");
    let existing: Vec<String> = devices(s)?.into_iter().map(|d| d.name).collect();
    if existing.contains(&name) {
        return Err(workflow(
            Errno::EEXIST,
            format!("a device named {name} exists already; choose another with --name"),
        ));
    }
    let meta = a.meta.clone().unwrap_or_else(|| default_meta(dev));
    let meta = std::path::absolute(&meta).unwrap_or(meta);
    let created = !meta.exists();
    if created {
        create_meta(&meta, meta_bytes(nr_blocks))?;
    }
    write_tracking_id(&meta)?;
    let forget = |s: &mut Session, added: bool| {
        if added {
            let _ = disk_remove(s, &meta_disk);
        }
        if created {
            let _ = std::fs::remove_file(&meta);
        }
    };
    if let Err(e) = done(
        s,
        "disk add",
        &meta_disk,
        Request::DiskAdd {
            name: meta_disk.clone(),
            path: meta.clone(),
            create: None,
            read_only: false,
            direct: false,
        },
    ) {
        forget(s, false);
        return Err(e);
    }
    let params = EraParams {
        meta: meta_disk.clone(),
        origin: format!("[interpose]{dev}"),
        block_sectors: bs,
    };
    let table = whole_line(sectors, "era", &params);
    if let Err(e) = create_interposed(s, &name, table) {
        forget(s, true);
        return Err(e);
    }
    Ok((name, meta, bs))
}

/// `stop`: removes the era device and its metadata disk; returns the metadata file.
pub fn stop(s: &mut Session, dev: &str, delete: bool) -> Result<Option<PathBuf>, CliError> {
    let (name, p) = tracked(s, dev)?;
    let (meta_disk, path) = meta_of(s, &p.meta)?;
    remove(s, &name)?;
    disk_remove(s, &meta_disk)?;
    if delete {
        if let Some(f) = &path {
            let _ = std::fs::remove_file(id_file(f));
            std::fs::remove_file(f).map_err(|e| {
                workflow(
                    Errno::from_io(&e),
                    format!("cannot delete {}: {e}", f.display()),
                )
            })?;
        }
    }
    Ok(path)
}

/// The metadata disk's name and file from the era table's metadata device (`major:minor`).
pub(crate) fn meta_of(s: &mut Session, meta: &str) -> Result<(String, Option<PathBuf>), CliError> {
    if let Response::Disks(disks) = s.call("disk list", "", Request::DiskList)? {
        if let Some(d) = disks.into_iter().find(|d| d.dev == meta || d.name == meta) {
            return Ok((d.name, d.path));
        }
    }
    Err(workflow(
        Errno::ENODEV,
        format!("the era metadata device {meta} is not a udm disk"),
    ))
}

/// `checkpoint`: the new era.
pub fn checkpoint(s: &mut Session, dev: &str) -> Result<u32, CliError> {
    let (name, _) = tracked(s, dev)?;
    message(s, &name, "checkpoint")?;
    Ok(era_status(s, &name)?.current_era)
}

/// The era of each block in the metadata snapshot whose superblock is at `root`.
fn snapshot_eras(path: &Path, root: u64) -> Result<Vec<u32>, CliError> {
    use udm_pdata::era::{logical_eras, Superblock};
    let bad = |e: udm_pdata::Error| {
        workflow(
            Errno(e.errno()),
            format!("reading the era metadata {}: {e}", path.display()),
        )
    };
    let f = std::fs::File::open(path).map_err(|e| {
        workflow(
            Errno::from_io(&e),
            format!("cannot open {}: {e}", path.display()),
        )
    })?;
    let store = udm_pdata::FileStore::new(f).map_err(bad)?;
    let sb = Superblock::read(&store, root).map_err(bad)?;
    let tm = udm_pdata::tm::Tm::reader(Box::new(store));
    logical_eras(&tm, &sb, false).map_err(bad)
}

/// What a metadata snapshot of a tracked device shows.
pub(crate) struct Eras {
    /// The era device.
    pub era_device: String,
    /// Its table arguments.
    pub params: EraParams,
    /// The metadata disk and file.
    pub meta_disk: String,
    /// The metadata file.
    pub meta_file: PathBuf,
    /// The status after the snapshot was taken (the era writes go to now).
    pub status: EraStatus,
    /// The era of each block (the last era it was written in; 0 = not since tracking began).
    pub eras: Vec<u32>,
}

/// Reads the era of every block of `dev` through a metadata snapshot (taking one starts a new
/// era, as in the kernel); the snapshot is dropped before returning.
pub(crate) fn read_eras(s: &mut Session, dev: &str) -> Result<Eras, CliError> {
    let (name, p) = tracked(s, dev)?;
    let (meta_disk, path) = meta_of(s, &p.meta)?;
    let path = path.ok_or_else(|| {
        workflow(
            Errno::ENODEV,
            format!("the era metadata disk {meta_disk} has no backing file to read"),
        )
    })?;
    if era_status(s, &name)?.held_root.is_some() {
        // Left by an interrupted status: drop it, then take a fresh one.
        message(s, &name, "drop_metadata_snap")?;
    }
    message(s, &name, "take_metadata_snap")?;
    let st = era_status(s, &name)?;
    let eras = match st.held_root {
        Some(root) => snapshot_eras(&path, root),
        None => Err(workflow(
            Errno::EPROTO,
            format!("{name}: no metadata snapshot held after take_metadata_snap"),
        )),
    };
    let dropped = message(s, &name, "drop_metadata_snap");
    let eras = eras?;
    dropped?;
    Ok(Eras {
        era_device: name,
        params: p,
        meta_disk,
        meta_file: path,
        status: st,
        eras,
    })
}

/// `status`: the blocks written in era `since` or later, read through a metadata snapshot.
pub fn status(s: &mut Session, dev: &str, since: u32) -> Result<TrackInfo, CliError> {
    let e = read_eras(s, dev)?;
    Ok(TrackInfo {
        device: dev.into(),
        era_device: e.era_device,
        meta_disk: e.meta_disk,
        meta_file: Some(e.meta_file),
        block_sectors: e.params.block_sectors,
        nr_blocks: e.eras.len() as u64,
        current_era: e.status.current_era,
        meta_used: e.status.used,
        meta_total: e.status.total,
        since,
        written_blocks: e.eras.iter().filter(|&&x| x >= since).count() as u64,
        written: ranges_since(&e.eras, since),
    })
}

/// The file naming one run of tracking of a metadata file: `META.track-id`.
pub fn id_file(meta: &Path) -> PathBuf {
    let mut p = meta.as_os_str().to_owned();
    p.push(".track-id");
    PathBuf::from(p)
}

/// The id of the current run of tracking with metadata `meta`. `start` writes a new one every
/// time, so a backup chain notices that tracking stopped and started again (writes in between
/// were not recorded) even when the metadata file was reused.
pub fn tracking_id(meta: &Path) -> Result<String, CliError> {
    let f = id_file(meta);
    std::fs::read_to_string(&f)
        .map(|t| t.trim().to_string())
        .map_err(|e| {
            workflow(
                Errno::from_io(&e),
                format!(
                    "cannot read the tracking id {}: {e}; restart tracking (`udm track stop` and `start`) and take a full backup",
                    f.display()
                ),
            )
        })
}

fn write_tracking_id(meta: &Path) -> Result<(), CliError> {
    use std::io::{Read, Write};
    let f = id_file(meta);
    let err = |e: std::io::Error| {
        workflow(
            Errno::from_io(&e),
            format!("cannot write {}: {e}", f.display()),
        )
    };
    let mut r = [0u8; 16];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut u| u.read_exact(&mut r))
        .map_err(err)?;
    let id: String = r.iter().map(|b| format!("{b:02x}")).collect();
    let mut o = std::fs::File::create(&f).map_err(err)?;
    o.write_all(format!("{id}\n").as_bytes()).map_err(err)?;
    o.sync_all().map_err(err)
}

/// The human form of `status`.
pub fn format_status(t: &TrackInfo) -> String {
    let pct = |a: u64, b: u64| 100.0 * a as f64 / b.max(1) as f64;
    format!(
        "device:        {}\nera device:    {}\nmetadata:      {} ({})\nblock size:    {} sectors\ncurrent era:   {}\nmetadata used: {}/{} blocks ({:.1}%)\nwritten since era {}: {}/{} blocks ({:.1}%)\n",
        t.device,
        t.era_device,
        t.meta_disk,
        t.meta_file.as_deref().map_or_else(|| "-".into(), |p| p.display().to_string()),
        t.block_sectors,
        t.current_era,
        t.meta_used,
        t.meta_total,
        pct(t.meta_used, t.meta_total),
        t.since,
        t.written_blocks,
        t.nr_blocks,
        pct(t.written_blocks, t.nr_blocks),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_table_is_built_from_the_types() {
        let p = EraParams {
            meta: "vol-era-meta".into(),
            origin: "[interpose]vol".into(),
            block_sectors: 128,
        };
        assert_eq!(
            whole_line(2048, "era", &p),
            "0 2048 era vol-era-meta [interpose]vol 128"
        );
    }

    #[test]
    fn ranges() {
        assert_eq!(
            ranges_since(&[0, 2, 3, 1, 2, 0, 5], 2),
            vec![(1, 3), (4, 5), (6, 7)]
        );
        assert_eq!(ranges_since(&[0, 0], 1), vec![]);
    }

    #[test]
    fn metadata_is_sized_generously() {
        assert_eq!(meta_bytes(0), 4 << 20);
        // 1 TiB in 64 KiB blocks: 16 Mi blocks, 256 MiB + 4 MiB.
        assert_eq!(meta_bytes(16 << 20), (4 << 20) + (256 << 20));
        assert_eq!(meta_bytes(1) % 4096, 0);
    }
}
