//! Metadata written by Linux 6.1's dm-era (vmlab), kept as non-zero blocks of a 4 MiB metadata
//! device (origin: 128 blocks of 64 KiB). It reads back as era_dump prints it, and the checker's
//! recomputed reference counts equal the kernel's space map, including the blocks shared with a
//! metadata snapshot.

use udm_pdata::array::Array;
use udm_pdata::bitset::Bitset;
use udm_pdata::block::{BlockStore, BLOCK_SIZE};
use udm_pdata::btree;
use udm_pdata::check::{self, Report};
use udm_pdata::era::{self, Superblock, Writeset, WRITESET_TREE};
use udm_pdata::tm::Tm;
use udm_pdata::MemStore;

/// Each record: le64 block number, then the block. Writes to blocks 1, 2, 40, `checkpoint`,
/// writes to 9 and 2, `take_metadata_snap` (status then: `0 16384 era 8 12/1024 3 48`).
const KERNEL: &[u8] = include_bytes!("data/kernel-6.1-era-metadata-snap.blocks");

/// Metadata written here (`examples/era_write.rs META 128`: current era 5, writesets 4 = {3}
/// and 5 = {1, 2, 9}, era array 1 → 2, 7 → 3, 127 → 1), then loaded by 6.1's dm-era (status
/// `17/1024 6 -`), written at blocks 20, 21, `checkpoint`, 22, `take_metadata_snap` (status
/// `12/1024 8 45`).
const ON_UDM: &[u8] = include_bytes!("data/kernel-6.1-era-on-udm-metadata.blocks");

fn load(image: &[u8]) -> MemStore {
    let mut bytes = vec![0u8; 1024 * BLOCK_SIZE];
    for rec in image.chunks_exact(8 + BLOCK_SIZE) {
        let b = u64::from_le_bytes(rec[..8].try_into().expect("8 bytes")) as usize;
        bytes[b * BLOCK_SIZE..(b + 1) * BLOCK_SIZE].copy_from_slice(&rec[8..]);
    }
    MemStore::from_bytes(&bytes)
}

fn check(store: &MemStore, sb: &Superblock) -> Report {
    check::check(
        store,
        &sb.sm_root,
        &era::check_roots(store, sb).expect("roots"),
    )
}

/// The archived writesets: (era, blocks set).
fn writesets(tm: &Tm, sb: &Superblock) -> Vec<(u64, Vec<usize>)> {
    let ws = btree::entries(tm, sb.writeset_tree_root, &WRITESET_TREE).expect("writesets");
    ws.iter()
        .map(|(era, v)| {
            let w = Writeset::parse(v);
            let bits = Bitset::open(w.root, u64::from(w.nr_bits))
                .bits(tm)
                .expect("bits");
            (
                *era,
                bits.iter()
                    .enumerate()
                    .filter(|(_, &b)| b)
                    .map(|(i, _)| i)
                    .collect(),
            )
        })
        .collect()
}

/// The era array's non-zero entries: (block, era).
fn written(tm: &Tm, sb: &Superblock) -> Vec<(usize, u64)> {
    let a = Array {
        root: sb.era_array_root,
        value_size: 4,
    };
    let eras = a.values(tm, u64::from(sb.nr_blocks)).expect("era array");
    eras.iter()
        .enumerate()
        .filter(|(_, &e)| e != 0)
        .map(|(i, &e)| (i, e))
        .collect()
}

#[test]
fn kernel_metadata_reads_and_checks_clean() {
    let store = load(KERNEL);
    let sb = Superblock::read(&store, 0).expect("superblock");
    assert_eq!(
        (
            sb.data_block_size,
            sb.nr_blocks,
            sb.current_era,
            sb.metadata_snap
        ),
        (128, 128, 3, 48)
    );
    assert_eq!(
        (sb.sm_root.nr_blocks, sb.sm_root.nr_allocated),
        (1024, 12),
        "status: 12/1024"
    );
    let r = check(&store, &sb);
    assert!(r.is_clean(), "{:#?}", r.problems);
    assert_eq!(
        r.expected.iter().filter(|&&c| c == 2).count(),
        2,
        "writeset tree and era array shared with the snapshot"
    );
    let tm = Tm::open(Box::new(store.clone()), &sb.sm_root).expect("tm");
    assert_eq!(
        writesets(&tm, &sb),
        vec![(2, vec![2, 9])],
        "era_dump: writeset era 2 = blocks 2, 9"
    );
    assert_eq!(
        written(&tm, &sb),
        vec![(1, 1), (2, 1), (40, 1)],
        "era_dump: blocks 1, 2, 40 in era 1"
    );
    assert_ne!(
        sb.current_writeset.root, 0,
        "the live writeset is in the superblock"
    );
}

#[test]
fn kernel_metadata_continues_here() {
    // A transaction opened on the kernel's metadata: shadowing must leave everything the
    // committed superblock and the snapshot reach untouched, and commit cleanly.
    let store = load(KERNEL);
    let sb = Superblock::read(&store, 0).expect("superblock");
    let before = store.deep_copy();
    let mut tm = Tm::open(Box::new(store.clone()), &sb.sm_root).expect("tm");
    let mut a = Array {
        root: sb.era_array_root,
        value_size: 4,
    };
    a.set(&mut tm, 128, 100, 3).expect("set");
    let sm_root = tm.pre_commit().expect("pre-commit");
    let old = check(&before, &sb);
    for b in 0..1024u64 {
        if old.expected[b as usize] > 0 {
            assert_eq!(
                store.read(b).expect("read"),
                before.read(b).expect("read"),
                "block {b} was in use"
            );
        }
    }
    let new = Superblock {
        sm_root,
        era_array_root: a.root,
        ..sb
    };
    tm.commit(0, udm_pdata::Kind::EraSuperblock, new.print(0))
        .expect("commit");
    let r = check(&store, &new);
    assert!(r.is_clean(), "{:#?}", r.problems);
}

#[test]
fn kernel_continues_metadata_written_here() {
    let store = load(ON_UDM);
    let sb = Superblock::read(&store, 0).expect("superblock");
    assert_eq!(
        (sb.current_era, sb.metadata_snap, sb.sm_root.nr_allocated),
        (8, 45, 12)
    );
    let r = check(&store, &sb);
    assert!(r.is_clean(), "{:#?}", r.problems);
    let tm = Tm::open(Box::new(store.clone()), &sb.sm_root).expect("tm");
    // As era_dump prints it: our writesets digested (1, 2, 9 → 5; 3 → 4), our values kept
    // (7 → 3, 127 → 1), the kernel's own writes in era 6, and era 7 archived.
    let want = vec![
        (1, 5),
        (2, 5),
        (3, 4),
        (7, 3),
        (9, 5),
        (20, 6),
        (21, 6),
        (127, 1),
    ];
    assert_eq!(written(&tm, &sb), want);
    assert_eq!(writesets(&tm, &sb), vec![(7, vec![22])]);
}
