//! Writes dm-era metadata to an existing file or device the way era_restore lays it out, for
//! loading in the kernel's dm-era (vmlab cross-check): block size 128 sectors, NR_BLOCKS origin
//! blocks, current era 5, archived writesets 4 = {3} and 5 = {1, 2, 9}, era array with block 1
//! in era 2, 7 in era 3, the last block in era 1.
//!
//!   cargo run -p udm-pdata --example era_write -- META_FILE NR_BLOCKS

use udm_pdata::era::{self, Restore};
use udm_pdata::FileStore;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let (Some(path), Some(nr)) = (args.first(), args.get(1)) else {
        return Err("usage: era_write META_FILE NR_BLOCKS".into());
    };
    let nr: u32 = nr.parse()?;
    if nr < 16 {
        return Err("NR_BLOCKS must be at least 16".into());
    }
    let ws = |bits: &[usize]| {
        (0..nr as usize)
            .map(|i| bits.contains(&i))
            .collect::<Vec<bool>>()
    };
    let writesets = vec![(4, ws(&[3])), (5, ws(&[1, 2, 9]))];
    let mut eras = vec![0u32; nr as usize];
    eras[1] = 2;
    eras[7] = 3;
    eras[nr as usize - 1] = 1;
    let r = Restore {
        block_size: 128,
        nr_blocks: nr,
        current_era: 5,
        writesets: &writesets,
        era_array: &eras,
        flags: 0,
    };
    let sb = era::restore(Box::new(FileStore::open(path.as_ref(), true)?), &r)?;
    println!("{sb:?}");
    Ok(())
}
