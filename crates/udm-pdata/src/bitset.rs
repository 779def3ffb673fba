//! dm-bitset (K dm-bitset.c): a dm-array of le64 words, bit i in word i/64 at bit i%64 (LSB
//! first). Bits past `nr_bits` in the last word stay 0.

use crate::array::Array;
use crate::error::{Error, Result};
use crate::tm::Tm;

/// A bitset of `nr_bits` bits over the array at `array.root`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Bitset {
    pub array: Array,
    pub nr_bits: u64,
}

fn words(bits: u64) -> u64 {
    bits.div_ceil(64)
}

impl Bitset {
    pub fn empty(tm: &mut Tm) -> Result<Bitset> {
        Ok(Bitset {
            array: Array::empty(tm, 8)?,
            nr_bits: 0,
        })
    }

    /// The bitset stored at `root` with `nr_bits` bits (as a writeset records it).
    pub fn open(root: u64, nr_bits: u64) -> Bitset {
        Bitset {
            array: Array {
                root,
                value_size: 8,
            },
            nr_bits,
        }
    }

    pub fn root(&self) -> u64 {
        self.array.root
    }

    fn check(&self, i: u64) -> Result<()> {
        if i >= self.nr_bits {
            return Err(Error::Index {
                index: i,
                len: self.nr_bits,
            });
        }
        Ok(())
    }

    pub fn test(&self, tm: &Tm, i: u64) -> Result<bool> {
        self.check(i)?;
        Ok(self.array.get(tm, words(self.nr_bits), i / 64)? & (1 << (i % 64)) != 0)
    }

    pub fn set(&mut self, tm: &mut Tm, i: u64, v: bool) -> Result<()> {
        self.check(i)?;
        let n = words(self.nr_bits);
        let w = self.array.get(tm, n, i / 64)?;
        let nw = if v {
            w | (1 << (i % 64))
        } else {
            w & !(1 << (i % 64))
        };
        if nw != w {
            self.array.set(tm, n, i / 64, nw)?;
        }
        Ok(())
    }

    /// Every bit, in order.
    pub fn bits(&self, tm: &Tm) -> Result<Vec<bool>> {
        let w = self.array.values(tm, words(self.nr_bits))?;
        Ok((0..self.nr_bits)
            .map(|i| w[(i / 64) as usize] & (1 << (i % 64)) != 0)
            .collect())
    }

    /// Resizes to `nr_bits`; new bits are `fill` (era and clone always use false).
    pub fn resize(&mut self, tm: &mut Tm, nr_bits: u64, fill: bool) -> Result<()> {
        let (old, new) = (self.nr_bits, nr_bits);
        let default = if fill { u64::MAX } else { 0 };
        self.array.resize(tm, words(old), words(new), default)?;
        self.nr_bits = new;
        // The old last word's bits past `old` take the fill; the new last word's past `new` are 0.
        if new > old && old % 64 != 0 && fill {
            for i in old..new.min(words(old) * 64) {
                self.set(tm, i, true)?;
            }
        }
        if new % 64 != 0 {
            let last = words(new) - 1;
            let n = words(new);
            let w = self.array.get(tm, n, last)?;
            let masked = w & ((1u64 << (new % 64)) - 1);
            if masked != w {
                self.array.set(tm, n, last, masked)?;
            }
        }
        Ok(())
    }

    pub fn delete(self, tm: &mut Tm) -> Result<()> {
        self.array.delete(tm)
    }
}
