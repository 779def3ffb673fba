//! `udm backup list|restore|verify`: reading a chain. Every cluster read back is checked
//! against the crc32c recorded when its point was taken, so a restore never writes data that
//! differs from what was backed up without saying so, and `verify` finds damage in any image of
//! the chain without touching a device.

use super::chain::{err, io_err, Manifest, Sums, ZeroCrc};
use super::nbd::{NbdDev, IO_MAX};
use super::Progress;
use crate::error::CliError;
use crate::session::Session;
use crate::udm::track::dev_id;
use clap::Args;
use serde::Serialize;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use udm_qcow2::{Chain, Cluster};
use udm_types::Errno;

/// `udm backup restore`.
#[derive(Debug, Args)]
pub struct RestoreArgs {
    /// The backup directory.
    pub dir: PathBuf,
    /// The point to restore (default: the latest).
    #[arg(long)]
    pub point: Option<u32>,
    /// Where: a file (created), a block device, or a udm device name.
    #[arg(long, value_name = "FILE|DEV")]
    pub to: String,
    /// Overwrite an existing file or device.
    #[arg(long)]
    pub force: bool,
}

/// What `restore` and `verify` report.
#[derive(Debug, Serialize)]
pub struct ReadReport {
    /// The point read.
    pub point: u32,
    /// Where it went (restore), or None (verify).
    pub target: Option<String>,
    /// Device size in bytes.
    pub size: u64,
    /// Clusters checked against their recorded crc32c.
    pub clusters: u64,
    /// Bytes that were data in the chain.
    pub data_bytes: u64,
    /// The point's digest (equal to the manifest's).
    pub digest: String,
}

/// The manifest, point `n`'s sums and chain, checked against each other.
fn open_point(dir: &Path, n: Option<u32>) -> Result<(Manifest, u32, Sums, Chain), CliError> {
    let m = Manifest::load(dir)?.ok_or_else(|| {
        err(
            Errno::ENOENT,
            format!(
                "{} is not a udm backup directory (no backup.json)",
                dir.display()
            ),
        )
    })?;
    let p = m.point(n)?.clone();
    let img = dir.join(&p.file);
    if !img.exists() {
        return Err(err(
            Errno::ENOENT,
            format!("point {} is missing: {} does not exist", p.n, img.display()),
        ));
    }
    let sums = Sums::load(&dir.join(super::chain::sums_file(p.n)))?;
    if sums.digest() != p.digest {
        return Err(err(
            Errno::EILSEQ,
            format!(
                "point {}: its sums have digest {}, the manifest records {}",
                p.n,
                sums.digest(),
                p.digest
            ),
        ));
    }
    let chain = Chain::open(&img).map_err(|e| {
        err(
            Errno(e.errno()),
            format!("point {} ({}): {e}", p.n, img.display()),
        )
    })?;
    if chain.size() != sums.size || sums.cluster_size != m.cluster_size {
        return Err(err(
            Errno::EILSEQ,
            format!(
                "point {}: image of {} bytes, sums of {} bytes in {}-byte clusters",
                p.n,
                chain.size(),
                sums.size,
                sums.cluster_size
            ),
        ));
    }
    Ok((m, p.n, sums, chain))
}

/// Where restored clusters go.
enum Sink {
    /// A file or block device; `fresh` when created empty here (zeros need no write).
    File { f: File, fresh: bool },
    /// A udm device, over NBD.
    Dev(Box<NbdDev>),
}

impl Sink {
    fn write(&mut self, offset: u64, data: &[u8], zero: bool) -> Result<(), CliError> {
        match self {
            Sink::File { fresh: true, .. } if zero => Ok(()),
            Sink::File { f, .. } => f
                .write_all_at(data, offset)
                .map_err(|e| err(Errno::from_io(&e), format!("writing at {offset}: {e}"))),
            Sink::Dev(d) => d.write(offset, data),
        }
    }
}

/// Reads every cluster of the point through its chain, checks its crc32c and hands it on.
fn walk(
    n: u32,
    sums: &Sums,
    chain: &Chain,
    progress: &mut dyn FnMut(Progress),
    mut out: impl FnMut(u64, &[u8], bool) -> Result<(), CliError>,
) -> Result<u64, CliError> {
    let cs = sums.cluster_size;
    let mut buf = vec![0u8; cs as usize];
    let zeros = vec![0u8; cs as usize];
    let zero_crc = ZeroCrc::new(cs);
    let mut data_bytes = 0;
    let step = (IO_MAX / cs).max(1);
    for idx in 0..sums.crcs.len() as u64 {
        let len = sums.len_of(idx) as usize;
        let at =
            |e: udm_qcow2::Error| err(Errno(e.errno()), format!("point {n}, cluster {idx}: {e}"));
        let (zero, src) = match chain.resolve(idx).map_err(at)? {
            Some((i, Cluster::Data { .. })) => {
                chain.images()[i].read_cluster(idx, &mut buf).map_err(at)?;
                data_bytes += len as u64;
                (false, Some(i))
            }
            _ => (true, None),
        };
        let (data, crc) = if zero {
            (&zeros[..len], zero_crc.of(len as u64))
        } else {
            (&buf[..len], crc32c::crc32c(&buf[..len]))
        };
        if crc != sums.crcs[idx as usize] {
            return Err(err(
                Errno::EILSEQ,
                format!(
                    "point {n}: cluster {idx} (offset {}) reads with crc32c {crc:08x}, {:08x} was recorded; it comes from {}",
                    idx * cs,
                    sums.crcs[idx as usize],
                    src.map_or("no image (zeros)".into(), |i| format!("image {} of the chain", i))
                ),
            ));
        }
        out(idx * cs, data, zero)?;
        if idx % step == 0 {
            progress(Progress::Copied {
                done: idx * cs,
                total: sums.size,
            });
        }
    }
    Ok(data_bytes)
}

/// `verify`: every cluster of the point checked; nothing written anywhere.
pub fn verify(
    dir: &Path,
    point: Option<u32>,
    progress: &mut dyn FnMut(Progress),
) -> Result<ReadReport, CliError> {
    let (_, n, sums, chain) = open_point(dir, point)?;
    let data_bytes = walk(n, &sums, &chain, progress, |_, _, _| Ok(()))?;
    Ok(ReadReport {
        point: n,
        target: None,
        size: sums.size,
        clusters: sums.crcs.len() as u64,
        data_bytes,
        digest: sums.digest(),
    })
}

/// `restore`: the point written to a file, block device or udm device.
pub fn restore(
    s: &mut Session,
    a: &RestoreArgs,
    progress: &mut dyn FnMut(Progress),
) -> Result<ReadReport, CliError> {
    let (_, n, sums, chain) = open_point(&a.dir, a.point)?;
    // A bare name that udmd knows (a mapped device, a disk or a partition) is a device; write
    // `./NAME` for a file of that name. Without udmd it is a file.
    let is_dev = !a.to.contains('/') && matches!(dev_id(s, &a.to), Ok(Some(_)));
    let mut sink = if is_dev {
        if !a.force {
            return Err(err(
                Errno::EEXIST,
                format!("{} is a udm device: give --force to overwrite it", a.to),
            ));
        }
        let d = NbdDev::open(s, &a.to, &format!("restore-{}", a.to), false, None)?;
        if d.size < sums.size {
            let size = d.size;
            let _ = d.close(s);
            return Err(err(
                Errno::ENOSPC,
                format!("{} has {size} bytes, the backup {}", a.to, sums.size),
            ));
        }
        Sink::Dev(Box::new(d))
    } else {
        open_file(Path::new(&a.to), sums.size, a.force)?
    };
    let data_bytes = walk(n, &sums, &chain, progress, |off, data, zero| {
        sink.write(off, data, zero)
    });
    let flushed = match &mut sink {
        Sink::File { f, .. } => f
            .sync_all()
            .map_err(|e| err(Errno::from_io(&e), format!("syncing {}: {e}", a.to))),
        Sink::Dev(d) => d.flush(),
    };
    if let Sink::Dev(d) = sink {
        d.close(s)?;
    }
    let data_bytes = data_bytes?;
    flushed?;
    Ok(ReadReport {
        point: n,
        target: Some(a.to.clone()),
        size: sums.size,
        clusters: sums.crcs.len() as u64,
        data_bytes,
        digest: sums.digest(),
    })
}

fn open_file(path: &Path, size: u64, force: bool) -> Result<Sink, CliError> {
    use std::os::unix::fs::FileTypeExt;
    match std::fs::metadata(path) {
        Ok(_) if !force => Err(err(
            Errno::EEXIST,
            format!("{} exists: give --force to overwrite it", path.display()),
        )),
        Ok(md) => {
            let f = std::fs::OpenOptions::new()
                .write(true)
                .open(path)
                .map_err(|e| io_err("cannot open", path, &e))?;
            if md.file_type().is_block_device() {
                let dev_size = block_size(&f).map_err(|e| io_err("cannot size", path, &e))?;
                if dev_size < size {
                    return Err(err(
                        Errno::ENOSPC,
                        format!("{} has {dev_size} bytes, the backup {size}", path.display()),
                    ));
                }
            } else {
                f.set_len(size)
                    .map_err(|e| io_err("cannot size", path, &e))?;
            }
            Ok(Sink::File { f, fresh: false })
        }
        Err(_) => {
            let f = std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .open(path)
                .map_err(|e| io_err("cannot create", path, &e))?;
            f.set_len(size)
                .map_err(|e| io_err("cannot size", path, &e))?;
            Ok(Sink::File { f, fresh: true })
        }
    }
}

fn block_size(f: &File) -> std::io::Result<u64> {
    use std::io::{Seek, SeekFrom};
    let mut f = f;
    f.seek(SeekFrom::End(0))
}
