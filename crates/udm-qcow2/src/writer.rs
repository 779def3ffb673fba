//! Writing a new image from a plan: data clusters first (in plan order, at offsets the plan
//! determines), then at `finish` the refcounts, L2 and L1 tables and last the header. Until the
//! header is written the file has no qcow2 magic, so an interrupted image is never opened as a
//! complete one, and `resume` continues it to a byte-identical result.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::Path;

use crate::error::{Error, Result};
use crate::header::{self, MAGIC, OFLAG_COPIED, OFLAG_ZERO, REFCOUNT_ORDER};
use crate::layout::{layout, Layout, Plan, Planned};

/// An image being written; see the module documentation for the order of writes.
#[derive(Debug)]
pub struct Writer {
    file: File,
    name: String,
    plan: Plan,
    layout: Layout,
    /// Where the next Data cluster is: (index into the plan's runs, clusters into that run).
    cursor: (usize, u64),
    done: u64,
}

/// The position of the `n`-th Data cluster of `plan` (from 0), as [`Writer`]'s cursor; past
/// the end of the runs when there is none.
fn data_cursor(plan: &Plan, mut n: u64) -> (usize, u64) {
    for (k, r) in plan.runs.iter().enumerate() {
        if r.planned != Planned::Data {
            continue;
        }
        if n < r.count {
            return (k, n);
        }
        n -= r.count;
    }
    (plan.runs.len(), 0)
}

fn io_err<'a>(
    name: &'a str,
    structure: &'static str,
    offset: u64,
) -> impl FnOnce(io::Error) -> Error + 'a {
    move |source| Error::Io {
        file: name.to_string(),
        structure,
        offset,
        source,
    }
}

impl Writer {
    /// Creates the image at `path` for `plan`: refuses an existing path (EEXIST) and an
    /// invalid plan (EINVAL naming the problem). Nothing but data is written before `finish`.
    pub fn create(path: &Path, plan: &Plan) -> Result<Writer> {
        let name = path.display().to_string();
        let layout = layout(&name, plan)?;
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(path)
            .map_err(|source| {
                if source.kind() == io::ErrorKind::AlreadyExists {
                    Error::Exists { file: name.clone() }
                } else {
                    io_err(&name, "file", 0)(source)
                }
            })?;
        Ok(Writer::new(file, name, plan, layout, 0))
    }

    /// Reopens an image interrupted after `done` Data clusters were synced, to continue with
    /// the next. Refuses a finished image (it has the magic), `done` beyond the plan, and a file
    /// too short to hold `done` clusters; anything written after them is cut off.
    pub fn resume(path: &Path, plan: &Plan, done: u64) -> Result<Writer> {
        let name = path.display().to_string();
        let layout = layout(&name, plan)?;
        let invalid = |what: String| Error::Invalid {
            file: name.clone(),
            what: format!("resume: {what}"),
        };
        if done > layout.data_count {
            return Err(invalid(format!(
                "{done} data clusters done but the plan has {}",
                layout.data_count
            )));
        }
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .open(path)
            .map_err(io_err(&name, "file", 0))?;
        let len = file.metadata().map_err(io_err(&name, "file", 0))?.len();
        let mut magic = [0u8; 4];
        if len >= 4 {
            file.read_exact_at(&mut magic, 0)
                .map_err(io_err(&name, "header", 0))?;
            if u32::from_be_bytes(magic) == MAGIC {
                return Err(invalid("the image is already finished".to_string()));
            }
        }
        let end = layout.data_offset(done);
        if done > 0 && len < end {
            return Err(Error::Truncated {
                file: name.clone(),
                structure: "data clusters",
                offset: layout.data_offset(0),
                len: end - layout.data_offset(0),
                file_len: len,
            });
        }
        file.set_len(end).map_err(io_err(&name, "file", end))?;
        Ok(Writer::new(file, name, plan, layout, done))
    }

    fn new(file: File, name: String, plan: &Plan, layout: Layout, done: u64) -> Writer {
        Writer {
            file,
            name,
            plan: plan.clone(),
            layout,
            cursor: data_cursor(plan, done),
            done,
        }
    }

    fn invalid(&self, what: String) -> Error {
        Error::Invalid {
            file: self.name.clone(),
            what,
        }
    }

    /// Writes the data of the next Data cluster in plan order: a whole cluster, or for the
    /// image's last, partial cluster exactly the bytes up to the virtual size (zero-padded).
    pub fn write_next(&mut self, data: &[u8]) -> Result<()> {
        let cs = self.layout.cluster_size();
        let (k, into) = self.cursor;
        let Some(run) = self.plan.runs.get(k).copied() else {
            return Err(self.invalid(format!(
                "write_next: all {} data clusters are written",
                self.layout.data_count
            )));
        };
        let index = run.start + into;
        let tail = self.plan.size - (index << self.layout.cluster_bits);
        let len = data.len() as u64;
        if len != cs && !(tail < cs && len == tail) {
            return Err(self.invalid(format!(
                "write_next: cluster {index}: {len} bytes (the cluster holds {})",
                tail.min(cs)
            )));
        }
        let offset = self.layout.data_offset(self.done);
        // Bytes past the virtual size are stored as zeros whatever the caller passed, so the
        // file depends only on the guest bytes.
        if tail >= cs {
            self.file.write_all_at(data, offset)
        } else {
            let mut padded = vec![0u8; cs as usize];
            padded[..tail as usize].copy_from_slice(&data[..tail as usize]);
            self.file.write_all_at(&padded, offset)
        }
        .map_err(io_err(&self.name, "data cluster", offset))?;
        self.done += 1;
        self.cursor = if into + 1 < run.count {
            (k, into + 1)
        } else {
            let next = self.plan.runs[k + 1..]
                .iter()
                .position(|r| r.planned == Planned::Data)
                .map_or(self.plan.runs.len(), |p| k + 1 + p);
            (next, 0)
        };
        Ok(())
    }

    /// Data clusters written so far.
    pub fn done(&self) -> u64 {
        self.done
    }

    /// Makes the written data clusters durable (fdatasync), so `done` may be recorded for a
    /// later `resume`.
    pub fn sync(&mut self) -> Result<()> {
        self.file.sync_data().map_err(io_err(&self.name, "file", 0))
    }

    /// Writes the refcounts, L2 and L1 tables, syncs, then writes the header and fsyncs.
    /// Returns the file size. Refuses (EINVAL) if not every Data cluster was written.
    pub fn finish(self) -> Result<u64> {
        let l = &self.layout;
        if self.done != l.data_count {
            return Err(self.invalid(format!(
                "finish: {} of {} data clusters written",
                self.done, l.data_count
            )));
        }
        let cs = l.cluster_size();
        let bits = l.cluster_bits;
        let put = |structure: &'static str, cluster: u64, buf: &[u8]| {
            let offset = cluster << bits;
            self.file
                .write_all_at(buf, offset)
                .map_err(io_err(&self.name, structure, offset))
        };
        // Refcount blocks: every cluster of the file is referenced exactly once.
        let per_block = cs * 8 / (1 << REFCOUNT_ORDER);
        let mut block = vec![0u8; cs as usize];
        for b in 0..l.rb_count {
            let first = b * per_block;
            let n = l.total_clusters.saturating_sub(first).min(per_block) as usize;
            block.fill(0);
            for e in block.chunks_exact_mut(2).take(n) {
                e.copy_from_slice(&1u16.to_be_bytes());
            }
            put("refcount block", l.rb_start + b, &block)?;
        }
        let mut table = vec![0u8; (l.rt_clusters * cs) as usize];
        for (b, e) in table
            .chunks_exact_mut(8)
            .take(l.rb_count as usize)
            .enumerate()
        {
            e.copy_from_slice(&((l.rb_start + b as u64) << bits).to_be_bytes());
        }
        put("refcount table", l.rt_start, &table)?;
        // L2 tables, one per L1 entry with planned clusters, in plan order.
        let l2_entries = cs / 8;
        let mut l1 = vec![0u8; (l.l1_clusters * cs) as usize];
        let mut data_n = 0u64;
        let mut clusters = self.plan.clusters().peekable();
        for (t, &l1_index) in l.l2_tables.iter().enumerate() {
            let l2_cluster = l.l2_start + t as u64;
            let mut l2 = vec![0u8; cs as usize];
            while let Some(&(index, planned)) = clusters.peek() {
                if index / l2_entries != l1_index {
                    break;
                }
                clusters.next();
                let entry = match planned {
                    Planned::Data => {
                        data_n += 1;
                        l.data_offset(data_n - 1) | OFLAG_COPIED
                    }
                    Planned::Zero => OFLAG_ZERO,
                };
                let at = (index % l2_entries) as usize * 8;
                l2[at..at + 8].copy_from_slice(&entry.to_be_bytes());
            }
            put("L2 table", l2_cluster, &l2)?;
            let at = l1_index as usize * 8;
            l1[at..at + 8].copy_from_slice(&((l2_cluster << bits) | OFLAG_COPIED).to_be_bytes());
        }
        if !l1.is_empty() {
            put("L1 table", l.l1_start, &l1)?;
        }
        let size = l.total_clusters << bits;
        self.file
            .set_len(size)
            .map_err(io_err(&self.name, "file", size))?;
        self.file
            .sync_data()
            .map_err(io_err(&self.name, "file", 0))?;
        // Last the header: only now does the file become a qcow2 image.
        put("header", 0, &header::print(&l.header(&self.plan)))?;
        self.file
            .sync_all()
            .map_err(io_err(&self.name, "header", 0))?;
        Ok(size)
    }
}
