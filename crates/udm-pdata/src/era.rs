//! dm-era's metadata (K dm-era-target.c `struct superblock_disk`): the superblock, the
//! writeset tree (era → `{le32 nr_bits; le64 bitset root}`), the era array (le32 per origin
//! block), and the root set the checker walks. The era target itself is not here.

use crate::array::{Array, ARRAY_TREE};
use crate::bitset::Bitset;
use crate::block::{self, get_u32, get_u64, put_u32, put_u64, Block, BlockStore, Kind};
use crate::btree::{self, Refs, ValueType};
use crate::check::Structure;
use crate::error::{Error, Result};
use crate::space_map::SmRoot;
use crate::tm::Tm;

pub const SUPERBLOCK_LOCATION: u64 = 0;
pub const MAGIC: u64 = 2_126_579_579;
pub const VERSION: u32 = 1;
/// 4096 >> 9: the metadata block size in sectors.
pub const METADATA_BLOCK_SECTORS: u32 = 8;

/// The writeset tree's value: a 12-byte packed `writeset_disk`; dec deletes the bitset.
pub static WRITESET_TREE: ValueType = ValueType {
    size: 12,
    refs: Refs::Tree {
        at: 4,
        inner: &ARRAY_TREE,
    },
};

/// `struct writeset_disk`: a bitset of `nr_bits` at `root` (root 0 = none).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Writeset {
    pub nr_bits: u32,
    pub root: u64,
}

impl Writeset {
    pub fn parse(v: &[u8]) -> Writeset {
        Writeset {
            nr_bits: get_u32(v, 0),
            root: get_u64(v, 4),
        }
    }

    pub fn print(&self) -> [u8; 12] {
        let mut v = [0u8; 12];
        put_u32(&mut v, 0, self.nr_bits);
        put_u64(&mut v, 4, self.root);
        v
    }
}

/// The era superblock (224 bytes used, the rest zero).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Superblock {
    /// The kernel writes 0 and never reads it; the Rust tools read bit 0 as clean shutdown.
    pub flags: u32,
    pub uuid: [u8; 16],
    pub magic: u64,
    pub version: u32,
    pub sm_root: SmRoot,
    /// Era block size in sectors.
    pub data_block_size: u32,
    pub metadata_block_size: u32,
    pub nr_blocks: u32,
    pub current_era: u32,
    pub current_writeset: Writeset,
    pub writeset_tree_root: u64,
    pub era_array_root: u64,
    /// The metadata snapshot's superblock copy; 0 = none.
    pub metadata_snap: u64,
}

impl Superblock {
    /// Parses the superblock at `location` with the kernel's checks: location (ENOTBLK),
    /// checksum and magic (EILSEQ), version 1 (EINVAL).
    pub fn parse(b: &Block, location: u64) -> Result<Superblock> {
        block::validate(b, Kind::EraSuperblock, location)?;
        let mut uuid = [0u8; 16];
        uuid.copy_from_slice(&b[16..32]);
        let sb = Superblock {
            flags: get_u32(b, 4),
            uuid,
            magic: get_u64(b, 32),
            version: get_u32(b, 40),
            sm_root: SmRoot::parse(&b[44..76]),
            data_block_size: get_u32(b, 172),
            metadata_block_size: get_u32(b, 176),
            nr_blocks: get_u32(b, 180),
            current_era: get_u32(b, 184),
            current_writeset: Writeset::parse(&b[188..200]),
            writeset_tree_root: get_u64(b, 200),
            era_array_root: get_u64(b, 208),
            metadata_snap: get_u64(b, 216),
        };
        if sb.magic != MAGIC {
            return Err(Error::Corrupt {
                kind: Kind::EraSuperblock,
                block: location,
                what: format!("magic {:#x}, expected {MAGIC:#x}", sb.magic),
            });
        }
        if sb.version != VERSION {
            return Err(Error::Unsupported {
                kind: Kind::EraSuperblock,
                block: location,
                what: format!(
                    "era metadata version {} found, but only versions between 1 and 1 supported",
                    sb.version
                ),
            });
        }
        Ok(sb)
    }

    /// The block image at `location`, sealed.
    pub fn print(&self, location: u64) -> Box<Block> {
        let mut b = block::zeroed();
        put_u32(&mut b[..], 4, self.flags);
        b[16..32].copy_from_slice(&self.uuid);
        put_u64(&mut b[..], 32, self.magic);
        put_u32(&mut b[..], 40, self.version);
        b[44..76].copy_from_slice(&self.sm_root.print());
        put_u32(&mut b[..], 172, self.data_block_size);
        put_u32(&mut b[..], 176, self.metadata_block_size);
        put_u32(&mut b[..], 180, self.nr_blocks);
        put_u32(&mut b[..], 184, self.current_era);
        b[188..200].copy_from_slice(&self.current_writeset.print());
        put_u64(&mut b[..], 200, self.writeset_tree_root);
        put_u64(&mut b[..], 208, self.era_array_root);
        put_u64(&mut b[..], 216, self.metadata_snap);
        block::seal(&mut b, Kind::EraSuperblock, location);
        b
    }

    pub fn read(store: &dyn BlockStore, location: u64) -> Result<Superblock> {
        Superblock::parse(&*store.read(location)?, location)
    }
}

fn writeset_bitset(v: &[u8]) -> Structure {
    Structure::Bitset {
        nr_bits: u64::from(get_u32(v, 0)),
    }
}

/// The era each origin block was last written in, as `era_dump --logical` prints it: the era
/// array, then the archived writesets in era order, then (with `current`) the current
/// writeset in `sb.current_era`. A metadata snapshot's copy is read with `current` false: the
/// snapshot holds no reference on the current writeset (K `metadata_take_snap` archives it
/// first), so its blocks may have been reused since.
pub fn logical_eras(tm: &Tm, sb: &Superblock, current: bool) -> Result<Vec<u32>> {
    let array = Array {
        root: sb.era_array_root,
        value_size: 4,
    };
    let mut eras: Vec<u32> = array
        .values(tm, u64::from(sb.nr_blocks))?
        .into_iter()
        .map(|v| v as u32)
        .collect();
    let mut sets = Vec::new();
    for (era, v) in btree::entries(tm, sb.writeset_tree_root, &WRITESET_TREE)? {
        let ws = Writeset::parse(&v);
        sets.push((era as u32, ws));
    }
    if current && sb.current_writeset.root != 0 {
        sets.push((sb.current_era, sb.current_writeset));
    }
    for (era, ws) in sets {
        let bits = Bitset::open(ws.root, u64::from(ws.nr_bits)).bits(tm)?;
        for (e, _) in eras.iter_mut().zip(&bits).filter(|(_, set)| **set) {
            *e = era;
        }
    }
    Ok(eras)
}

/// What the checker walks for an era device: the superblock, the writeset tree with each
/// archived bitset, the era array, the live writeset, and a metadata snapshot's copy with the
/// extra references it holds on its two roots.
pub fn check_roots(
    store: &dyn BlockStore,
    sb: &Superblock,
) -> Result<Vec<(&'static str, u64, Structure)>> {
    let tree = Structure::Btree {
        value_size: 12,
        nested: Some((4, writeset_bitset)),
    };
    let mut roots = vec![
        (
            "era superblock",
            SUPERBLOCK_LOCATION,
            Structure::Block(Kind::EraSuperblock),
        ),
        ("writeset tree", sb.writeset_tree_root, tree),
        (
            "era array",
            sb.era_array_root,
            Structure::Array {
                value_size: 4,
                len: u64::from(sb.nr_blocks),
            },
        ),
    ];
    if sb.current_writeset.root != 0 {
        roots.push((
            "current writeset",
            sb.current_writeset.root,
            Structure::Bitset {
                nr_bits: u64::from(sb.current_writeset.nr_bits),
            },
        ));
    }
    if sb.metadata_snap != 0 {
        let snap = Superblock::read(store, sb.metadata_snap)?;
        roots.push((
            "metadata snapshot",
            sb.metadata_snap,
            Structure::Block(Kind::EraSuperblock),
        ));
        roots.push(("snapshot writeset tree", snap.writeset_tree_root, tree));
        roots.push((
            "snapshot era array",
            snap.era_array_root,
            Structure::Array {
                value_size: 4,
                len: u64::from(snap.nr_blocks),
            },
        ));
    }
    Ok(roots)
}

/// What `era_restore` writes: the archived writesets in the tree, the era array, and a
/// current writeset of `{nr_blocks, 0}`.
pub struct Restore<'a> {
    pub block_size: u32,
    pub nr_blocks: u32,
    pub current_era: u32,
    /// (era, bits) for each archived writeset, in era order.
    pub writesets: &'a [(u32, Vec<bool>)],
    pub era_array: &'a [u32],
    pub flags: u32,
}

/// Formats `store` bottom-up, in the order the userspace tools allocate: superblock, then for
/// each writeset its array blocks and btree, the writeset tree, the era array blocks and btree,
/// and at the commit the space map's bitmap, refcount tree and index.
pub fn restore(store: Box<dyn BlockStore>, r: &Restore<'_>) -> Result<Superblock> {
    let mut tm = Tm::format(store);
    let sb_loc = tm.new_block()?;
    let mut keys = Vec::new();
    let mut values = Vec::new();
    for (era, bits) in r.writesets {
        let words: Vec<u64> = bits
            .chunks(64)
            .map(|c| {
                c.iter()
                    .enumerate()
                    .fold(0u64, |w, (i, &b)| w | (u64::from(b) << i))
            })
            .collect();
        let bitset = Bitset {
            array: Array::build(&mut tm, 8, &words)?,
            nr_bits: bits.len() as u64,
        };
        keys.push(u64::from(*era));
        values.extend_from_slice(
            &Writeset {
                nr_bits: bits.len() as u32,
                root: bitset.root(),
            }
            .print(),
        );
    }
    let writeset_tree_root = btree::build(&mut tm, &keys, &values, &WRITESET_TREE)?;
    let eras: Vec<u64> = r.era_array.iter().map(|&e| u64::from(e)).collect();
    let era_array = Array::build(&mut tm, 4, &eras)?;
    let sm_root = tm.pre_commit()?;
    let sb = Superblock {
        flags: r.flags,
        uuid: [0; 16],
        magic: MAGIC,
        version: VERSION,
        sm_root,
        data_block_size: r.block_size,
        metadata_block_size: METADATA_BLOCK_SECTORS,
        nr_blocks: r.nr_blocks,
        current_era: r.current_era,
        current_writeset: Writeset {
            nr_bits: r.nr_blocks,
            root: 0,
        },
        writeset_tree_root,
        era_array_root: era_array.root,
        metadata_snap: 0,
    };
    tm.commit(sb_loc, Kind::EraSuperblock, sb.print(sb_loc))?;
    Ok(sb)
}
