//! dm-array (K dm-array.c): a btree from block index (0, 1, 2, ...) to array blocks of packed
//! le32 or le64 values. The length is kept by the caller (the era superblock, the bitset).

use crate::block::{self, get_u32, get_u64, put_u32, put_u64, Block, Kind, BLOCK_SIZE};
use crate::btree::{self, Refs, ValueType};
use crate::error::{Error, Result};
use crate::tm::Tm;

pub const ARRAY_HEADER: usize = 24;

/// The btree under an array: le64 values, each the block of an array block.
pub static ARRAY_TREE: ValueType = ValueType {
    size: 8,
    refs: Refs::Block,
};

/// Values per array block: 1018 for le32, 509 for le64 (the kernel computes it, never reads it).
pub fn max_entries(value_size: u32) -> u32 {
    (BLOCK_SIZE - ARRAY_HEADER) as u32 / value_size
}

/// One array block: `le32 csum; le32 max_entries; le32 nr_entries; le32 value_size; le64 blocknr`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ArrayBlock {
    pub value_size: u32,
    pub max_entries: u32,
    pub values: Vec<u64>,
}

impl ArrayBlock {
    pub fn new(value_size: u32) -> ArrayBlock {
        ArrayBlock {
            value_size,
            max_entries: max_entries(value_size),
            values: Vec::new(),
        }
    }

    /// Parses the block at `location`, expecting values of `value_size` bytes (4 or 8).
    pub fn parse(b: &Block, location: u64, value_size: u32) -> Result<ArrayBlock> {
        block::validate(b, Kind::ArrayBlock, location)?;
        let corrupt = |what: String| Error::Corrupt {
            kind: Kind::ArrayBlock,
            block: location,
            what,
        };
        let (max, nr, vs) = (get_u32(b, 4), get_u32(b, 8), get_u32(b, 12));
        if vs != value_size || !(vs == 4 || vs == 8) {
            return Err(corrupt(format!("value_size {vs}, expected {value_size}")));
        }
        if max != max_entries(vs) {
            return Err(corrupt(format!(
                "max_entries {max}, expected {}",
                max_entries(vs)
            )));
        }
        if nr > max {
            return Err(corrupt(format!("nr_entries {nr} > max_entries {max}")));
        }
        let vsz = vs as usize;
        let values = (0..nr as usize)
            .map(|i| {
                let off = ARRAY_HEADER + i * vsz;
                if vs == 4 {
                    u64::from(get_u32(b, off))
                } else {
                    get_u64(b, off)
                }
            })
            .collect();
        Ok(ArrayBlock {
            value_size: vs,
            max_entries: max,
            values,
        })
    }

    pub fn print(&self, location: u64) -> Box<Block> {
        let mut b = block::zeroed();
        put_u32(&mut b[..], 4, self.max_entries);
        put_u32(&mut b[..], 8, self.values.len() as u32);
        put_u32(&mut b[..], 12, self.value_size);
        for (i, &v) in self.values.iter().enumerate() {
            let off = ARRAY_HEADER + i * self.value_size as usize;
            if self.value_size == 4 {
                put_u32(&mut b[..], off, v as u32);
            } else {
                put_u64(&mut b[..], off, v);
            }
        }
        block::seal(&mut b, Kind::ArrayBlock, location);
        b
    }
}

/// An array of `value_size`-byte values (4 or 8) whose btree is at `root`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Array {
    pub root: u64,
    pub value_size: u32,
}

fn block_key(a: &Array, i: u64) -> (u64, usize) {
    let m = u64::from(max_entries(a.value_size));
    (i / m, (i % m) as usize)
}

impl Array {
    /// An empty array (`dm_array_empty`: an empty btree leaf).
    pub fn empty(tm: &mut Tm, value_size: u32) -> Result<Array> {
        Ok(Array {
            root: btree::empty(tm, &ARRAY_TREE)?,
            value_size,
        })
    }

    /// An array holding `values`, written bottom-up: the array blocks first, then the btree
    /// (the layout era_restore writes).
    pub fn build(tm: &mut Tm, value_size: u32, values: &[u64]) -> Result<Array> {
        let m = max_entries(value_size) as usize;
        let (mut keys, mut ptrs) = (Vec::new(), Vec::new());
        for (i, chunk) in values.chunks(m).enumerate() {
            let loc = tm.new_block()?;
            let ab = ArrayBlock {
                value_size,
                max_entries: m as u32,
                values: chunk.to_vec(),
            };
            tm.write(loc, Kind::ArrayBlock, ab.print(loc))?;
            keys.push(i as u64);
            ptrs.extend_from_slice(&loc.to_le_bytes());
        }
        Ok(Array {
            root: btree::build(tm, &keys, &ptrs, &ARRAY_TREE)?,
            value_size,
        })
    }

    fn ablock_loc(&self, tm: &Tm, bi: u64) -> Result<u64> {
        match btree::lookup(tm, self.root, bi, &ARRAY_TREE)? {
            Some(v) => Ok(get_u64(&v, 0)),
            None => Err(Error::Corrupt {
                kind: Kind::BtreeNode,
                block: self.root,
                what: format!("array block {bi} missing"),
            }),
        }
    }

    fn read_ablock(&self, tm: &Tm, loc: u64) -> Result<ArrayBlock> {
        ArrayBlock::parse(&*tm.read(loc, Kind::ArrayBlock)?, loc, self.value_size)
    }

    /// Value `i` (`len` is the array's length, kept by the caller).
    pub fn get(&self, tm: &Tm, len: u64, i: u64) -> Result<u64> {
        if i >= len {
            return Err(Error::Index { index: i, len });
        }
        let (bi, slot) = block_key(self, i);
        let loc = self.ablock_loc(tm, bi)?;
        let ab = self.read_ablock(tm, loc)?;
        ab.values.get(slot).copied().ok_or_else(|| Error::Corrupt {
            kind: Kind::ArrayBlock,
            block: loc,
            what: format!("{} entries, index {i} needs slot {slot}", ab.values.len()),
        })
    }

    /// Shadows array block `bi` and updates the btree when it moved (K `__shadow_ablock`). The
    /// block is shadowed before the path above it, so a second reference to the array's root
    /// must be taken only right after a commit (as era's take_metadata_snap does): a block new in
    /// this transaction under a freshly shared root would be written in place.
    fn shadow_ablock(&mut self, tm: &mut Tm, bi: u64) -> Result<(u64, ArrayBlock)> {
        let loc = self.ablock_loc(tm, bi)?;
        let s = tm.shadow(loc, Kind::ArrayBlock)?;
        let ab = ArrayBlock::parse(&s.data, loc, self.value_size)?;
        if s.location != loc {
            // The shadow already dropped the btree's reference to `loc`; the insert below drops
            // it again when it overwrites the value, so take one back first (as the kernel does).
            tm.inc(loc)?;
            self.root = btree::insert(tm, self.root, bi, &s.location.to_le_bytes(), &ARRAY_TREE)?;
        }
        Ok((s.location, ab))
    }

    pub fn set(&mut self, tm: &mut Tm, len: u64, i: u64, v: u64) -> Result<()> {
        if i >= len {
            return Err(Error::Index { index: i, len });
        }
        let (bi, slot) = block_key(self, i);
        let (loc, mut ab) = self.shadow_ablock(tm, bi)?;
        let n = ab.values.len();
        *ab.values.get_mut(slot).ok_or_else(|| Error::Corrupt {
            kind: Kind::ArrayBlock,
            block: loc,
            what: format!("{n} entries, index {i} needs slot {slot}"),
        })? = v;
        tm.write(loc, Kind::ArrayBlock, ab.print(loc))
    }

    /// Every value, in order.
    pub fn values(&self, tm: &Tm, len: u64) -> Result<Vec<u64>> {
        let mut out = Vec::new();
        let m = u64::from(max_entries(self.value_size));
        for bi in 0..len.div_ceil(m) {
            let loc = self.ablock_loc(tm, bi)?;
            let ab = self.read_ablock(tm, loc)?;
            let want = (len - bi * m).min(m) as usize;
            if ab.values.len() != want {
                return Err(Error::Corrupt {
                    kind: Kind::ArrayBlock,
                    block: loc,
                    what: format!("{} entries, expected {want}", ab.values.len()),
                });
            }
            out.extend_from_slice(&ab.values);
        }
        Ok(out)
    }

    /// Changes the length from `old` to `new`; new values are `default` (`dm_array_resize`:
    /// the tail block extended, then a new block for each new full block and the new tail).
    pub fn resize(&mut self, tm: &mut Tm, old: u64, new: u64, default: u64) -> Result<()> {
        let m = u64::from(max_entries(self.value_size));
        let (old_blocks, new_blocks) = (old.div_ceil(m), new.div_ceil(m));
        if new > old {
            if old % m != 0 {
                let fill = if new_blocks == old_blocks { new % m } else { m };
                let fill = if fill == 0 { m } else { fill };
                let (loc, mut ab) = self.shadow_ablock(tm, old_blocks - 1)?;
                ab.values.resize(fill as usize, default);
                tm.write(loc, Kind::ArrayBlock, ab.print(loc))?;
            }
            // One new block per full block, as the kernel's `insert_full_ablocks` does (so the
            // metadata's used-block count is the kernel's).
            let full_end = new / m;
            for bi in old_blocks..full_end {
                let loc = tm.new_block()?;
                let mut ab = ArrayBlock::new(self.value_size);
                ab.values = vec![default; m as usize];
                tm.write(loc, Kind::ArrayBlock, ab.print(loc))?;
                self.root = btree::insert(tm, self.root, bi, &loc.to_le_bytes(), &ARRAY_TREE)?;
            }
            if new_blocks > old_blocks.max(full_end) {
                let tail = tm.new_block()?;
                let mut ab = ArrayBlock::new(self.value_size);
                ab.values = vec![default; (new % m) as usize];
                tm.write(tail, Kind::ArrayBlock, ab.print(tail))?;
                self.root = btree::insert(
                    tm,
                    self.root,
                    new_blocks - 1,
                    &tail.to_le_bytes(),
                    &ARRAY_TREE,
                )?;
            }
        } else if new < old {
            for bi in (new_blocks..old_blocks).rev() {
                self.root = btree::remove(tm, self.root, bi, &ARRAY_TREE)?.0;
            }
            if new % m != 0 {
                let (loc, mut ab) = self.shadow_ablock(tm, new_blocks - 1)?;
                ab.values.truncate((new % m) as usize);
                tm.write(loc, Kind::ArrayBlock, ab.print(loc))?;
            }
        }
        Ok(())
    }

    /// Drops this array's reference to its blocks (`dm_array_del`).
    pub fn delete(self, tm: &mut Tm) -> Result<()> {
        btree::delete(tm, self.root, &ARRAY_TREE)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hand_built_array_block() {
        // The reference's block 1: le64 words, max 509, nr 1, value 0x206.
        let mut b = block::zeroed();
        put_u32(&mut b[..], 4, 509);
        put_u32(&mut b[..], 8, 1);
        put_u32(&mut b[..], 12, 8);
        put_u64(&mut b[..], 24, 0x206);
        block::seal(&mut b, Kind::ArrayBlock, 1);
        let ab = ArrayBlock::parse(&b, 1, 8).expect("valid array block");
        assert_eq!(ab.values, vec![0x206]);
        assert_eq!(&ab.print(1)[..], &b[..]);
        assert_eq!(max_entries(4), 1018);
        assert!(
            ArrayBlock::parse(&b, 1, 4).is_err(),
            "value size is checked"
        );
        put_u32(&mut b[..], 8, 510);
        block::seal(&mut b, Kind::ArrayBlock, 1);
        assert!(ArrayBlock::parse(&b, 1, 8).is_err(), "nr > max");
    }
}
