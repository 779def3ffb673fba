//! The plan of a new image and the file layout it determines. Everything's offset follows from
//! the plan alone, so an interrupted write can be resumed knowing only how many data clusters
//! were synced, and the result is byte-identical to an uninterrupted write:
//!
//! ```text
//! cluster 0          header, extensions, backing name
//! refcount table     rt_clusters
//! refcount blocks    rb_count (every cluster of the file has refcount 1)
//! L1 table           l1_clusters
//! L2 tables          one per L1 entry that has a Data or Zero cluster, ascending
//! data clusters      in plan order
//! ```

use crate::error::{Error, Result};
use crate::header::{self, MAX_BACKING_NAME, MAX_L1_BYTES, REFCOUNT_ORDER};

/// What a guest cluster holds in the new image.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Planned {
    /// Data the caller passes to `Writer::write_next`, in plan order.
    Data,
    /// Reads as zeros, hiding the backing file (the v3 zero flag; no host cluster).
    Zero,
}

/// A new image: its virtual size, cluster size, backing file and the clusters it holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Plan {
    /// Virtual size in bytes (need not be a multiple of the cluster size). QEMU rounds a
    /// qcow2 virtual size down to 512-byte sectors, so only sector multiples read the same
    /// everywhere (udm devices are sector multiples).
    pub size: u64,
    /// log2 of the cluster size, 12..=21.
    pub cluster_bits: u32,
    /// Backing file name as written in the header (relative to the image's directory).
    pub backing: Option<String>,
    /// Runs of guest clusters, ascending and not overlapping; the clusters of no run are
    /// unallocated (they fall through to the backing file, or read as zeros without one).
    /// Runs, not clusters, so a plan's memory follows the number of changed regions, not the
    /// device size (a full backup of 1 TiB in 64 KiB clusters is a handful of runs, not 16 M
    /// entries).
    pub runs: Vec<Run>,
}

/// `count` consecutive guest clusters from `start`, all planned the same way.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Run {
    /// First guest cluster index.
    pub start: u64,
    /// Number of clusters (at least 1).
    pub count: u64,
    /// What they hold.
    pub planned: Planned,
}

impl Run {
    /// Runs of `clusters` (guest index and plan, ascending): neighbours planned alike merged.
    pub fn from_clusters(clusters: &[(u64, Planned)]) -> Vec<Run> {
        let mut out: Vec<Run> = Vec::new();
        for &(index, planned) in clusters {
            match out.last_mut() {
                Some(r) if r.planned == planned && r.start + r.count == index => r.count += 1,
                _ => out.push(Run {
                    start: index,
                    count: 1,
                    planned,
                }),
            }
        }
        out
    }
}

impl Plan {
    /// Every planned cluster, ascending: (guest index, plan).
    pub fn clusters(&self) -> impl Iterator<Item = (u64, Planned)> + '_ {
        self.runs
            .iter()
            .flat_map(|r| (r.start..r.start.saturating_add(r.count)).map(move |c| (c, r.planned)))
    }
}

/// Offsets (in clusters) of every structure of the image a plan describes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Layout {
    pub cluster_bits: u32,
    pub l1_size: u64,
    pub rt_start: u64,
    pub rt_clusters: u64,
    pub rb_start: u64,
    pub rb_count: u64,
    pub l1_start: u64,
    pub l1_clusters: u64,
    pub l2_start: u64,
    /// The L1 index each L2 table serves, ascending.
    pub l2_tables: Vec<u64>,
    pub data_start: u64,
    pub data_count: u64,
    pub total_clusters: u64,
}

impl Layout {
    pub fn cluster_size(&self) -> u64 {
        1 << self.cluster_bits
    }

    /// Host byte offset of the `n`th data cluster.
    pub fn data_offset(&self, n: u64) -> u64 {
        (self.data_start + n) << self.cluster_bits
    }

    /// The header for this layout.
    pub fn header(&self, plan: &Plan) -> header::Header {
        let backing_format = plan.backing.as_ref().map(|_| "qcow2".to_string());
        let (off, len) = match &plan.backing {
            Some(b) => (header::backing_name_offset(Some("qcow2")), b.len() as u32),
            None => (0, 0),
        };
        header::Header {
            version: 3,
            backing_file_offset: off,
            backing_file_size: len,
            cluster_bits: self.cluster_bits,
            size: plan.size,
            crypt_method: 0,
            l1_size: self.l1_size as u32,
            l1_table_offset: self.l1_start << self.cluster_bits,
            refcount_table_offset: self.rt_start << self.cluster_bits,
            refcount_table_clusters: self.rt_clusters as u32,
            nb_snapshots: 0,
            snapshots_offset: 0,
            incompatible_features: 0,
            compatible_features: 0,
            autoclear_features: 0,
            refcount_order: REFCOUNT_ORDER,
            header_length: header::WRITE_HEADER_LEN,
            backing: plan.backing.clone(),
            backing_format,
        }
    }
}

/// Checks `plan` (naming the problem for `file`) and computes its layout.
pub(crate) fn layout(file: &str, plan: &Plan) -> Result<Layout> {
    let invalid = |what: String| Error::Invalid {
        file: file.to_string(),
        what: format!("plan: {what}"),
    };
    if !(12..=21).contains(&plan.cluster_bits) {
        return Err(invalid(format!(
            "cluster_bits {} not in 12..=21",
            plan.cluster_bits
        )));
    }
    let bits = plan.cluster_bits;
    let cs = 1u64 << bits;
    let nb_clusters = plan.size.div_ceil(cs);
    let l2_entries = cs / 8;
    let l1_size = nb_clusters.div_ceil(l2_entries);
    if l1_size * 8 > MAX_L1_BYTES {
        return Err(invalid(format!(
            "virtual size {} needs an L1 table of {l1_size} entries (at most {})",
            plan.size,
            MAX_L1_BYTES / 8
        )));
    }
    if let Some(b) = &plan.backing {
        if b.is_empty() || b.len() > MAX_BACKING_NAME || b.contains('\0') {
            return Err(invalid(format!(
                "backing name of {} bytes (1..=1023, no NUL)",
                b.len()
            )));
        }
    }
    let mut l2_tables: Vec<u64> = Vec::new();
    let mut data_count = 0u64;
    let mut next = 0u64; // the first cluster a run may start at
    for (k, r) in plan.runs.iter().enumerate() {
        if r.count == 0 {
            return Err(invalid(format!("run {k} (cluster {}) is empty", r.start)));
        }
        if r.start < next {
            return Err(invalid(format!(
                "run {k}: cluster {} not after {}",
                r.start,
                next - 1
            )));
        }
        let end = r.start.saturating_add(r.count);
        if end > nb_clusters {
            return Err(invalid(format!(
                "cluster {} past the virtual size {} ({nb_clusters} clusters)",
                end - 1,
                plan.size
            )));
        }
        next = end;
        for l1 in r.start / l2_entries..=(end - 1) / l2_entries {
            if l2_tables.last() != Some(&l1) {
                l2_tables.push(l1);
            }
        }
        if r.planned == Planned::Data {
            data_count += r.count;
        }
    }
    let l1_clusters = (l1_size * 8).div_ceil(cs);
    let fixed = 1 + l1_clusters + l2_tables.len() as u64 + data_count;
    // Refcount blocks cover every cluster including themselves and the table: iterate to the
    // fixed point (each step only grows, and the counts are small against `fixed`).
    let per_block = cs * 8 / (1 << REFCOUNT_ORDER);
    let (mut rb, mut rt) = (1u64, 1u64);
    loop {
        let total = fixed + rb + rt;
        let rb2 = total.div_ceil(per_block);
        let rt2 = (rb2 * 8).div_ceil(cs);
        let next = (rb2.max(rb), rt2.max(rt));
        if next == (rb, rt) {
            break;
        }
        (rb, rt) = next;
    }
    // Host offsets must fit the 56-bit offset field of L1/L2 entries.
    if (fixed + rb + rt) > (header::OFFSET_MASK >> bits) {
        return Err(invalid(
            "the image would exceed the 56-bit host offset range".to_string(),
        ));
    }
    let rt_start = 1;
    let rb_start = rt_start + rt;
    let l1_start = rb_start + rb;
    let l2_start = l1_start + l1_clusters;
    let data_start = l2_start + l2_tables.len() as u64;
    Ok(Layout {
        cluster_bits: bits,
        l1_size,
        rt_start,
        rt_clusters: rt,
        rb_start,
        rb_count: rb,
        l1_start,
        l1_clusters,
        l2_start,
        l2_tables,
        data_start,
        data_count,
        total_clusters: data_start + data_count,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn plan(size: u64, bits: u32, clusters: Vec<(u64, Planned)>) -> Plan {
        Plan {
            size,
            cluster_bits: bits,
            backing: None,
            runs: Run::from_clusters(&clusters),
        }
    }

    #[test]
    fn runs_merge_neighbours_planned_alike_and_are_checked() {
        use Planned::{Data, Zero};
        let c = [
            (0, Data),
            (1, Data),
            (2, Zero),
            (3, Zero),
            (5, Zero),
            (6, Data),
        ];
        let runs = Run::from_clusters(&c);
        assert_eq!(runs.len(), 4);
        let p = Plan {
            size: 8 << 12,
            cluster_bits: 12,
            backing: None,
            runs,
        };
        assert_eq!(p.clusters().collect::<Vec<_>>(), c.to_vec());
        let l = layout("t", &p).expect("layout");
        assert_eq!(l.data_count, 3);
        let bad = |runs: Vec<Run>| {
            let p = Plan { runs, ..p.clone() };
            layout("t", &p).expect_err("refused").to_string()
        };
        let r = |start, count| Run {
            start,
            count,
            planned: Data,
        };
        assert!(bad(vec![r(0, 2), r(1, 1)]).contains("not after 1"));
        assert!(bad(vec![r(3, 0)]).contains("empty"));
        assert!(bad(vec![r(6, 3)]).contains("past the virtual size"));
    }

    #[test]
    fn structures_follow_each_other() {
        let p = plan(
            1 << 30,
            16,
            vec![
                (0, Planned::Data),
                (1, Planned::Zero),
                (8192, Planned::Data),
            ],
        );
        let l = layout("t", &p).expect("layout");
        assert_eq!(l.l1_size, 2);
        assert_eq!(
            (l.rt_start, l.rt_clusters, l.rb_start, l.rb_count),
            (1, 1, 2, 1)
        );
        assert_eq!((l.l1_start, l.l1_clusters, l.l2_start), (3, 1, 4));
        assert_eq!(l.l2_tables, vec![0, 1]);
        assert_eq!((l.data_start, l.data_count, l.total_clusters), (6, 2, 8));
        assert_eq!(l.data_offset(1), 7 << 16);
    }

    /// The refcount blocks cover every cluster, themselves and the table included, and the
    /// table holds every block, at the boundaries where one more block or table cluster is due.
    #[test]
    fn refcounts_cover_the_file() {
        for n in [0u64, 1, 2030, 2040, 2041, 2042, 2043, 2048, 5000, 300_000] {
            let p = plan(
                (n + 1) << 12,
                12,
                (0..n).map(|i| (i, Planned::Data)).collect(),
            );
            let l = layout("t", &p).expect("layout");
            let per_block = 4096 * 8 / 16;
            assert!(l.rb_count * per_block >= l.total_clusters, "{n}: {l:?}");
            assert!(
                (l.rb_count - 1) * per_block < l.total_clusters,
                "{n}: minimal"
            );
            assert!(l.rt_clusters * 512 >= l.rb_count, "{n}: {l:?}");
        }
    }

    #[test]
    fn header_round_trips() {
        let mut p = plan(12345 << 12, 12, vec![(3, Planned::Zero)]);
        p.backing = Some("point-0.qcow2".to_string());
        let l = layout("t", &p).expect("layout");
        let h = l.header(&p);
        let mut bytes = header::print(&h);
        bytes.resize(4096, 0);
        let len = l.total_clusters << 12;
        assert_eq!(header::parse("t", &bytes, len).expect("parse"), h);
    }
}
