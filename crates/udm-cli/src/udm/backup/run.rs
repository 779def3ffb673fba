//! `udm backup full|incremental`: a point of a device in use.
//!
//! Order, and why it never under-reports: (1) `checkpoint` the era target, so writes from now
//! on are in era C or later; (2) take the live snapshot (optionally frozen): the point in time;
//! (3) read the eras through a metadata snapshot: every block written since the previous
//! point's snapshot has an era at least the previous point's C (writes between its checkpoint
//! and its snapshot are copied twice, which is allowed); (4) write the changed blocks as a
//! dirty bitmap file and export the snapshot over NBD with it as `qemu:dirty-bitmap:backup-DEV`
//! (what any backup tool would read); (5) read the bitmap and `base:allocation` back over NBD,
//! plan the clusters (zero ranges become zero clusters: a discard makes the next point smaller,
//! not larger), copy them into `point-N.qcow2` (backing: the previous point); (6) record the
//! point with C, drop the snapshot. Progress is recorded every few seconds in `partial.json`,
//! so the same command run again after an interruption continues where it stopped.

use super::chain::{
    err, io_err, point_file, sums_file, sync_dir, DirLock, Kind, Manifest, Partial, Point, Sums,
    FORMAT,
};
use super::copy::{copy, plan};
use super::nbd::NbdDev;
use super::Progress;
use crate::error::CliError;
use crate::session::Session;
use crate::udm::snapshot::{self, devices, size_of, TakeArgs};
use crate::udm::track::{self, StartArgs};
use clap::Args;
use std::path::{Path, PathBuf};
use std::time::{Instant, SystemTime, UNIX_EPOCH};
use udm_proto::BitmapSpec;
use udm_types::{DirtyBitmap, Errno};

/// qcow2 cluster size of every point.
pub const CLUSTER_BITS: u32 = 16;

/// `udm backup full|incremental`.
#[derive(Debug, Args, Clone)]
pub struct RunArgs {
    /// The device to back up (a udm disk, partition or mapped device; may be in use).
    pub device: String,
    /// The backup directory (created when missing).
    #[arg(long, value_name = "DIR")]
    pub to: PathBuf,
    /// Freeze the filesystem mounted here around the snapshot.
    #[arg(long, value_name = "MOUNTPOINT")]
    pub freeze: Option<PathBuf>,
    /// Size of the snapshot's COW file: room for the writes made while the backup copies
    /// (default: a tenth of the device, at least 64M).
    #[arg(long, value_name = "SIZE")]
    pub cow_size: Option<String>,
    /// Leave the snapshot (read-only NBD export `DEV-backup`) in place after the copy, for
    /// inspection; drop it with `udm snapshot drop DEV-backup`.
    #[arg(long)]
    pub keep_snapshot: bool,
    /// `full`: do not start change tracking (the next backup must be full too).
    #[arg(long)]
    pub no_track: bool,
    /// `incremental`: take a full backup when an incremental is impossible (no tracking, no
    /// previous point, tracking restarted), instead of failing.
    #[arg(long)]
    pub auto: bool,
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// A tracked device's era device, tracking id and the bytes its era table covers.
pub(super) struct Tracked {
    era_device: String,
    id: String,
    covers: u64,
}

/// Why an incremental cannot be taken (errno and what to do), or the era to copy from.
fn incremental_refusal(
    m: Option<&Manifest>,
    dev: &str,
    tracked: Option<&Tracked>,
    size: u64,
) -> Result<u32, (Errno, String)> {
    let Some(t) = tracked else {
        return Err((Errno::ENOENT, format!(
            "{dev} is not tracked, so what changed is unknown: start tracking with `udm track start {dev}` and take a full backup (`udm backup full {dev} --to DIR`), or give --auto"
        )));
    };
    let Some((m, last)) = m.and_then(|m| m.points.last().map(|p| (m, p))) else {
        return Err((Errno::ENOENT, "the backup directory has no full backup to build on: take one with `udm backup full`, or give --auto".into()));
    };
    if m.size != size || t.covers != size {
        return Err((Errno::EINVAL, format!(
            "{dev} is {size} bytes now, {} at point {} (tracking covers {}): a size change needs a full backup, or give --auto",
            m.size, last.n, t.covers
        )));
    }
    if last.tracking_id.as_deref() != Some(t.id.as_str()) {
        return Err((Errno::ENOENT, format!(
            "tracking of {dev} was restarted since point {} (writes in between were not recorded): take a full backup, or give --auto",
            last.n
        )));
    }
    last.next_era.ok_or_else(|| {
        (
            Errno::ENOENT,
            format!(
                "point {} was taken without tracking: take a full backup",
                last.n
            ),
        )
    })
}

/// The tracking of `dev`, if tracked.
fn tracking(s: &mut Session, dev: &str) -> Result<Option<Tracked>, CliError> {
    let Some((name, p)) = track::tracker(s, dev)? else {
        return Ok(None);
    };
    let (_, file) = track::meta_of(s, &p.meta)?;
    let file = file.ok_or_else(|| {
        err(
            Errno::ENODEV,
            format!("the era metadata of {dev} has no backing file"),
        )
    })?;
    Ok(Some(Tracked {
        covers: size_of(s, &name)?.saturating_mul(512),
        era_device: name,
        id: track::tracking_id(&file)?,
    }))
}

/// Runs one backup; returns the point recorded.
pub fn run(
    s: &mut Session,
    requested: Kind,
    a: &RunArgs,
    progress: &mut dyn FnMut(Progress),
) -> Result<Point, CliError> {
    let dir = &a.to;
    std::fs::create_dir_all(dir).map_err(|e| io_err("cannot create", dir, &e))?;
    let _lock = DirLock::take(dir)?;
    let dev = a.device.as_str();
    let size = size_of(s, dev)?.saturating_mul(512);
    let manifest = Manifest::load(dir)?;
    if let Some(m) = &manifest {
        if m.device != dev {
            return Err(err(
                Errno::EINVAL,
                format!("{} holds backups of {}, not {dev}", dir.display(), m.device),
            ));
        }
    }
    if let Some(p) = Partial::load(dir)? {
        if let Some(point) = resume(s, dir, manifest.as_ref(), &p, a, requested, progress)? {
            return Ok(point);
        }
    }
    let mut tracked = tracking(s, dev)?;
    let mut kind = requested;
    let mut since = None;
    if kind == Kind::Incremental {
        match incremental_refusal(manifest.as_ref(), dev, tracked.as_ref(), size) {
            Ok(era) => since = Some(era),
            Err((_, why)) if a.auto => {
                progress(Progress::Note(format!(
                    "{why}; taking a full backup (--auto)"
                )));
                kind = Kind::Full;
            }
            Err((errno, why)) => return Err(err(errno, why)),
        }
    }
    if kind == Kind::Full && tracked.as_ref().is_some_and(|t| t.covers != size) {
        // Tracking made for another size: start it again over the whole device.
        track::stop(s, dev, false)?;
        progress(Progress::Note(format!(
            "{dev} changed size: change tracking restarts"
        )));
        tracked = None;
    }
    if kind == Kind::Full && !a.no_track && tracked.is_none() {
        track::start(
            s,
            &StartArgs {
                device: dev.into(),
                meta: None,
                block_size: "64K".into(),
                name: None,
            },
        )?;
        progress(Progress::Note(format!("started change tracking of {dev}")));
        tracked = tracking(s, dev)?;
    }
    let n = manifest.as_ref().map_or(0, |m| m.points.len() as u32);
    // (1) The era of writes from now on.
    let next_era = match &tracked {
        Some(_) => Some(track::checkpoint(s, dev)?),
        None => None,
    };
    // (2) The snapshot: of the era device when tracked (it interposes the device; the
    // snapshot-origin interposes it in turn), else of the device.
    let snap_of = tracked
        .as_ref()
        .map_or(dev.to_string(), |t| t.era_device.clone());
    let snap_name = format!("{dev}-backup");
    if devices(s)?.iter().any(|d| d.name == snap_name) {
        return Err(err(
            Errno::EEXIST,
            format!("a device named {snap_name} exists (a kept backup snapshot?): drop it with `udm snapshot drop {snap_name}`"),
        ));
    }
    let cow = dir.join(format!(".cow-{n}"));
    let _ = std::fs::remove_file(&cow);
    let cow_bytes = match &a.cow_size {
        Some(c) => c.clone(),
        None => format!("{}", (size / 10).max(64 << 20).div_ceil(4096) * 4096),
    };
    let created = now();
    snapshot::take(
        s,
        &TakeArgs {
            device: snap_of,
            cow: cow.clone(),
            size: Some(cow_bytes),
            chunk: 8,
            name: Some(snap_name.clone()),
            store: "P".into(),
            freeze: a.freeze.clone(),
            export: None,
            fuse_dir: None,
        },
    )?;
    progress(Progress::Note(format!("snapshot {snap_name} taken")));
    // Anything failing before the progress record is saved leaves nothing behind: no resume
    // would find this snapshot, so it is dropped here.
    let prepared = prepare(
        s,
        dir,
        dev,
        kind,
        n,
        size,
        since,
        snap_name.clone(),
        cow.clone(),
    );
    let prepared = prepared.and_then(|(mut p, mut nbd)| {
        p.point.created = created;
        p.point.tracking_id = tracked.as_ref().map(|t| t.id.clone());
        p.point.next_era = next_era;
        p.plan = plan(&mut nbd, kind, CLUSTER_BITS)?;
        p.save(dir)?;
        Ok((initial_sums(dir, kind, n, size)?, p, nbd))
    });
    let (sums, partial, nbd) = match prepared {
        Ok(x) => x,
        Err(e) => {
            let _ = snapshot::drop_snapshot(s, &snap_name);
            let _ = std::fs::remove_file(&cow);
            let _ = std::fs::remove_file(dir.join(format!(".bitmap-{n}")));
            let _ = Partial::remove(dir);
            return Err(e);
        }
    };
    finish(
        s,
        dir,
        manifest,
        partial,
        nbd,
        sums,
        a.keep_snapshot,
        progress,
    )
}

/// Steps (3) and (4): the changed blocks as a bitmap file (incremental), and the snapshot
/// exported over NBD with it.
#[allow(clippy::too_many_arguments)]
fn prepare(
    s: &mut Session,
    dir: &Path,
    dev: &str,
    kind: Kind,
    n: u32,
    size: u64,
    since: Option<u32>,
    snapshot: String,
    cow: PathBuf,
) -> Result<(Partial, NbdDev), CliError> {
    let mut bitmap = None;
    let mut changed_bytes = size;
    if let Some(since) = since {
        let eras = track::read_eras(s, dev)?;
        let bs = u64::from(eras.params.block_sectors) * 512;
        let mut bm = DirtyBitmap::new(size, bs)
            .map_err(|e| err(Errno::EINVAL, format!("dirty bitmap of {dev}: {e}")))?;
        for (b, _) in eras.eras.iter().enumerate().filter(|(_, &e)| e >= since) {
            bm.set(b as u64);
        }
        changed_bytes = (bm.count() * bs).min(size);
        let f = dir.join(format!(".bitmap-{n}"));
        bm.save(&f)
            .map_err(|e| err(Errno::EIO, format!("saving the dirty bitmap: {e}")))?;
        bitmap = Some(f);
    }
    let partial = Partial {
        point: Point {
            n,
            kind,
            file: point_file(n),
            created: 0,
            tracking_id: None,
            next_era: None,
            changed_bytes,
            data_bytes: 0,
            zero_bytes: 0,
            image_bytes: 0,
            digest: String::new(),
            seconds: 0.0,
        },
        snapshot,
        cow,
        bitmap,
        plan: Vec::new(),
        done: 0,
    };
    let nbd = open_snapshot(s, dev, &partial)?;
    Ok((partial, nbd))
}

/// The sums a point starts from: zeros for a full one, the previous point's for an incremental.
fn initial_sums(dir: &Path, kind: Kind, n: u32, size: u64) -> Result<Sums, CliError> {
    match kind {
        Kind::Full => Ok(Sums::zeros(size, 1 << CLUSTER_BITS)),
        Kind::Incremental => Sums::load(&dir.join(sums_file(n.saturating_sub(1)))),
    }
}

fn open_snapshot(s: &mut Session, dev: &str, p: &Partial) -> Result<NbdDev, CliError> {
    let bitmap = p.bitmap.as_ref().map(|f| BitmapSpec {
        name: format!("backup-{dev}"),
        file: f.clone(),
    });
    NbdDev::open(s, &p.snapshot, &p.snapshot, true, bitmap)
}

/// Continues an interrupted backup when its snapshot is still there and valid; otherwise
/// discards it (returns None: a new backup starts).
#[allow(clippy::too_many_arguments)]
fn resume(
    s: &mut Session,
    dir: &Path,
    manifest: Option<&Manifest>,
    p: &Partial,
    a: &RunArgs,
    requested: Kind,
    progress: &mut dyn FnMut(Progress),
) -> Result<Option<Point>, CliError> {
    if dev_of(p) != a.device {
        return Err(err(
            Errno::EINVAL,
            format!(
                "{} holds an unfinished backup of {}, not {}: finish it with `udm backup {} {} --to {}`",
                dir.display(),
                dev_of(p),
                a.device,
                if p.point.kind == Kind::Full { "full" } else { "incremental" },
                dev_of(p),
                dir.display()
            ),
        ));
    }
    let expected = manifest.map_or(0, |m| m.points.len() as u32);
    let snap_ok = snapshot::list(s)?
        .iter()
        .any(|x| x.name == p.snapshot && x.state == "active");
    // Continue only what was asked for (an unfinished incremental when a full one is asked
    // for is discarded), with its snapshot still valid and exported.
    let wanted = p.point.kind == requested || requested == Kind::Incremental;
    if p.point.n == expected && snap_ok && wanted {
        if let Ok(nbd) = open_snapshot(s, &a.device, p) {
            // Sums are saved with each progress record; before the first one, start afresh.
            let sums = match Sums::load(&dir.join(".partial.sums")) {
                Ok(sums) => Some(sums),
                Err(_) if p.done == 0 => {
                    Some(initial_sums(dir, p.point.kind, p.point.n, nbd.size)?)
                }
                Err(_) => None,
            };
            if let Some(sums) = sums {
                progress(Progress::Note(format!(
                    "resuming point {} after {} data clusters",
                    p.point.n, p.done
                )));
                let m = manifest.cloned();
                return finish(s, dir, m, p.clone(), nbd, sums, a.keep_snapshot, progress)
                    .map(Some);
            }
        }
    }
    progress(Progress::Note(format!(
        "discarding the unfinished point {} (its snapshot or progress record is gone or invalid)",
        p.point.n
    )));
    discard(s, dir, p)?;
    Ok(None)
}

/// Removes what an unfinished point left: export, snapshot, COW, bitmap, partial image.
fn discard(s: &mut Session, dir: &Path, p: &Partial) -> Result<(), CliError> {
    // Dropping the snapshot removes its exports too.
    if snapshot::list(s)?.iter().any(|x| x.name == p.snapshot) {
        snapshot::drop_snapshot(s, &p.snapshot)?;
    }
    let _ = std::fs::remove_file(&p.cow);
    if let Some(b) = &p.bitmap {
        let _ = std::fs::remove_file(b);
    }
    let _ = std::fs::remove_file(dir.join(format!("{}.part", p.point.file)));
    let _ = std::fs::remove_file(dir.join(".partial.sums"));
    Partial::remove(dir)
}

/// Copies, records the point and cleans up.
#[allow(clippy::too_many_arguments)]
fn finish(
    s: &mut Session,
    dir: &Path,
    manifest: Option<Manifest>,
    mut p: Partial,
    mut nbd: NbdDev,
    mut sums: Sums,
    keep: bool,
    progress: &mut dyn FnMut(Progress),
) -> Result<Point, CliError> {
    let started = Instant::now();
    let backing = (p.point.kind == Kind::Incremental).then(|| point_file(p.point.n - 1));
    let stats = copy(dir, &mut p, &mut nbd, &mut sums, backing, progress)?;
    // A snapshot that overflowed while we read it returned errors or, worse, we must not trust
    // what it returned: check it is still valid before recording the point.
    let valid = snapshot::list(s)?
        .iter()
        .any(|x| x.name == p.snapshot && x.state == "active");
    if !valid {
        let _ = std::fs::remove_file(dir.join(&p.point.file));
        let _ = nbd.close(s);
        let _ = discard(s, dir, &p);
        return Err(err(
            Errno::EIO,
            format!(
                "the snapshot {} became invalid during the copy (its COW file was too small for the writes made meanwhile): nothing was recorded; run again with a larger --cow-size",
                p.snapshot
            ),
        ));
    }
    let mut point = p.point.clone();
    point.data_bytes = stats.data_bytes;
    point.zero_bytes = stats.zero_bytes;
    point.image_bytes = stats.image_bytes;
    point.seconds = started.elapsed().as_secs_f64() + stats.earlier_seconds;
    point.digest = sums.digest();
    sums.save(&dir.join(sums_file(point.n)))?;
    let mut m = manifest.unwrap_or(Manifest {
        format: FORMAT,
        device: dev_of(&p),
        size: sums.size,
        cluster_size: sums.cluster_size,
        points: Vec::new(),
    });
    if point.kind == Kind::Full {
        m.size = sums.size;
    }
    m.points.push(point.clone());
    m.save(dir)?;
    let _ = std::fs::remove_file(dir.join(".partial.sums"));
    Partial::remove(dir)?;
    if keep {
        // Disconnect only: the export (with its dirty bitmap) stays for inspection until
        // `udm snapshot drop`; the bitmap file stays with it (udmd reloads it on restart).
        drop(nbd);
    } else {
        nbd.close(s)?;
        snapshot::drop_snapshot(s, &p.snapshot)?;
        let _ = std::fs::remove_file(&p.cow);
        if let Some(b) = &p.bitmap {
            let _ = std::fs::remove_file(b);
        }
    }
    sync_dir(&dir.join(&point.file))?;
    Ok(point)
}

/// The device a partial point belongs to (the snapshot is named DEV-backup).
fn dev_of(p: &Partial) -> String {
    p.snapshot
        .strip_suffix("-backup")
        .unwrap_or(&p.snapshot)
        .to_string()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::udm::backup::chain::{point_file, Point};

    fn manifest(size: u64, id: &str, next_era: Option<u32>) -> Manifest {
        Manifest {
            format: FORMAT,
            device: "vol".into(),
            size,
            cluster_size: 65536,
            points: vec![Point {
                n: 0,
                kind: Kind::Full,
                file: point_file(0),
                created: 0,
                tracking_id: Some(id.into()),
                next_era,
                changed_bytes: size,
                data_bytes: size,
                zero_bytes: 0,
                image_bytes: size,
                digest: String::new(),
                seconds: 0.0,
            }],
        }
    }

    fn tracked(id: &str, covers: u64) -> Tracked {
        Tracked {
            era_device: "vol-era".into(),
            id: id.into(),
            covers,
        }
    }

    #[test]
    fn an_incremental_needs_tracking_a_base_the_same_size_and_the_same_tracking_run() {
        let m = manifest(1 << 20, "a", Some(7));
        let t = tracked("a", 1 << 20);
        assert_eq!(
            incremental_refusal(Some(&m), "vol", Some(&t), 1 << 20),
            Ok(7)
        );
        let errno = |r: Result<u32, (Errno, String)>| r.err().map(|e| e.0);
        assert_eq!(
            errno(incremental_refusal(Some(&m), "vol", None, 1 << 20)),
            Some(Errno::ENOENT)
        );
        assert_eq!(
            errno(incremental_refusal(None, "vol", Some(&t), 1 << 20)),
            Some(Errno::ENOENT)
        );
        assert_eq!(
            errno(incremental_refusal(Some(&m), "vol", Some(&t), 2 << 20)),
            Some(Errno::EINVAL)
        );
        let short = tracked("a", 1 << 19);
        assert_eq!(
            errno(incremental_refusal(Some(&m), "vol", Some(&short), 1 << 20)),
            Some(Errno::EINVAL)
        );
        let other = tracked("b", 1 << 20);
        assert_eq!(
            errno(incremental_refusal(Some(&m), "vol", Some(&other), 1 << 20)),
            Some(Errno::ENOENT)
        );
        let untracked_point = manifest(1 << 20, "a", None);
        assert_eq!(
            errno(incremental_refusal(
                Some(&untracked_point),
                "vol",
                Some(&t),
                1 << 20
            )),
            Some(Errno::ENOENT)
        );
    }
}
