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
use udm_io::{Bio, BioFlags, BioKind, BioOp, IoError};
use udm_types::Errno;

use crate::args::{self, FlakeyParams, FromArgs};
use crate::target::{CtorContext, DevRef, Target, TargetCaps, TargetError, TargetType};
pub use udm_table::params::{CorruptByte, Direction, FlakeyFeatures, PROBABILITY_BASE};

/// `REQ_FUA` in the kernel's `bi_opf`, for the `corrupt_bio_byte` flags mask.
pub const REQ_FUA: u32 = 1 << 17;
/// `REQ_PREFLUSH` in the kernel's `bi_opf`.
pub const REQ_PREFLUSH: u32 = 1 << 18;

/// The `flakey` target type.
#[derive(Debug, Clone, Copy, Default)]
pub struct FlakeyType;

/// A flakey target instance.
#[derive(Debug)]
pub struct Flakey {
    dev: DevRef,
    start: u64,
    up: u32,
    down: u32,
    features: FlakeyFeatures,
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
        let start_time = Instant::now();
        let p = FlakeyParams::from_args(argv)?;
        let dev = args::get_device(ctx, &p.dev)?;
        dev.check_area(p.offset, ctx.len())?;
        Ok(Box::new(Flakey {
            dev,
            start: p.offset,
            up: p.up,
            down: p.down,
            features: p.features,
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
    pub fn features(&self) -> FlakeyFeatures {
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
                lent: None,
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
                    lent: None,
                });
            }
        }
        self.remap(bio)
    }

    fn table_params(&self) -> String {
        FlakeyParams {
            dev: self.dev.id.to_string(),
            offset: self.start,
            up: self.up,
            down: self.down,
            features: self.features,
        }
        .to_string()
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

    // Block status: the trait's default, everything data. An NBD client reads ranges reported
    // as zeroes from the block status alone (hole replies), which would skip this target's
    // read errors and corruption.
}
