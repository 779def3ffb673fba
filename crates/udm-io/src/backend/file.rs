//! Regular files served as block devices, buffered or with O_DIRECT, with positioned reads and
//! writes (the "pread engine").
//!
//! The fd plumbing shared with the block-device backend and the io_uring engine lives here too
//! (`RawDisk`): O_DIRECT alignment handling (aligned bounce buffers for misaligned memory, a
//! second buffered fd for misaligned offsets), FUA through `pwritev2(RWF_DSYNC)`, and reads past
//! end-of-file that fill zeroes instead of failing.

use crate::bio::{Bio, BioFlags, BioKind, BioOp};
use crate::device::{check_range, check_writable, BlockDevice, Extent, ExtentKind, Limits};
use crate::error::IoError;
use std::alloc::Layout;
use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};
use std::ptr::NonNull;
use std::sync::atomic::{AtomicBool, Ordering};
use udm_types::SECTOR_SIZE;

/// Largest zero buffer written at once when write-zeroes has to be emulated.
const ZERO_CHUNK: usize = 1 << 20;

/// Most extents one `block_status` call returns (callers ask again for the rest).
const MAX_EXTENTS: usize = 1024;

/// A heap buffer with a chosen alignment, for O_DIRECT transfers whose caller buffer is not
/// aligned. Always zero-initialised.
pub(crate) struct AlignedBuf {
    ptr: NonNull<u8>,
    layout: Layout,
}

impl AlignedBuf {
    /// A zeroed buffer of `len` bytes (at least 1) aligned to `align` (a power of two).
    pub(crate) fn new(len: usize, align: usize) -> io::Result<Self> {
        let layout = Layout::from_size_align(len.max(1), align.max(1))
            .map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
        // SAFETY: the layout has a non-zero size (len.max(1)).
        let raw = unsafe { std::alloc::alloc_zeroed(layout) };
        let ptr = NonNull::new(raw).ok_or_else(|| io::Error::from_raw_os_error(libc::ENOMEM))?;
        Ok(AlignedBuf { ptr, layout })
    }
}

impl std::ops::Deref for AlignedBuf {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        // SAFETY: ptr points to layout.size() initialised (zeroed) bytes owned by self.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.layout.size()) }
    }
}

impl std::ops::DerefMut for AlignedBuf {
    fn deref_mut(&mut self) -> &mut [u8] {
        // SAFETY: as in deref, and &mut self guarantees exclusive access.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.layout.size()) }
    }
}

impl Drop for AlignedBuf {
    fn drop(&mut self) {
        // SAFETY: ptr was returned by alloc_zeroed with exactly this layout and is freed once.
        unsafe { std::alloc::dealloc(self.ptr.as_ptr(), self.layout) }
    }
}

/// Reads `buf.len()` bytes at `off`, filling with zeroes whatever lies past end-of-file.
pub(crate) fn pread_full(file: &File, buf: &mut [u8], off: u64) -> io::Result<()> {
    let mut done = 0;
    while done < buf.len() {
        match file.read_at(&mut buf[done..], off + done as u64) {
            Ok(0) => {
                buf[done..].fill(0);
                break;
            }
            Ok(n) => done += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// `preadv2(fd, buf, off, RWF_NOWAIT)` once: what the page cache holds, without waiting for
/// I/O (EAGAIN when nothing of it is cached); returns bytes read.
fn pread_nowait(file: &File, buf: &mut [u8], off: u64) -> io::Result<usize> {
    // SAFETY: iov describes `buf`, which stays mutably borrowed for the call; the kernel writes
    // at most iov_len bytes into it.
    let n = unsafe {
        libc::preadv2(
            file.as_raw_fd(),
            &iovec(buf.as_mut_ptr(), buf.len()),
            1,
            off as libc::off_t,
            libc::RWF_NOWAIT,
        )
    };
    byte_count(n)
}

/// `pwritev2(fd, buf, off, RWF_DSYNC)` once; returns bytes written.
fn pwrite_dsync(file: &File, buf: &[u8], off: u64) -> io::Result<usize> {
    // SAFETY: iov describes `buf`, which stays borrowed for the call; the kernel only reads it.
    let n = unsafe {
        libc::pwritev2(
            file.as_raw_fd(),
            &iovec(buf.as_ptr().cast_mut(), buf.len()),
            1,
            off as libc::off_t,
            libc::RWF_DSYNC,
        )
    };
    byte_count(n)
}

/// The iovec of one buffer.
fn iovec(base: *mut u8, len: usize) -> libc::iovec {
    libc::iovec {
        iov_base: base.cast(),
        iov_len: len,
    }
}

/// A byte count from a system call, or its errno.
fn byte_count(n: isize) -> io::Result<usize> {
    usize::try_from(n).map_err(|_| io::Error::last_os_error())
}

/// `fallocate(2)` on a file or block device.
pub(crate) fn fallocate(file: &File, mode: libc::c_int, off: u64, len: u64) -> io::Result<()> {
    loop {
        // SAFETY: fallocate only reads its integer arguments; the fd is owned by `file`.
        let r = unsafe {
            libc::fallocate(
                file.as_raw_fd(),
                mode,
                off as libc::off_t,
                len as libc::off_t,
            )
        };
        if r == 0 {
            return Ok(());
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
}

/// True for the errnos that mean "this file system or device cannot do that".
pub(crate) fn is_unsupported(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EOPNOTSUPP) | Some(libc::ENOSYS) | Some(libc::ENOTTY)
    )
}

/// O_DIRECT alignment of an open fd from `statx(STATX_DIOALIGN)`: `(memory, offset)`, or `None`
/// when the kernel or file system does not report it.
pub(crate) fn statx_dio_align(file: &File) -> Option<(u32, u32)> {
    // SAFETY: an all-zero statx is a valid value of this plain C struct.
    let mut stx: libc::statx = unsafe { std::mem::zeroed() };
    let empty = c"";
    // SAFETY: `empty` is a valid NUL-terminated string, `stx` a valid out-pointer; with
    // AT_EMPTY_PATH the call inspects the fd itself.
    let r = unsafe {
        libc::statx(
            file.as_raw_fd(),
            empty.as_ptr(),
            libc::AT_EMPTY_PATH,
            libc::STATX_DIOALIGN,
            &mut stx,
        )
    };
    if r != 0 || stx.stx_mask & libc::STATX_DIOALIGN == 0 || stx.stx_dio_offset_align == 0 {
        return None;
    }
    Some((stx.stx_dio_mem_align.max(1), stx.stx_dio_offset_align))
}

/// The fd-level core shared by the file and block-device backends and the io_uring engine:
/// one open file (O_DIRECT when `direct`), a buffered twin for requests O_DIRECT cannot take,
/// and the alignment rules.
pub(crate) struct RawDisk {
    pub(crate) file: File,
    /// Buffered fd on the same file, used in direct mode for offsets or lengths that are not
    /// multiples of the direct-I/O alignment, and for the tail of a short direct read.
    slow: Option<File>,
    pub(crate) path: PathBuf,
    pub(crate) sectors: u64,
    pub(crate) read_only: bool,
    pub(crate) direct: bool,
    /// Offset and length granularity O_DIRECT needs (512 when buffered).
    pub(crate) offset_align: u64,
    /// Buffer address alignment O_DIRECT needs (1 when buffered).
    pub(crate) mem_align: usize,
    pub(crate) lbs: u32,
    pub(crate) pbs: u32,
    /// A regular file (not a block device).
    pub(crate) regular: bool,
    /// pwritev2(RWF_DSYNC) works here (cleared on the first EOPNOTSUPP/EINVAL).
    rwf_dsync: AtomicBool,
    /// preadv2(RWF_NOWAIT) works here (cleared on the first EOPNOTSUPP/EINVAL).
    nowait_ok: AtomicBool,
}

impl RawDisk {
    /// Opens `path` for the backends; sizes and alignments are filled in by the caller.
    pub(crate) fn open(path: &Path, read_only: bool, direct: bool) -> io::Result<RawDisk> {
        let mut oo = OpenOptions::new();
        oo.read(true).write(!read_only);
        let slow = if direct {
            let slow = oo.open(path)?;
            oo.custom_flags(libc::O_DIRECT);
            Some(slow)
        } else {
            None
        };
        let file = oo.open(path)?;
        Ok(RawDisk {
            file,
            slow,
            path: path.to_path_buf(),
            sectors: 0,
            read_only,
            direct,
            offset_align: SECTOR_SIZE,
            mem_align: 1,
            lbs: SECTOR_SIZE as u32,
            pbs: 4096,
            regular: false,
            rwf_dsync: AtomicBool::new(true),
            nowait_ok: AtomicBool::new(true),
        })
    }

    /// The buffered fd (the only fd when not in direct mode).
    pub(crate) fn buffered(&self) -> &File {
        self.slow.as_ref().unwrap_or(&self.file)
    }

    /// True when an O_DIRECT transfer of `len` bytes at `off` is allowed by the alignment rules.
    pub(crate) fn offset_ok(&self, off: u64, len: usize) -> bool {
        off % self.offset_align == 0 && (len as u64) % self.offset_align == 0
    }

    /// True when `ptr` can be handed to O_DIRECT as is.
    pub(crate) fn mem_ok(&self, ptr: *const u8) -> bool {
        (ptr as usize) % self.mem_align == 0
    }

    /// Reads `buf` at byte offset `off`; zeroes past end-of-file.
    pub(crate) fn read_at(&self, buf: &mut [u8], off: u64) -> io::Result<()> {
        if buf.is_empty() {
            return Ok(());
        }
        if !self.direct || !self.offset_ok(off, buf.len()) {
            return self.read_cached(buf, off);
        }
        if self.mem_ok(buf.as_ptr()) {
            return self.read_direct(buf, off);
        }
        let mut bounce = AlignedBuf::new(buf.len(), self.mem_align)?;
        self.read_direct(&mut bounce, off)?;
        buf.copy_from_slice(&bounce[..buf.len()]);
        Ok(())
    }

    /// A buffered read, tried first without waiting (`RWF_NOWAIT`): what the page cache does
    /// not hold is then read normally and the wait is noted for the caller
    /// ([`crate::thread::note_device_wait`]), which may then issue requests in parallel.
    fn read_cached(&self, buf: &mut [u8], off: u64) -> io::Result<()> {
        let file = self.buffered();
        let done = if self.nowait_ok.load(Ordering::Relaxed) {
            match pread_nowait(file, buf, off) {
                Ok(n) => n,
                Err(e) if e.raw_os_error() == Some(libc::EAGAIN) => 0,
                Err(e) if matches!(e.raw_os_error(), Some(libc::EOPNOTSUPP | libc::EINVAL)) => {
                    self.nowait_ok.store(false, Ordering::Relaxed);
                    0
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => 0,
                Err(e) => return Err(e),
            }
        } else {
            0
        };
        if done == buf.len() {
            return Ok(());
        }
        if self.nowait_ok.load(Ordering::Relaxed) {
            crate::thread::note_device_wait();
        }
        pread_full(file, &mut buf[done..], off + done as u64)
    }

    /// O_DIRECT read of an aligned request; a short read (end of file) is finished through the
    /// buffered fd, which has no alignment rules.
    fn read_direct(&self, buf: &mut [u8], off: u64) -> io::Result<()> {
        loop {
            match self.file.read_at(buf, off) {
                Ok(n) if n == buf.len() => return Ok(()),
                Ok(n) => return pread_full(self.buffered(), &mut buf[n..], off + n as u64),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
    }

    /// Writes `buf` at byte offset `off`; durable on return when `fua`.
    pub(crate) fn write_at(&self, buf: &[u8], off: u64, fua: bool) -> io::Result<()> {
        if buf.is_empty() {
            if fua {
                self.sync()?;
            }
            return Ok(());
        }
        if !self.direct || !self.offset_ok(off, buf.len()) {
            return self.pwrite_all(self.buffered(), buf, off, fua);
        }
        if self.mem_ok(buf.as_ptr()) {
            return self.pwrite_all(&self.file, buf, off, fua);
        }
        let mut bounce = AlignedBuf::new(buf.len(), self.mem_align)?;
        bounce[..buf.len()].copy_from_slice(buf);
        self.pwrite_all(&self.file, &bounce[..buf.len()], off, fua)
    }

    fn pwrite_all(&self, file: &File, buf: &[u8], off: u64, fua: bool) -> io::Result<()> {
        let mut done = 0;
        let mut dsync = fua && self.rwf_dsync.load(Ordering::Relaxed);
        while done < buf.len() {
            let chunk = &buf[done..];
            let at = off + done as u64;
            let r = if dsync {
                pwrite_dsync(file, chunk, at)
            } else {
                file.write_at(chunk, at)
            };
            match r {
                Ok(0) => return Err(io::Error::from_raw_os_error(libc::ENOSPC)),
                Ok(n) => done += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e)
                    if dsync
                        && matches!(e.raw_os_error(), Some(libc::EOPNOTSUPP | libc::EINVAL)) =>
                {
                    // Old kernel or file system without RWF_DSYNC: write, then fdatasync.
                    self.rwf_dsync.store(false, Ordering::Relaxed);
                    dsync = false;
                }
                Err(e) => return Err(e),
            }
        }
        if fua && !dsync {
            self.sync()?;
        }
        Ok(())
    }

    /// fdatasync: makes completed writes durable (also flushes the device's volatile cache).
    pub(crate) fn sync(&self) -> io::Result<()> {
        self.file.sync_data()
    }

    /// Writes zero buffers over `[off, off + len)`: the slow path of write-zeroes.
    pub(crate) fn write_zero_buffers(&self, off: u64, len: u64) -> io::Result<()> {
        let chunk = (len.min(ZERO_CHUNK as u64)) as usize;
        let zeroes = AlignedBuf::new(chunk, self.mem_align.max(4096))?;
        let mut done = 0u64;
        while done < len {
            let n = (len - done).min(chunk as u64) as usize;
            self.write_at(&zeroes[..n], off + done, false)?;
            done += n as u64;
        }
        Ok(())
    }

    /// Limits common to both backends.
    pub(crate) fn limits(&self) -> Limits {
        Limits {
            logical_block_size: self.lbs,
            physical_block_size: self.pbs.max(self.lbs),
            max_io_sectors: 0,
            discard: true,
            write_zeroes: true,
            volatile_cache: true,
        }
    }

    /// Describes the backend for logs: path, plus `(direct)` when O_DIRECT.
    pub(crate) fn describe(&self, engine: &str) -> String {
        let mut s = self.path.display().to_string();
        s.push_str(" (");
        s.push_str(engine);
        if self.direct {
            s.push_str(", direct");
        }
        if self.read_only {
            s.push_str(", read-only");
        }
        s.push(')');
        s
    }

    /// Runs the PREFLUSH part of a request, then checks it (range, read-only).
    /// The positioned-I/O engine's request path, shared by files and block devices: `abnormal`
    /// performs discard and write-zeroes (given the request, byte offset and byte length), the
    /// one step in which the two differ.
    pub(crate) fn submit_with(
        &self,
        bio: Bio<'_>,
        abnormal: impl FnOnce(&Bio<'_>, u64, u64) -> Result<(), IoError>,
    ) -> Result<(), IoError> {
        self.precheck(&bio, "pread")?;
        let kind = bio.kind();
        let sector = bio.sector;
        let os = |e| IoError::os(kind, sector, e);
        if bio.flags.contains(BioFlags::PREFLUSH) || bio.is_empty_flush() {
            self.sync().map_err(os)?;
        }
        let off = sector * SECTOR_SIZE;
        let len = bio.sectors() * SECTOR_SIZE;
        let fua = bio.flags.contains(BioFlags::FUA);
        match bio.op {
            BioOp::Read(buf) => self.read_at(buf, off).map_err(os),
            BioOp::Write(buf) => self.write_at(buf, off, fua).map_err(os),
            BioOp::Flush => Ok(()),
            BioOp::Discard(_) | BioOp::WriteZeroes(_) => {
                abnormal(&bio, off, len)?;
                if fua {
                    self.sync().map_err(os)?;
                }
                Ok(())
            }
        }
    }

    pub(crate) fn precheck(&self, bio: &Bio<'_>, engine: &str) -> Result<(), IoError> {
        check_range(bio, self.sectors)?;
        check_writable(bio, self.read_only, &|| self.describe(engine))
    }
}

/// Implemented by the fd-based backends so the io_uring engine can drive their fd and borrow
/// their slow paths (discard, write-zeroes, block status, misaligned requests).
pub(crate) trait RawBacked: BlockDevice {
    /// The fd core.
    fn raw(&self) -> &RawDisk;
}

/// A regular file served as a block device, through the pread/pwrite engine.
///
/// Buffered by default (the page cache makes this the fastest way to serve a file); with
/// `direct`, O_DIRECT, whose alignment rules are handled internally so callers may still send
/// any sector-aligned request from any buffer.
pub struct FileDevice {
    disk: RawDisk,
    /// PUNCH_HOLE works on this file system (cleared on the first EOPNOTSUPP).
    can_punch: AtomicBool,
    /// ZERO_RANGE works on this file system (cleared on the first EOPNOTSUPP).
    can_zero_range: AtomicBool,
    /// SEEK_DATA/SEEK_HOLE work here (cleared on the first EINVAL).
    can_seek_data: AtomicBool,
}

impl FileDevice {
    /// Opens an existing file, buffered; its size is rounded down to whole sectors.
    pub fn open(path: &Path, read_only: bool) -> io::Result<Self> {
        Self::open_with(path, read_only, false)
    }

    /// Opens an existing file, with O_DIRECT when `direct`. The logical block size is the
    /// file system's direct-I/O offset alignment (`statx` DIOALIGN, else its block size).
    pub fn open_with(path: &Path, read_only: bool, direct: bool) -> io::Result<Self> {
        let mut disk = RawDisk::open(path, read_only, direct)?;
        let meta = disk.file.metadata()?;
        if !meta.is_file() {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("{} is not a regular file", path.display()),
            ));
        }
        disk.sectors = meta.len() / SECTOR_SIZE;
        disk.regular = true;
        let blksize = std::os::unix::fs::MetadataExt::blksize(&meta).clamp(512, 65536) as u32;
        disk.pbs = blksize.max(512);
        if direct {
            let (mem, offset) = statx_dio_align(&disk.file).unwrap_or((blksize, blksize));
            // The device's logical block is the offset alignment, but never below a sector.
            disk.offset_align = u64::from(offset.max(512));
            disk.lbs = offset.max(512);
            disk.mem_align = mem as usize;
        }
        tracing::debug!(
            path = %path.display(),
            sectors = disk.sectors,
            direct,
            lbs = disk.lbs,
            mem_align = disk.mem_align,
            "opened file backend"
        );
        Ok(FileDevice {
            disk,
            can_punch: AtomicBool::new(true),
            can_zero_range: AtomicBool::new(true),
            can_seek_data: AtomicBool::new(true),
        })
    }

    /// Creates a new sparse file of `bytes` bytes (a multiple of 512) and opens it buffered.
    /// Refuses (`AlreadyExists`) to touch an existing path, so no data is ever truncated.
    pub fn create(path: &Path, bytes: u64) -> io::Result<Self> {
        if bytes % SECTOR_SIZE != 0 {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("size {bytes} is not a multiple of {SECTOR_SIZE} bytes"),
            ));
        }
        let f = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(path)?;
        if let Err(e) = f.set_len(bytes) {
            drop(f);
            let _ = std::fs::remove_file(path);
            return Err(e);
        }
        drop(f);
        Self::open(path, false)
    }

    /// The backing file's path.
    pub fn path(&self) -> &Path {
        &self.disk.path
    }

    /// True when the file is open with O_DIRECT.
    pub fn is_direct(&self) -> bool {
        self.disk.direct
    }

    fn punch(&self, off: u64, len: u64) -> io::Result<bool> {
        if !self.can_punch.load(Ordering::Relaxed) {
            return Ok(false);
        }
        match fallocate(
            &self.disk.file,
            libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
            off,
            len,
        ) {
            Ok(()) => Ok(true),
            Err(e) if is_unsupported(&e) => {
                self.can_punch.store(false, Ordering::Relaxed);
                Ok(false)
            }
            Err(e) => Err(e),
        }
    }

    fn zero_range(&self, off: u64, len: u64) -> io::Result<bool> {
        if !self.can_zero_range.load(Ordering::Relaxed) {
            return Ok(false);
        }
        match fallocate(
            &self.disk.file,
            libc::FALLOC_FL_ZERO_RANGE | libc::FALLOC_FL_KEEP_SIZE,
            off,
            len,
        ) {
            Ok(()) => Ok(true),
            Err(e) if is_unsupported(&e) => {
                self.can_zero_range.store(false, Ordering::Relaxed);
                Ok(false)
            }
            Err(e) => Err(e),
        }
    }

    /// Discard and write-zeroes, with their fallbacks.
    fn submit_slow(&self, bio: &Bio<'_>) -> Result<(), IoError> {
        let off = bio.sector * SECTOR_SIZE;
        let len = bio.sectors() * SECTOR_SIZE;
        let os = |e| IoError::os(bio.kind(), bio.sector, e);
        match bio.op {
            BioOp::Discard(_) => {
                // Discard is advisory: where holes cannot be punched it does nothing.
                self.punch(off, len).map_err(os)?;
            }
            BioOp::WriteZeroes(_) => {
                let no_unmap = bio.flags.contains(BioFlags::NO_UNMAP);
                let done = (!no_unmap && self.punch(off, len).map_err(os)?)
                    || self.zero_range(off, len).map_err(os)?;
                if !done {
                    if bio.flags.contains(BioFlags::FAST_ZERO) {
                        return Err(IoError::Unsupported {
                            op: BioKind::WriteZeroes,
                            device: self.describe(),
                        });
                    }
                    self.disk.write_zero_buffers(off, len).map_err(os)?;
                }
            }
            _ => {}
        }
        Ok(())
    }

    /// `lseek(SEEK_DATA/SEEK_HOLE)`; `Ok(None)` for ENXIO (nothing more of that kind).
    fn seek(&self, off: u64, whence: libc::c_int) -> io::Result<Option<u64>> {
        // SAFETY: lseek only reads its integer arguments. It moves the shared file offset,
        // which this backend never uses (all I/O is positioned).
        let r = unsafe { libc::lseek(self.disk.file.as_raw_fd(), off as libc::off_t, whence) };
        if r < 0 {
            let e = io::Error::last_os_error();
            if e.raw_os_error() == Some(libc::ENXIO) {
                return Ok(None);
            }
            return Err(e);
        }
        Ok(Some(r as u64))
    }

    fn extents(&self, sector: u64, end: u64) -> io::Result<Vec<Extent>> {
        let mut out: Vec<Extent> = Vec::new();
        let push = |out: &mut Vec<Extent>, sectors: u64, kind: ExtentKind| {
            if sectors == 0 {
                return;
            }
            match out.last_mut() {
                Some(e) if e.kind == kind => e.sectors += sectors,
                _ => out.push(Extent { sectors, kind }),
            }
        };
        let mut pos = sector;
        while pos < end && out.len() < MAX_EXTENTS {
            let data = match self.seek(pos * SECTOR_SIZE, libc::SEEK_DATA)? {
                // No data from here on: the rest (up to EOF and beyond) is a hole.
                None => end,
                // A data start inside a sector makes that whole sector data.
                Some(d) => (d / SECTOR_SIZE).clamp(pos, end),
            };
            if data > pos {
                push(&mut out, data - pos, ExtentKind::HoleZero);
                pos = data;
                continue;
            }
            let hole = match self.seek(pos * SECTOR_SIZE, libc::SEEK_HOLE)? {
                None => end,
                Some(h) => h.div_ceil(SECTOR_SIZE).clamp(pos + 1, end),
            };
            push(&mut out, hole - pos, ExtentKind::Data);
            pos = hole;
        }
        Ok(out)
    }
}

impl RawBacked for FileDevice {
    fn raw(&self) -> &RawDisk {
        &self.disk
    }
}

impl BlockDevice for FileDevice {
    fn size(&self) -> u64 {
        self.disk.sectors
    }

    fn limits(&self) -> Limits {
        self.disk.limits()
    }

    fn read_only(&self) -> bool {
        self.disk.read_only
    }

    fn submit(&self, bio: Bio<'_>) -> Result<(), IoError> {
        self.disk
            .submit_with(bio, |bio, _, _| self.submit_slow(bio))
    }

    fn block_status(&self, sector: u64, sectors: u64) -> Result<Vec<Extent>, IoError> {
        let end = sector.saturating_add(sectors).min(self.disk.sectors);
        if sector >= end {
            return Ok(Vec::new());
        }
        if self.can_seek_data.load(Ordering::Relaxed) {
            match self.extents(sector, end) {
                Ok(v) => return Ok(v),
                Err(e) if matches!(e.raw_os_error(), Some(libc::EINVAL) | Some(libc::ENOSYS)) => {
                    self.can_seek_data.store(false, Ordering::Relaxed);
                }
                Err(e) => return Err(IoError::os(BioKind::Read, sector, e)),
            }
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn short_file_reads_as_zero_sectors() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("short");
        std::fs::write(&p, b"abc").unwrap();
        let d = FileDevice::open(&p, true).unwrap();
        assert_eq!(d.size(), 0);
        let mut b = vec![1u8; 512];
        assert!(d.submit(Bio::read(0, &mut b)).is_err());
        // The file shrinks under us: reads past EOF return zeroes, never panic.
        std::fs::write(&p, vec![9u8; 2048]).unwrap();
        let d = FileDevice::open(&p, false).unwrap();
        std::fs::OpenOptions::new()
            .write(true)
            .open(&p)
            .unwrap()
            .set_len(700)
            .unwrap();
        let mut b = vec![1u8; 2048];
        d.submit(Bio::read(0, &mut b)).unwrap();
        assert!(b[..700].iter().all(|&x| x == 9));
        assert!(b[700..].iter().all(|&x| x == 0));
    }

    #[test]
    fn create_refuses_existing() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("new");
        let d = FileDevice::create(&p, 1 << 20).unwrap();
        assert_eq!(d.size(), 2048);
        assert!(FileDevice::create(&p, 1 << 20).is_err());
        assert!(FileDevice::create(&dir.path().join("odd"), 1000).is_err());
    }

    #[test]
    fn aligned_buf_is_aligned() {
        let b = AlignedBuf::new(4096, 4096).unwrap();
        assert_eq!(b.as_ptr() as usize % 4096, 0);
        assert!(b.iter().all(|&x| x == 0));
    }
}
