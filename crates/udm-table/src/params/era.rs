//! `era <metadata dev> <origin dev> <block size>` and its status line
//! (`<metadata block size> <used>/<total> <current era> <held metadata root|->`).

use std::fmt;

use super::{from_str_via_args, invalid, Dev, FromArgs};
use crate::args::{scan_u32, scan_u64, ArgError};

/// The smallest era block, and the unit every era block is a multiple of (K `MIN_BLOCK_SIZE`).
pub const ERA_MIN_BLOCK_SECTORS: u32 = 8;

/// `era` arguments.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EraParams {
    /// The metadata device.
    pub meta: String,
    /// The origin device whose writes are tracked.
    pub origin: String,
    /// Era block size in sectors (a non-zero multiple of 8; a power of two is not required).
    pub block_sectors: u32,
}

impl FromArgs for EraParams {
    fn from_args(argv: &[String]) -> Result<Self, ArgError> {
        let [meta, origin, bs] = argv else {
            return Err(invalid("Invalid argument count"));
        };
        let block_sectors = scan_u32(bs).ok_or_else(|| invalid("Error parsing block size"))?;
        if block_sectors == 0 || block_sectors % ERA_MIN_BLOCK_SECTORS != 0 {
            return Err(invalid("Invalid block size"));
        }
        Ok(EraParams {
            meta: meta.clone(),
            origin: origin.clone(),
            block_sectors,
        })
    }
}

impl fmt::Display for EraParams {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} {} {}",
            Dev(&self.meta),
            Dev(&self.origin),
            self.block_sectors
        )
    }
}

/// `era` status (K `era_status`, STATUSTYPE_INFO).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EraStatus {
    /// Metadata block size in sectors (always 8).
    pub metadata_block_sectors: u32,
    /// Metadata blocks in use.
    pub used: u64,
    /// Metadata blocks the space map covers.
    pub total: u64,
    /// The era writes go to now.
    pub current_era: u32,
    /// Block of the held metadata snapshot's superblock, if one is held.
    pub held_root: Option<u64>,
}

impl FromArgs for EraStatus {
    fn from_args(argv: &[String]) -> Result<Self, ArgError> {
        let bad = || invalid("not an era status");
        let [mbs, usage, era, held] = argv else {
            return Err(bad());
        };
        let (used, total) = usage.split_once('/').ok_or_else(bad)?;
        Ok(EraStatus {
            metadata_block_sectors: scan_u32(mbs).ok_or_else(bad)?,
            used: scan_u64(used).ok_or_else(bad)?,
            total: scan_u64(total).ok_or_else(bad)?,
            current_era: scan_u32(era).ok_or_else(bad)?,
            held_root: match held.as_str() {
                "-" => None,
                h => Some(scan_u64(h).ok_or_else(bad)?),
            },
        })
    }
}

impl fmt::Display for EraStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} {}/{} {}",
            self.metadata_block_sectors, self.used, self.total, self.current_era
        )?;
        match self.held_root {
            Some(r) => write!(f, " {r}"),
            None => f.write_str(" -"),
        }
    }
}

from_str_via_args!(EraParams, EraStatus);

#[cfg(test)]
mod tests {
    use super::super::strategies::{dev, round_trips};
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn round_trip(
            meta in dev(),
            origin in dev(),
            blocks in 1u32..(u32::MAX / 8),
            used in any::<u64>(),
            total in any::<u64>(),
            current_era in any::<u32>(),
            held_root in proptest::option::of(any::<u64>()),
        ) {
            round_trips(&EraParams { meta, origin, block_sectors: blocks * 8 })?;
            round_trips(&EraStatus {
                metadata_block_sectors: 8,
                used,
                total,
                current_era,
                held_root,
            })?;
        }
    }

    #[test]
    fn kernel_messages() {
        let e = |s: &str| s.parse::<EraParams>().unwrap_err().msg;
        assert_eq!(e("m o"), "Invalid argument count");
        assert_eq!(e("m o 8 x"), "Invalid argument count");
        assert_eq!(e("m o x"), "Error parsing block size");
        assert_eq!(e("m o 8x"), "Error parsing block size");
        assert_eq!(e("m o 0"), "Invalid block size");
        assert_eq!(e("m o 12"), "Invalid block size");
        let p: EraParams = "m o 24".parse().unwrap();
        assert_eq!(p.block_sectors, 24, "a multiple of 8, not a power of two");
        let s: EraStatus = "8 11/1024 3 -".parse().unwrap();
        assert_eq!(
            (s.used, s.total, s.current_era, s.held_root),
            (11, 1024, 3, None)
        );
        assert_eq!(
            "8 11/1024 3 7".parse::<EraStatus>().unwrap().held_root,
            Some(7)
        );
        assert!("8 11 3 -".parse::<EraStatus>().is_err());
    }
}
