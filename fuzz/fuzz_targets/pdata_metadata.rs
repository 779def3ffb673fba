//! udm-pdata on an arbitrary metadata image: block parsers, opening the space map and the
//! transaction manager, walking trees and arrays, and the checker must give errors, never
//! panic or hang. The first byte selects modes; bit 0 reseals every block (location and
//! checksum, as the kind its last byte picks) so the fuzzer gets past the checksums.
#![no_main]
use udm_pdata::array::{Array, ArrayBlock};
use udm_pdata::bitset::Bitset;
use udm_pdata::block::{self, get_u32, get_u64, BlockStore, Kind};
use udm_pdata::btree::{self, ValueType};
use udm_pdata::check::{self, Structure};
use udm_pdata::era::{self, Superblock, Writeset};
use udm_pdata::node::Node;
use udm_pdata::space_map::{self, SmRoot};
use udm_pdata::tm::Tm;
use udm_pdata::MemStore;

const MAX_BLOCKS: usize = 64;
const KINDS: [Kind; 6] =
    [Kind::EraSuperblock, Kind::CloneSuperblock, Kind::BtreeNode, Kind::Bitmap, Kind::Index, Kind::ArrayBlock];

fn structure(sel: u8, v: u32) -> Structure {
    match sel % 4 {
        0 => Structure::Btree { value_size: 8, nested: None },
        1 => Structure::Array { value_size: 4, len: u64::from(v % 5000) },
        2 => Structure::Bitset { nr_bits: u64::from(v % 100_000) },
        _ => Structure::Btree {
            value_size: 12,
            nested: Some((4, |v| Structure::Bitset { nr_bits: u64::from(get_u32(v, 0)) })),
        },
    }
}

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else { return };
    let nr = rest.len().div_ceil(block::BLOCK_SIZE).clamp(1, MAX_BLOCKS);
    let mut image = vec![0u8; nr * block::BLOCK_SIZE];
    let n = rest.len().min(image.len());
    image[..n].copy_from_slice(&rest[..n]);
    if mode & 1 == 1 {
        for (i, b) in image.chunks_exact_mut(block::BLOCK_SIZE).enumerate() {
            let kind = KINDS[usize::from(b[block::BLOCK_SIZE - 1]) % KINDS.len()];
            let blk: &mut block::Block = b.try_into().expect("whole block");
            block::seal(blk, kind, i as u64);
        }
    }
    let store = MemStore::from_bytes(&image);
    for i in 0..nr as u64 {
        let b = store.read(i).expect("in range");
        let _ = Node::parse(&b, i);
        let _ = space_map::parse_index(&b, i);
        let _ = space_map::parse_bitmap(&b, i);
        let _ = ArrayBlock::parse(&b, i, 4);
        let _ = ArrayBlock::parse(&b, i, 8);
    }
    // Block 0 as an era superblock: its roots, the checker, and the era structures.
    if let Ok(sb) = Superblock::parse(&store.read(0).expect("in range"), 0) {
        if let Ok(roots) = era::check_roots(&store, &sb) {
            let _ = check::check(&store, &sb.sm_root, &roots);
        }
        if let Ok(tm) = Tm::open(Box::new(store.clone()), &sb.sm_root) {
            if let Ok(ws) = btree::entries(&tm, sb.writeset_tree_root, &era::WRITESET_TREE) {
                for (_, v) in ws.iter().take(8) {
                    let w = Writeset::parse(v);
                    let _ = Bitset::open(w.root, u64::from(w.nr_bits) % 100_000).bits(&tm);
                }
            }
            let a = Array { root: sb.era_array_root, value_size: 4 };
            let _ = a.values(&tm, u64::from(sb.nr_blocks) % 100_000);
        }
    }
    // Block 0 as the tests' superblock: the space-map root at 16, up to 4 roots from 64.
    let sb = store.read(0).expect("in range");
    let sm = SmRoot::parse(&sb[16..48]);
    let roots: Vec<(&str, u64, Structure)> = (0..(get_u32(&sb[..], 56) % 5) as usize)
        .map(|i| ("root", get_u64(&sb[..], 64 + 8 * i), structure(mode >> (2 * (i % 4) + 1), get_u32(&sb[..], 100 + 4 * i))))
        .collect();
    let _ = check::check(&store, &sm, &roots);
    let Ok(mut tm) = Tm::open(Box::new(store.clone()), &sm) else { return };
    let vt = ValueType::plain(8);
    for &(_, r, s) in &roots {
        match s {
            Structure::Array { len, .. } => {
                let mut a = Array { root: r, value_size: 4 };
                let _ = a.values(&tm, len);
                let _ = a.set(&mut tm, len, len / 2, 1);
                let _ = a.resize(&mut tm, len, len / 3, 0);
            }
            _ => {
                let _ = btree::entries(&tm, r, &vt);
                let _ = btree::insert(&mut tm, r, 7, &[1; 8], &vt);
                let _ = btree::remove(&mut tm, r, 3, &vt);
            }
        }
    }
    let _ = tm.pre_commit();
});
