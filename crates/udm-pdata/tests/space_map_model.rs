//! The space map against a refcount model: allocations only from blocks free in the model's
//! last commit, counts of 0 to many (bitmap entries and the refcount tree, several bitmaps),
//! and after each commit the map reopened from the store equals the model.

use std::collections::{BTreeMap, HashSet};

use proptest::prelude::*;
use udm_pdata::block::BlockStore;
use udm_pdata::node;
use udm_pdata::space_map::{self, SmRoot, SpaceMap};
use udm_pdata::MemStore;

/// Spans three bitmaps (16320 entries each).
const NR_BLOCKS: u64 = 40_000;

#[derive(Clone, Debug)]
enum Op {
    Alloc(u16),
    Inc(usize, u8),
    IncAll,
    Dec(usize),
    DecAll,
    Commit,
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => (1..700u16).prop_map(Op::Alloc),
        6 => (any::<usize>(), 1..5u8).prop_map(|(i, n)| Op::Inc(i, n)),
        1 => Just(Op::IncAll),
        6 => any::<usize>().prop_map(Op::Dec),
        1 => Just(Op::DecAll),
        3 => Just(Op::Commit),
    ]
}

/// The blocks the committed space map uses for itself.
fn own_blocks(store: &dyn BlockStore, root: &SmRoot) -> HashSet<u64> {
    let mut own: HashSet<u64> = HashSet::from([root.bitmap_root]);
    let idx = space_map::parse_index(
        &store.read(root.bitmap_root).expect("read"),
        root.bitmap_root,
    )
    .expect("index");
    own.extend(
        idx.iter()
            .take(NR_BLOCKS.div_ceil(space_map::ENTRIES_PER_BITMAP) as usize)
            .map(|e| e.blocknr),
    );
    own.extend(
        node::walk(store, root.ref_count_root)
            .expect("refcount tree")
            .1,
    );
    own
}

fn run(ops: &[Op]) {
    let mut store = MemStore::new(NR_BLOCKS);
    let mut sm = SpaceMap::new(NR_BLOCKS);
    let mut model: BTreeMap<u64, u32> = BTreeMap::new();
    let mut committed_used: HashSet<u64> = HashSet::new();
    for op in ops {
        let live: Vec<u64> = model.keys().copied().collect();
        match *op {
            Op::Alloc(n) => {
                for _ in 0..n {
                    let b = match sm.alloc() {
                        Ok(b) => b,
                        Err(e) => {
                            assert_eq!(e.errno(), libc::ENOSPC);
                            break;
                        }
                    };
                    assert!(!model.contains_key(&b), "block {b} handed out twice");
                    assert!(
                        !committed_used.contains(&b),
                        "block {b} in use in the committed map"
                    );
                    model.insert(b, 1);
                }
            }
            Op::Inc(i, n) if !live.is_empty() => {
                let b = live[i % live.len()];
                for _ in 0..n {
                    sm.inc(b).expect("inc");
                    *model.entry(b).or_default() += 1;
                }
            }
            Op::IncAll => {
                for b in live {
                    sm.inc(b).expect("inc");
                    *model.entry(b).or_default() += 1;
                }
            }
            Op::Dec(i) if !live.is_empty() => {
                let b = live[i % live.len()];
                sm.dec(b).expect("dec");
                dec_model(&mut model, b);
            }
            Op::DecAll => {
                for b in live {
                    sm.dec(b).expect("dec");
                    dec_model(&mut model, b);
                }
            }
            Op::Commit => {
                let root = sm.commit(&mut store).expect("commit");
                let own = own_blocks(&store, &root);
                let reopened = SpaceMap::open(&store, &root).expect("reopen");
                for b in 0..NR_BLOCKS {
                    let want = model.get(&b).copied().unwrap_or(0) + u32::from(own.contains(&b));
                    assert_eq!(
                        reopened.count(b).expect("count"),
                        want,
                        "block {b} after reopen"
                    );
                    assert_eq!(sm.count(b).expect("count"), want, "block {b}");
                }
                assert_eq!(root.nr_allocated, (model.len() + own.len()) as u64);
                committed_used = model.keys().copied().chain(own).collect();
            }
            _ => {}
        }
    }
}

fn dec_model(model: &mut BTreeMap<u64, u32>, b: u64) {
    if let Some(c) = model.get_mut(&b) {
        *c -= 1;
        if *c == 0 {
            model.remove(&b);
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 40, ..ProptestConfig::default() })]
    #[test]
    fn space_map_matches_model(ops in prop::collection::vec(op(), 0..60)) {
        run(&ops);
    }
}

/// Enough counts ≥ 3 for a refcount tree of several nodes, and blocks in every bitmap.
#[test]
fn many_overflow_counts_and_bitmaps() {
    let mut ops = vec![Op::Alloc(699); 50];
    ops.extend([
        Op::IncAll,
        Op::IncAll,
        Op::IncAll,
        Op::Commit,
        Op::DecAll,
        Op::Commit,
        Op::DecAll,
        Op::DecAll,
        Op::Commit,
    ]);
    run(&ops);
}
