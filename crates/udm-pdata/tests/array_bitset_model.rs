//! dm-array against a Vec<u64> and dm-bitset against a Vec<bool>: sets, resizes (growing adds
//! one block per new full block, as the kernel), snapshots of the root, commits and crashes; then reopen and check.

mod common;

use proptest::prelude::*;
use udm_pdata::array::Array;
use udm_pdata::bitset::Bitset;
use udm_pdata::check::Structure;

#[derive(Clone, Debug)]
enum Op {
    Set(usize, u64),
    Resize(u64, u64),
    Commit,
    Crash,
    Snapshot,
}

fn op(max_len: u64) -> impl Strategy<Value = Op> {
    prop_oneof![
        12 => (any::<usize>(), any::<u64>()).prop_map(|(i, v)| Op::Set(i, v)),
        3 => (0..max_len, any::<u64>()).prop_map(|(n, d)| Op::Resize(n, d)),
        2 => Just(Op::Commit),
        1 => Just(Op::Crash),
        1 => Just(Op::Snapshot),
    ]
}

type State = (Vec<u64>, Vec<(u64, Vec<u64>)>);

fn run_array(ops: &[Op]) {
    let (store, mut tm) = common::format(2048);
    let mut a = Array::empty(&mut tm, 4).expect("empty");
    let mut model: Vec<u64> = Vec::new();
    let mut snaps: Vec<(u64, Vec<u64>)> = Vec::new();
    let roots = |a: &Array, s: &[(u64, Vec<u64>)]| -> Vec<u64> {
        std::iter::once(a.root)
            .chain(s.iter().map(|x| x.0))
            .collect()
    };
    let structures = |m: &Vec<u64>, s: &[(u64, Vec<u64>)]| -> Vec<Structure> {
        std::iter::once(m.len())
            .chain(s.iter().map(|x| x.1.len()))
            .map(|len| Structure::Array {
                value_size: 4,
                len: len as u64,
            })
            .collect()
    };
    common::commit(&mut tm, &roots(&a, &snaps));
    let mut committed: State = (model.clone(), snaps.clone());
    for op in ops {
        match *op {
            Op::Set(i, v) if !model.is_empty() => {
                let i = i % model.len();
                let v = v & 0xFFFF_FFFF;
                a.set(&mut tm, model.len() as u64, i as u64, v)
                    .expect("set");
                model[i] = v;
            }
            Op::Set(..) => {}
            Op::Resize(n, d) => {
                let d = d & 0xFFFF_FFFF;
                a.resize(&mut tm, model.len() as u64, n, d).expect("resize");
                model.resize(n as usize, d);
            }
            Op::Snapshot => {
                // As the kernel does (era's metadata_take_snap): commit, then share the root.
                common::commit(&mut tm, &roots(&a, &snaps));
                committed = (model.clone(), snaps.clone());
                tm.inc(a.root).expect("inc");
                snaps.push((a.root, model.clone()));
            }
            Op::Commit => {
                common::commit(&mut tm, &roots(&a, &snaps));
                committed = (model.clone(), snaps.clone());
            }
            Op::Crash => {
                let (t, r) = common::reopen(&store);
                tm = t;
                a.root = r[0];
                (model, snaps) = committed.clone();
            }
        }
        assert_eq!(
            a.values(&tm, model.len() as u64).expect("values"),
            model,
            "after {op:?}"
        );
        for (r, m) in &snaps {
            let s = Array {
                root: *r,
                value_size: 4,
            };
            assert_eq!(
                &s.values(&tm, m.len() as u64).expect("values"),
                m,
                "snapshot after {op:?}"
            );
        }
    }
    common::commit(&mut tm, &roots(&a, &snaps));
    let (tm, r) = common::reopen(&store);
    let a = Array {
        root: r[0],
        value_size: 4,
    };
    assert_eq!(
        a.values(&tm, model.len() as u64).expect("values"),
        model,
        "reopened"
    );
    common::assert_clean(&common::check(&store, &structures(&model, &snaps)));
}

fn run_bitset(ops: &[Op]) {
    let (store, mut tm) = common::format(2048);
    let mut b = Bitset::empty(&mut tm).expect("empty");
    let mut model: Vec<bool> = Vec::new();
    common::commit(&mut tm, &[b.root()]);
    let mut committed = model.clone();
    for op in ops {
        match *op {
            Op::Set(i, v) if !model.is_empty() => {
                let i = i % model.len();
                b.set(&mut tm, i as u64, v & 1 == 1).expect("set");
                model[i] = v & 1 == 1;
            }
            Op::Set(..) | Op::Snapshot => {}
            Op::Resize(n, d) => {
                b.resize(&mut tm, n, d & 1 == 1).expect("resize");
                model.resize(n as usize, d & 1 == 1);
            }
            Op::Commit => {
                common::commit(&mut tm, &[b.root(), b.nr_bits]);
                committed = model.clone();
            }
            Op::Crash => {
                let (t, r) = common::reopen(&store);
                tm = t;
                b = Bitset::open(r[0], committed.len() as u64);
                model = committed.clone();
            }
        }
        assert_eq!(b.bits(&tm).expect("bits"), model, "after {op:?}");
    }
    common::commit(&mut tm, &[b.root()]);
    let (tm, r) = common::reopen(&store);
    let reopened = Bitset::open(r[0], model.len() as u64);
    assert_eq!(reopened.bits(&tm).expect("bits"), model, "reopened");
    for (i, &v) in model.iter().enumerate().step_by(97) {
        assert_eq!(reopened.test(&tm, i as u64).expect("test"), v);
    }
    common::assert_clean(&common::check(
        &store,
        &[Structure::Bitset {
            nr_bits: model.len() as u64,
        }],
    ));
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 40, ..ProptestConfig::default() })]
    #[test]
    fn array_matches_model(ops in prop::collection::vec(op(4000), 0..80)) {
        run_array(&ops);
    }

    #[test]
    fn bitset_matches_model(ops in prop::collection::vec(op(70_000), 0..80)) {
        run_bitset(&ops);
    }
}
