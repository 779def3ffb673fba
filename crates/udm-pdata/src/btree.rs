//! Single-level btrees (K dm-btree.c, dm-btree-remove.c) through the transaction manager: every
//! node on a changed path is shadowed first, so a block reachable from the committed superblock
//! is never written in place. Value types say which values are references to other blocks.

use crate::block::{get_u64, Kind};
use crate::error::{Error, Result};
use crate::node::{self, Node, MAX_DEPTH};
use crate::tm::Tm;

/// What a leaf value refers to, for the kernel's value-type `inc`/`dec`.
#[derive(Clone, Copy, Debug)]
pub enum Refs {
    /// Plain data.
    None,
    /// A le64 block number at offset 0 (array blocks): inc/dec that block.
    Block,
    /// A le64 root of another tree at `at` (a writeset's bitset): dec deletes that tree.
    Tree {
        at: usize,
        inner: &'static ValueType,
    },
}

/// The size of a leaf value and what it refers to.
#[derive(Clone, Copy, Debug)]
pub struct ValueType {
    pub size: u32,
    pub refs: Refs,
}

impl ValueType {
    pub const fn plain(size: u32) -> ValueType {
        ValueType {
            size,
            refs: Refs::None,
        }
    }

    fn inc(&self, tm: &mut Tm, v: &[u8]) -> Result<()> {
        match self.refs {
            Refs::None => Ok(()),
            Refs::Block => tm.inc(get_u64(v, 0)),
            Refs::Tree { at, .. } => tm.inc(get_u64(v, at)),
        }
    }

    fn dec(&self, tm: &mut Tm, v: &[u8]) -> Result<()> {
        match self.refs {
            Refs::None => Ok(()),
            Refs::Block => tm.dec(get_u64(v, 0)),
            Refs::Tree { at, inner } => delete(tm, get_u64(v, at), inner),
        }
    }
}

/// A new tree: one empty leaf (`dm_btree_empty`).
pub fn empty(tm: &mut Tm, vt: &ValueType) -> Result<u64> {
    let b = tm.new_block()?;
    write(tm, b, &Node::empty(true, vt.size))?;
    Ok(b)
}

fn read(tm: &Tm, b: u64, vt: &ValueType) -> Result<Node> {
    let n = Node::parse(&*tm.read(b, Kind::BtreeNode)?, b)?;
    if n.leaf && n.value_size != vt.size {
        return Err(Error::Corrupt {
            kind: Kind::BtreeNode,
            block: b,
            what: format!("leaf value_size {}, expected {}", n.value_size, vt.size),
        });
    }
    Ok(n)
}

fn write(tm: &mut Tm, b: u64, n: &Node) -> Result<()> {
    tm.write(b, Kind::BtreeNode, n.print(b))
}

/// Shadows a node; when it was shared, the copy takes a reference to each child or value.
fn shadow(tm: &mut Tm, b: u64, vt: &ValueType) -> Result<(u64, Node)> {
    let s = tm.shadow(b, Kind::BtreeNode)?;
    let n = Node::parse(&s.data, b)?;
    if n.leaf && n.value_size != vt.size {
        return Err(Error::Corrupt {
            kind: Kind::BtreeNode,
            block: b,
            what: format!("leaf value_size {}", n.value_size),
        });
    }
    if s.inc_children {
        for i in 0..n.nr() {
            if n.leaf {
                vt.inc(tm, n.value(i))?;
            } else {
                tm.inc(n.child(i))?;
            }
        }
    }
    Ok((s.location, n))
}

pub fn lookup(tm: &Tm, root: u64, key: u64, vt: &ValueType) -> Result<Option<Vec<u8>>> {
    let mut b = root;
    for _ in 0..MAX_DEPTH {
        let n = read(tm, b, vt)?;
        let Some(i) = n.lower_bound(key) else {
            return Ok(None);
        };
        if n.leaf {
            return Ok((n.keys[i] == key).then(|| n.value(i).to_vec()));
        }
        b = n.child(i);
    }
    Err(node::too_deep(root))
}

/// Inserts or overwrites `key`; an overwritten value loses its reference (unless equal). Returns
/// the new root (the old one when it was already shadowed in this transaction).
pub fn insert(tm: &mut Tm, root: u64, key: u64, value: &[u8], vt: &ValueType) -> Result<u64> {
    let (root, mut n) = shadow(tm, root, vt)?;
    if n.is_full() {
        // The root splits in place: its entries go to two new children.
        let right = n.split_off(n.nr() / 2);
        let left = std::mem::replace(&mut n, Node::empty(false, 8));
        let (l, r) = (tm.new_block()?, tm.new_block()?);
        n.insert_at(0, left.keys[0], &l.to_le_bytes());
        n.insert_at(1, right.keys[0], &r.to_le_bytes());
        write(tm, l, &left)?;
        write(tm, r, &right)?;
    }
    insert_into(tm, root, n, key, value, vt, 0)?;
    Ok(root)
}

fn insert_into(
    tm: &mut Tm,
    loc: u64,
    mut n: Node,
    key: u64,
    value: &[u8],
    vt: &ValueType,
    depth: usize,
) -> Result<()> {
    if depth >= MAX_DEPTH {
        return Err(node::too_deep(loc));
    }
    if n.leaf {
        match n.keys.binary_search(&key) {
            Ok(i) => {
                if n.value(i) != value {
                    let old = n.value(i).to_vec();
                    vt.dec(tm, &old)?;
                    n.set_value(i, value);
                }
            }
            Err(i) => n.insert_at(i, key, value),
        }
        return write(tm, loc, &n);
    }
    let i = match n.lower_bound(key) {
        Some(i) => i,
        None => {
            n.keys[0] = key;
            0
        }
    };
    let (cloc, mut child) = shadow(tm, n.child(i), vt)?;
    n.set_child(i, cloc);
    let mut target = (cloc, child.clone());
    if child.is_full() {
        let right = child.split_off(child.nr() / 2);
        let rloc = tm.new_block()?;
        n.insert_at(i + 1, right.keys[0], &rloc.to_le_bytes());
        write(tm, cloc, &child)?;
        write(tm, rloc, &right)?;
        target = if key >= right.keys[0] {
            (rloc, right)
        } else {
            (cloc, child)
        };
    }
    write(tm, loc, &n)?;
    insert_into(tm, target.0, target.1, key, value, vt, depth + 1)
}

/// Removes `key`; its value loses its reference. Returns the new root and the removed value.
pub fn remove(tm: &mut Tm, root: u64, key: u64, vt: &ValueType) -> Result<(u64, Option<Vec<u8>>)> {
    if lookup(tm, root, key, vt)?.is_none() {
        return Ok((root, None));
    }
    let (root, n) = shadow(tm, root, vt)?;
    let old = remove_from(tm, root, n, key, vt, 0)?;
    // A root left with one child takes that child's entries, keeping its block.
    loop {
        let n = read(tm, root, vt)?;
        if n.leaf || n.nr() != 1 {
            break;
        }
        let (cloc, child) = shadow(tm, n.child(0), vt)?;
        write(tm, root, &child)?;
        tm.dec(cloc)?;
    }
    Ok((root, Some(old)))
}

fn remove_from(
    tm: &mut Tm,
    loc: u64,
    mut n: Node,
    key: u64,
    vt: &ValueType,
    depth: usize,
) -> Result<Vec<u8>> {
    let missing = || Error::Corrupt {
        kind: Kind::BtreeNode,
        block: loc,
        what: format!("key {key} vanished during remove"),
    };
    if depth >= MAX_DEPTH {
        return Err(node::too_deep(loc));
    }
    if n.leaf {
        let i = n.keys.binary_search(&key).map_err(|_| missing())?;
        let old = n.remove_at(i);
        vt.dec(tm, &old)?;
        write(tm, loc, &n)?;
        return Ok(old);
    }
    let i = n.lower_bound(key).ok_or_else(missing)?;
    let (cloc, child) = shadow(tm, n.child(i), vt)?;
    n.set_child(i, cloc);
    let old = remove_from(tm, cloc, child, key, vt, depth + 1)?;
    let child = read(tm, cloc, vt)?;
    if child.nr() < (child.max_entries / 3) as usize && n.nr() > 1 {
        let (li, ri) = if i + 1 < n.nr() {
            (i, i + 1)
        } else {
            (i - 1, i)
        };
        let (lloc, mut left) = shadow(tm, n.child(li), vt)?;
        let (rloc, mut right) = shadow(tm, n.child(ri), vt)?;
        n.set_child(li, lloc);
        n.set_child(ri, rloc);
        if left.nr() + right.nr() <= left.max_entries as usize {
            left.keys.append(&mut right.keys);
            left.values.append(&mut right.values);
            write(tm, lloc, &left)?;
            n.remove_at(ri);
            tm.dec(rloc)?;
        } else {
            let total = left.nr() + right.nr();
            let mut all = left.clone();
            all.keys.extend_from_slice(&right.keys);
            all.values.extend_from_slice(&right.values);
            let r = all.split_off(total / 2);
            write(tm, lloc, &all)?;
            write(tm, rloc, &r)?;
            n.keys[ri] = r.keys[0];
        }
    }
    write(tm, loc, &n)?;
    Ok(old)
}

/// Drops one reference to the tree at `root`; what is no longer referenced releases its children
/// and values (`dm_btree_del`).
pub fn delete(tm: &mut Tm, root: u64, vt: &ValueType) -> Result<()> {
    delete_rec(tm, root, vt, 0)
}

fn delete_rec(tm: &mut Tm, b: u64, vt: &ValueType, depth: usize) -> Result<()> {
    if depth >= MAX_DEPTH {
        return Err(node::too_deep(b));
    }
    if tm.count(b)? > 1 {
        return tm.dec(b);
    }
    let n = read(tm, b, vt)?;
    for i in 0..n.nr() {
        if n.leaf {
            vt.dec(tm, n.value(i))?;
        } else {
            delete_rec(tm, n.child(i), vt, depth + 1)?;
        }
    }
    tm.dec(b)
}

/// A new tree holding sorted `keys` and their packed `values`, written bottom-up (leaves, then
/// the levels above; the root is allocated last), as the userspace tools' builders do.
pub fn build(tm: &mut Tm, keys: &[u64], values: &[u8], vt: &ValueType) -> Result<u64> {
    let built = node::build(keys, values, vt.size);
    let locs = (0..built.nodes.len())
        .map(|_| tm.new_block())
        .collect::<Result<Vec<u64>>>()?;
    let root = locs.last().copied().unwrap_or_default();
    for (loc, b) in built.place(&locs) {
        tm.write(loc, Kind::BtreeNode, b)?;
    }
    Ok(root)
}

/// Every (key, value) in key order.
pub fn entries(tm: &Tm, root: u64, vt: &ValueType) -> Result<Vec<(u64, Vec<u8>)>> {
    let mut out = Vec::new();
    let mut visits = 0u64;
    entries_rec(tm, root, vt, 0, &mut visits, &mut out)?;
    Ok(out)
}

fn entries_rec(
    tm: &Tm,
    b: u64,
    vt: &ValueType,
    depth: usize,
    visits: &mut u64,
    out: &mut Vec<(u64, Vec<u8>)>,
) -> Result<()> {
    if depth >= MAX_DEPTH {
        return Err(node::too_deep(b));
    }
    // Nodes are not shared within one tree: more visits than blocks is corrupt sharing.
    *visits += 1;
    if *visits > tm.store().nr_blocks() {
        return Err(Error::Corrupt {
            kind: Kind::BtreeNode,
            block: b,
            what: "node reached twice in one tree".into(),
        });
    }
    let n = read(tm, b, vt)?;
    for i in 0..n.nr() {
        if n.leaf {
            out.push((n.keys[i], n.value(i).to_vec()));
        } else {
            entries_rec(tm, n.child(i), vt, depth + 1, visits, out)?;
        }
    }
    Ok(())
}
