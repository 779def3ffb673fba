//! Sector arithmetic and synthetic device numbers.

use serde::{Deserialize, Serialize};
use std::fmt;
use std::str::FromStr;

/// Bytes per sector: every offset and length in tables, status and the control protocol.
pub const SECTOR_SIZE: u64 = 512;
/// `log2(SECTOR_SIZE)`.
pub const SECTOR_SHIFT: u32 = 9;

/// Converts a byte count to sectors, `None` when it is not a whole number of sectors.
pub fn bytes_to_sectors(bytes: u64) -> Option<u64> {
    (bytes % SECTOR_SIZE == 0).then_some(bytes >> SECTOR_SHIFT)
}

/// A synthetic `major:minor`, so that dmsetup-style output reads the same as on Linux.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct DevId {
    /// Major number: one per device class (disks, partitions share it; mapped devices have theirs).
    pub major: u32,
    /// Minor number, unique within the major.
    pub minor: u32,
}

impl DevId {
    /// Builds a device number.
    pub const fn new(major: u32, minor: u32) -> Self {
        Self { major, minor }
    }
}

impl fmt::Display for DevId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.major, self.minor)
    }
}

/// Why a `major:minor` string was rejected.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("invalid device number {0:?}: expected MAJOR:MINOR")]
pub struct DevIdParseError(pub String);

impl FromStr for DevId {
    type Err = DevIdParseError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let err = || DevIdParseError(s.to_string());
        let (a, b) = s.split_once(':').ok_or_else(err)?;
        let major = a.parse().map_err(|_| err())?;
        let minor = b.parse().map_err(|_| err())?;
        Ok(Self { major, minor })
    }
}

/// Parses a human size such as `1G`, `512M`, `4096`, `8s` (sectors) into bytes.
pub fn parse_size(s: &str) -> Option<u64> {
    let s = s.trim();
    let (num, mult) = match s.char_indices().find(|(_, c)| !c.is_ascii_digit()) {
        None => (s, 1u64),
        Some((i, _)) => {
            let unit = s[i..]
                .trim_end_matches(['b', 'B', 'i'])
                .to_ascii_lowercase();
            let m = match unit.as_str() {
                "" => 1,
                "s" => SECTOR_SIZE,
                "k" => 1 << 10,
                "m" => 1 << 20,
                "g" => 1 << 30,
                "t" => 1 << 40,
                _ => return None,
            };
            (&s[..i], m)
        }
    };
    num.parse::<u64>().ok()?.checked_mul(mult)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn devid_round_trip() {
        let d: DevId = "253:7".parse().unwrap();
        assert_eq!(d, DevId::new(253, 7));
        assert_eq!(d.to_string(), "253:7");
        assert!("253".parse::<DevId>().is_err());
        assert!("a:b".parse::<DevId>().is_err());
    }

    #[test]
    fn sizes() {
        assert_eq!(parse_size("1G"), Some(1 << 30));
        assert_eq!(parse_size("64MiB"), Some(64 << 20));
        assert_eq!(parse_size("8s"), Some(4096));
        assert_eq!(parse_size("4096"), Some(4096));
        assert_eq!(parse_size("x"), None);
        assert_eq!(parse_size("99999999999999999999T"), None);
        assert_eq!(bytes_to_sectors(1024), Some(2));
        assert_eq!(bytes_to_sectors(1000), None);
    }
}
