//! `striped <#stripes> <chunk_sectors> (<dev> <offset>)...`: round-robin chunks over several
//! devices (dm-stripe.c, v1.7.0). The chunk size need not be a power of two.

use std::sync::atomic::{AtomicU32, Ordering};

use udm_io::{Bio, BioKind, BioOp, Extent, ExtentKind, IoError};
use udm_types::errno::HasErrno;
use udm_types::Errno;

use crate::args::{self, FromArgs, StripeDest, StripeHealth, StripedParams, StripedStatus};
use crate::target::{CtorContext, DevRef, EventSink, Target, TargetCaps, TargetError, TargetType};

/// Errors on one stripe raise an event only while its count stays below this
/// (`DM_IO_ERROR_THRESHOLD`).
pub const DM_IO_ERROR_THRESHOLD: u32 = 15;

/// The `striped` target type.
#[derive(Debug, Clone, Copy, Default)]
pub struct StripedType;

struct Stripe {
    dev: DevRef,
    physical_start: u64,
    error_count: AtomicU32,
}

/// A striped mapping over `stripes.len()` devices.
pub struct Striped {
    stripes: Vec<Stripe>,
    chunk: u64,
    /// Sectors of the target held by each stripe (`stripe_width`).
    width: u64,
    events: EventSink,
}

impl TargetType for StripedType {
    fn name(&self) -> &'static str {
        "striped"
    }

    fn version(&self) -> [u32; 3] {
        [1, 7, 0]
    }

    fn construct(
        &self,
        ctx: &mut dyn CtorContext,
        argv: &[String],
    ) -> Result<Box<dyn Target>, TargetError> {
        // The length checks come before the destinations are read, as in the kernel.
        let (stripes, chunk) = StripedParams::header(argv)?;
        let (stripes, chunk) = (u64::from(stripes), u64::from(chunk));
        let len = ctx.len();
        if len % stripes != 0 {
            return Err(TargetError::invalid(
                "Target length not divisible by number of stripes",
            ));
        }
        let width = len / stripes;
        if width % chunk != 0 {
            return Err(TargetError::invalid(
                "Target length not divisible by chunk size",
            ));
        }
        let p = StripedParams::from_args(argv)?;
        let mut out = Vec::with_capacity(p.stripes.len());
        for d in &p.stripes {
            let dev = args::get_device_as(ctx, &d.dev, "Couldn't parse stripe destination")?;
            dev.check_area(d.offset, width)?;
            out.push(Stripe {
                dev,
                physical_start: d.offset,
                error_count: AtomicU32::new(0),
            });
        }
        Ok(Box::new(Striped {
            stripes: out,
            chunk,
            width,
            events: ctx.events(),
        }))
    }
}

impl Striped {
    fn nstripes(&self) -> u64 {
        self.stripes.len() as u64
    }

    /// `stripe_map_sector`: (stripe, sector within the stripe) of a target sector.
    fn map_sector(&self, sector: u64) -> (usize, u64) {
        let chunk = sector / self.chunk;
        let offset = sector % self.chunk;
        let stripe = (chunk % self.nstripes()) as usize;
        (stripe, (chunk / self.nstripes()) * self.chunk + offset)
    }

    /// `stripe_map_range_sector`: where `sector` falls in `target` stripe, rounded to that
    /// stripe's chunk boundaries when it belongs to another stripe.
    fn map_range_sector(&self, sector: u64, target: usize) -> u64 {
        let (stripe, result) = self.map_sector(sector);
        if stripe == target {
            return result;
        }
        let rounded = result - result % self.chunk;
        if target < stripe {
            rounded + self.chunk
        } else {
            rounded
        }
    }

    /// Counts an error against every stripe on the failing device (`stripe_end_io`).
    fn note_error(&self, stripe: usize, e: &IoError) {
        if e.errno() == Errno::EOPNOTSUPP {
            return;
        }
        let id = self.stripes[stripe].dev.id;
        for s in self.stripes.iter().filter(|s| s.dev.id == id) {
            let n = s.error_count.fetch_add(1, Ordering::Relaxed) + 1;
            if n < DM_IO_ERROR_THRESHOLD {
                self.events.raise();
            }
        }
    }

    fn submit_to(&self, stripe: usize, bio: Bio<'_>) -> Result<(), IoError> {
        let r = self.stripes[stripe].dev.dev.submit(bio);
        if let Err(e) = &r {
            self.note_error(stripe, e);
        }
        r
    }

    /// Discard and write-zeroes: one request per stripe, clipped to the stripe's share.
    fn map_range(&self, bio: Bio<'_>) -> Result<(), IoError> {
        let (start, end) = (bio.sector, bio.end());
        let mut first_err = None;
        for s in 0..self.stripes.len() {
            let begin = self.map_range_sector(start, s);
            let stop = self.map_range_sector(end, s);
            if begin >= stop {
                continue;
            }
            let sector = begin + self.stripes[s].physical_start;
            let piece = match bio.op {
                BioOp::Discard(_) => BioOp::Discard(stop - begin),
                _ => BioOp::WriteZeroes(stop - begin),
            };
            let b = Bio {
                sector,
                op: piece,
                flags: bio.flags,
                lent: None,
            };
            if let Err(e) = self.submit_to(s, b) {
                first_err.get_or_insert(e);
            }
        }
        first_err.map_or(Ok(()), Err)
    }
}

impl Target for Striped {
    fn map(&self, bio: Bio<'_>) -> Result<(), IoError> {
        match bio.kind() {
            BioKind::Flush => {
                let mut first_err = None;
                for s in 0..self.stripes.len() {
                    if let Err(e) = self.submit_to(s, Bio::flush()) {
                        first_err.get_or_insert(e);
                    }
                }
                first_err.map_or(Ok(()), Err)
            }
            BioKind::Discard | BioKind::WriteZeroes => self.map_range(bio),
            BioKind::Read | BioKind::Write => {
                // The table splits at chunk boundaries already; splitting here as well keeps
                // a direct caller correct.
                let mut cur = Some(bio);
                while let Some(b) = cur.take() {
                    let room = self.chunk - b.sector % self.chunk;
                    let (head, tail) = b.split(room);
                    cur = tail;
                    let (s, dev_sector) = self.map_sector(head.sector);
                    let sector = dev_sector + self.stripes[s].physical_start;
                    self.submit_to(s, head.at(sector))?;
                }
                Ok(())
            }
        }
    }

    fn table_params(&self) -> String {
        StripedParams {
            chunk_sectors: self.chunk,
            stripes: self
                .stripes
                .iter()
                .map(|st| StripeDest {
                    dev: st.dev.id.to_string(),
                    offset: st.physical_start,
                })
                .collect(),
        }
        .to_string()
    }

    fn status(&self) -> String {
        StripedStatus {
            stripes: self
                .stripes
                .iter()
                .map(|st| StripeHealth {
                    dev: st.dev.id.to_string(),
                    alive: st.error_count.load(Ordering::Relaxed) == 0,
                })
                .collect(),
        }
        .to_string()
    }

    fn max_io_len(&self) -> u64 {
        self.chunk
    }

    fn caps(&self) -> TargetCaps {
        let all =
            |f: fn(&udm_io::Limits) -> bool| self.stripes.iter().all(|s| f(&s.dev.dev.limits()));
        TargetCaps {
            flush: true,
            discard: all(|l| l.discard),
            write_zeroes: all(|l| l.write_zeroes),
        }
    }

    fn discards_split_at_max_io_len(&self) -> bool {
        false
    }

    fn devices(&self) -> Vec<DevRef> {
        self.stripes.iter().map(|s| s.dev.clone()).collect()
    }

    fn block_status(&self, sector: u64, sectors: u64) -> Result<Vec<Extent>, IoError> {
        // One chunk piece at a time, at most this many, so a huge query stays cheap.
        const MAX_PIECES: usize = 1024;
        let mut out: Vec<Extent> = Vec::new();
        let (mut pos, end) = (sector, sector.saturating_add(sectors));
        for _ in 0..MAX_PIECES {
            if pos >= end {
                break;
            }
            let n = (self.chunk - pos % self.chunk).min(end - pos);
            let (s, dev_sector) = self.map_sector(pos);
            let st = &self.stripes[s];
            let ext = st.dev.dev.block_status(dev_sector + st.physical_start, n)?;
            let mut covered = 0;
            for e in ext {
                let len = e.sectors.min(n - covered);
                if len == 0 {
                    continue;
                }
                match out.last_mut() {
                    Some(l) if l.kind == e.kind => l.sectors += len,
                    _ => out.push(Extent {
                        sectors: len,
                        kind: e.kind,
                    }),
                }
                covered += len;
            }
            if covered == 0 {
                out.push(Extent {
                    sectors: n,
                    kind: ExtentKind::Data,
                });
                covered = n;
            }
            pos += covered;
            if covered < n {
                break;
            }
        }
        Ok(out)
    }
}

impl std::fmt::Debug for Striped {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Striped({} width {})", self.table_params(), self.width)
    }
}
