//! `delay <dev> <off> <ms> [<wdev> <woff> <wms> [<fdev> <foff> <fms>]]` and its status
//! (requests held: reads, writes, flushes).

use std::fmt;

use super::{from_str_via_args, invalid, Dev, FromArgs};
use crate::args::{scan_u32, scan_u64, sector, ArgError};

/// One class of requests: where it goes and how long it is held.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DelayClass {
    /// The device.
    pub dev: String,
    /// First device sector.
    pub offset: u64,
    /// Delay in milliseconds.
    pub delay_ms: u32,
}

impl FromArgs for DelayClass {
    fn from_args(argv: &[String]) -> Result<Self, ArgError> {
        let [dev, offset, delay] = argv else {
            return Err(invalid("Requires exactly 3, 6 or 9 arguments"));
        };
        Ok(DelayClass {
            dev: dev.clone(),
            offset: sector(offset)?,
            delay_ms: scan_u32(delay).ok_or_else(|| invalid("Invalid delay"))?,
        })
    }
}

impl fmt::Display for DelayClass {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {} {}", Dev(&self.dev), self.offset, self.delay_ms)
    }
}

/// `delay` arguments: reads, then writes (and discards) and flushes where given; a class not
/// given is handled as the one before it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DelayParams {
    /// Reads (and every class when alone).
    pub read: DelayClass,
    /// Writes, and flushes unless `flush` is given.
    pub write: Option<DelayClass>,
    /// Flushes (only with `write`).
    pub flush: Option<DelayClass>,
}

impl DelayParams {
    /// Read, write and flush classes, each falling back to the one before.
    pub fn classes(&self) -> [&DelayClass; 3] {
        let write = self.write.as_ref().unwrap_or(&self.read);
        [&self.read, write, self.flush.as_ref().unwrap_or(write)]
    }
}

impl FromArgs for DelayParams {
    fn from_args(argv: &[String]) -> Result<Self, ArgError> {
        if !matches!(argv.len(), 3 | 6 | 9) {
            return Err(invalid("Requires exactly 3, 6 or 9 arguments"));
        }
        let class = |i: usize| argv.get(i..i + 3).map(DelayClass::from_args).transpose();
        Ok(DelayParams {
            read: DelayClass::from_args(&argv[0..3])?,
            write: class(3)?,
            flush: class(6)?,
        })
    }
}

impl fmt::Display for DelayParams {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.read)?;
        if let Some(w) = &self.write {
            write!(f, " {w}")?;
            if let Some(fl) = &self.flush {
                write!(f, " {fl}")?;
            }
        }
        Ok(())
    }
}

/// `delay` status: requests currently held, by class.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct DelayStatus {
    /// Reads, writes, flushes.
    pub held: [u32; 3],
}

impl FromArgs for DelayStatus {
    fn from_args(argv: &[String]) -> Result<Self, ArgError> {
        let n = |s: &String| scan_u64(s).and_then(|v| u32::try_from(v).ok());
        match argv {
            [r, w, f] => match (n(r), n(w), n(f)) {
                (Some(r), Some(w), Some(f)) => Ok(DelayStatus { held: [r, w, f] }),
                _ => Err(invalid("not a delay status")),
            },
            _ => Err(invalid("not a delay status")),
        }
    }
}

impl fmt::Display for DelayStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let [r, w, fl] = self.held;
        write!(f, "{r} {w} {fl}")
    }
}

from_str_via_args!(DelayClass, DelayParams, DelayStatus);

#[cfg(test)]
mod tests {
    use super::super::strategies::{dev, round_trips};
    use super::*;
    use proptest::prelude::*;

    fn class() -> impl Strategy<Value = DelayClass> {
        (dev(), any::<u64>(), any::<u32>()).prop_map(|(dev, offset, delay_ms)| DelayClass {
            dev,
            offset,
            delay_ms,
        })
    }

    proptest! {
        #[test]
        fn round_trip(
            read in class(),
            rest in proptest::option::of((class(), proptest::option::of(class()))),
            held in any::<[u32; 3]>(),
        ) {
            let (write, flush) = match rest {
                Some((w, f)) => (Some(w), f),
                None => (None, None),
            };
            round_trips(&DelayParams { read, write, flush })?;
            round_trips(&DelayStatus { held })?;
        }
    }

    #[test]
    fn kernel_messages() {
        let e = |s: &str| s.parse::<DelayParams>().unwrap_err().msg;
        assert_eq!(e("d0 0"), "Requires exactly 3, 6 or 9 arguments");
        assert_eq!(e("d0 x 1"), "Invalid device sector");
        assert_eq!(e("d0 0 1 d1 0 x"), "Invalid delay");
        let p: DelayParams = "d0 0 1 d1 2 3".parse().unwrap();
        assert_eq!(p.classes()[2].dev, "d1");
    }
}
