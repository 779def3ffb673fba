//! `flakey <dev> <off> <up_s> <down_s> [<#feat> <feat>...]`.
//!
//! Features: `error_reads`, `drop_writes`, `error_writes`,
//! `corrupt_bio_byte <N> <r|w> <value> <flags>`, `random_read_corrupt <p>`,
//! `random_write_corrupt <p>` (p out of 1 000 000 000). Without features the down period fails
//! every request (mainline implies `error_reads error_writes`). The table line is Linux 6.1's
//! (what `dmsetup table` prints on the kernels in use, checked by tests/vmlab/dmsetup-compare.sh):
//! the feature count and each feature followed by a space (`0 `, `1 drop_writes `), implied
//! features not listed. Argument checks and messages are the kernel's.

use std::fmt;

use super::{from_str_via_args, invalid, Dev, FromArgs};
use crate::args::{sector, ArgError, ArgSet};

/// Random corruption probabilities are out of this (`PROBABILITY_BASE`).
pub const PROBABILITY_BASE: u32 = 1_000_000_000;

/// Direction of `corrupt_bio_byte`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    /// Corrupt data returned by reads.
    Read,
    /// Corrupt data written.
    Write,
}

/// `corrupt_bio_byte <N> <r|w> <value> <flags>`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CorruptByte {
    /// 1-based byte of the request data to overwrite.
    pub byte: u32,
    /// Reads or writes.
    pub dir: Direction,
    /// Value written into that byte.
    pub value: u8,
    /// Only requests whose `bi_opf` has all these bits are corrupted (0 = all).
    pub flags: u32,
}

/// Parsed flakey features (with none given, the down period fails reads and writes).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct FlakeyFeatures {
    /// Reads fail with EIO while down.
    pub error_reads: bool,
    /// Writes complete without being written while down.
    pub drop_writes: bool,
    /// Writes fail with EIO while down.
    pub error_writes: bool,
    /// Fixed byte corruption while down.
    pub corrupt: Option<CorruptByte>,
    /// Probability (out of 1e9) of corrupting one random byte of a read while down.
    pub random_read_corrupt: u32,
    /// Probability (out of 1e9) of corrupting one random byte of a write while down.
    pub random_write_corrupt: u32,
    /// `error_reads` and `error_writes` were implied by a table without features (not printed).
    pub implied: bool,
}

impl FlakeyFeatures {
    /// The kernel's `parse_features`.
    pub fn parse(a: &mut ArgSet<'_>) -> Result<FlakeyFeatures, ArgError> {
        let mut f = FlakeyFeatures::default();
        let mut argc = 0;
        if a.remaining() > 0 {
            argc = a.read_arg_group(0, 11, "Invalid number of feature args")?;
        }
        let dup = |n: &str| invalid(format!("Feature {n} duplicated"));
        while argc > 0 {
            let name = a
                .shift()
                .ok_or_else(|| invalid("Insufficient feature arguments"))?;
            argc -= 1;
            match name.to_ascii_lowercase().as_str() {
                "error_reads" => {
                    if f.error_reads {
                        return Err(dup("error_reads"));
                    }
                    f.error_reads = true;
                }
                "drop_writes" => {
                    if f.drop_writes {
                        return Err(dup("drop_writes"));
                    }
                    f.drop_writes = true;
                    if f.error_writes {
                        return Err(invalid(
                            "Feature drop_writes conflicts with feature error_writes",
                        ));
                    }
                }
                "error_writes" => {
                    if f.error_writes {
                        return Err(dup("error_writes"));
                    }
                    f.error_writes = true;
                    if f.drop_writes {
                        return Err(invalid(
                            "Feature error_writes conflicts with feature drop_writes",
                        ));
                    }
                }
                "corrupt_bio_byte" => {
                    if f.corrupt.is_some() {
                        return Err(dup("corrupt_bio_byte"));
                    }
                    if argc < 4 {
                        return Err(invalid("Feature corrupt_bio_byte requires 4 parameters"));
                    }
                    let byte = a.read_arg(1, u32::MAX, "Invalid corrupt bio byte")?;
                    argc -= 1;
                    let dir = match a.shift().map(str::to_ascii_lowercase).as_deref() {
                        Some("w") => Direction::Write,
                        Some("r") => Direction::Read,
                        _ => return Err(invalid("Invalid corrupt bio direction (r or w)")),
                    };
                    argc -= 1;
                    let value = a.read_arg(
                        0,
                        255,
                        "Invalid corrupt value to write into bio byte (0-255)",
                    )?;
                    argc -= 1;
                    let flags = a.read_arg(0, u32::MAX, "Invalid corrupt bio flags mask")?;
                    argc -= 1;
                    f.corrupt = Some(CorruptByte {
                        byte,
                        dir,
                        value: u8::try_from(value).unwrap_or(u8::MAX),
                        flags,
                    });
                }
                "random_read_corrupt" | "random_write_corrupt" => {
                    let read = name.eq_ignore_ascii_case("random_read_corrupt");
                    let cur = if read {
                        f.random_read_corrupt
                    } else {
                        f.random_write_corrupt
                    };
                    let n = if read {
                        "random_read_corrupt"
                    } else {
                        "random_write_corrupt"
                    };
                    if cur != 0 {
                        return Err(dup(n));
                    }
                    if argc == 0 {
                        return Err(invalid(format!("Feature {n} requires a parameter")));
                    }
                    let p = a.read_arg(0, PROBABILITY_BASE, "Invalid random corrupt argument")?;
                    argc -= 1;
                    if read {
                        f.random_read_corrupt = p;
                    } else {
                        f.random_write_corrupt = p;
                    }
                }
                _ => return Err(invalid("Unrecognised flakey feature requested")),
            }
        }
        let corrupt_dir = |d: Direction| f.corrupt.is_some_and(|c| c.dir == d);
        if f.drop_writes && (corrupt_dir(Direction::Write) || f.random_write_corrupt != 0) {
            return Err(invalid(
                "drop_writes is incompatible with random_write_corrupt or corrupt_bio_byte \
                 with the WRITE flag set",
            ));
        }
        if f.error_writes && (corrupt_dir(Direction::Write) || f.random_write_corrupt != 0) {
            return Err(invalid(
                "error_writes is incompatible with random_write_corrupt or corrupt_bio_byte \
                 with the WRITE flag set",
            ));
        }
        if f.error_reads && (corrupt_dir(Direction::Read) || f.random_read_corrupt != 0) {
            return Err(invalid(
                "error_reads is incompatible with random_read_corrupt or corrupt_bio_byte \
                 with the READ flag set",
            ));
        }
        if f.corrupt.is_none()
            && !f.error_reads
            && !f.drop_writes
            && !f.error_writes
            && f.random_read_corrupt == 0
            && f.random_write_corrupt == 0
        {
            f.error_reads = true;
            f.error_writes = true;
            f.implied = true;
        }
        Ok(f)
    }

    /// Feature arguments as Linux 6.1 prints them: the count, then each feature, every item
    /// followed by a space (so the line ends with one); implied features are not listed.
    fn text(&self) -> String {
        let shown = !self.implied;
        let count = u32::from(shown && self.error_reads)
            + u32::from(self.drop_writes)
            + u32::from(shown && self.error_writes)
            + if self.corrupt.is_some() { 5 } else { 0 }
            + if self.random_read_corrupt > 0 { 2 } else { 0 }
            + if self.random_write_corrupt > 0 { 2 } else { 0 };
        let mut s = format!("{count} ");
        if shown && self.error_reads {
            s.push_str("error_reads ");
        }
        if self.drop_writes {
            s.push_str("drop_writes ");
        } else if shown && self.error_writes {
            s.push_str("error_writes ");
        }
        if let Some(c) = self.corrupt {
            let d = if c.dir == Direction::Write { 'w' } else { 'r' };
            s.push_str(&format!(
                "corrupt_bio_byte {} {d} {} {} ",
                c.byte, c.value, c.flags
            ));
        }
        if self.random_read_corrupt > 0 {
            s.push_str(&format!(
                "random_read_corrupt {} ",
                self.random_read_corrupt
            ));
        }
        if self.random_write_corrupt > 0 {
            s.push_str(&format!(
                "random_write_corrupt {} ",
                self.random_write_corrupt
            ));
        }
        s
    }
}

impl fmt::Display for FlakeyFeatures {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text())
    }
}

/// `flakey` arguments.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FlakeyParams {
    /// The device.
    pub dev: String,
    /// First device sector.
    pub offset: u64,
    /// Seconds up per period.
    pub up: u32,
    /// Seconds down per period.
    pub down: u32,
    /// What the down period does.
    pub features: FlakeyFeatures,
}

impl FromArgs for FlakeyParams {
    fn from_args(argv: &[String]) -> Result<Self, ArgError> {
        if argv.len() < 4 {
            return Err(invalid("Invalid argument count"));
        }
        let mut a = ArgSet::new(argv);
        let dev = a.shift().unwrap_or_default().to_string();
        let offset = sector(a.shift().unwrap_or_default())?;
        let up = a.read_arg(0, u32::MAX, "Invalid up interval")?;
        let down = a.read_arg(0, u32::MAX, "Invalid down interval")?;
        // In this order, as the kernel's u32 arithmetic gives: a sum wrapping to exactly 0
        // reports a zero interval.
        if up.wrapping_add(down) == 0 {
            return Err(invalid("Total (up + down) interval is zero"));
        }
        if up.checked_add(down).is_none() {
            return Err(invalid("Interval overflow"));
        }
        let features = FlakeyFeatures::parse(&mut a)?;
        Ok(FlakeyParams {
            dev,
            offset,
            up,
            down,
            features,
        })
    }
}

impl fmt::Display for FlakeyParams {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} {} {} {} {}",
            Dev(&self.dev),
            self.offset,
            self.up,
            self.down,
            self.features
        )
    }
}

from_str_via_args!(FlakeyParams);

#[cfg(test)]
mod tests {
    use super::super::strategies::{dev, round_trips};
    use super::*;
    use proptest::prelude::*;

    fn features() -> impl Strategy<Value = FlakeyFeatures> {
        let corrupt = (1u32.., any::<bool>(), any::<u8>(), any::<u32>()).prop_map(
            |(byte, w, value, flags)| CorruptByte {
                byte,
                dir: if w { Direction::Write } else { Direction::Read },
                value,
                flags,
            },
        );
        let p = prop_oneof![Just(0u32), 1..=PROBABILITY_BASE];
        (
            any::<[bool; 3]>(),
            proptest::option::of(corrupt),
            p.clone(),
            p,
        )
            .prop_map(|([er, dw, ew], corrupt, rr, rw)| FlakeyFeatures {
                error_reads: er,
                drop_writes: dw,
                error_writes: ew,
                corrupt,
                random_read_corrupt: rr,
                random_write_corrupt: rw,
                implied: false,
            })
            // Only what the kernel accepts, as it stores it (none given means both errors).
            .prop_filter_map("refused or not normalised", |f| {
                let text = f.to_string();
                let args = crate::split_args(&text);
                FlakeyFeatures::parse(&mut ArgSet::new(&args))
                    .ok()
                    .filter(|back| *back == f)
            })
    }

    proptest! {
        #[test]
        fn round_trip(
            dev in dev(),
            offset in any::<u64>(),
            up in 0u32..1000,
            down in 1u32..1000,
            features in features(),
        ) {
            round_trips(&FlakeyParams { dev, offset, up, down, features })?;
        }
    }

    #[test]
    fn kernel_forms() {
        let p: FlakeyParams = "d0 0 1 1".parse().unwrap();
        assert_eq!(p.to_string(), "d0 0 1 1 0 ");
        assert!(p.features.implied && p.features.error_reads && p.features.error_writes);
        let p: FlakeyParams = "d0 0 1 1 2 error_reads error_writes".parse().unwrap();
        assert_eq!(p.to_string(), "d0 0 1 1 2 error_reads error_writes ");
        let e = |s: &str| s.parse::<FlakeyParams>().unwrap_err().msg;
        assert_eq!(e("d0 0 0 0"), "Total (up + down) interval is zero");
        assert_eq!(
            e("d0 0 1 1 2 drop_writes error_writes"),
            "Feature error_writes conflicts with feature drop_writes"
        );
    }
}
