//! Btree node layout (K dm-btree-internal.h), parse/print, and what needs no transaction: read-only
//! lookup and walks, and the bottom-up builder the space map uses for its refcount tree.

use crate::block::{self, get_u32, get_u64, put_u32, put_u64, Block, BlockStore, Kind, BLOCK_SIZE};
use crate::error::{Error, Result};

pub const NODE_HEADER: usize = 32;
pub const INTERNAL_NODE: u32 = 1;
pub const LEAF_NODE: u32 = 2;

/// `3 * floor(((4096 - 32) / (8 + value_size)) / 3)`: 336, 252, 201, 168 for 4, 8, 12, 16 bytes.
pub fn max_entries(value_size: u32) -> u32 {
    let per = (BLOCK_SIZE - NODE_HEADER) as u32 / (8 + value_size);
    3 * (per / 3)
}

/// One btree node: keys and packed values (`value_size` bytes each; le64 children when internal).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Node {
    pub leaf: bool,
    pub value_size: u32,
    pub max_entries: u32,
    pub keys: Vec<u64>,
    pub values: Vec<u8>,
}

impl Node {
    /// An empty node with the kernel's `max_entries` for its value size.
    pub fn empty(leaf: bool, value_size: u32) -> Node {
        Node {
            leaf,
            value_size,
            max_entries: max_entries(value_size),
            keys: Vec::new(),
            values: Vec::new(),
        }
    }

    pub fn nr(&self) -> usize {
        self.keys.len()
    }

    pub fn is_full(&self) -> bool {
        self.keys.len() >= self.max_entries as usize
    }

    pub fn value(&self, i: usize) -> &[u8] {
        let vs = self.value_size as usize;
        &self.values[i * vs..(i + 1) * vs]
    }

    pub fn set_value(&mut self, i: usize, v: &[u8]) {
        let vs = self.value_size as usize;
        self.values[i * vs..(i + 1) * vs].copy_from_slice(v);
    }

    /// Child block `i` of an internal node.
    pub fn child(&self, i: usize) -> u64 {
        get_u64(self.value(i), 0)
    }

    pub fn set_child(&mut self, i: usize, b: u64) {
        self.set_value(i, &b.to_le_bytes());
    }

    pub fn insert_at(&mut self, i: usize, key: u64, v: &[u8]) {
        let vs = self.value_size as usize;
        self.keys.insert(i, key);
        self.values.splice(i * vs..i * vs, v.iter().copied());
    }

    pub fn remove_at(&mut self, i: usize) -> Vec<u8> {
        let vs = self.value_size as usize;
        self.keys.remove(i);
        self.values.drain(i * vs..(i + 1) * vs).collect()
    }

    /// Moves entries `[at, nr)` into a new node of the same type.
    pub fn split_off(&mut self, at: usize) -> Node {
        let vs = self.value_size as usize;
        Node {
            leaf: self.leaf,
            value_size: self.value_size,
            max_entries: self.max_entries,
            keys: self.keys.split_off(at),
            values: self.values.split_off(at * vs),
        }
    }

    /// "Largest key ≤ key" (the kernel's `lower_bound`); None when key is below every key.
    pub fn lower_bound(&self, key: u64) -> Option<usize> {
        match self.keys.binary_search(&key) {
            Ok(i) => Some(i),
            Err(0) => None,
            Err(i) => Some(i - 1),
        }
    }

    /// Parses and validates the node stored at `location`.
    pub fn parse(b: &Block, location: u64) -> Result<Node> {
        block::validate(b, Kind::BtreeNode, location)?;
        let corrupt = |what: String| Error::Corrupt {
            kind: Kind::BtreeNode,
            block: location,
            what,
        };
        let flags = get_u32(b, 4);
        let leaf = match flags {
            INTERNAL_NODE => false,
            LEAF_NODE => true,
            f => {
                return Err(corrupt(format!(
                    "flags {f:#x} are neither internal (1) nor leaf (2)"
                )))
            }
        };
        let nr = get_u32(b, 16);
        let max = get_u32(b, 20);
        let vs = get_u32(b, 24);
        if vs == 0 || NODE_HEADER as u64 + (8 + u64::from(vs)) * u64::from(max) > BLOCK_SIZE as u64
        {
            return Err(corrupt(format!(
                "max_entries {max} of value_size {vs} do not fit a block"
            )));
        }
        if nr > max {
            return Err(corrupt(format!("nr_entries {nr} > max_entries {max}")));
        }
        // The kernel computes max_entries (never below 3); an internal node always has a child.
        if max < 3 {
            return Err(corrupt(format!("max_entries {max} < 3")));
        }
        if !leaf && nr == 0 {
            return Err(corrupt("internal node without entries".into()));
        }
        if !leaf && vs != 8 {
            return Err(corrupt(format!("internal node with value_size {vs}")));
        }
        let (nr, max, vsz) = (nr as usize, max as usize, vs as usize);
        let keys = (0..nr).map(|i| get_u64(b, NODE_HEADER + 8 * i)).collect();
        let voff = NODE_HEADER + 8 * max;
        let values = b[voff..voff + nr * vsz].to_vec();
        Ok(Node {
            leaf,
            value_size: vs,
            max_entries: max as u32,
            keys,
            values,
        })
    }

    /// The block image at `location`: unused slots zero, values after all `max_entries` keys.
    pub fn print(&self, location: u64) -> Box<Block> {
        let mut b = block::zeroed();
        put_u32(
            &mut b[..],
            4,
            if self.leaf { LEAF_NODE } else { INTERNAL_NODE },
        );
        put_u32(&mut b[..], 16, self.keys.len() as u32);
        put_u32(&mut b[..], 20, self.max_entries);
        put_u32(&mut b[..], 24, self.value_size);
        for (i, k) in self.keys.iter().enumerate() {
            put_u64(&mut b[..], NODE_HEADER + 8 * i, *k);
        }
        let voff = NODE_HEADER + 8 * self.max_entries as usize;
        b[voff..voff + self.values.len()].copy_from_slice(&self.values);
        block::seal(&mut b, Kind::BtreeNode, location);
        b
    }
}

/// Reads and parses a node from a store.
pub fn read_node(store: &dyn BlockStore, b: u64) -> Result<Node> {
    Node::parse(&*store.read(b)?, b)
}

/// Read-only lookup in a single-level tree.
pub fn lookup(store: &dyn BlockStore, root: u64, key: u64) -> Result<Option<Vec<u8>>> {
    let mut b = root;
    for _ in 0..MAX_DEPTH {
        let n = read_node(store, b)?;
        let Some(i) = n.lower_bound(key) else {
            return Ok(None);
        };
        if n.leaf {
            return Ok((n.keys[i] == key).then(|| n.value(i).to_vec()));
        }
        b = n.child(i);
    }
    Err(too_deep(root))
}

/// A bound on depth so that a cycle of internal nodes ends in an error, not a hang.
pub const MAX_DEPTH: usize = 16;

pub fn too_deep(root: u64) -> Error {
    Error::Corrupt {
        kind: Kind::BtreeNode,
        block: root,
        what: format!("tree deeper than {MAX_DEPTH} levels"),
    }
}

/// Leaf entries in key order.
pub type Entries = Vec<(u64, Vec<u8>)>;

/// Every (key, value) of a single-level tree in key order, and the blocks of its nodes.
pub fn walk(store: &dyn BlockStore, root: u64) -> Result<(Entries, Vec<u64>)> {
    let mut entries = Vec::new();
    let mut nodes = Vec::new();
    walk_rec(store, root, 0, &mut entries, &mut nodes)?;
    Ok((entries, nodes))
}

fn walk_rec(
    store: &dyn BlockStore,
    b: u64,
    depth: usize,
    entries: &mut Vec<(u64, Vec<u8>)>,
    nodes: &mut Vec<u64>,
) -> Result<()> {
    if depth >= MAX_DEPTH {
        return Err(too_deep(b));
    }
    // A tree's nodes are never shared within it, so more visits than blocks means a cycle or
    // corrupt sharing (which would otherwise make the walk exponential).
    if nodes.len() as u64 >= store.nr_blocks() {
        return Err(Error::Corrupt {
            kind: Kind::BtreeNode,
            block: b,
            what: "node reached twice in one tree".into(),
        });
    }
    let n = read_node(store, b)?;
    nodes.push(b);
    for i in 0..n.nr() {
        if n.leaf {
            entries.push((n.keys[i], n.value(i).to_vec()));
        } else {
            walk_rec(store, n.child(i), depth + 1, entries, nodes)?;
        }
    }
    Ok(())
}

/// A tree built bottom-up before its blocks are known: internal values are indexes into `nodes`;
/// the root is the last node.
pub struct Built {
    pub nodes: Vec<Node>,
}

/// Packs sorted entries into evenly filled nodes (each non-root node at least half full).
pub fn build(keys: &[u64], values: &[u8], value_size: u32) -> Built {
    let mut nodes = Vec::new();
    let mut level: Vec<(u64, u64)> = Vec::new(); // (first key, node index)
    let vs = value_size as usize;
    for (r, n) in chunks(keys.len(), max_entries(value_size) as usize) {
        let node = Node {
            leaf: true,
            value_size,
            max_entries: max_entries(value_size),
            keys: keys[r..r + n].to_vec(),
            values: values[r * vs..(r + n) * vs].to_vec(),
        };
        level.push((keys.get(r).copied().unwrap_or(0), nodes.len() as u64));
        nodes.push(node);
    }
    while level.len() > 1 {
        let mut up = Vec::new();
        for (r, n) in chunks(level.len(), max_entries(8) as usize) {
            let mut node = Node::empty(false, 8);
            for &(k, idx) in &level[r..r + n] {
                node.insert_at(node.nr(), k, &idx.to_le_bytes());
            }
            up.push((level[r].0, nodes.len() as u64));
            nodes.push(node);
        }
        level = up;
    }
    Built { nodes }
}

/// Splits `n` items into the fewest groups of at most `max`, sizes differing by at most one.
fn chunks(n: usize, max: usize) -> Vec<(usize, usize)> {
    let k = n.div_ceil(max).max(1);
    let mut out = Vec::new();
    let mut start = 0;
    for i in 0..k {
        let len = n / k + usize::from(i < n % k);
        out.push((start, len));
        start += len;
    }
    out
}

impl Built {
    /// The block images once node `i` lives at `locs[i]`; the root is at `locs[last]`.
    pub fn place(mut self, locs: &[u64]) -> Vec<(u64, Box<Block>)> {
        for n in self.nodes.iter_mut().filter(|n| !n.leaf) {
            for i in 0..n.nr() {
                let idx = n.child(i) as usize;
                n.set_child(i, locs[idx]);
            }
        }
        self.nodes
            .iter()
            .zip(locs)
            .map(|(n, &l)| (l, n.print(l)))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn max_entries_match_the_reference() {
        assert_eq!(
            [4, 8, 12, 16].map(max_entries),
            [336, 252, 201, 168],
            "A.4.3: value_size 4 → 336; 8 → 252; 12 → 201; 16 → 168"
        );
    }

    #[test]
    fn hand_built_leaf_parses() {
        // The reference's block 3: writeset-tree leaf, value_size 12, key 5 → {16, root 2}.
        let mut b = block::zeroed();
        put_u32(&mut b[..], 4, 2);
        put_u32(&mut b[..], 16, 1);
        put_u32(&mut b[..], 20, 201);
        put_u32(&mut b[..], 24, 12);
        put_u64(&mut b[..], 32, 5);
        let voff = 32 + 8 * 201;
        put_u32(&mut b[..], voff, 16);
        put_u64(&mut b[..], voff + 4, 2);
        block::seal(&mut b, Kind::BtreeNode, 3);
        let n = Node::parse(&b, 3).expect("valid leaf");
        assert!(n.leaf);
        assert_eq!(n.keys, vec![5]);
        assert_eq!(get_u32(n.value(0), 0), 16);
        assert_eq!(get_u64(n.value(0), 4), 2);
        assert_eq!(&n.print(3)[..], &b[..], "print is the inverse of parse");
    }

    #[test]
    fn corrupt_headers_are_errors() {
        let mut n = Node::empty(true, 8);
        n.insert_at(0, 1, &[0; 8]);
        let good = n.print(4);
        for (off, v) in [(4usize, 3u32), (16, 253), (20, 1000), (24, 0)] {
            let mut b = good.clone();
            put_u32(&mut b[..], off, v);
            block::seal(&mut b, Kind::BtreeNode, 4);
            let e = Node::parse(&b, 4).expect_err("corrupt header");
            assert_eq!(e.errno(), libc::EILSEQ, "{e}");
        }
    }

    #[test]
    fn build_fills_evenly() {
        let keys: Vec<u64> = (0..1000).collect();
        let values = vec![0u8; 4000];
        let built = build(&keys, &values, 4);
        let leaves: Vec<usize> = built
            .nodes
            .iter()
            .filter(|n| n.leaf)
            .map(Node::nr)
            .collect();
        assert_eq!(leaves, vec![334, 333, 333]);
        assert_eq!(built.nodes.len(), 4);
        assert_eq!(
            build(&[], &[], 4).nodes.len(),
            1,
            "an empty tree is one empty leaf"
        );
    }
}
