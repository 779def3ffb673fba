//! Byte-range I/O on a block device: what a FUSE file needs on top of sector requests.
//!
//! Clients of the FUSE file use any offset and length; devices take whole logical blocks. Aligned
//! requests go straight through with the caller's buffer; unaligned writes are done by
//! read-modify-write of the partial blocks at either end, under an exclusive lock so that two
//! unaligned writes (or an aligned and an unaligned one) to the same block never lose an update.

use parking_lot::RwLock;
use udm_io::{Bio, BioFlags, BioKind, BlockDevice, IoError};
use udm_types::{Errno, SECTOR_SIZE};

/// Largest logical block size handled; larger reported sizes are clamped (no real device has one).
const MAX_UNIT: u64 = 64 * 1024;

/// Zeroes for partial-block zeroing.
static ZEROES: [u8; MAX_UNIT as usize] = [0; MAX_UNIT as usize];

/// How to address one device: its size, its alignment unit and its largest request, in bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Geometry {
    /// Device size in bytes.
    pub size: u64,
    /// Alignment unit in bytes (the logical block size, at least one sector).
    pub unit: u64,
    /// Largest request in sectors (0 = unlimited).
    pub max_io_sectors: u64,
    /// The device writes zeroes natively.
    pub write_zeroes: bool,
    /// The device can discard.
    pub discard: bool,
}

impl Geometry {
    /// Reads the geometry of `dev` now (a mapped device may change size on resume).
    pub fn of(dev: &dyn BlockDevice) -> Geometry {
        let limits = dev.limits();
        let lbs = u64::from(limits.logical_block_size);
        let unit = if lbs.is_power_of_two() {
            lbs.clamp(SECTOR_SIZE, MAX_UNIT)
        } else {
            SECTOR_SIZE
        };
        Geometry {
            size: dev.size().saturating_mul(SECTOR_SIZE),
            unit,
            max_io_sectors: limits.max_io_sectors,
            write_zeroes: limits.write_zeroes,
            discard: limits.discard,
        }
    }

    fn down(&self, x: u64) -> u64 {
        x - x % self.unit
    }

    fn up(&self, x: u64) -> u64 {
        self.down(x.saturating_add(self.unit - 1)).min(self.size)
    }
}

/// A reusable buffer whose usable part starts on a 4096-byte boundary, so that backends doing
/// O_DIRECT get aligned memory without a bounce copy.
#[derive(Default)]
pub(crate) struct Scratch {
    buf: Vec<u8>,
}

/// Alignment of [`Scratch`] buffers.
const SCRATCH_ALIGN: usize = 4096;

/// Buffers above this size are given back after use instead of being kept per thread.
const SCRATCH_KEEP: usize = 4 << 20;

impl Scratch {
    /// An aligned slice of `len` bytes (contents unspecified).
    pub fn get(&mut self, len: usize) -> &mut [u8] {
        let need = len + SCRATCH_ALIGN;
        if self.buf.len() < need {
            self.buf.resize(need, 0);
        }
        let off = self.buf.as_ptr().align_offset(SCRATCH_ALIGN);
        let off = if off > SCRATCH_ALIGN { 0 } else { off };
        &mut self.buf[off..off + len]
    }

    /// Drops an unusually large buffer so one huge request does not pin memory forever.
    pub fn trim(&mut self) {
        if self.buf.len() > SCRATCH_KEEP {
            self.buf = Vec::new();
        }
    }
}

/// Submits `bio`, split at the device's largest request size.
pub(crate) fn submit(dev: &dyn BlockDevice, geo: &Geometry, bio: Bio<'_>) -> Result<(), IoError> {
    if geo.max_io_sectors == 0 {
        return dev.submit(bio);
    }
    let mut rest = Some(bio);
    while let Some(b) = rest {
        let (head, tail) = b.split(geo.max_io_sectors);
        dev.submit(head)?;
        rest = tail;
    }
    Ok(())
}

/// Reads `len` bytes at byte offset `off`; returns fewer at the end of the device, none past it.
pub(crate) fn read_at<'s>(
    dev: &dyn BlockDevice,
    geo: &Geometry,
    off: u64,
    len: u64,
    scratch: &'s mut Scratch,
) -> Result<&'s [u8], IoError> {
    if off >= geo.size || len == 0 {
        return Ok(&[]);
    }
    let end = off.saturating_add(len).min(geo.size);
    let a_start = geo.down(off);
    let a_end = geo.up(end);
    let buf = scratch.get((a_end - a_start) as usize);
    submit(dev, geo, Bio::read(a_start / SECTOR_SIZE, buf))?;
    Ok(&buf[(off - a_start) as usize..(end - a_start) as usize])
}

/// The error for a write or allocation that starts at or beyond the end of the device (ENOSPC,
/// as a block device reports it).
fn beyond_end(op: BioKind, geo: &Geometry, off: u64, len: u64) -> IoError {
    IoError::OutOfRange {
        op,
        sector: off / SECTOR_SIZE,
        sectors: len.div_ceil(SECTOR_SIZE),
        size: geo.size / SECTOR_SIZE,
    }
}

/// Writes `data` at byte offset `off`. A write running past the end is cut short (the count
/// written is returned, as a block device does); one starting at or past the end fails with
/// ENOSPC. `fua` makes the write durable before it completes.
pub(crate) fn write_at(
    dev: &dyn BlockDevice,
    geo: &Geometry,
    off: u64,
    data: &[u8],
    fua: bool,
    rmw: &RwLock<()>,
    scratch: &mut Scratch,
) -> Result<usize, IoError> {
    if data.is_empty() {
        return Ok(0);
    }
    if off >= geo.size {
        return Err(beyond_end(BioKind::Write, geo, off, data.len() as u64));
    }
    let end = off.saturating_add(data.len() as u64).min(geo.size);
    let data = &data[..(end - off) as usize];
    let flags = if fua {
        BioFlags::FUA
    } else {
        BioFlags::empty()
    };
    if off % geo.unit == 0 && end % geo.unit == 0 {
        let _shared = rmw.read();
        submit(
            dev,
            geo,
            Bio::write(off / SECTOR_SIZE, data).with_flags(flags),
        )?;
        return Ok(data.len());
    }
    let _exclusive = rmw.write();
    let a_start = geo.down(off);
    let a_end = geo.up(end);
    let unit = geo.unit as usize;
    let buf = scratch.get((a_end - a_start) as usize);
    let blen = buf.len();
    let head_partial = off != a_start;
    let tail_partial = end != a_end;
    if head_partial {
        let n = unit.min(blen);
        submit(dev, geo, Bio::read(a_start / SECTOR_SIZE, &mut buf[..n]))?;
    }
    // The tail block needs reading unless it is the head block, already read.
    let tail_start = blen.saturating_sub(unit);
    if tail_partial && !(head_partial && tail_start == 0) {
        submit(
            dev,
            geo,
            Bio::read(
                (a_start + tail_start as u64) / SECTOR_SIZE,
                &mut buf[tail_start..],
            ),
        )?;
    }
    let at = (off - a_start) as usize;
    buf[at..at + data.len()].copy_from_slice(data);
    submit(
        dev,
        geo,
        Bio::write(a_start / SECTOR_SIZE, buf).with_flags(flags),
    )?;
    Ok(data.len())
}

/// How a range is to be zeroed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum ZeroMode {
    /// FALLOC_FL_PUNCH_HOLE: the range may be deallocated and must read back as zeroes where the
    /// device can promise it (write-zeroes with unmap); a device that can only discard gets a
    /// discard of the aligned part.
    PunchHole,
    /// FALLOC_FL_ZERO_RANGE: the range must read back as zeroes and stay allocated.
    ZeroRange,
}

/// Zeroes (or deallocates) `[off, off + len)`, clipped to the device. Partial blocks at either
/// end are zeroed by read-modify-write.
pub(crate) fn zero_range(
    dev: &dyn BlockDevice,
    geo: &Geometry,
    off: u64,
    len: u64,
    mode: ZeroMode,
    rmw: &RwLock<()>,
    scratch: &mut Scratch,
) -> Result<(), IoError> {
    let end = off.saturating_add(len).min(geo.size);
    if off >= end {
        return Ok(());
    }
    let kind = match mode {
        ZeroMode::PunchHole if !geo.write_zeroes => BioKind::Discard,
        _ => BioKind::WriteZeroes,
    };
    if mode == ZeroMode::PunchHole && !geo.write_zeroes && !geo.discard {
        return Err(IoError::Unsupported {
            op: BioKind::Discard,
            device: dev.describe(),
        });
    }
    // Head [off, mid_start) and tail [mid_end, end) are partial blocks; the middle is aligned.
    // When the range lies inside one block, the head covers it all and mid_end == end.
    let mid_start = geo.up(off).min(end);
    let mid_end = geo.down(end).max(mid_start);
    if off < mid_start {
        let n = (mid_start - off) as usize;
        write_at(dev, geo, off, &ZEROES[..n], false, rmw, scratch)?;
    }
    if mid_end < end {
        let n = (end - mid_end) as usize;
        write_at(dev, geo, mid_end, &ZEROES[..n], false, rmw, scratch)?;
    }
    if mid_start >= mid_end {
        return Ok(());
    }
    let sector = mid_start / SECTOR_SIZE;
    let sectors = (mid_end - mid_start) / SECTOR_SIZE;
    let _shared = rmw.read();
    match (kind, mode) {
        (BioKind::Discard, _) => submit(dev, geo, Bio::discard(sector, sectors)),
        (_, ZeroMode::PunchHole) => submit(dev, geo, Bio::write_zeroes(sector, sectors)),
        (_, ZeroMode::ZeroRange) if geo.write_zeroes => submit(
            dev,
            geo,
            Bio::write_zeroes(sector, sectors).with_flags(BioFlags::NO_UNMAP),
        ),
        _ => udm_io::write_zeroes_fallback(sector, sectors, |at, zeroes| {
            submit(dev, geo, Bio::write(at, zeroes))
        }),
    }
}

/// What `fallocate` on the device file does, decided from its mode bits alone.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Fallocate {
    /// Nothing to do: the range is already allocated (mode 0 or KEEP_SIZE within the device).
    Nothing,
    /// Zero the range.
    Zero(ZeroMode),
    /// Refused with this errno.
    Refuse(Errno),
}

/// Translates `fallocate(mode, off, len)` on a file of `size` bytes. The device file cannot
/// grow, so extending allocations fail with EFBIG; modes that shift data (collapse, insert) or
/// unshare are not supported.
pub(crate) fn fallocate_action(mode: i32, off: u64, len: u64, size: u64) -> Fallocate {
    let keep = mode & libc::FALLOC_FL_KEEP_SIZE != 0;
    let rest = mode & !libc::FALLOC_FL_KEEP_SIZE;
    let end = off.saturating_add(len);
    match rest {
        0 => {
            if end <= size || keep {
                Fallocate::Nothing
            } else {
                Fallocate::Refuse(Errno::EFBIG)
            }
        }
        libc::FALLOC_FL_PUNCH_HOLE if keep => Fallocate::Zero(ZeroMode::PunchHole),
        libc::FALLOC_FL_ZERO_RANGE => {
            if end > size && !keep {
                Fallocate::Refuse(Errno::EFBIG)
            } else {
                Fallocate::Zero(ZeroMode::ZeroRange)
            }
        }
        _ => Fallocate::Refuse(Errno::EOPNOTSUPP),
    }
}
