//! A backup directory, as files a storage engineer can read with standard tools:
//! - `backup.json`, the manifest: the device, its size, the cluster size, one record per point;
//! - `point-N.qcow2`: point N, a qcow2 image whose backing file is `point-(N-1).qcow2` (point 0,
//!   the full backup, has none), so `qemu-img convert point-N.qcow2` reads the device as of N;
//! - `point-N.sums`: the crc32c of every cluster of the device as of point N (`verify`);
//! - while a backup runs, `partial.json` (what a resumed run needs) and `point-N.qcow2.part`.
//!
//! Every file is written to a temporary name, synced and renamed, so an interruption leaves
//! either the old or the new version.

use crate::error::CliError;
use serde::{Deserialize, Serialize};
use std::io::Write;
use std::path::{Path, PathBuf};
use udm_types::Errno;

/// The manifest's name.
pub const MANIFEST: &str = "backup.json";
/// The in-progress record's name.
pub const PARTIAL: &str = "partial.json";
/// Manifest format version.
pub const FORMAT: u32 = 1;

pub(super) fn err(errno: Errno, message: String) -> CliError {
    CliError::Workflow { errno, message }
}

pub(super) fn io_err(what: &str, path: &Path, e: &std::io::Error) -> CliError {
    err(Errno::from_io(e), format!("{what} {}: {e}", path.display()))
}

/// Full or incremental.
#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum Kind {
    /// Every cluster of the device.
    Full,
    /// The clusters tracking marked changed since the previous point.
    Incremental,
}

/// One backup point as the manifest records it.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct Point {
    /// Its number (0 = the full backup).
    pub n: u32,
    /// Full or incremental.
    pub kind: Kind,
    /// The image file, relative to the directory.
    pub file: String,
    /// When the snapshot was taken (seconds since the epoch).
    pub created: u64,
    /// The run of tracking the point belongs to (`udm track start` makes a new one).
    pub tracking_id: Option<String>,
    /// The era writes went to just before this point's snapshot: the next incremental copies
    /// the blocks written in this era or later.
    pub next_era: Option<u32>,
    /// Bytes tracking marked changed (a full backup: the device size).
    pub changed_bytes: u64,
    /// Bytes stored as data.
    pub data_bytes: u64,
    /// Bytes stored as zero clusters (read as zeros: discarded or never written).
    pub zero_bytes: u64,
    /// Size of the image file.
    pub image_bytes: u64,
    /// crc32c of the point's sums: a fingerprint of the device's content at this point.
    pub digest: String,
    /// How long the copy took.
    pub seconds: f64,
}

/// `backup.json`.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct Manifest {
    /// Format version.
    pub format: u32,
    /// The device backed up.
    pub device: String,
    /// Its size in bytes.
    pub size: u64,
    /// qcow2 cluster size of every point.
    pub cluster_size: u64,
    /// The points, oldest first.
    pub points: Vec<Point>,
}

/// Writes `bytes` to `path` durably: a temporary file, fsync, rename, fsync of the directory.
pub(super) fn write_atomic(path: &Path, bytes: &[u8]) -> Result<(), CliError> {
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    let tmp = PathBuf::from(tmp);
    let w = |e: std::io::Error| io_err("cannot write", path, &e);
    let mut f = std::fs::File::create(&tmp).map_err(w)?;
    f.write_all(bytes).map_err(w)?;
    f.sync_all().map_err(w)?;
    std::fs::rename(&tmp, path).map_err(w)?;
    sync_dir(path)
}

/// Syncs the directory holding `path`, so a rename in it survives a power cut.
pub(super) fn sync_dir(path: &Path) -> Result<(), CliError> {
    let dir = path.parent().unwrap_or(Path::new("."));
    std::fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| io_err("cannot sync", dir, &e))
}

fn read_json<T: for<'de> Deserialize<'de>>(path: &Path) -> Result<Option<T>, CliError> {
    let b = match std::fs::read(path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(io_err("cannot read", path, &e)),
    };
    serde_json::from_slice(&b)
        .map(Some)
        .map_err(|e| err(Errno::EILSEQ, format!("{} is damaged: {e}", path.display())))
}

impl Manifest {
    /// The manifest of `dir`, if it has one. A newer format or a point file that is missing
    /// is an error naming it (a chain with a hole cannot be restored).
    pub fn load(dir: &Path) -> Result<Option<Manifest>, CliError> {
        let path = dir.join(MANIFEST);
        let Some(m) = read_json::<Manifest>(&path)? else {
            return Ok(None);
        };
        if m.format != FORMAT {
            return Err(err(
                Errno::EINVAL,
                format!(
                    "{}: format {} (this udm reads {FORMAT})",
                    path.display(),
                    m.format
                ),
            ));
        }
        for (i, p) in m.points.iter().enumerate() {
            if p.n as usize != i || p.file.contains('/') {
                return Err(err(
                    Errno::EILSEQ,
                    format!("{}: point {i} is recorded as {:?}", path.display(), p.file),
                ));
            }
        }
        Ok(Some(m))
    }

    /// Writes the manifest durably.
    pub fn save(&self, dir: &Path) -> Result<(), CliError> {
        let b = serde_json::to_vec_pretty(self)
            .map_err(|e| err(Errno::EINVAL, format!("encoding the manifest: {e}")))?;
        write_atomic(&dir.join(MANIFEST), &b)
    }

    /// Point `n`, or the latest; an error naming what exists otherwise.
    pub fn point(&self, n: Option<u32>) -> Result<&Point, CliError> {
        let p = match n {
            Some(n) => self.points.get(n as usize),
            None => self.points.last(),
        };
        p.ok_or_else(|| {
            err(
                Errno::ENOENT,
                match (n, self.points.len()) {
                    (_, 0) => "the backup directory has no point yet".into(),
                    (Some(n), k) => format!("no point {n}: points are 0 to {}", k - 1),
                    (None, _) => "no point".into(),
                },
            )
        })
    }
}

/// The name of point `n`'s image.
pub fn point_file(n: u32) -> String {
    format!("point-{n}.qcow2")
}

/// The name of point `n`'s sums.
pub fn sums_file(n: u32) -> String {
    format!("point-{n}.sums")
}

/// crc32c of every cluster of the device at one point (the last, partial cluster over its
/// bytes within the device).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Sums {
    /// Cluster size in bytes.
    pub cluster_size: u64,
    /// Device size in bytes.
    pub size: u64,
    /// One per cluster.
    pub crcs: Vec<u32>,
}

const SUMS_MAGIC: &[u8; 8] = b"UDMSUMS1";

impl Sums {
    /// The sums of a device of zeros.
    pub fn zeros(size: u64, cluster_size: u64) -> Sums {
        let n = size.div_ceil(cluster_size);
        let mut sums = Sums {
            cluster_size,
            size,
            crcs: vec![0; n as usize],
        };
        let zero = ZeroCrc::new(cluster_size);
        for i in 0..n {
            sums.crcs[i as usize] = zero.of(sums.len_of(i));
        }
        sums
    }

    /// Bytes of cluster `i` within the device.
    pub fn len_of(&self, i: u64) -> u64 {
        self.cluster_size
            .min(self.size.saturating_sub(i * self.cluster_size))
    }

    /// Fingerprint of the whole point (the crc32c of the encoded sums without their own
    /// trailing crc: a crc over data and its crc is a constant).
    pub fn digest(&self) -> String {
        let e = self.encode();
        format!("{:08x}", crc32c::crc32c(&e[..e.len() - 4]))
    }

    fn encode(&self) -> Vec<u8> {
        let mut b = Vec::with_capacity(24 + self.crcs.len() * 4 + 4);
        b.extend_from_slice(SUMS_MAGIC);
        b.extend_from_slice(&self.cluster_size.to_le_bytes());
        b.extend_from_slice(&self.size.to_le_bytes());
        for c in &self.crcs {
            b.extend_from_slice(&c.to_le_bytes());
        }
        let crc = crc32c::crc32c(&b);
        b.extend_from_slice(&crc.to_le_bytes());
        b
    }

    /// Writes the sums durably.
    pub fn save(&self, path: &Path) -> Result<(), CliError> {
        write_atomic(path, &self.encode())
    }

    /// Reads sums; a damaged file is an error naming it.
    pub fn load(path: &Path) -> Result<Sums, CliError> {
        let b = std::fs::read(path).map_err(|e| io_err("cannot read", path, &e))?;
        let bad = |what: &str| {
            err(
                Errno::EILSEQ,
                format!("{} is damaged: {what}", path.display()),
            )
        };
        if b.len() < 28 || &b[..8] != SUMS_MAGIC {
            return Err(bad("not a sums file"));
        }
        let (body, tail) = b.split_at(b.len() - 4);
        if crc32c::crc32c(body).to_le_bytes() != tail {
            return Err(bad("checksum mismatch"));
        }
        let u64_at = |o: usize| {
            let mut a = [0u8; 8];
            a.copy_from_slice(&body[o..o + 8]);
            u64::from_le_bytes(a)
        };
        let (cluster_size, size) = (u64_at(8), u64_at(16));
        if cluster_size == 0 || (body.len() as u64 - 24) / 4 != size.div_ceil(cluster_size) {
            return Err(bad("size and cluster count disagree"));
        }
        let crcs = body[24..]
            .chunks_exact(4)
            .map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect();
        Ok(Sums {
            cluster_size,
            size,
            crcs,
        })
    }
}

/// crc32c of zero clusters, the full cluster's computed once (a mostly empty device has
/// millions of them).
pub struct ZeroCrc {
    cluster: u64,
    full: u32,
}

impl ZeroCrc {
    /// For clusters of `cluster` bytes.
    pub fn new(cluster: u64) -> ZeroCrc {
        ZeroCrc {
            cluster,
            full: crc_zeros(cluster),
        }
    }

    /// crc32c of `len` zero bytes (a cluster, or the device's short last one).
    pub fn of(&self, len: u64) -> u32 {
        if len == self.cluster {
            self.full
        } else {
            crc_zeros(len)
        }
    }
}

/// crc32c of `len` zero bytes.
pub fn crc_zeros(len: u64) -> u32 {
    let block = [0u8; 4096];
    let mut crc = 0u32;
    let mut left = len;
    while left > 0 {
        let n = left.min(4096) as usize;
        crc = crc32c::crc32c_append(crc, &block[..n]);
        left -= n as u64;
    }
    crc
}

/// A run of planned clusters: `count` clusters from `start`, data or zeros.
#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct Run {
    /// First cluster.
    pub start: u64,
    /// Clusters.
    pub count: u64,
    /// Stored as a zero cluster (no data read).
    pub zero: bool,
}

/// `partial.json`: a backup that has not finished. A new run with the same snapshot still
/// present continues from `done` data clusters; otherwise the partial point is discarded.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct Partial {
    /// The point being written.
    pub point: Point,
    /// The snapshot device it reads.
    pub snapshot: String,
    /// Its COW file (deleted with the snapshot).
    pub cow: PathBuf,
    /// The dirty bitmap file given to the export (incremental).
    pub bitmap: Option<PathBuf>,
    /// The clusters to write, in order.
    pub plan: Vec<Run>,
    /// Data clusters written and synced.
    pub done: u64,
}

impl Partial {
    /// The in-progress record of `dir`, if any.
    pub fn load(dir: &Path) -> Result<Option<Partial>, CliError> {
        read_json(&dir.join(PARTIAL))
    }

    /// Records progress durably.
    pub fn save(&self, dir: &Path) -> Result<(), CliError> {
        let b = serde_json::to_vec(self)
            .map_err(|e| err(Errno::EINVAL, format!("encoding the progress record: {e}")))?;
        write_atomic(&dir.join(PARTIAL), &b)
    }

    /// Forgets it.
    pub fn remove(dir: &Path) -> Result<(), CliError> {
        let p = dir.join(PARTIAL);
        match std::fs::remove_file(&p) {
            Ok(()) => sync_dir(&p),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(io_err("cannot remove", &p, &e)),
        }
    }
}

/// An exclusive lock on a backup directory (`DIR/.lock`, flock): two backups of one chain at
/// once would number their points alike.
pub struct DirLock {
    /// Held open: the lock lives as long as the descriptor.
    _file: std::fs::File,
}

impl DirLock {
    /// Takes the lock or says who holds it.
    pub fn take(dir: &Path) -> Result<DirLock, CliError> {
        use std::os::fd::AsRawFd;
        let p = dir.join(".lock");
        let f = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&p)
            .map_err(|e| io_err("cannot open", &p, &e))?;
        // SAFETY: flock on a descriptor this function owns; no memory is passed.
        let r = unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
        if r != 0 {
            return Err(err(
                Errno::EBUSY,
                format!("{} is in use by another udm backup", dir.display()),
            ));
        }
        Ok(DirLock { _file: f })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sums_round_trip_and_refuse_damage() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut s = Sums::zeros(10 * 65536 + 512, 65536);
        assert_eq!(s.crcs.len(), 11);
        assert_eq!(s.len_of(10), 512);
        assert_eq!(s.crcs[10], crc32c::crc32c(&[0u8; 512]));
        assert_eq!(s.crcs[0], crc32c::crc32c(&vec![0u8; 65536]));
        s.crcs[3] = 7;
        let p = dir.path().join("s");
        s.save(&p).expect("save");
        assert_eq!(Sums::load(&p).expect("load"), s);
        let mut b = std::fs::read(&p).expect("read");
        b[30] ^= 1;
        std::fs::write(&p, &b).expect("write");
        assert!(Sums::load(&p).is_err());
    }

    #[test]
    fn manifest_refuses_holes_and_names_points() {
        let dir = tempfile::tempdir().expect("tempdir");
        assert_eq!(Manifest::load(dir.path()).expect("none"), None);
        let pt = |n| Point {
            n,
            kind: Kind::Full,
            file: point_file(n),
            created: 0,
            tracking_id: None,
            next_era: Some(2),
            changed_bytes: 0,
            data_bytes: 0,
            zero_bytes: 0,
            image_bytes: 0,
            digest: String::new(),
            seconds: 0.0,
        };
        let mut m = Manifest {
            format: FORMAT,
            device: "vol".into(),
            size: 1 << 20,
            cluster_size: 65536,
            points: vec![pt(0), pt(1)],
        };
        m.save(dir.path()).expect("save");
        let l = Manifest::load(dir.path()).expect("load").expect("some");
        assert_eq!(l, m);
        assert_eq!(l.point(None).expect("latest").n, 1);
        assert!(l.point(Some(2)).is_err());
        m.points[1].n = 5;
        m.save(dir.path()).expect("save");
        assert!(Manifest::load(dir.path()).is_err());
    }
}
