//! `flakey <dev> <off> <up_s> <down_s> [<#feat> <feat>...]`: a linear mapping that misbehaves
//! during the down part of every `up + down` second period counted from construction
//! (dm-flakey.c, v1.5.0).
//!
//! Features: `error_reads`, `drop_writes`, `error_writes`,
//! `corrupt_bio_byte <N> <r|w> <value> <flags>`, `random_read_corrupt <p>`,
//! `random_write_corrupt <p>` (p out of 1 000 000 000). Without features the down period fails
//! every request (mainline implies `error_reads error_writes`). The table line is Linux 6.1's
//! (what `dmsetup table` prints on the kernels in use): the feature count and each feature
//! followed by a space (`60 0 0 `, `60 5 1 drop_writes `), implied features not listed.
//! Argument checks and messages are the kernel's.

use std::time::Instant;

use rand::Rng;
use udm_io::{Bio, BioFlags, BioKind, BioOp, Extent, IoError};
use udm_types::Errno;

use crate::table::args::{self, ArgSet};
use crate::target::{CtorContext, DevRef, Target, TargetCaps, TargetError, TargetType};

/// Random corruption probabilities are out of this (`PROBABILITY_BASE`).
pub const PROBABILITY_BASE: u32 = 1_000_000_000;

/// `REQ_FUA` in the kernel's `bi_opf`, for the `corrupt_bio_byte` flags mask.
pub const REQ_FUA: u32 = 1 << 17;
/// `REQ_PREFLUSH` in the kernel's `bi_opf`.
pub const REQ_PREFLUSH: u32 = 1 << 18;

/// The `flakey` target type.
#[derive(Debug, Clone, Copy, Default)]
pub struct FlakeyType;

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

/// Parsed flakey features.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Features {
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

impl Features {
    /// The kernel's `parse_features`.
    fn parse(a: &mut ArgSet<'_>) -> Result<Features, TargetError> {
        let mut f = Features::default();
        let mut argc = 0;
        if a.remaining() > 0 {
            argc = a.read_arg_group(0, 11, "Invalid number of feature args")?;
        }
        let dup = |n: &str| TargetError::invalid(format!("Feature {n} duplicated"));
        while argc > 0 {
            let name = a
                .shift()
                .ok_or_else(|| TargetError::invalid("Insufficient feature arguments"))?;
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
                        return Err(TargetError::invalid(
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
                        return Err(TargetError::invalid(
                            "Feature error_writes conflicts with feature drop_writes",
                        ));
                    }
                }
                "corrupt_bio_byte" => {
                    if f.corrupt.is_some() {
                        return Err(dup("corrupt_bio_byte"));
                    }
                    if argc < 4 {
                        return Err(TargetError::invalid(
                            "Feature corrupt_bio_byte requires 4 parameters",
                        ));
                    }
                    let byte = a.read_arg(1, u32::MAX, "Invalid corrupt bio byte")?;
                    argc -= 1;
                    let dir = match a.shift().map(str::to_ascii_lowercase).as_deref() {
                        Some("w") => Direction::Write,
                        Some("r") => Direction::Read,
                        _ => {
                            return Err(TargetError::invalid(
                                "Invalid corrupt bio direction (r or w)",
                            ))
                        }
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
                        return Err(TargetError::invalid(format!(
                            "Feature {n} requires a parameter"
                        )));
                    }
                    let p = a.read_arg(0, PROBABILITY_BASE, "Invalid random corrupt argument")?;
                    argc -= 1;
                    if read {
                        f.random_read_corrupt = p;
                    } else {
                        f.random_write_corrupt = p;
                    }
                }
                _ => {
                    return Err(TargetError::invalid(
                        "Unrecognised flakey feature requested",
                    ))
                }
            }
        }
        let corrupt_dir = |d: Direction| f.corrupt.is_some_and(|c| c.dir == d);
        if f.drop_writes && (corrupt_dir(Direction::Write) || f.random_write_corrupt != 0) {
            return Err(TargetError::invalid(
                "drop_writes is incompatible with random_write_corrupt or corrupt_bio_byte \
                 with the WRITE flag set",
            ));
        }
        if f.error_writes && (corrupt_dir(Direction::Write) || f.random_write_corrupt != 0) {
            return Err(TargetError::invalid(
                "error_writes is incompatible with random_write_corrupt or corrupt_bio_byte \
                 with the WRITE flag set",
            ));
        }
        if f.error_reads && (corrupt_dir(Direction::Read) || f.random_read_corrupt != 0) {
            return Err(TargetError::invalid(
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
    fn table(&self) -> String {
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

/// A flakey target instance.
#[derive(Debug)]
pub struct Flakey {
    dev: DevRef,
    start: u64,
    up: u32,
    down: u32,
    features: Features,
    start_time: Instant,
}

impl TargetType for FlakeyType {
    fn name(&self) -> &'static str {
        "flakey"
    }

    fn version(&self) -> [u32; 3] {
        [1, 5, 0]
    }

    fn construct(
        &self,
        ctx: &mut dyn CtorContext,
        argv: &[String],
    ) -> Result<Box<dyn Target>, TargetError> {
        if argv.len() < 4 {
            return Err(TargetError::invalid("Invalid argument count"));
        }
        let start_time = Instant::now();
        let mut a = ArgSet::new(argv);
        let path = a.shift().unwrap_or_default();
        let start = args::sector(a.shift().unwrap_or_default())?;
        let up = a.read_arg(0, u32::MAX, "Invalid up interval")?;
        let down = a.read_arg(0, u32::MAX, "Invalid down interval")?;
        // In this order, as the kernel's u32 arithmetic gives: a sum wrapping to exactly 0
        // reports a zero interval.
        if up.wrapping_add(down) == 0 {
            return Err(TargetError::invalid("Total (up + down) interval is zero"));
        }
        if up.checked_add(down).is_none() {
            return Err(TargetError::invalid("Interval overflow"));
        }
        let features = Features::parse(&mut a)?;
        let dev = args::get_device(ctx, path)?;
        dev.check_area(start, ctx.len())?;
        Ok(Box::new(Flakey {
            dev,
            start,
            up,
            down,
            features,
            start_time,
        }))
    }
}

/// The kernel's `bi_opf` of a request: operation code plus FUA/PREFLUSH bits.
pub fn bi_opf(bio: &Bio<'_>) -> u32 {
    let op = match bio.kind() {
        BioKind::Read => 0,
        // dm sends flushes as empty REQ_OP_WRITE | REQ_PREFLUSH.
        BioKind::Write | BioKind::Flush => 1,
        BioKind::Discard => 3,
        BioKind::WriteZeroes => 9,
    };
    let mut opf = op;
    if bio.flags.contains(BioFlags::FUA) {
        opf |= REQ_FUA;
    }
    if bio.flags.contains(BioFlags::PREFLUSH) {
        opf |= REQ_PREFLUSH;
    }
    opf
}

fn corrupt_at(buf: &mut [u8], index: u64, value: u8) {
    if let Some(b) = usize::try_from(index).ok().and_then(|i| buf.get_mut(i)) {
        *b = value;
    }
}

fn chance(p: u32) -> bool {
    p > 0 && rand::thread_rng().gen::<u64>() % u64::from(PROBABILITY_BASE) < u64::from(p)
}

fn corrupt_random(buf: &mut [u8]) {
    if buf.is_empty() {
        return;
    }
    let mut rng = rand::thread_rng();
    let i = rng.gen_range(0..buf.len());
    buf[i] = rng.gen();
}

impl Flakey {
    /// The features in force during the down period.
    pub fn features(&self) -> Features {
        self.features
    }

    /// True while in the down part of the period (`flakey_map`'s "are we alive?").
    pub fn is_down(&self) -> bool {
        let elapsed = self.start_time.elapsed().as_secs();
        let period = u64::from(self.up) + u64::from(self.down);
        elapsed % period >= u64::from(self.up)
    }

    fn remap<'a>(&self, bio: Bio<'a>) -> Result<(), IoError> {
        if bio.is_empty_flush() {
            return self.dev.dev.submit(bio);
        }
        let sector = self.start + bio.sector;
        self.dev.dev.submit(bio.at(sector))
    }

    fn flags_match(&self, c: &CorruptByte, opf: u32) -> bool {
        opf & c.flags == c.flags
    }
}

impl Target for Flakey {
    fn map(&self, bio: Bio<'_>) -> Result<(), IoError> {
        if !self.is_down() {
            return self.remap(bio);
        }
        let f = &self.features;
        let opf = bi_opf(&bio);
        if bio.kind() == BioKind::Read {
            if f.error_reads {
                return Err(IoError::errno(
                    BioKind::Read,
                    bio.sector,
                    Errno::EIO,
                    "flakey: error_reads while down",
                ));
            }
            let sector = self.start + bio.sector;
            let flags = bio.flags;
            let BioOp::Read(buf) = bio.op else {
                return Ok(());
            };
            self.dev.dev.submit(Bio {
                sector,
                op: BioOp::Read(&mut *buf),
                flags,
            })?;
            if let Some(c) = f.corrupt {
                if c.dir == Direction::Read && self.flags_match(&c, opf) {
                    corrupt_at(buf, u64::from(c.byte) - 1, c.value);
                }
            }
            if chance(f.random_read_corrupt) {
                corrupt_random(buf);
            }
            return Ok(());
        }
        if f.drop_writes {
            return Ok(());
        }
        if f.error_writes {
            return Err(IoError::errno(
                bio.kind(),
                bio.sector,
                Errno::EIO,
                "flakey: error_writes while down",
            ));
        }
        if let BioOp::Write(data) = bio.op {
            let fixed = f
                .corrupt
                .filter(|c| c.dir == Direction::Write && self.flags_match(c, opf));
            let random = chance(f.random_write_corrupt);
            if fixed.is_some() || random {
                let mut copy = data.to_vec();
                if let Some(c) = fixed {
                    corrupt_at(&mut copy, u64::from(c.byte) - 1, c.value);
                }
                if random {
                    corrupt_random(&mut copy);
                }
                return self.dev.dev.submit(Bio {
                    sector: self.start + bio.sector,
                    op: BioOp::Write(&copy),
                    flags: bio.flags,
                });
            }
        }
        self.remap(bio)
    }

    fn table_params(&self) -> String {
        format!(
            "{} {} {} {} {}",
            self.dev.id,
            self.start,
            self.up,
            self.down,
            self.features.table()
        )
    }

    fn caps(&self) -> TargetCaps {
        TargetCaps {
            flush: true,
            discard: self.dev.dev.limits().discard,
            write_zeroes: false,
        }
    }

    fn devices(&self) -> Vec<DevRef> {
        vec![self.dev.clone()]
    }

    fn block_status(&self, sector: u64, sectors: u64) -> Result<Vec<Extent>, IoError> {
        self.dev.dev.block_status(self.start + sector, sectors)
    }
}
