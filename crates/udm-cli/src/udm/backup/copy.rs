//! Planning and copying one point: which clusters it stores (from the dirty bitmap and
//! `base:allocation` read over NBD) and the copy into its qcow2 image, with progress records
//! that let an interrupted copy continue.

use super::chain::{err, io_err, sync_dir, Kind, Partial, Run, Sums, ZeroCrc};
use super::nbd::{NbdDev, ReadAhead, IO_MAX};
use super::Progress;
use crate::error::CliError;
use std::path::Path;
use std::time::{Duration, Instant};
use udm_qcow2::{Plan, Planned, Writer};
use udm_types::Errno;

/// Block status asked per request.
const STATUS_STEP: u64 = 1 << 30;
/// Reads of up to IO_MAX in flight at once (the server serves them in parallel).
const READ_AHEAD: usize = 4;
/// How often progress is made durable (and reported).
const CHECKPOINT: Duration = Duration::from_secs(2);

/// Folds `(bytes, dirty, zero)` runs into per-cluster decisions, emitted as runs.
struct Planner {
    cluster: u64,
    size: u64,
    full: bool,
    /// The cluster being looked at: (index, dirty, all zero).
    cur: Option<(u64, bool, bool)>,
    out: Vec<Run>,
}

impl Planner {
    fn add(&mut self, offset: u64, bytes: u64, dirty: bool, zero: bool) {
        let end = (offset + bytes).min(self.size);
        let mut pos = offset;
        while pos < end {
            let idx = pos / self.cluster;
            let next = ((idx + 1) * self.cluster).min(end);
            match &mut self.cur {
                Some(c) if c.0 == idx => {
                    c.1 |= dirty;
                    c.2 &= zero;
                }
                _ => {
                    self.emit();
                    self.cur = Some((idx, dirty, zero));
                }
            }
            pos = next;
        }
    }

    fn emit(&mut self) {
        let Some((idx, dirty, zero)) = self.cur.take() else {
            return;
        };
        let keep = if self.full { !zero } else { dirty };
        if !keep {
            return;
        }
        match self.out.last_mut() {
            Some(r) if r.start + r.count == idx && r.zero == zero => r.count += 1,
            _ => self.out.push(Run {
                start: idx,
                count: 1,
                zero,
            }),
        }
    }
}

/// The clusters of a point: a full one stores every cluster that does not read as zeros; an
/// incremental one every cluster the bitmap marks, as a zero cluster when it reads as zeros.
pub fn plan(nbd: &mut NbdDev, kind: Kind, cluster_bits: u32) -> Result<Vec<Run>, CliError> {
    let mut p = Planner {
        cluster: 1 << cluster_bits,
        size: nbd.size,
        full: kind == Kind::Full,
        cur: None,
        out: Vec::new(),
    };
    let mut pos = 0u64;
    while pos < nbd.size {
        let len = (nbd.size - pos).min(STATUS_STEP) as u32;
        let runs = nbd.status(pos, len)?;
        for (bytes, dirty, zero) in runs {
            p.add(pos, bytes, dirty || p.full, zero);
            pos += bytes;
        }
    }
    p.emit();
    Ok(p.out)
}

/// What a copy stored.
pub struct CopyStats {
    /// Bytes stored as data.
    pub data_bytes: u64,
    /// Bytes stored as zero clusters.
    pub zero_bytes: u64,
    /// Image file size.
    pub image_bytes: u64,
    /// Seconds spent by earlier, interrupted runs.
    pub earlier_seconds: f64,
}

fn qcow_err(what: &str, path: &Path, e: udm_qcow2::Error) -> CliError {
    err(Errno(e.errno()), format!("{what} {}: {e}", path.display()))
}

/// Copies the planned clusters of `p` from `nbd` into `DIR/point-N.qcow2`, updating `sums`;
/// continues after `p.done` data clusters when resuming.
pub fn copy(
    dir: &Path,
    p: &mut Partial,
    nbd: &mut NbdDev,
    sums: &mut Sums,
    backing: Option<String>,
    progress: &mut dyn FnMut(Progress),
) -> Result<CopyStats, CliError> {
    let cs = sums.cluster_size;
    let cluster_bits = cs.trailing_zeros();
    let plan = Plan {
        size: sums.size,
        cluster_bits,
        backing,
        runs: p
            .plan
            .iter()
            .map(|r| udm_qcow2::Run {
                start: r.start,
                count: r.count,
                planned: if r.zero { Planned::Zero } else { Planned::Data },
            })
            .collect(),
    };
    let part = dir.join(format!("{}.part", p.point.file));
    let mut w = if p.done > 0 && part.exists() {
        Writer::resume(&part, &plan, p.done).map_err(|e| qcow_err("cannot resume", &part, e))?
    } else {
        p.done = 0;
        let _ = std::fs::remove_file(&part);
        Writer::create(&part, &plan).map_err(|e| qcow_err("cannot create", &part, e))?
    };
    let total: u64 = p.plan.iter().filter(|r| !r.zero).map(|r| r.count).sum();
    let earlier = p.point.seconds;
    let started = Instant::now();
    let mut last = Instant::now();
    let abort_after = test_abort_after();
    let mut buf = vec![0u8; IO_MAX as usize];
    let per_io = (IO_MAX / cs).max(1);
    let (mut data_bytes, mut zero_bytes) = (0u64, 0u64);
    // The data clusters in plan order as reads of up to IO_MAX: (first cluster, count, bytes).
    let mut reads: Vec<(u64, u64, u64)> = Vec::new();
    let zero = ZeroCrc::new(cs);
    for r in &p.plan {
        if r.zero {
            for c in r.start..r.start + r.count {
                sums.crcs[c as usize] = zero.of(sums.len_of(c));
                zero_bytes += sums.len_of(c);
            }
            continue;
        }
        let mut c = r.start;
        while c < r.start + r.count {
            let n = (r.start + r.count - c).min(per_io);
            let bytes: u64 = (c..c + n).map(|x| sums.len_of(x)).sum();
            data_bytes += bytes;
            reads.push((c, n, bytes));
            c += n;
        }
    }
    // Reads wholly written before an interruption (their sums were saved with `done`).
    let mut k = 0u64; // data clusters seen in plan order
    let mut first = 0;
    while first < reads.len() && k + reads[first].1 <= p.done {
        k += reads[first].1;
        first += 1;
    }
    let mut ra = ReadAhead::new(READ_AHEAD);
    let mut sent = first;
    for &(c, n, bytes) in &reads[first..] {
        while sent < reads.len() && ra.has_room() {
            let (sc, _, sb) = reads[sent];
            nbd.read_ahead(&mut ra, sc * cs, sb as u32)?;
            sent += 1;
        }
        let b = &mut buf[..bytes as usize];
        nbd.read_next(&mut ra, b)?;
        for (i, chunk) in b.chunks(cs as usize).enumerate() {
            let idx = c + i as u64;
            if k + (i as u64) < p.done {
                continue;
            }
            w.write_next(chunk)
                .map_err(|e| qcow_err("cannot write", &part, e))?;
            sums.crcs[idx as usize] = crc32c::crc32c(chunk);
        }
        k += n;
        if last.elapsed() >= CHECKPOINT || abort_after.is_some_and(|a| k >= a) {
            w.sync().map_err(|e| qcow_err("cannot sync", &part, e))?;
            p.done = w.done();
            p.point.seconds = earlier + started.elapsed().as_secs_f64();
            sums.save(&dir.join(".partial.sums"))?;
            p.save(dir)?;
            last = Instant::now();
            if abort_after.is_some_and(|a| k >= a) {
                // Test hook: an interruption right after a progress record.
                std::process::exit(75);
            }
        }
        progress(Progress::Copied {
            done: k.min(total) * cs,
            total: total * cs,
        });
    }
    let image_bytes = w
        .finish()
        .map_err(|e| qcow_err("cannot finish", &part, e))?;
    let fin = dir.join(&p.point.file);
    std::fs::rename(&part, &fin).map_err(|e| io_err("cannot rename", &part, &e))?;
    sync_dir(&fin)?;
    Ok(CopyStats {
        data_bytes,
        zero_bytes,
        image_bytes,
        earlier_seconds: earlier,
    })
}

/// `UDM_BACKUP_TEST_ABORT_AFTER=N`: exit (status 75) once N data clusters are copied and
/// recorded, as a kill would; the resume tests use it to interrupt at a known point.
fn test_abort_after() -> Option<u64> {
    std::env::var("UDM_BACKUP_TEST_ABORT_AFTER")
        .ok()
        .and_then(|v| v.parse().ok())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn planner(full: bool) -> Planner {
        Planner {
            cluster: 1024,
            size: 10 * 1024 + 100,
            full,
            cur: None,
            out: Vec::new(),
        }
    }

    fn run(start: u64, count: u64, zero: bool) -> Run {
        Run { start, count, zero }
    }

    #[test]
    fn incremental_plans_dirty_clusters_and_zero_ones() {
        let mut p = planner(false);
        // cluster 0 clean; 1..=2 dirty data; 3 dirty but zero; 4 partly dirty; rest clean
        // except the partial last cluster (10), dirty.
        p.add(0, 1024, false, false);
        p.add(1024, 2048, true, false);
        p.add(3072, 1024, true, true);
        p.add(4096, 512, false, true);
        p.add(4608, 512, true, true);
        p.add(5120, 5 * 1024, false, false);
        p.add(10240, 100, true, false);
        p.emit();
        assert_eq!(
            p.out,
            [run(1, 2, false), run(3, 2, true), run(10, 1, false)]
        );
    }

    #[test]
    fn full_plans_every_cluster_that_has_data() {
        let mut p = planner(true);
        p.add(0, 2048, true, true);
        p.add(2048, 512, true, true);
        p.add(2560, 512, true, false); // cluster 2 half data: data
        p.add(3072, 10 * 1024 + 100 - 3072, true, false);
        p.emit();
        assert_eq!(p.out, [run(2, 9, false)]);
    }
}
