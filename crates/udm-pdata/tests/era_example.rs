//! The reference's worked example (backup-migration.md A.4.1): what era_restore (TPT 1.3.3)
//! wrote for block_size 128, nr_blocks 16, current_era 5 and one archived writeset (era 5 =
//! bits {1, 2, 9}) on a 4 MiB file. The superblock must match the golden bytes (and so its
//! checksum), every other block the reference's table, and the checker the refcounts.

use udm_pdata::array::ArrayBlock;
use udm_pdata::block::{self, get_u32, get_u64, put_u32, put_u64, BlockStore, Kind};
use udm_pdata::check;
use udm_pdata::era::{self, Restore, Superblock, Writeset};
use udm_pdata::node::Node;
use udm_pdata::space_map::{self, IndexEntry};
use udm_pdata::MemStore;

/// The hexdump in A.4.1, bytes 0x00..0xe0; the rest of the block is zero.
const GOLDEN: &str = "
64a5 a124 0100 0000 0000 0000 0000 0000
0000 0000 0000 0000 0000 0000 0000 0000
7b07 c17e 0000 0000 0100 0000 0004 0000
0000 0000 0900 0000 0000 0000 0800 0000
0000 0000 0700 0000 0000 0000 0000 0000
0000 0000 0000 0000 0000 0000 0000 0000
0000 0000 0000 0000 0000 0000 0000 0000
0000 0000 0000 0000 0000 0000 0000 0000
0000 0000 0000 0000 0000 0000 0000 0000
0000 0000 0000 0000 0000 0000 0000 0000
0000 0000 0000 0000 0000 0000 8000 0000
0800 0000 1000 0000 0500 0000 1000 0000
0000 0000 0000 0000 0300 0000 0000 0000
0500 0000 0000 0000 0000 0000 0000 0000";

fn golden() -> Vec<u8> {
    let hex: String = GOLDEN.chars().filter(char::is_ascii_hexdigit).collect();
    (0..hex.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&hex[i..i + 2], 16).expect("hex"))
        .collect()
}

fn example() -> (MemStore, Superblock) {
    let store = MemStore::new(1024);
    let mut bits = vec![false; 16];
    for b in [1, 2, 9] {
        bits[b] = true;
    }
    let eras: Vec<u32> = (0..16).map(|i| i % 3).collect();
    let r = Restore {
        block_size: 128,
        nr_blocks: 16,
        current_era: 5,
        writesets: &[(5, bits)],
        era_array: &eras,
        flags: 1,
    };
    let sb = era::restore(Box::new(store.clone()), &r).expect("restore");
    (store, sb)
}

#[test]
fn superblock_matches_golden_bytes() {
    let (store, sb) = example();
    let b = store.read(0).expect("read");
    let g = golden();
    assert_eq!(g.len(), 0xe0);
    assert_eq!(&b[..0xe0], &g[..], "superblock bytes 0..224");
    assert!(b[0xe0..].iter().all(|&x| x == 0), "zero after 224");
    assert_eq!(get_u32(&b[..], 0), 0x24a1_a564, "checksum");
    assert_eq!(Superblock::parse(&b, 0).expect("parse"), sb);
    assert_eq!(
        sb.current_writeset,
        Writeset {
            nr_bits: 16,
            root: 0
        }
    );
}

#[test]
fn blocks_match_the_reference_table() {
    let (store, _) = example();
    let node = |b: u64| Node::parse(&store.read(b).expect("read"), b).expect("node");
    let a1 = ArrayBlock::parse(&store.read(1).expect("read"), 1, 8).expect("array block 1");
    assert_eq!((a1.max_entries, a1.values.clone()), (509, vec![0x206]));
    let n2 = node(2);
    assert_eq!(
        (
            n2.leaf,
            n2.value_size,
            n2.max_entries,
            n2.keys.clone(),
            get_u64(n2.value(0), 0)
        ),
        (true, 8, 252, vec![0], 1)
    );
    let n3 = node(3);
    assert_eq!(
        (n3.value_size, n3.max_entries, n3.keys.clone()),
        (12, 201, vec![5])
    );
    assert_eq!(
        Writeset::parse(n3.value(0)),
        Writeset {
            nr_bits: 16,
            root: 2
        }
    );
    let a4 = ArrayBlock::parse(&store.read(4).expect("read"), 4, 4).expect("array block 4");
    assert_eq!((a4.max_entries, a4.values.len()), (1018, 16));
    let n5 = node(5);
    assert_eq!((n5.keys.clone(), get_u64(n5.value(0), 0)), (vec![0], 4));
    let counts = space_map::parse_bitmap(&store.read(6).expect("read"), 6).expect("bitmap 6");
    assert!(counts[..9].iter().all(|&c| c == 1) && counts[9..].iter().all(|&c| c == 0));
    let n7 = node(7);
    assert_eq!(
        (n7.leaf, n7.value_size, n7.max_entries, n7.nr()),
        (true, 4, 336, 0)
    );
    let idx = space_map::parse_index(&store.read(8).expect("read"), 8).expect("index 8");
    assert_eq!(
        idx[0],
        IndexEntry {
            blocknr: 6,
            nr_free: 16311,
            none_free_before: 9
        }
    );
}

#[test]
fn checker_agrees_with_the_space_map() {
    let (store, sb) = example();
    let roots = era::check_roots(&store, &sb).expect("roots");
    let r = check::check(&store, &sb.sm_root, &roots);
    assert!(r.is_clean(), "{:#?}", r.problems);
    let mut want = vec![0u32; 1024];
    want[..9].fill(1);
    assert_eq!(
        r.expected, want,
        "blocks 0..=8 referenced once, nothing else"
    );
}

#[test]
fn superblock_errors_are_the_kernels() {
    let (store, _) = example();
    let good = store.read(0).expect("read");
    let e = Superblock::parse(&good, 1).expect_err("location");
    assert_eq!(e.errno(), libc::ENOTBLK);
    let mut b = good.clone();
    b[200] ^= 1;
    assert_eq!(
        Superblock::parse(&b, 0).expect_err("checksum").errno(),
        libc::EILSEQ
    );
    let mut b = good.clone();
    put_u64(&mut b[..], 32, 1);
    block::seal(&mut b, Kind::EraSuperblock, 0);
    assert_eq!(
        Superblock::parse(&b, 0).expect_err("magic").errno(),
        libc::EILSEQ
    );
    let mut b = good;
    put_u32(&mut b[..], 40, 2);
    block::seal(&mut b, Kind::EraSuperblock, 0);
    let e = Superblock::parse(&b, 0).expect_err("version");
    assert_eq!(e.errno(), libc::EINVAL);
    assert!(e.to_string().contains("version 2"), "{e}");
}
