//! The checker finds what era_check does not: a wrong reference count in the space map (each
//! difference reported with its block), as well as bad checksums, wrong locations and key order.
//! Also: the commit order, and the file-backed store.

mod common;

use udm_pdata::array::Array;
use udm_pdata::block::{self, BlockStore, Kind};
use udm_pdata::btree::{self, ValueType};
use udm_pdata::check::Structure;
use udm_pdata::node::Node;
use udm_pdata::space_map::{self, SmRoot};
use udm_pdata::tm::Tm;
use udm_pdata::{FileStore, MemStore};

const VT: ValueType = ValueType::plain(8);
const TREE: Structure = Structure::Btree {
    value_size: 8,
    nested: None,
};
const ARRAY: Structure = Structure::Array {
    value_size: 4,
    len: 3000,
};

/// A device with a two-level tree (600 keys) and an array of 3000 le32 values.
fn build() -> (MemStore, Tm, u64, Array) {
    let (store, mut tm) = common::format(1024);
    let mut root = btree::empty(&mut tm, &VT).expect("empty");
    for k in 0..600u64 {
        root = btree::insert(&mut tm, root, k * 3, &k.to_le_bytes(), &VT).expect("insert");
    }
    let mut a = Array::empty(&mut tm, 4).expect("array");
    a.resize(&mut tm, 0, 3000, 7).expect("resize");
    a.set(&mut tm, 3000, 2500, 9).expect("set");
    common::commit(&mut tm, &[root, a.root]);
    (store, tm, root, a)
}

fn sm_root(store: &MemStore) -> SmRoot {
    common::read_sb(store).0
}

/// Rewrites the bitmap entry of `b` to `count` with a valid checksum (as the reference's
/// experiment did to show era_check misses it).
fn set_bitmap_count(store: &MemStore, b: u64, count: u32) {
    let root = sm_root(store);
    let idx = space_map::parse_index(
        &store.read(root.bitmap_root).expect("read"),
        root.bitmap_root,
    )
    .expect("index");
    let bm = idx[0].blocknr;
    let mut counts = space_map::parse_bitmap(&store.read(bm).expect("read"), bm).expect("bitmap");
    counts[b as usize] = count;
    store.poke(bm, &space_map::print_bitmap(&counts, bm));
}

#[test]
fn clean_device_checks_clean() {
    let (store, ..) = build();
    common::assert_clean(&common::check(&store, &[TREE, ARRAY]));
}

#[test]
fn wrong_refcounts_are_each_reported() {
    let (store, tm, root, _) = build();
    let child = Node::parse(&tm.read(root, Kind::BtreeNode).expect("root"), root)
        .expect("node")
        .child(1);
    set_bitmap_count(&store, child, 0);
    let r = common::check(&store, &[TREE, ARRAY]);
    let found: Vec<String> = r.problems.iter().map(ToString::to_string).collect();
    assert!(
        found.iter().any(|p| p
            == &format!("block {child}: space map: reference count 0 on disk, 1 references found")),
        "{found:#?}"
    );
    assert!(
        found.iter().any(|p| p.contains("nr_allocated")),
        "{found:#?}"
    );
    // A leak: a count of 2 for a block referenced once.
    set_bitmap_count(&store, child, 2);
    let r = common::check(&store, &[TREE, ARRAY]);
    assert!(
        r.problems
            .iter()
            .any(|p| p.block == child && p.what.contains("reference count 2 on disk, 1")),
        "{:#?}",
        r.problems
    );
}

#[test]
fn shared_blocks_count_each_reference() {
    let (store, mut tm, root, a) = build();
    // A second reference to the tree, then a change to the live copy: the two share subtrees.
    tm.inc(root).expect("inc");
    let live = btree::insert(&mut tm, root, 1, &[1; 8], &VT).expect("insert");
    common::commit(&mut tm, &[live, a.root, root]);
    let r = common::check(&store, &[TREE, ARRAY, TREE]);
    common::assert_clean(&r);
    assert!(r.expected.contains(&2), "shared children are counted twice");
}

#[test]
fn bad_blocks_are_reported_with_errno_text() {
    let (store, tm, root, _) = build();
    let n = Node::parse(&tm.read(root, Kind::BtreeNode).expect("root"), root).expect("node");
    let (c0, c1) = (n.child(0), n.child(1));
    let mut b = store.read(c0).expect("read");
    b[200] ^= 0xff;
    store.poke(c0, &b);
    // c1 holds a valid node that claims to live elsewhere.
    let mut moved = store.read(c1).expect("read");
    block::seal(&mut moved, Kind::BtreeNode, c1 + 1000);
    store.poke(c1, &moved);
    let r = common::check(&store, &[TREE, ARRAY]);
    let text: Vec<String> = r.problems.iter().map(ToString::to_string).collect();
    assert!(
        text.iter()
            .any(|p| p.starts_with(&format!("block {c0}:")) && p.contains("EILSEQ")),
        "{text:#?}"
    );
    assert!(
        text.iter()
            .any(|p| p.starts_with(&format!("block {c1}:")) && p.contains("ENOTBLK")),
        "{text:#?}"
    );
}

#[test]
fn key_order_is_checked() {
    let (store, tm, root, _) = build();
    let n = Node::parse(&tm.read(root, Kind::BtreeNode).expect("root"), root).expect("node");
    let leaf = n.child(0);
    let mut l = Node::parse(&store.read(leaf).expect("read"), leaf).expect("leaf");
    l.keys.swap(3, 4);
    store.poke(leaf, &l.print(leaf));
    let r = common::check(&store, &[TREE, ARRAY]);
    assert!(
        r.problems
            .iter()
            .any(|p| p.block == leaf && p.what.contains("strictly increasing")),
        "{:#?}",
        r.problems
    );
}

#[test]
fn array_shape_is_checked() {
    let (store, ..) = build();
    let r = common::check(
        &store,
        &[
            TREE,
            Structure::Array {
                value_size: 4,
                len: 2000,
            },
        ],
    );
    assert!(
        r.problems
            .iter()
            .any(|p| p.what.contains("array blocks for 2000 values")),
        "{:#?}",
        r.problems
    );
}

#[test]
fn superblock_is_written_last_between_flushes() {
    let (store, mut tm, root, a) = build();
    let before = store.write_log().len();
    let root = btree::insert(&mut tm, root, 5, &[5; 8], &VT).expect("insert");
    let f = store.flushes();
    common::commit(&mut tm, &[root, a.root]);
    let log = &store.write_log()[before..];
    let (last, rest) = log.split_last().expect("writes");
    assert_eq!(
        *last,
        (0, f + 1),
        "the superblock comes after the first flush"
    );
    assert!(
        rest.iter().all(|&(b, fl)| b != 0 && fl == f),
        "data and space map before it: {rest:?}"
    );
    assert_eq!(store.flushes(), f + 2, "and is flushed itself");
    // Nothing the previous superblock reached was written: every block written is new.
    let old = common::check(&store, &[TREE, ARRAY]);
    common::assert_clean(&old);
}

#[test]
fn uncommitted_writes_never_touch_committed_blocks() {
    let (store, mut tm, root, mut a) = build();
    let image = store.deep_copy();
    let mut r = root;
    for k in 0..2000u64 {
        r = btree::insert(&mut tm, r, k, &[9; 8], &VT).expect("insert");
    }
    a.set(&mut tm, 3000, 5, 5).expect("set");
    tm.pre_commit().expect("pre-commit");
    // Crash before the superblock: the old superblock still describes a clean device.
    let in_use = common::check(&image, &[TREE, ARRAY]).expected;
    for b in 0..store.nr_blocks() {
        if image.read(b).expect("read") != store.read(b).expect("read") {
            assert_eq!(in_use[b as usize], 0, "block {b} was in use");
        }
    }
    common::assert_clean(&common::check(&store, &[TREE, ARRAY]));
}

#[test]
fn file_store_round_trip() {
    let f = tempfile::NamedTempFile::new().expect("temp file");
    f.as_file().set_len(256 * 4096).expect("size");
    let store = FileStore::open(f.path(), true).expect("open");
    assert_eq!(store.nr_blocks(), 256);
    let mut tm = Tm::format(Box::new(store));
    assert_eq!(tm.new_block().expect("sb"), 0);
    let mut root = btree::empty(&mut tm, &VT).expect("empty");
    for k in 0..300u64 {
        root = btree::insert(&mut tm, root, k, &k.to_le_bytes(), &VT).expect("insert");
    }
    common::commit(&mut tm, &[root]);
    drop(tm);
    let store = FileStore::open(f.path(), false).expect("reopen");
    let (sm, roots) = common::read_sb(&store);
    let tm = Tm::open(Box::new(store), &sm).expect("tm");
    assert_eq!(
        btree::lookup(&tm, roots[0], 299, &VT).expect("lookup"),
        Some(299u64.to_le_bytes().to_vec())
    );
    assert_eq!(
        btree::entries(&tm, roots[0], &VT).expect("entries").len(),
        300
    );
}

#[test]
fn superblock_only_after_pre_commit() {
    let (store, mut tm, root, _) = build();
    let sb = || block::zeroed();
    assert_eq!(
        tm.commit(0, Kind::CloneSuperblock, sb())
            .expect_err("no pre-commit")
            .errno(),
        libc::EINVAL
    );
    tm.pre_commit().expect("pre-commit");
    btree::insert(&mut tm, root, 1, &[1; 8], &VT).expect("insert");
    assert!(
        tm.commit(0, Kind::CloneSuperblock, sb()).is_err(),
        "a change after the pre-commit"
    );
    common::assert_clean(&common::check(&store, &[TREE, ARRAY]));
}
