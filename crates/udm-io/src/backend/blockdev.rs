//! Block devices (`/dev/sdX`, `/dev/loopN`, ...) served through the pread engine: size and block
//! sizes from the kernel's ioctls, discard and write-zeroes offloaded with BLKDISCARD and
//! BLKZEROOUT / fallocate, flush with fdatasync (which also flushes the device's cache).

use crate::backend::file::{fallocate, is_unsupported, statx_dio_align, RawBacked, RawDisk};
use crate::bio::{Bio, BioFlags, BioKind, BioOp};
use crate::device::{BlockDevice, Extent, ExtentKind, Limits};
use crate::error::IoError;
use std::fs::File;
use std::io;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::os::unix::io::AsRawFd;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use udm_types::SECTOR_SIZE;

/// `_IOR(0x12, 114, size_t)`: device size in bytes.
const BLKGETSIZE64: libc::Ioctl = 0x8008_1272;
/// `_IO(0x12, 119)`: discard a byte range.
const BLKDISCARD: libc::Ioctl = 0x1277;
/// `_IO(0x12, 127)`: zero a byte range (offloaded where possible, else the kernel writes zeroes).
const BLKZEROOUT: libc::Ioctl = 0x127f;

fn ioctl_u64(file: &File, req: libc::Ioctl) -> io::Result<u64> {
    let mut v: u64 = 0;
    // SAFETY: the request writes one u64 through the pointer, which points to a live u64.
    let r = unsafe { libc::ioctl(file.as_raw_fd(), req, &mut v as *mut u64) };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(v)
}

fn ioctl_int(file: &File, req: libc::Ioctl) -> io::Result<u32> {
    let mut v: libc::c_int = 0;
    // SAFETY: the request writes one int through the pointer, which points to a live c_int.
    let r = unsafe { libc::ioctl(file.as_raw_fd(), req, &mut v as *mut libc::c_int) };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(v.max(0) as u32)
}

fn ioctl_range(file: &File, req: libc::Ioctl, off: u64, len: u64) -> io::Result<()> {
    let range: [u64; 2] = [off, len];
    loop {
        // SAFETY: BLKDISCARD/BLKZEROOUT read two u64 (start, length) from the pointer, which
        // points to a live [u64; 2].
        let r = unsafe { libc::ioctl(file.as_raw_fd(), req, range.as_ptr()) };
        if r == 0 {
            return Ok(());
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
}

/// Reads a number from the device's `queue/` directory in sysfs (for a partition, the queue of
/// its disk). `None` when sysfs is not mounted or the attribute is missing.
fn queue_attr(rdev: u64, name: &str) -> Option<u64> {
    let (maj, min) = (libc::major(rdev), libc::minor(rdev));
    let base = format!("/sys/dev/block/{maj}:{min}");
    for dir in [format!("{base}/queue"), format!("{base}/../queue")] {
        if let Ok(s) = std::fs::read_to_string(format!("{dir}/{name}")) {
            return s.trim().parse().ok();
        }
    }
    None
}

/// A block device served through the pread engine.
pub struct BlockDevDevice {
    disk: RawDisk,
    /// The device advertises discard (`discard_max_bytes > 0`).
    discard: bool,
    /// The device offloads write-zeroes (`write_zeroes_max_bytes > 0`), so FAST_ZERO can work.
    zeroes_offload: bool,
    /// BLKDISCARD has not failed with EOPNOTSUPP yet.
    can_discard: AtomicBool,
}

impl BlockDevDevice {
    /// Opens a block device, with O_DIRECT when `direct`.
    pub fn open(path: &Path, read_only: bool, direct: bool) -> io::Result<Self> {
        let mut disk = RawDisk::open(path, read_only, direct)?;
        let meta = disk.file.metadata()?;
        if !meta.file_type().is_block_device() {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("{} is not a block device", path.display()),
            ));
        }
        let bytes = ioctl_u64(&disk.file, BLKGETSIZE64)?;
        disk.sectors = bytes / SECTOR_SIZE;
        disk.lbs = ioctl_int(&disk.file, libc::BLKSSZGET)?.clamp(512, 65536);
        disk.pbs = ioctl_int(&disk.file, libc::BLKPBSZGET)
            .unwrap_or(disk.lbs)
            .max(disk.lbs);
        if direct {
            let (mem, offset) = statx_dio_align(&disk.file).unwrap_or((disk.lbs, disk.lbs));
            disk.offset_align = u64::from(offset.max(disk.lbs));
            disk.mem_align = mem as usize;
        } else {
            // The page cache takes any sector, but a 4K device should still be told about.
            disk.offset_align = SECTOR_SIZE;
        }
        let rdev = meta.rdev();
        let discard = queue_attr(rdev, "discard_max_bytes").is_none_or(|v| v > 0);
        let zeroes_offload = queue_attr(rdev, "write_zeroes_max_bytes").is_some_and(|v| v > 0);
        tracing::debug!(
            path = %path.display(),
            sectors = disk.sectors,
            lbs = disk.lbs,
            pbs = disk.pbs,
            discard,
            zeroes_offload,
            direct,
            "opened block device backend"
        );
        Ok(BlockDevDevice {
            disk,
            discard,
            zeroes_offload,
            can_discard: AtomicBool::new(discard),
        })
    }

    /// The device's path.
    pub fn path(&self) -> &Path {
        &self.disk.path
    }

    /// True when opened with O_DIRECT.
    pub fn is_direct(&self) -> bool {
        self.disk.direct
    }

    /// True when `[off, off + len)` is aligned to the logical block size, as the ioctls need.
    fn lbs_aligned(&self, off: u64, len: u64) -> bool {
        let lbs = u64::from(self.disk.lbs);
        off % lbs == 0 && len % lbs == 0
    }

    fn discard(&self, off: u64, len: u64) -> io::Result<()> {
        if !self.can_discard.load(Ordering::Relaxed) {
            return Ok(());
        }
        // Discard is advisory: shrink to whole logical blocks and skip what is left.
        let lbs = u64::from(self.disk.lbs);
        let start = off.div_ceil(lbs) * lbs;
        let end = (off + len) / lbs * lbs;
        if end <= start {
            return Ok(());
        }
        match ioctl_range(&self.disk.file, BLKDISCARD, start, end - start) {
            Err(e) if is_unsupported(&e) => {
                self.can_discard.store(false, Ordering::Relaxed);
                Ok(())
            }
            r => r,
        }
    }

    fn write_zeroes(&self, bio: &Bio<'_>, off: u64, len: u64) -> Result<(), IoError> {
        let os = |e| IoError::os(BioKind::WriteZeroes, bio.sector, e);
        let fast = bio.flags.contains(BioFlags::FAST_ZERO);
        let unsupported = || IoError::Unsupported {
            op: BioKind::WriteZeroes,
            device: self.describe(),
        };
        if !self.lbs_aligned(off, len) {
            // A sub-block request on a 4K device: only the slow way works.
            if fast {
                return Err(unsupported());
            }
            return self.disk.write_zero_buffers(off, len).map_err(os);
        }
        if !bio.flags.contains(BioFlags::NO_UNMAP) {
            // PUNCH_HOLE on a block device: write-zeroes with unmap allowed, never emulated.
            match fallocate(
                &self.disk.file,
                libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
                off,
                len,
            ) {
                Ok(()) => return Ok(()),
                Err(e) if is_unsupported(&e) => {}
                Err(e) => return Err(os(e)),
            }
        }
        if fast && !self.zeroes_offload {
            return Err(unsupported());
        }
        // BLKZEROOUT never unmaps; the kernel writes zeroes itself when there is no offload.
        match ioctl_range(&self.disk.file, BLKZEROOUT, off, len) {
            Ok(()) => Ok(()),
            Err(e) if is_unsupported(&e) && !fast => {
                self.disk.write_zero_buffers(off, len).map_err(os)
            }
            Err(e) if is_unsupported(&e) => Err(unsupported()),
            Err(e) => Err(os(e)),
        }
    }
}

impl RawBacked for BlockDevDevice {
    fn raw(&self) -> &RawDisk {
        &self.disk
    }
}

impl BlockDevice for BlockDevDevice {
    fn size(&self) -> u64 {
        self.disk.sectors
    }

    fn limits(&self) -> Limits {
        Limits {
            discard: self.discard,
            ..self.disk.limits()
        }
    }

    fn read_only(&self) -> bool {
        self.disk.read_only
    }

    fn submit(&self, bio: Bio<'_>) -> Result<(), IoError> {
        self.disk.submit_with(bio, |bio, off, len| match bio.op {
            BioOp::Discard(_) => self
                .discard(off, len)
                .map_err(|e| IoError::os(bio.kind(), bio.sector, e)),
            _ => self.write_zeroes(bio, off, len),
        })
    }

    fn block_status(&self, sector: u64, sectors: u64) -> Result<Vec<Extent>, IoError> {
        // A block device has no holes we can see: everything in range is data.
        let end = sector.saturating_add(sectors).min(self.disk.sectors);
        if sector >= end {
            return Ok(Vec::new());
        }
        Ok(vec![Extent {
            sectors: end - sector,
            kind: ExtentKind::Data,
        }])
    }

    fn describe(&self) -> String {
        self.disk.describe("pread")
    }
}
