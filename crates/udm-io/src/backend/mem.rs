//! A memory device with fault injection, for tests: EIO (or any errno) on chosen ranges and
//! operations, ENOSPC, added latency, and a count of what it served.

use crate::bio::{Bio, BioFlags, BioKind, BioOp};
use crate::device::{check_range, BlockDevice, Extent, ExtentKind, Limits};
use crate::error::IoError;
use parking_lot::{Mutex, RwLock};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;
use udm_types::{Errno, SECTOR_SIZE};

/// One injected fault: requests of `ops` that touch `[start, end)` fail with `errno`, optionally
/// only the first `remaining` times.
#[derive(Clone, Debug)]
pub struct Fault {
    /// First sector affected.
    pub start: u64,
    /// One past the last sector affected.
    pub end: u64,
    /// Operations affected; empty means all.
    pub ops: Vec<BioKind>,
    /// The error to return.
    pub errno: Errno,
    /// How many more times to fire (`None` = forever).
    pub remaining: Option<u64>,
}

impl Fault {
    /// A fault on every operation touching `[start, end)`.
    pub fn range(start: u64, end: u64, errno: Errno) -> Self {
        Fault {
            start,
            end,
            ops: Vec::new(),
            errno,
            remaining: None,
        }
    }

    /// Restricts the fault to these operations.
    pub fn ops(mut self, ops: &[BioKind]) -> Self {
        self.ops = ops.to_vec();
        self
    }

    /// Fires only `n` times.
    pub fn times(mut self, n: u64) -> Self {
        self.remaining = Some(n);
        self
    }

    fn hits(&self, bio: &Bio<'_>) -> bool {
        let kind = bio.kind();
        if !self.ops.is_empty() && !self.ops.contains(&kind) {
            return false;
        }
        if bio.is_empty_flush() {
            return self.ops.contains(&BioKind::Flush) || self.ops.is_empty();
        }
        bio.sector < self.end && bio.end() > self.start
    }
}

/// A device held in RAM. Discard and write-zeroes turn sectors into tracked holes so
/// `block_status` can report them.
pub struct MemDevice {
    data: RwLock<Vec<u8>>,
    /// Sector-granular "is a hole" map (true = reads as zero, unallocated).
    holes: RwLock<Vec<bool>>,
    faults: Mutex<Vec<Fault>>,
    latency: Mutex<Duration>,
    limits: Limits,
    read_only: bool,
    /// Requests served, by kind (read, write, flush, discard, write-zeroes).
    counts: [AtomicU64; 5],
    /// Requests served with each flag (bit i of `BioFlags`): whether callers pass flags on.
    flagged: [AtomicU64; 4],
}

impl MemDevice {
    /// A zeroed device of `sectors` sectors (all holes).
    pub fn new(sectors: u64) -> Self {
        Self::with_limits(sectors, Limits::default())
    }

    /// A zeroed device with explicit limits (e.g. a 4096-byte logical block size).
    pub fn with_limits(sectors: u64, limits: Limits) -> Self {
        MemDevice {
            data: RwLock::new(vec![0; (sectors * SECTOR_SIZE) as usize]),
            holes: RwLock::new(vec![true; sectors as usize]),
            faults: Mutex::new(Vec::new()),
            latency: Mutex::new(Duration::ZERO),
            limits,
            read_only: false,
            counts: Default::default(),
            flagged: Default::default(),
        }
    }

    /// The same device, refusing writes.
    pub fn read_only(mut self) -> Self {
        self.read_only = true;
        self
    }

    /// Adds a fault.
    pub fn inject(&self, fault: Fault) {
        self.faults.lock().push(fault);
    }

    /// Removes every fault.
    pub fn clear_faults(&self) {
        self.faults.lock().clear();
    }

    /// Adds latency to every request.
    pub fn set_latency(&self, d: Duration) {
        *self.latency.lock() = d;
    }

    /// A copy of the whole contents.
    pub fn contents(&self) -> Vec<u8> {
        self.data.read().clone()
    }

    /// Number of requests of `kind` served (including failed ones).
    pub fn count(&self, kind: BioKind) -> u64 {
        self.counts[kind_index(kind)].load(Ordering::Relaxed)
    }

    /// Number of requests served with `flag` (one flag: FUA, PREFLUSH, NO_UNMAP or
    /// FAST_ZERO), failed ones included.
    pub fn flag_count(&self, flag: BioFlags) -> u64 {
        let bit = flag.bits().trailing_zeros() as usize;
        self.flagged
            .get(bit)
            .map_or(0, |c| c.load(Ordering::Relaxed))
    }

    fn check_faults(&self, bio: &Bio<'_>) -> Result<(), IoError> {
        let mut faults = self.faults.lock();
        for f in faults.iter_mut() {
            if f.hits(bio) && f.remaining != Some(0) {
                if let Some(n) = f.remaining.as_mut() {
                    *n -= 1;
                }
                return Err(IoError::errno(
                    bio.kind(),
                    bio.sector,
                    f.errno,
                    "injected fault",
                ));
            }
        }
        Ok(())
    }
}

fn kind_index(k: BioKind) -> usize {
    match k {
        BioKind::Read => 0,
        BioKind::Write => 1,
        BioKind::Flush => 2,
        BioKind::Discard => 3,
        BioKind::WriteZeroes => 4,
    }
}

impl BlockDevice for MemDevice {
    fn size(&self) -> u64 {
        self.holes.read().len() as u64
    }

    fn limits(&self) -> Limits {
        self.limits
    }

    fn read_only(&self) -> bool {
        self.read_only
    }

    fn submit(&self, bio: Bio<'_>) -> Result<(), IoError> {
        self.counts[kind_index(bio.kind())].fetch_add(1, Ordering::Relaxed);
        for (bit, c) in self.flagged.iter().enumerate() {
            if bio.flags.bits() & (1 << bit) != 0 {
                c.fetch_add(1, Ordering::Relaxed);
            }
        }
        let lat = *self.latency.lock();
        if !lat.is_zero() {
            std::thread::sleep(lat);
        }
        check_range(&bio, self.size())?;
        crate::device::check_writable(&bio, self.read_only, &|| self.describe())?;
        self.check_faults(&bio)?;
        let start = (bio.sector * SECTOR_SIZE) as usize;
        let s = bio.sector as usize;
        let n = bio.sectors() as usize;
        match bio.op {
            BioOp::Read(buf) => {
                let d = self.data.read();
                buf.copy_from_slice(&d[start..start + buf.len()]);
            }
            BioOp::Write(buf) => {
                self.data.write()[start..start + buf.len()].copy_from_slice(buf);
                self.holes.write()[s..s + n].fill(false);
            }
            BioOp::Flush => {}
            BioOp::Discard(_) | BioOp::WriteZeroes(_) => {
                let len = n * SECTOR_SIZE as usize;
                self.data.write()[start..start + len].fill(0);
                let unmap = bio.kind() == BioKind::Discard
                    || !bio.flags.contains(crate::bio::BioFlags::NO_UNMAP);
                self.holes.write()[s..s + n].fill(unmap);
            }
        }
        Ok(())
    }

    fn block_status(&self, sector: u64, sectors: u64) -> Result<Vec<Extent>, IoError> {
        let holes = self.holes.read();
        let end = sector.saturating_add(sectors).min(holes.len() as u64) as usize;
        let mut out: Vec<Extent> = Vec::new();
        for h in holes.get(sector as usize..end).unwrap_or(&[]) {
            let kind = if *h {
                ExtentKind::HoleZero
            } else {
                ExtentKind::Data
            };
            match out.last_mut() {
                Some(e) if e.kind == kind => e.sectors += 1,
                _ => out.push(Extent { sectors: 1, kind }),
            }
        }
        Ok(out)
    }

    fn describe(&self) -> String {
        format!("memory device ({} sectors)", self.size())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use udm_types::errno::HasErrno;

    #[test]
    fn read_write_and_holes() {
        let d = MemDevice::new(16);
        let w = vec![7u8; 1024];
        d.submit(Bio::write(2, &w)).unwrap();
        let mut r = vec![0u8; 1024];
        d.submit(Bio::read(2, &mut r)).unwrap();
        assert_eq!(r, w);
        let ext = d.block_status(0, 16).unwrap();
        assert_eq!(
            ext[0],
            Extent {
                sectors: 2,
                kind: ExtentKind::HoleZero
            }
        );
        assert_eq!(
            ext[1],
            Extent {
                sectors: 2,
                kind: ExtentKind::Data
            }
        );
        d.submit(Bio::discard(2, 1)).unwrap();
        d.submit(Bio::read(2, &mut r)).unwrap();
        assert!(r[..512].iter().all(|&b| b == 0));
    }

    #[test]
    fn faults_fire_and_expire() {
        let d = MemDevice::new(16);
        d.inject(
            Fault::range(4, 8, Errno::EIO)
                .ops(&[BioKind::Read])
                .times(1),
        );
        let mut r = vec![0u8; 512];
        let e = d.submit(Bio::read(5, &mut r)).unwrap_err();
        assert_eq!(e.errno(), Errno::EIO);
        d.submit(Bio::read(5, &mut r)).unwrap();
        d.submit(Bio::write(5, &r)).unwrap();
        assert!(d.submit(Bio::read(15, &mut vec![0u8; 1024])).is_err());
    }
}
