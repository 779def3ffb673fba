//! A minimal superblock for the property tests: block 0 holds the space-map root and a list of
//! structure roots, committed the kernel's way through the transaction manager.
#![allow(dead_code)]

use udm_pdata::block::{self, get_u32, get_u64, put_u32, put_u64, BlockStore, Kind};
use udm_pdata::check::{self, Report, Structure};
use udm_pdata::space_map::SmRoot;
use udm_pdata::tm::Tm;
use udm_pdata::MemStore;

const SB_KIND: Kind = Kind::CloneSuperblock;

/// A new metadata device of `nr_blocks`, its superblock at block 0.
pub fn format(nr_blocks: u64) -> (MemStore, Tm) {
    let store = MemStore::new(nr_blocks);
    let mut tm = Tm::format(Box::new(store.clone()));
    assert_eq!(tm.new_block().expect("space for the superblock"), 0);
    (store, tm)
}

/// Commits with `roots` in the superblock.
pub fn commit(tm: &mut Tm, roots: &[u64]) -> SmRoot {
    let sm = tm.pre_commit().expect("pre-commit");
    let mut sb = block::zeroed();
    sb[16..48].copy_from_slice(&sm.print());
    put_u32(&mut sb[..], 56, roots.len() as u32);
    for (i, r) in roots.iter().enumerate() {
        put_u64(&mut sb[..], 64 + 8 * i, *r);
    }
    tm.commit(0, SB_KIND, sb).expect("commit");
    sm
}

/// Opens what was last committed: the transaction manager and the roots.
pub fn reopen(store: &MemStore) -> (Tm, Vec<u64>) {
    let (sm, roots) = read_sb(store);
    (
        Tm::open(Box::new(store.clone()), &sm).expect("reopen"),
        roots,
    )
}

pub fn read_sb(store: &dyn BlockStore) -> (SmRoot, Vec<u64>) {
    let sb = block::read_validated(store, 0, SB_KIND).expect("superblock");
    let n = get_u32(&sb[..], 56) as usize;
    (
        SmRoot::parse(&sb[16..48]),
        (0..n).map(|i| get_u64(&sb[..], 64 + 8 * i)).collect(),
    )
}

/// Runs the checker on the committed state; `what` says the structure of each root.
pub fn check(store: &MemStore, what: &[Structure]) -> Report {
    let (sm, roots) = read_sb(store);
    let mut set = vec![("superblock", 0, Structure::Block(SB_KIND))];
    set.extend(roots.iter().zip(what).map(|(&r, &s)| ("root", r, s)));
    check::check(store, &sm, &set)
}

pub fn assert_clean(r: &Report) {
    let shown: Vec<String> = r
        .problems
        .iter()
        .take(10)
        .map(ToString::to_string)
        .collect();
    assert!(r.is_clean(), "{} problems: {shown:#?}", r.problems.len());
}
