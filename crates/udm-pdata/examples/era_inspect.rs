//! Reads dm-era metadata from a file or device and prints the superblock, the writesets, the
//! era array and what the checker finds (reference counts included). For cross-checks against
//! the kernel's metadata and era_dump.
//!
//!   cargo run -p udm-pdata --example era_inspect -- META_FILE [--snapshot]

use udm_pdata::array::Array;
use udm_pdata::bitset::Bitset;
use udm_pdata::btree;
use udm_pdata::check;
use udm_pdata::era::{self, Superblock, Writeset, WRITESET_TREE};
use udm_pdata::tm::Tm;
use udm_pdata::FileStore;

fn set_bits(bits: &[bool]) -> Vec<usize> {
    bits.iter()
        .enumerate()
        .filter(|(_, &b)| b)
        .map(|(i, _)| i)
        .collect()
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let path = args
        .first()
        .ok_or("usage: era_inspect META_FILE [--snapshot]")?;
    let store = FileStore::open(path.as_ref(), false)?;
    let sb = Superblock::read(&store, era::SUPERBLOCK_LOCATION)?;
    println!("{sb:#?}");
    let roots = era::check_roots(&store, &sb)?;
    let report = check::check(&store, &sb.sm_root, &roots);
    println!("check: {} problems", report.problems.len());
    for p in &report.problems {
        println!("  {p}");
    }
    let shared = report.expected.iter().filter(|&&c| c > 1).count();
    let used = report.expected.iter().filter(|&&c| c > 0).count();
    println!(
        "blocks referenced: {used}, shared: {shared}, nr_allocated: {}",
        sb.sm_root.nr_allocated
    );
    let view = if args.iter().any(|a| a == "--snapshot") && sb.metadata_snap != 0 {
        Superblock::read(&store, sb.metadata_snap)?
    } else {
        sb.clone()
    };
    let tm = Tm::open(Box::new(store), &sb.sm_root)?;
    for (era, v) in btree::entries(&tm, view.writeset_tree_root, &WRITESET_TREE)? {
        let w = Writeset::parse(&v);
        let bits = Bitset::open(w.root, u64::from(w.nr_bits)).bits(&tm)?;
        println!(
            "writeset era {era} nr_bits {}: {:?}",
            w.nr_bits,
            set_bits(&bits)
        );
    }
    if view.current_writeset.root != 0 {
        let w = view.current_writeset;
        let bits = Bitset::open(w.root, u64::from(w.nr_bits)).bits(&tm)?;
        println!(
            "current writeset (era {}) nr_bits {}: {:?}",
            sb.current_era,
            w.nr_bits,
            set_bits(&bits)
        );
    }
    let a = Array {
        root: view.era_array_root,
        value_size: 4,
    };
    println!("era array: {:?}", a.values(&tm, u64::from(view.nr_blocks))?);
    if !report.is_clean() {
        std::process::exit(1);
    }
    Ok(())
}
