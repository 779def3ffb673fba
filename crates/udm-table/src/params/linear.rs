//! `linear <dev> <offset>`.

use std::fmt;

use super::{from_str_via_args, invalid, Dev, FromArgs};
use crate::args::{sector, ArgError};

/// `linear` arguments: the device and its first sector.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LinearParams {
    /// The device (a udm name, `major:minor` or path; `major:minor` in table output).
    pub dev: String,
    /// First device sector of the mapping.
    pub offset: u64,
}

impl FromArgs for LinearParams {
    fn from_args(argv: &[String]) -> Result<Self, ArgError> {
        let [dev, offset] = argv else {
            return Err(invalid("Invalid argument count"));
        };
        Ok(LinearParams {
            dev: dev.clone(),
            offset: sector(offset)?,
        })
    }
}

from_str_via_args!(LinearParams);

impl fmt::Display for LinearParams {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {}", Dev(&self.dev), self.offset)
    }
}

#[cfg(test)]
mod tests {
    use super::super::strategies::{dev, round_trips};
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn round_trip(dev in dev(), offset in any::<u64>()) {
            round_trips(&LinearParams { dev, offset })?;
        }
    }

    #[test]
    fn kernel_messages() {
        let e = |s: &str| s.parse::<LinearParams>().unwrap_err().msg;
        assert_eq!(e("d0"), "Invalid argument count");
        assert_eq!(e("d0 x"), "Invalid device sector");
        assert_eq!(e("d0 +1"), "Invalid device sector");
        let p: LinearParams = "a\\ b 007".parse().unwrap();
        assert_eq!((p.dev.as_str(), p.offset), ("a b", 7));
        assert_eq!(p.to_string(), "a\\ b 7");
    }
}
