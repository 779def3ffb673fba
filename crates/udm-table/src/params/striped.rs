//! `striped <#stripes> <chunk_sectors> <dev> <offset>...` and its status
//! `<#stripes> <dev>... 1 <A|D>...`.

use std::fmt;

use super::{from_str_via_args, invalid, Dev, FromArgs};
use crate::args::{kstrtouint, scan_u64, ArgError};

/// One stripe's device and first sector.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StripeDest {
    /// The device.
    pub dev: String,
    /// First device sector of the stripe.
    pub offset: u64,
}

/// `striped` arguments.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StripedParams {
    /// Chunk size in sectors (> 0; at most `u32::MAX`, as the kernel reads it).
    pub chunk_sectors: u64,
    /// The stripes, at least one.
    pub stripes: Vec<StripeDest>,
}

impl StripedParams {
    /// The stripe count and chunk size alone: the kernel checks the target length against
    /// them before it reads the destinations.
    pub fn header(argv: &[String]) -> Result<(u32, u32), ArgError> {
        if argv.len() < 2 {
            return Err(invalid("Not enough arguments"));
        }
        let stripes = kstrtouint(&argv[0])
            .filter(|s| *s > 0)
            .ok_or_else(|| invalid("Invalid stripe count"))?;
        let chunk = kstrtouint(&argv[1])
            .filter(|c| *c > 0)
            .ok_or_else(|| invalid("Invalid chunk_size"))?;
        Ok((stripes, chunk))
    }
}

impl FromArgs for StripedParams {
    fn from_args(argv: &[String]) -> Result<Self, ArgError> {
        let (stripes, chunk_sectors) = Self::header(argv)?;
        if argv.len() as u64 != 2 + 2 * u64::from(stripes) {
            return Err(invalid("Not enough destinations specified"));
        }
        let stripes = argv[2..]
            .chunks_exact(2)
            .map(|pair| {
                let offset = scan_u64(&pair[1])
                    .ok_or_else(|| invalid("Couldn't parse stripe destination"))?;
                Ok(StripeDest {
                    dev: pair[0].clone(),
                    offset,
                })
            })
            .collect::<Result<_, ArgError>>()?;
        Ok(StripedParams {
            chunk_sectors: u64::from(chunk_sectors),
            stripes,
        })
    }
}

impl fmt::Display for StripedParams {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {}", self.stripes.len(), self.chunk_sectors)?;
        for s in &self.stripes {
            write!(f, " {} {}", Dev(&s.dev), s.offset)?;
        }
        Ok(())
    }
}

/// One stripe in the status: its device and whether it is alive (`A`) or has failed (`D`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StripeHealth {
    /// The device.
    pub dev: String,
    /// No I/O error seen on it.
    pub alive: bool,
}

/// `striped` status: `<#stripes> <dev>... 1 <A|D>...` (the trailing space after each device is
/// the kernel's).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StripedStatus {
    /// The stripes in table order.
    pub stripes: Vec<StripeHealth>,
}

impl FromArgs for StripedStatus {
    fn from_args(argv: &[String]) -> Result<Self, ArgError> {
        let bad = || invalid("not a striped status");
        let (n, rest) = argv.split_first().ok_or_else(bad)?;
        let n = scan_u64(n)
            .and_then(|n| usize::try_from(n).ok())
            .ok_or_else(bad)?;
        let [devs @ .., one, health] = rest else {
            return Err(bad());
        };
        if devs.len() != n || one != "1" || health.chars().count() != n {
            return Err(bad());
        }
        let stripes = devs
            .iter()
            .zip(health.chars())
            .map(|(dev, h)| match h {
                'A' | 'D' => Ok(StripeHealth {
                    dev: dev.clone(),
                    alive: h == 'A',
                }),
                _ => Err(bad()),
            })
            .collect::<Result<_, ArgError>>()?;
        Ok(StripedStatus { stripes })
    }
}

impl fmt::Display for StripedStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} ", self.stripes.len())?;
        for s in &self.stripes {
            write!(f, "{} ", Dev(&s.dev))?;
        }
        f.write_str("1 ")?;
        for s in &self.stripes {
            f.write_str(if s.alive { "A" } else { "D" })?;
        }
        Ok(())
    }
}

from_str_via_args!(StripedParams, StripedStatus);

#[cfg(test)]
mod tests {
    use super::super::strategies::{dev, round_trips};
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn round_trip(
            chunk_sectors in 1..=u64::from(u32::MAX),
            stripes in proptest::collection::vec((dev(), any::<u64>(), any::<bool>()), 1..6),
        ) {
            round_trips(&StripedParams {
                chunk_sectors,
                stripes: stripes
                    .iter()
                    .map(|(dev, offset, _)| StripeDest { dev: dev.clone(), offset: *offset })
                    .collect(),
            })?;
            round_trips(&StripedStatus {
                stripes: stripes
                    .iter()
                    .map(|(dev, _, alive)| StripeHealth { dev: dev.clone(), alive: *alive })
                    .collect(),
            })?;
        }
    }

    #[test]
    fn kernel_forms() {
        let e = |s: &str| s.parse::<StripedParams>().unwrap_err().msg;
        assert_eq!(e("1"), "Not enough arguments");
        assert_eq!(e("0 2 d0 0"), "Invalid stripe count");
        assert_eq!(e("2 0 d0 0 d1 0"), "Invalid chunk_size");
        assert_eq!(e("2 2 d0 0"), "Not enough destinations specified");
        assert_eq!(e("1 2 d0 x"), "Couldn't parse stripe destination");
        let s: StripedStatus = "2 8:0 8:16 1 AD".parse().unwrap();
        assert!(s.stripes[0].alive && !s.stripes[1].alive);
        assert_eq!(s.to_string(), "2 8:0 8:16 1 AD");
        assert!("2 8:0 1 AD".parse::<StripedStatus>().is_err());
        assert!("1 8:0 1 X".parse::<StripedStatus>().is_err());
    }
}
