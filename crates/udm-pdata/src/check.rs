//! A checker for a whole metadata device: walks every structure from a root set, validates each
//! block (location, checksum, layout), btree key order and fill, array shape, and recomputes
//! every block's reference count to compare it with the on-disk space map. era_check does not
//! do the last part; a refcount bug shows up only here or in the kernel.

use std::collections::{HashMap, HashSet};
use std::fmt;

use crate::array::{self, ArrayBlock};
use crate::block::{self, get_u32, get_u64, BlockStore, Kind};
use crate::node::{self, Node, MAX_DEPTH};
use crate::space_map::{self, SmRoot, ENTRIES_PER_BITMAP, INDEX_ENTRIES};

/// Where a leaf value holds the root of another structure: its offset, and what the value says
/// that structure is.
pub type Nested = (usize, fn(&[u8]) -> Structure);

/// What a root (or a value inside a leaf) points to.
#[derive(Clone, Copy, Debug)]
pub enum Structure {
    /// One validated block without children (a superblock, a metadata-snapshot copy).
    Block(Kind),
    /// A single-level btree; `nested`, when set, reads a le64 root at that offset of each value
    /// and says what it is (e.g. a writeset's bitset from `{le32 nr_bits; le64 root}`).
    Btree {
        value_size: u32,
        nested: Option<Nested>,
    },
    /// A dm-array of `len` values of `value_size` bytes.
    Array { value_size: u32, len: u64 },
    /// A dm-bitset of `nr_bits` bits.
    Bitset { nr_bits: u64 },
}

/// One finding: the block, the structure it belongs to, and what is wrong.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Problem {
    pub block: u64,
    pub structure: String,
    pub what: String,
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "block {}: {}: {}", self.block, self.structure, self.what)
    }
}

/// All findings, and the reference counts the walk found.
#[derive(Debug, Default)]
pub struct Report {
    pub problems: Vec<Problem>,
    pub expected: Vec<u32>,
}

impl Report {
    pub fn is_clean(&self) -> bool {
        self.problems.is_empty()
    }
}

struct Checker<'a> {
    store: &'a dyn BlockStore,
    nr_blocks: u64,
    expected: Vec<u32>,
    visited: HashSet<u64>,
    problems: Vec<Problem>,
    /// Nodes the current tree walk may still visit (a tree never shares a node within itself).
    budget: u64,
}

/// Checks the space map at `sm_root` and every structure in `roots` (name, block, what).
pub fn check(store: &dyn BlockStore, sm_root: &SmRoot, roots: &[(&str, u64, Structure)]) -> Report {
    let nr_blocks = sm_root.nr_blocks.min(store.nr_blocks());
    let mut c = Checker {
        store,
        nr_blocks,
        expected: vec![0; nr_blocks as usize],
        visited: HashSet::new(),
        problems: Vec::new(),
        budget: 0,
    };
    if sm_root.nr_blocks > store.nr_blocks() || sm_root.nr_blocks > space_map::MAX_METADATA_BLOCKS {
        c.problem(
            sm_root.bitmap_root,
            "space map",
            format!(
                "nr_blocks {} but the device has {}",
                sm_root.nr_blocks,
                store.nr_blocks()
            ),
        );
    }
    let on_disk = c.space_map(sm_root);
    for (name, b, s) in roots {
        c.reference(name, *b, *s, true);
    }
    if let Some(on_disk) = on_disk {
        for (b, (&e, &d)) in c.expected.iter().zip(&on_disk).enumerate() {
            if e != d {
                c.problems.push(Problem {
                    block: b as u64,
                    structure: "space map".into(),
                    what: format!("reference count {d} on disk, {e} references found"),
                });
            }
        }
        let allocated = on_disk.iter().filter(|&&n| n > 0).count() as u64;
        if allocated != sm_root.nr_allocated {
            c.problem(
                sm_root.bitmap_root,
                "space map",
                format!(
                    "nr_allocated {} but {allocated} blocks are in use",
                    sm_root.nr_allocated
                ),
            );
        }
    }
    Report {
        problems: c.problems,
        expected: c.expected,
    }
}

impl Checker<'_> {
    fn problem(&mut self, block: u64, structure: &str, what: String) {
        self.problems.push(Problem {
            block,
            structure: structure.into(),
            what,
        });
    }

    /// Counts one reference to `b`; walks it the first time it is seen. `count` is false below a
    /// node already walked (its children's references were counted then).
    fn reference(&mut self, name: &str, b: u64, s: Structure, count: bool) {
        if b >= self.nr_blocks {
            self.problem(
                b,
                name,
                format!(
                    "reference past the end of the space map ({} blocks)",
                    self.nr_blocks
                ),
            );
            return;
        }
        let first = self.visited.insert(b);
        if count {
            self.expected[b as usize] += 1;
        }
        let count = count && first;
        match s {
            Structure::Block(kind) => {
                if let Err(e) = block::read_validated(self.store, b, kind) {
                    self.problem(b, name, e.to_string());
                }
            }
            Structure::Btree { value_size, nested } => {
                let entries = self.tree(name, b, value_size, count);
                let Some((at, what)) = nested else { return };
                for (key, v, counted) in entries {
                    match v.get(at..at + 8) {
                        Some(r) => self.reference(name, get_u64(r, 0), what(&v), counted),
                        None => self.problem(
                            b,
                            name,
                            format!("value of key {key} too short for a root at {at}"),
                        ),
                    }
                }
            }
            Structure::Array { value_size, len } => {
                self.array(name, b, value_size, len, count);
            }
            Structure::Bitset { nr_bits } => {
                let words = nr_bits.div_ceil(64);
                if let Some(last) = self.array(name, b, 8, words, count) {
                    if nr_bits % 64 != 0 && last >> (nr_bits % 64) != 0 {
                        self.problem(b, name, format!("bits set past nr_bits {nr_bits}"));
                    }
                }
            }
        }
    }

    /// Walks the tree whose root `b` was just referenced: its leaf entries, each with whether
    /// the references it holds are counted (false below an already walked node).
    fn tree(
        &mut self,
        name: &str,
        b: u64,
        value_size: u32,
        count: bool,
    ) -> Vec<(u64, Vec<u8>, bool)> {
        let mut leaf_depth = None;
        let mut entries = Vec::new();
        self.budget = self.nr_blocks;
        self.node(
            name,
            b,
            value_size,
            (0, u64::MAX),
            0,
            true,
            count,
            &mut leaf_depth,
            &mut entries,
        );
        entries
    }

    /// Counts one reference to `b` without walking it; false when `b` is out of range.
    fn count_ref(&mut self, name: &str, from: u64, b: u64, count: bool) -> bool {
        if b >= self.nr_blocks {
            self.problem(
                from,
                name,
                format!(
                    "reference to block {b}, past the end ({} blocks)",
                    self.nr_blocks
                ),
            );
            return false;
        }
        self.visited.insert(b);
        if count {
            self.expected[b as usize] += 1;
        }
        true
    }

    /// Walks an array: contiguous keys, full blocks but the last, `len` values in all. Returns
    /// the last value (a bitset checks its tail bits with it).
    fn array(
        &mut self,
        name: &str,
        root: u64,
        value_size: u32,
        len: u64,
        count: bool,
    ) -> Option<u64> {
        let m = u64::from(array::max_entries(value_size));
        let entries = self.tree(name, root, 8, count);
        let nr = len.div_ceil(m);
        if entries.len() as u64 != nr {
            self.problem(
                root,
                name,
                format!(
                    "{} array blocks for {len} values, expected {nr}",
                    entries.len()
                ),
            );
        }
        let mut last = None;
        for (i, (key, v, counted)) in entries.into_iter().enumerate() {
            if key != i as u64 {
                self.problem(
                    root,
                    name,
                    format!("array block index {key} at position {i}: indices not contiguous"),
                );
            }
            let ab = get_u64(&v, 0);
            if !self.count_ref(name, root, ab, counted) {
                continue;
            }
            let parsed = self
                .store
                .read(ab)
                .and_then(|d| ArrayBlock::parse(&d, ab, value_size));
            match parsed {
                Ok(a) => {
                    let want = len.saturating_sub(key.saturating_mul(m)).min(m);
                    if a.values.len() as u64 != want {
                        self.problem(
                            ab,
                            name,
                            format!("{} entries, expected {want}", a.values.len()),
                        );
                    }
                    last = a.values.last().copied();
                }
                Err(e) => self.problem(ab, name, e.to_string()),
            }
        }
        last
    }

    /// Reads the on-disk counts (bitmaps and refcount tree) and counts the space map's blocks.
    fn space_map(&mut self, root: &SmRoot) -> Option<Vec<u32>> {
        const SM: &str = "space map";
        if !self.count_ref(SM, root.bitmap_root, root.bitmap_root, true) {
            return None;
        }
        let index = match self
            .store
            .read(root.bitmap_root)
            .and_then(|b| space_map::parse_index(&b, root.bitmap_root))
        {
            Ok(i) => i,
            Err(e) => {
                self.problem(root.bitmap_root, SM, e.to_string());
                return None;
            }
        };
        let mut rc: HashMap<u64, u32> = HashMap::new();
        if self.count_ref(SM, root.bitmap_root, root.ref_count_root, true) {
            let entries = self.tree(
                "refcount tree",
                root.ref_count_root,
                space_map::REFCOUNT_VALUE_SIZE,
                true,
            );
            rc = entries
                .into_iter()
                .map(|(k, v, _)| (k, get_u32(&v, 0)))
                .collect();
        }
        let nr_bitmaps = self.nr_blocks.div_ceil(ENTRIES_PER_BITMAP) as usize;
        let mut on_disk = vec![0u32; self.nr_blocks as usize];
        for (i, e) in index.iter().enumerate() {
            if i >= nr_bitmaps {
                if *e != space_map::IndexEntry::default() {
                    self.problem(
                        root.bitmap_root,
                        SM,
                        format!("index entry {i} set past the last bitmap"),
                    );
                }
                continue;
            }
            if !self.count_ref(SM, root.bitmap_root, e.blocknr, true) {
                continue;
            }
            let counts = match self
                .store
                .read(e.blocknr)
                .and_then(|b| space_map::parse_bitmap(&b, e.blocknr))
            {
                Ok(c) => c,
                Err(err) => {
                    self.problem(e.blocknr, SM, err.to_string());
                    continue;
                }
            };
            let base = i as u64 * ENTRIES_PER_BITMAP;
            let mut used = 0u32;
            let mut first_free = None;
            for (j, &c) in counts.iter().enumerate() {
                let b = base + j as u64;
                if b >= self.nr_blocks {
                    if c != 0 {
                        self.problem(
                            e.blocknr,
                            SM,
                            format!("entry for block {b} past the end is {c}"),
                        );
                    }
                    continue;
                }
                let c = if c == 3 {
                    match rc.get(&b) {
                        Some(&n) if n >= 3 => n,
                        other => {
                            self.problem(
                                b,
                                SM,
                                format!("bitmap says ≥3, refcount tree has {other:?}"),
                            );
                            3
                        }
                    }
                } else {
                    c
                };
                if c == 0 && first_free.is_none() {
                    first_free = Some(j as u32);
                }
                used += u32::from(c > 0);
                on_disk[b as usize] = c;
            }
            // The kernel counts a bitmap's entries past the device end as free; the C++ tools
            // (era_restore 0.9) do not. Either is accepted (the kernel only tests nr_free != 0).
            let in_device = (self.nr_blocks - base).min(ENTRIES_PER_BITMAP) as u32;
            let (kernel, tools) = (ENTRIES_PER_BITMAP as u32 - used, in_device - used);
            if e.nr_free != kernel && e.nr_free != tools {
                self.problem(
                    e.blocknr,
                    SM,
                    format!(
                        "index entry {i}: nr_free {}, {kernel} entries free",
                        e.nr_free
                    ),
                );
            }
            if first_free.is_some_and(|f| e.none_free_before > f) {
                self.problem(
                    e.blocknr,
                    SM,
                    format!(
                        "index entry {i}: none_free_before {} but entry {first_free:?} is free",
                        e.none_free_before
                    ),
                );
            }
        }
        for (&b, &n) in &rc {
            if b >= self.nr_blocks || on_disk[b as usize] < 3 || n < 3 {
                self.problem(
                    b,
                    "refcount tree",
                    format!("count {n} for a block the bitmap does not mark ≥3"),
                );
            }
        }
        if index.len() != INDEX_ENTRIES {
            self.problem(root.bitmap_root, SM, "short index".into());
        }
        Some(on_disk)
    }

    /// Walks a node: validity, key order within `range`, fill, equal leaf depth. Leaf entries go
    /// to `entries`; nested structures are referenced where the leaf is walked first.
    #[allow(clippy::too_many_arguments)]
    fn node(
        &mut self,
        name: &str,
        b: u64,
        value_size: u32,
        range: (u64, u64),
        depth: usize,
        root: bool,
        count: bool,
        leaf_depth: &mut Option<usize>,
        entries: &mut Vec<(u64, Vec<u8>, bool)>,
    ) {
        if depth >= MAX_DEPTH {
            self.problem(b, name, format!("deeper than {MAX_DEPTH} levels"));
            return;
        }
        if self.budget == 0 {
            self.problem(
                b,
                name,
                "node reached twice in one tree (cycle or corrupt sharing)".into(),
            );
            return;
        }
        self.budget -= 1;
        let n = match node::read_node(self.store, b) {
            Ok(n) => n,
            Err(e) => return self.problem(b, name, e.to_string()),
        };
        self.node_shape(name, b, &n, value_size, range, root);
        if n.leaf {
            if *leaf_depth.get_or_insert(depth) != depth {
                self.problem(
                    b,
                    name,
                    format!("leaf at depth {depth}, others at {leaf_depth:?}"),
                );
            }
            if n.value_size == value_size {
                entries.extend((0..n.nr()).map(|i| (n.keys[i], n.value(i).to_vec(), count)));
            }
            return;
        }
        for i in 0..n.nr() {
            let child = n.child(i);
            let hi = n.keys.get(i + 1).copied().unwrap_or(range.1);
            if child >= self.nr_blocks {
                self.problem(b, name, format!("child {child} past the end"));
                continue;
            }
            let first = self.visited.insert(child);
            if count {
                self.expected[child as usize] += 1;
            }
            self.node(
                name,
                child,
                value_size,
                (n.keys[i], hi),
                depth + 1,
                false,
                count && first,
                leaf_depth,
                entries,
            );
        }
    }

    fn node_shape(
        &mut self,
        name: &str,
        b: u64,
        n: &Node,
        value_size: u32,
        range: (u64, u64),
        root: bool,
    ) {
        if n.leaf && n.value_size != value_size {
            self.problem(
                b,
                name,
                format!("leaf value_size {}, expected {value_size}", n.value_size),
            );
        }
        if n.max_entries % 3 != 0 {
            self.problem(
                b,
                name,
                format!("max_entries {} is not a multiple of 3", n.max_entries),
            );
        }
        if !root && n.nr() < (n.max_entries / 3) as usize {
            self.problem(
                b,
                name,
                format!(
                    "{} entries, fewer than a third of {}",
                    n.nr(),
                    n.max_entries
                ),
            );
        }
        if !n.keys.windows(2).all(|w| w[0] < w[1]) {
            self.problem(b, name, "keys not strictly increasing".into());
        }
        if let (Some(&lo), Some(&hi)) = (n.keys.first(), n.keys.last()) {
            if lo < range.0 || hi >= range.1 {
                self.problem(
                    b,
                    name,
                    format!(
                        "keys {lo}..={hi} outside the parent's range {}..{}",
                        range.0, range.1
                    ),
                );
            }
        }
    }
}
