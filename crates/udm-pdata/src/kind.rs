//! The block types that carry a kernel validator: each one's checksum salt and where it stores
//! its own location. Its own module so that errors can name a block's kind.

use std::fmt;

/// The block types that carry a validator, each with the kernel's checksum salt.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Kind {
    EraSuperblock,
    CloneSuperblock,
    BtreeNode,
    Bitmap,
    Index,
    ArrayBlock,
}

impl Kind {
    /// The XOR salt of `dm_bm_checksum` for this block type.
    pub fn salt(self) -> u32 {
        match self {
            Kind::EraSuperblock => 146_538_381,
            Kind::CloneSuperblock => 257_649_492,
            Kind::BtreeNode => 121_107,
            Kind::Bitmap => 240_779,
            Kind::Index => 160_478,
            Kind::ArrayBlock => 595_846_735,
        }
    }

    /// Where the block stores its own number: offset 8 everywhere but in array blocks (16).
    pub fn blocknr_offset(self) -> usize {
        match self {
            Kind::ArrayBlock => 16,
            _ => 8,
        }
    }
}

impl fmt::Display for Kind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Kind::EraSuperblock => "era superblock",
            Kind::CloneSuperblock => "clone superblock",
            Kind::BtreeNode => "btree node",
            Kind::Bitmap => "space-map bitmap",
            Kind::Index => "space-map index",
            Kind::ArrayBlock => "array block",
        })
    }
}
