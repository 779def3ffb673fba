//! The metadata space map (K dm-space-map-common.c, dm-space-map-metadata.c): an index block,
//! bitmap blocks of 2-bit counts and a refcount btree for counts ≥ 3. Counts are held in memory;
//! a commit shadows what changed. Allocation takes only blocks free in the last committed map, so
//! nothing the on-disk superblock reaches is overwritten before the next commit.

use std::collections::HashMap;

use crate::block::{self, get_u32, get_u64, put_u32, put_u64, Block, BlockStore, Kind};
use crate::error::{Error, Result};
use crate::node;

/// 2-bit entries per bitmap block: (4096 - 16) * 4.
pub const ENTRIES_PER_BITMAP: u64 = 16320;
/// Index entries in the metadata index block.
pub const INDEX_ENTRIES: usize = 255;
/// `DM_SM_METADATA_MAX_BLOCKS`.
pub const MAX_METADATA_BLOCKS: u64 = 255 * ENTRIES_PER_BITMAP;
const HEADER: usize = 16;

/// `disk_sm_root`, the 32 bytes the superblock keeps at its space-map root.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SmRoot {
    pub nr_blocks: u64,
    pub nr_allocated: u64,
    /// For the metadata space map: the block of the index.
    pub bitmap_root: u64,
    pub ref_count_root: u64,
}

impl SmRoot {
    pub fn parse(b: &[u8]) -> SmRoot {
        SmRoot {
            nr_blocks: get_u64(b, 0),
            nr_allocated: get_u64(b, 8),
            bitmap_root: get_u64(b, 16),
            ref_count_root: get_u64(b, 24),
        }
    }

    pub fn print(&self) -> [u8; 32] {
        let mut b = [0u8; 32];
        for (i, v) in [
            self.nr_blocks,
            self.nr_allocated,
            self.bitmap_root,
            self.ref_count_root,
        ]
        .iter()
        .enumerate()
        {
            put_u64(&mut b, 8 * i, *v);
        }
        b
    }
}

/// `disk_index_entry`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct IndexEntry {
    pub blocknr: u64,
    pub nr_free: u32,
    pub none_free_before: u32,
}

/// Parses the index block at `location`: all 255 entries.
pub fn parse_index(b: &Block, location: u64) -> Result<Vec<IndexEntry>> {
    block::validate(b, Kind::Index, location)?;
    Ok((0..INDEX_ENTRIES)
        .map(|i| {
            let off = HEADER + 16 * i;
            IndexEntry {
                blocknr: get_u64(b, off),
                nr_free: get_u32(b, off + 8),
                none_free_before: get_u32(b, off + 12),
            }
        })
        .collect())
}

pub fn print_index(entries: &[IndexEntry], location: u64) -> Box<Block> {
    let mut b = block::zeroed();
    for (i, e) in entries.iter().take(INDEX_ENTRIES).enumerate() {
        let off = HEADER + 16 * i;
        put_u64(&mut b[..], off, e.blocknr);
        put_u32(&mut b[..], off + 8, e.nr_free);
        put_u32(&mut b[..], off + 12, e.none_free_before);
    }
    block::seal(&mut b, Kind::Index, location);
    b
}

/// Raw 2-bit field → count (3 means "see the refcount tree"): the kernel reads bit 2i as the high
/// bit, so raw 1 is a count of 2 and raw 2 a count of 1.
pub fn decode_entry(raw: u64) -> u32 {
    [0, 2, 1, 3][(raw & 3) as usize]
}

pub fn encode_entry(count: u32) -> u64 {
    [0, 2, 1, 3][count.min(3) as usize]
}

/// The 16320 entries of the bitmap block at `location` (each 0, 1, 2 or 3).
pub fn parse_bitmap(b: &Block, location: u64) -> Result<Vec<u32>> {
    block::validate(b, Kind::Bitmap, location)?;
    Ok((0..ENTRIES_PER_BITMAP as usize)
        .map(|i| decode_entry(get_u64(b, HEADER + 8 * (i / 32)) >> (2 * (i % 32))))
        .collect())
}

/// A bitmap block from counts (missing entries are 0; counts ≥ 3 are stored as 3).
pub fn print_bitmap(counts: &[u32], location: u64) -> Box<Block> {
    let mut b = block::zeroed();
    for (w, chunk) in counts.chunks(32).enumerate() {
        let word = chunk
            .iter()
            .enumerate()
            .fold(0u64, |acc, (j, &c)| acc | (encode_entry(c) << (2 * j)));
        put_u64(&mut b[..], HEADER + 8 * w, word);
    }
    block::seal(&mut b, Kind::Bitmap, location);
    b
}

/// The refcount tree's value: a le32 count.
pub const REFCOUNT_VALUE_SIZE: u32 = 4;

/// Reference counts of every metadata block, with the on-disk locations of its own blocks.
#[derive(Clone, Debug)]
pub struct SpaceMap {
    nr_blocks: u64,
    counts: Vec<u32>,
    nr_allocated: u64,
    /// One bit per block: in use in the last committed map (never handed out before the commit).
    committed: Vec<u64>,
    bitmaps: Vec<u64>,
    /// Bitmaps changed since the commit, and those already moved to a new block in this commit.
    dirty: Vec<bool>,
    shadowed: Vec<bool>,
    index: Option<u64>,
    refcount_nodes: Vec<u64>,
    refcount_root: Option<u64>,
    refcount_dirty: bool,
    /// Where the next search for a free block starts (`smm->begin` of dm-space-map-metadata.c):
    /// just past the last block handed out, wrapping to the start when the end is reached. Not
    /// reset by a commit (the kernel stopped doing that in 5.19), 0 when a map is opened. The
    /// kernel's block numbers follow from it: a metadata snapshot taken after a few commits
    /// lands where the cursor is, not in the lowest free block.
    begin: u64,
    /// Nothing committed yet: the bitmaps have no old blocks to release.
    fresh: bool,
    /// Blocks in use at the last commit, and blocks handed out by [`SpaceMap::alloc`] since:
    /// what the kernel's metadata space map counts as used (its `get_nr_free` takes frees
    /// into account only once committed).
    committed_allocated: u64,
    allocated_since: u64,
}

impl SpaceMap {
    /// A new map with every block free (the kernel caps it at `MAX_METADATA_BLOCKS`).
    pub fn new(nr_blocks: u64) -> SpaceMap {
        let nr_blocks = nr_blocks.min(MAX_METADATA_BLOCKS);
        let nr_bitmaps = nr_blocks.div_ceil(ENTRIES_PER_BITMAP) as usize;
        SpaceMap {
            nr_blocks,
            counts: vec![0; nr_blocks as usize],
            nr_allocated: 0,
            committed: vec![0; (nr_blocks as usize).div_ceil(64)],
            bitmaps: vec![0; nr_bitmaps],
            dirty: vec![true; nr_bitmaps],
            shadowed: vec![false; nr_bitmaps],
            index: None,
            refcount_nodes: Vec::new(),
            refcount_root: None,
            refcount_dirty: true,
            begin: 0,
            fresh: true,
            committed_allocated: 0,
            allocated_since: 0,
        }
    }

    /// Loads the map committed at `root`.
    pub fn open(store: &dyn BlockStore, root: &SmRoot) -> Result<SpaceMap> {
        if root.nr_blocks > MAX_METADATA_BLOCKS || root.nr_blocks > store.nr_blocks() {
            return Err(Error::Corrupt {
                kind: Kind::Index,
                block: root.bitmap_root,
                what: format!(
                    "space map of {} blocks on a device of {}",
                    root.nr_blocks,
                    store.nr_blocks()
                ),
            });
        }
        let mut sm = SpaceMap::new(root.nr_blocks);
        let index = parse_index(&*store.read(root.bitmap_root)?, root.bitmap_root)?;
        let (overflow, nodes) = node::walk(store, root.ref_count_root)?;
        let mut counts = HashMap::new();
        for (k, v) in overflow {
            if v.len() != REFCOUNT_VALUE_SIZE as usize {
                return Err(Error::Corrupt {
                    kind: Kind::BtreeNode,
                    block: root.ref_count_root,
                    what: format!("refcount tree value of {} bytes", v.len()),
                });
            }
            counts.insert(k, get_u32(&v, 0));
        }
        let overflow = counts;
        for (i, e) in index.iter().take(sm.bitmaps.len()).enumerate() {
            let entries = parse_bitmap(&*store.read(e.blocknr)?, e.blocknr)?;
            let base = i as u64 * ENTRIES_PER_BITMAP;
            for (j, &c) in entries.iter().enumerate() {
                let b = base + j as u64;
                if b >= sm.nr_blocks {
                    break;
                }
                let c = if c == 3 {
                    match overflow.get(&b) {
                        Some(&n) if n >= 3 => n,
                        _ => {
                            return Err(Error::Corrupt {
                                kind: Kind::Bitmap,
                                block: e.blocknr,
                                what: format!(
                                "block {b} marked ≥3 but the refcount tree has no count ≥3 for it"
                            ),
                            })
                        }
                    }
                } else {
                    c
                };
                sm.counts[b as usize] = c;
            }
            sm.bitmaps[i] = e.blocknr;
        }
        sm.nr_allocated = sm.counts.iter().filter(|&&c| c > 0).count() as u64;
        sm.dirty.fill(false);
        sm.index = Some(root.bitmap_root);
        sm.refcount_nodes = nodes;
        sm.refcount_root = Some(root.ref_count_root);
        sm.refcount_dirty = false;
        sm.fresh = false;
        sm.mark_committed();
        Ok(sm)
    }

    pub fn nr_blocks(&self) -> u64 {
        self.nr_blocks
    }

    pub fn nr_allocated(&self) -> u64 {
        self.nr_allocated
    }

    pub fn nr_free(&self) -> u64 {
        self.nr_blocks - self.nr_allocated
    }

    /// Used blocks as the kernel's metadata space map reports them (`nr_blocks - get_nr_free`
    /// of dm-space-map-metadata.c): those in use at the last commit plus those allocated since,
    /// so a block freed in this transaction still counts until the commit.
    pub fn used_as_kernel(&self) -> u64 {
        (self.committed_allocated + self.allocated_since).min(self.nr_blocks)
    }

    fn check(&self, b: u64) -> Result<usize> {
        if b >= self.nr_blocks {
            return Err(Error::OutOfRange {
                block: b,
                nr_blocks: self.nr_blocks,
            });
        }
        Ok(b as usize)
    }

    pub fn count(&self, b: u64) -> Result<u32> {
        Ok(self.counts[self.check(b)?])
    }

    /// Every block's count, in block order.
    pub fn counts(&self) -> &[u32] {
        &self.counts
    }

    fn set(&mut self, b: u64, c: u32) -> Result<()> {
        let i = self.check(b)?;
        let old = self.counts[i];
        if old == c {
            return Ok(());
        }
        if old >= 3 || c >= 3 {
            self.refcount_dirty = true;
        }
        match (old, c) {
            (0, _) => self.nr_allocated += 1,
            (_, 0) => self.nr_allocated -= 1,
            _ => {}
        }
        self.counts[i] = c;
        let bitmap = (b / ENTRIES_PER_BITMAP) as usize;
        self.dirty[bitmap] = true;
        // The kernel moves a bitmap to a new block at its first change in a transaction
        // (`sm_ll_inc`/`sm_ll_dec` shadow it), so that block comes next from the cursor.
        if !self.fresh && !self.shadowed[bitmap] {
            self.shadow_bitmap(bitmap)?;
        }
        Ok(())
    }

    pub fn inc(&mut self, b: u64) -> Result<()> {
        let c = self.count(b)?;
        let n = c.checked_add(1).ok_or_else(|| Error::RefCount {
            block: b,
            what: "count overflows u32".into(),
        })?;
        self.set(b, n)
    }

    pub fn dec(&mut self, b: u64) -> Result<()> {
        let c = self.count(b)?;
        if c == 0 {
            return Err(Error::RefCount {
                block: b,
                what: "decrement of a free block".into(),
            });
        }
        self.set(b, c - 1)
    }

    fn committed_used(&self, b: u64) -> bool {
        self.committed[(b / 64) as usize] & (1 << (b % 64)) != 0
    }

    fn mark_committed(&mut self) {
        self.committed_allocated = self.nr_allocated;
        self.allocated_since = 0;
        self.committed.fill(0);
        for (b, &c) in self.counts.iter().enumerate() {
            if c > 0 {
                self.committed[b / 64] |= 1 << (b % 64);
            }
        }
    }

    /// A block free now and in the last committed map, with count 1: the first at or after the
    /// cursor, else the first before it (`sm_metadata_new_block_`).
    pub fn alloc(&mut self) -> Result<u64> {
        let begin = self.begin.min(self.nr_blocks);
        let free = |b: &u64| self.counts[*b as usize] == 0 && !self.committed_used(*b);
        let found = (begin..self.nr_blocks)
            .find(free)
            .or_else(|| (0..begin).find(free));
        let Some(b) = found else {
            return Err(Error::NoSpace {
                nr_blocks: self.nr_blocks,
            });
        };
        self.begin = b + 1;
        self.allocated_since += 1;
        self.set(b, 1)?;
        Ok(b)
    }

    /// Writes what changed (bitmaps, refcount tree, index) to new blocks and returns the root the
    /// superblock stores. The caller flushes before it writes the superblock.
    pub fn commit(&mut self, store: &mut dyn BlockStore) -> Result<SmRoot> {
        if !self.dirty.iter().any(|&d| d) && !self.refcount_dirty {
            if let (Some(index), Some(rc)) = (self.index, self.refcount_root) {
                return Ok(self.root(index, rc));
            }
        }
        self.shadow_dirty_bitmaps()?;
        let mut writes: Vec<(u64, Box<Block>)> = Vec::new();
        if self.refcount_dirty || self.refcount_root.is_none() {
            for b in std::mem::take(&mut self.refcount_nodes) {
                self.dec(b)?;
            }
            let (keys, values): (Vec<u64>, Vec<u32>) = self
                .counts
                .iter()
                .enumerate()
                .filter(|(_, &c)| c >= 3)
                .map(|(b, &c)| (b as u64, c))
                .unzip();
            let values: Vec<u8> = values.iter().flat_map(|c| c.to_le_bytes()).collect();
            let built = node::build(&keys, &values, REFCOUNT_VALUE_SIZE);
            let locs = (0..built.nodes.len())
                .map(|_| self.alloc())
                .collect::<Result<Vec<u64>>>()?;
            self.refcount_root = locs.last().copied();
            self.refcount_nodes = locs.clone();
            writes.extend(built.place(&locs));
        }
        let new_index = self.alloc()?;
        if let Some(old) = self.index.replace(new_index) {
            self.dec(old)?;
        }
        self.shadow_dirty_bitmaps()?;
        let mut entries = Vec::new();
        for (i, &loc) in self.bitmaps.iter().enumerate() {
            let lo = i * ENTRIES_PER_BITMAP as usize;
            let hi = (lo + ENTRIES_PER_BITMAP as usize).min(self.counts.len());
            let range = &self.counts[lo..hi];
            let used = range.iter().filter(|&&c| c > 0).count() as u32;
            let first_free = range.iter().position(|&c| c == 0).unwrap_or(range.len()) as u32;
            entries.push(IndexEntry {
                blocknr: loc,
                nr_free: ENTRIES_PER_BITMAP as u32 - used,
                none_free_before: first_free,
            });
            if self.shadowed[i] {
                writes.push((loc, print_bitmap(range, loc)));
            }
        }
        writes.push((new_index, print_index(&entries, new_index)));
        for (loc, b) in &writes {
            store.write(*loc, b)?;
        }
        self.dirty.fill(false);
        self.shadowed.fill(false);
        self.refcount_dirty = false;
        self.fresh = false;
        self.mark_committed();
        let rc = self.refcount_root.unwrap_or(0);
        Ok(self.root(new_index, rc))
    }

    fn root(&self, index: u64, rc: u64) -> SmRoot {
        SmRoot {
            nr_blocks: self.nr_blocks,
            nr_allocated: self.nr_allocated,
            bitmap_root: index,
            ref_count_root: rc,
        }
    }

    /// Moves each changed bitmap to a new block once per commit; moving one can change another.
    fn shadow_dirty_bitmaps(&mut self) -> Result<()> {
        while let Some(i) = (0..self.bitmaps.len()).find(|&i| self.dirty[i] && !self.shadowed[i]) {
            self.shadow_bitmap(i)?;
        }
        Ok(())
    }

    fn shadow_bitmap(&mut self, i: usize) -> Result<()> {
        // Marked first: the new block's own count change is in this bitmap. Unmarked again if
        // there is no block, so a commit never writes the bitmap over its committed block.
        self.shadowed[i] = true;
        let new = self.alloc().inspect_err(|_| self.shadowed[i] = false)?;
        let old = std::mem::replace(&mut self.bitmaps[i], new);
        if !self.fresh {
            self.dec(old)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::block::MemStore;

    #[test]
    fn bitmap_entry_mapping() {
        // A.4.2: nine blocks of refcount 1 give word 0 = 0x2AAAA.
        let b = print_bitmap(&[1; 9], 6);
        assert_eq!(get_u64(&b[..], 16), 0x0002_AAAA);
        let back = parse_bitmap(&b, 6).expect("valid bitmap");
        assert_eq!(&back[..10], &[1, 1, 1, 1, 1, 1, 1, 1, 1, 0]);
        assert_eq!([0, 1, 2, 3].map(encode_entry), [0, 2, 1, 3]);
    }

    #[test]
    fn fresh_commit_layout() {
        let mut store = MemStore::new(1024);
        let mut sm = SpaceMap::new(1024);
        for want in 0..6 {
            assert_eq!(sm.alloc().expect("space"), want);
        }
        let root = sm.commit(&mut store).expect("commit");
        // Bitmap, then the empty refcount leaf, then the index (the reference's blocks 6, 7, 8).
        assert_eq!(
            root,
            SmRoot {
                nr_blocks: 1024,
                nr_allocated: 9,
                bitmap_root: 8,
                ref_count_root: 7
            }
        );
        let idx = parse_index(&store.read(8).expect("read"), 8).expect("index");
        assert_eq!(
            idx[0],
            IndexEntry {
                blocknr: 6,
                nr_free: 16311,
                none_free_before: 9
            }
        );
        assert_eq!(idx[1], IndexEntry::default());
        let again = SpaceMap::open(&store, &root).expect("reopen");
        assert_eq!(again.counts(), sm.counts());
    }

    /// A map with one block allocated and committed: (store, map, that block).
    fn one_committed() -> (MemStore, SpaceMap, u64) {
        let mut store = MemStore::new(64);
        let mut sm = SpaceMap::new(64);
        let a = sm.alloc().expect("space");
        sm.commit(&mut store).expect("commit");
        (store, sm, a)
    }

    #[test]
    fn allocation_avoids_committed_blocks() {
        let (_, mut sm, a) = one_committed();
        sm.dec(a).expect("dec");
        let b = sm.alloc().expect("space");
        assert_ne!(
            a, b,
            "a block free only since the commit is not reused before the next"
        );
        assert!(sm.dec(63).is_err(), "decrement of a free block");
    }

    #[test]
    fn used_as_the_kernel_counts_frees_only_once_committed() {
        let (mut store, mut sm, a) = one_committed();
        let committed = sm.nr_allocated();
        assert_eq!(sm.used_as_kernel(), committed);
        sm.dec(a).expect("dec");
        sm.alloc().expect("space");
        assert_eq!(
            sm.nr_allocated(),
            committed,
            "one freed, one allocated, the bitmap moved"
        );
        assert_eq!(
            sm.used_as_kernel(),
            committed + 2,
            "the frees count after the commit"
        );
        sm.commit(&mut store).expect("commit");
        assert_eq!(sm.used_as_kernel(), sm.nr_allocated());
    }

    #[test]
    fn allocation_follows_the_kernels_cursor() {
        let (mut store, mut sm, a) = one_committed();
        // Fresh: block 0, then the bitmap, refcount leaf and index at the commit.
        assert_eq!((a, sm.nr_allocated()), (0, 4));
        // The first change after a commit moves the bitmap to the block after the new one.
        let b = sm.alloc().expect("space");
        assert_eq!(b, 4, "the cursor is not reset by the commit");
        assert_eq!(sm.bitmaps[0], 5, "bitmap shadowed at its first change");
        assert_eq!(sm.count(1).expect("count"), 0, "the old bitmap is released");
        sm.dec(b).expect("dec");
        assert_eq!(
            sm.alloc().expect("space"),
            6,
            "freed blocks wait for the cursor"
        );
        sm.commit(&mut store).expect("commit");
        // Past the end, the search wraps to the lowest block free before and after the commit.
        sm.begin = 63;
        assert_eq!(sm.alloc().expect("space"), 63);
        assert_eq!(sm.bitmaps[0], 1, "wrapped to the old bitmap's block");
        assert_eq!(
            sm.alloc().expect("space"),
            3,
            "block 2 holds the refcount leaf"
        );
        // A reopened map starts from block 0, as the kernel's.
        let root = sm.commit(&mut store).expect("commit");
        let mut again = SpaceMap::open(&store, &root).expect("reopen");
        assert_eq!(
            again.alloc().expect("space"),
            5,
            "the lowest free block (4 is the index)"
        );
    }
}
