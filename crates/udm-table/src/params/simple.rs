//! The targets with one device or none: `zero`, `error` and `snapshot-origin`.

use std::fmt;

use super::{from_str_via_args, invalid, Dev, FromArgs};
use crate::args::{sector, ArgError};

/// `zero` takes no arguments.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ZeroParams;

impl FromArgs for ZeroParams {
    fn from_args(argv: &[String]) -> Result<Self, ArgError> {
        if !argv.is_empty() {
            return Err(invalid("No arguments required"));
        }
        Ok(ZeroParams)
    }
}

impl fmt::Display for ZeroParams {
    fn fmt(&self, _: &mut fmt::Formatter<'_>) -> fmt::Result {
        Ok(())
    }
}

/// `error [<dev> <offset>]`: exactly two arguments name a device and start like linear (for
/// limits and `deps`); any other arguments are ignored, as the kernel does. (The table output
/// of an error target is empty whatever its arguments.)
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ErrorParams {
    /// The device and its first sector, when given.
    pub dev: Option<(String, u64)>,
}

impl FromArgs for ErrorParams {
    fn from_args(argv: &[String]) -> Result<Self, ArgError> {
        Ok(ErrorParams {
            dev: match argv {
                [dev, offset] => Some((dev.clone(), sector(offset)?)),
                _ => None,
            },
        })
    }
}

impl fmt::Display for ErrorParams {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.dev {
            Some((dev, offset)) => write!(f, "{} {offset}", Dev(dev)),
            None => Ok(()),
        }
    }
}

/// `snapshot-origin <dev>`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OriginParams {
    /// The origin device.
    pub dev: String,
}

impl FromArgs for OriginParams {
    fn from_args(argv: &[String]) -> Result<Self, ArgError> {
        match argv {
            [dev] => Ok(OriginParams { dev: dev.clone() }),
            _ => Err(invalid("origin: incorrect number of arguments")),
        }
    }
}

impl fmt::Display for OriginParams {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", Dev(&self.dev))
    }
}

from_str_via_args!(ZeroParams, ErrorParams, OriginParams);

#[cfg(test)]
mod tests {
    use super::super::strategies::{dev, round_trips};
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn round_trip(d in proptest::option::of((dev(), any::<u64>())), o in dev()) {
            round_trips(&ZeroParams)?;
            round_trips(&ErrorParams { dev: d })?;
            round_trips(&OriginParams { dev: o })?;
        }
    }

    #[test]
    fn kernel_messages() {
        assert_eq!(
            "x".parse::<ZeroParams>().unwrap_err().msg,
            "No arguments required"
        );
        assert_eq!(
            "d0 x".parse::<ErrorParams>().unwrap_err().msg,
            "Invalid device sector"
        );
        assert_eq!(
            "a b c".parse::<ErrorParams>(),
            Ok(ErrorParams { dev: None })
        );
        assert_eq!(
            "a b".parse::<OriginParams>().unwrap_err().msg,
            "origin: incorrect number of arguments"
        );
    }
}
