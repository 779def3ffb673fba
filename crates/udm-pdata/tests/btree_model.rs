//! The btree against a BTreeMap: inserts, removes, snapshots (shared subtrees), commits and
//! crashes (uncommitted work dropped); after each run the committed tree reopens with the same
//! contents and the checker finds every reference count right.

mod common;

use std::collections::BTreeMap;

use proptest::prelude::*;
use udm_pdata::block::BlockStore;
use udm_pdata::btree::{self, ValueType};
use udm_pdata::check::Structure;

const VT: ValueType = ValueType::plain(8);
const TREE: Structure = Structure::Btree {
    value_size: 8,
    nested: None,
};

#[derive(Clone, Debug)]
enum Op {
    Insert(u64, u64),
    InsertRun(u64, u16),
    Remove(u64),
    RemoveRun(u64, u16),
    Commit(u16),
    Crash,
    Snapshot,
    DropSnapshot,
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        20 => (0..4000u64, any::<u64>()).prop_map(|(k, v)| Op::Insert(k, v)),
        3 => (0..4000u64, 1..600u16).prop_map(|(k, n)| Op::InsertRun(k, n)),
        10 => (0..4000u64).prop_map(Op::Remove),
        2 => (0..4000u64, 1..600u16).prop_map(|(k, n)| Op::RemoveRun(k, n)),
        2 => any::<u16>().prop_map(Op::Commit),
        1 => Just(Op::Crash),
        1 => Just(Op::Snapshot),
        1 => Just(Op::DropSnapshot),
    ]
}

type Model = BTreeMap<u64, u64>;

fn contents(tm: &udm_pdata::tm::Tm, root: u64) -> Model {
    btree::entries(tm, root, &VT)
        .expect("walk")
        .into_iter()
        .map(|(k, v)| (k, u64::from_le_bytes(v.try_into().expect("8 bytes"))))
        .collect()
}

/// Equal maps, or a panic naming the first few differing keys (not both maps).
fn assert_same(got: &Model, want: &Model, when: &str) {
    if got != want {
        let keys: std::collections::BTreeSet<u64> =
            got.keys().chain(want.keys()).copied().collect();
        let diff: Vec<_> = keys
            .into_iter()
            .filter(|k| got.get(k) != want.get(k))
            .take(5)
            .map(|k| (k, got.get(&k), want.get(&k)))
            .collect();
        panic!(
            "{when}: {} vs {} entries; first differences (key, got, want): {diff:?}",
            got.len(),
            want.len()
        );
    }
}

fn run(ops: &[Op]) {
    let (store, mut tm) = common::format(4096);
    let mut root = btree::empty(&mut tm, &VT).expect("empty");
    let mut model = Model::new();
    // Snapshots: (root, contents); each holds one reference to its root.
    let mut snaps: Vec<(u64, Model)> = Vec::new();
    let mut committed = (model.clone(), snaps.clone());
    common::commit(&mut tm, &[root]);
    for op in ops {
        match *op {
            Op::Insert(k, v) => {
                root = btree::insert(&mut tm, root, k, &v.to_le_bytes(), &VT).expect("insert");
                model.insert(k, v);
            }
            Op::InsertRun(k, n) => {
                for k in k..k + u64::from(n) {
                    root = btree::insert(&mut tm, root, k, &k.to_le_bytes(), &VT).expect("insert");
                    model.insert(k, k);
                }
            }
            Op::Remove(k) => {
                let (r, old) = btree::remove(&mut tm, root, k, &VT).expect("remove");
                root = r;
                assert_eq!(
                    old.map(|v| u64::from_le_bytes(v.try_into().expect("8 bytes"))),
                    model.remove(&k)
                );
            }
            Op::RemoveRun(k, n) => {
                for k in k..k + u64::from(n) {
                    root = btree::remove(&mut tm, root, k, &VT).expect("remove").0;
                    model.remove(&k);
                }
            }
            Op::Snapshot => {
                tm.inc(root).expect("inc");
                snaps.push((root, model.clone()));
            }
            Op::DropSnapshot => {
                if let Some((r, _)) = snaps.pop() {
                    btree::delete(&mut tm, r, &VT).expect("delete");
                }
            }
            Op::Commit(cut) => {
                let mut roots = vec![root];
                roots.extend(snaps.iter().map(|s| s.0));
                let image = store.deep_copy();
                let start = store.write_log().len();
                common::commit(&mut tm, &roots);
                // A power cut after `cut` of this commit's writes: the device holds the old
                // state (or the new one once the superblock is written), and checks clean.
                let writes = &store.write_log()[start..];
                let n = usize::from(cut) % (writes.len() + 1);
                let mut torn = image.deep_copy();
                for &(b, _) in &writes[..n] {
                    torn.write(b, &store.read(b).expect("read")).expect("write");
                }
                let (t, r) = common::reopen(&torn);
                let want = if n == writes.len() {
                    &model
                } else {
                    &committed.0
                };
                assert_same(
                    &contents(&t, r[0]),
                    want,
                    &format!("after a cut at write {n} of {}", writes.len()),
                );
                common::assert_clean(&common::check(&torn, &vec![TREE; r.len()]));
                committed = (model.clone(), snaps.clone());
            }
            Op::Crash => {
                let (t, roots) = common::reopen(&store);
                tm = t;
                root = roots[0];
                (model, snaps) = committed.clone();
            }
        }
        assert_same(&contents(&tm, root), &model, &format!("after {op:?}"));
        for (r, m) in &snaps {
            assert_same(&contents(&tm, *r), m, &format!("snapshot after {op:?}"));
        }
    }
    let mut roots = vec![root];
    roots.extend(snaps.iter().map(|s| s.0));
    common::commit(&mut tm, &roots);
    let (tm, roots) = common::reopen(&store);
    assert_same(&contents(&tm, roots[0]), &model, "reopened");
    for (r, (_, m)) in roots[1..].iter().zip(&snaps) {
        assert_same(&contents(&tm, *r), m, "snapshot reopened");
    }
    common::assert_clean(&common::check(&store, &vec![TREE; roots.len()]));
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]
    #[test]
    fn btree_matches_model(ops in prop::collection::vec(op(), 0..120)) {
        run(&ops);
    }
}

/// Three levels (more than 252 * 252 entries), then everything removed in a scattered order.
#[test]
fn deep_tree_grows_and_shrinks() {
    let n = 70_000u64;
    let (store, mut tm) = common::format(8192);
    let mut root = btree::empty(&mut tm, &VT).expect("empty");
    for k in 0..n {
        let k = (k * 7919) % n;
        root = btree::insert(&mut tm, root, k, &k.to_le_bytes(), &VT).expect("insert");
    }
    common::commit(&mut tm, &[root]);
    common::assert_clean(&common::check(&store, &[TREE]));
    for k in 0..n {
        let k = (k * 104_729) % n;
        if k % 5 != 0 {
            root = btree::remove(&mut tm, root, k, &VT).expect("remove").0;
        }
    }
    common::commit(&mut tm, &[root]);
    common::assert_clean(&common::check(&store, &[TREE]));
    let want: Model = (0..n).filter(|k| k % 5 == 0).map(|k| (k, k)).collect();
    assert_eq!(contents(&tm, root), want);
}
