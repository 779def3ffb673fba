//! The io_uring engine: reads, writes and flushes of a file or block device submitted through
//! io_uring instead of pread/pwrite/fdatasync.
//!
//! The data path is synchronous and called from many threads at once, so each calling thread
//! gets its own small ring (thread-local, created on first use with `SINGLE_ISSUER |
//! DEFER_TASKRUN` where the kernel has them): a request is pushed and waited for with one
//! `io_uring_enter`, with no lock and no cross-thread wake-up. A write with PREFLUSH is one
//! linked `fsync -> write` chain, a FUA write carries `RWF_DSYNC`. Discard, write-zeroes, block
//! status and requests O_DIRECT cannot take go to the wrapped pread backend, which shares the fd.
//! So do writes other than O_DIRECT writes to block devices, which measured slower through
//! the ring (see the comment in the write path).

use crate::backend::blockdev::BlockDevDevice;
use crate::backend::file::{pread_full, AlignedBuf, FileDevice, RawBacked, RawDisk};
use crate::bio::{Bio, BioFlags, BioOp};
use crate::device::{BlockDevice, Extent, Limits};
use crate::error::IoError;
use io_uring::{opcode, squeue, types, IoUring};
use std::cell::RefCell;
use std::io;
use std::os::unix::io::AsRawFd;
use std::sync::atomic::{AtomicBool, Ordering};
use udm_types::SECTOR_SIZE;

/// Entries per thread ring: a request uses at most two.
const RING_ENTRIES: u32 = 8;

/// Largest transfer sent as one SQE (the SQE length field is 32 bits).
const MAX_SQE_BYTES: usize = 1 << 30;

/// Set once a thread failed to build its ring, so the warning is logged once per process.
static RING_WARNED: AtomicBool = AtomicBool::new(false);

enum Slot {
    Empty,
    Ready(Box<IoUring>),
    Failed,
}

thread_local! {
    static RING: RefCell<Slot> = const { RefCell::new(Slot::Empty) };
}

/// Builds a ring with the cheapest completion mode the kernel offers.
fn build_ring() -> io::Result<IoUring> {
    IoUring::builder()
        .setup_single_issuer()
        .setup_defer_taskrun()
        .build(RING_ENTRIES)
        .or_else(|_| IoUring::builder().setup_coop_taskrun().build(RING_ENTRIES))
        .or_else(|_| IoUring::new(RING_ENTRIES))
}

/// Setting this environment variable (to anything) makes [`probe`] fail, so every open takes
/// the pread engine: an escape hatch for kernels whose io_uring misbehaves.
pub const DISABLE_ENV: &str = "UDM_NO_IO_URING";

/// Checks that io_uring can be used here (not disabled by sysctl, seccomp or [`DISABLE_ENV`],
/// and the kernel knows read, write and fsync). Builds this thread's ring as a side effect.
pub fn probe() -> io::Result<()> {
    if std::env::var_os(DISABLE_ENV).is_some() {
        return Err(io::Error::new(
            io::ErrorKind::Unsupported,
            format!("disabled by {DISABLE_ENV}"),
        ));
    }
    let ring = build_ring()?;
    let mut probe = io_uring::Probe::new();
    ring.submitter().register_probe(&mut probe)?;
    for code in [opcode::Read::CODE, opcode::Write::CODE, opcode::Fsync::CODE] {
        if !probe.is_supported(code) {
            return Err(io::Error::from_raw_os_error(libc::ENOSYS));
        }
    }
    let _ = RING.try_with(|cell| {
        if let Ok(mut slot) = cell.try_borrow_mut() {
            if matches!(*slot, Slot::Empty) {
                *slot = Slot::Ready(Box::new(ring));
            }
        }
    });
    Ok(())
}

/// Runs `f` with this thread's ring; `None` when the thread has no usable ring (the caller then
/// takes the pread path).
fn with_ring<R>(f: impl FnOnce(&mut IoUring) -> R) -> Option<R> {
    RING.try_with(|cell| {
        let mut slot = cell.try_borrow_mut().ok()?;
        if matches!(*slot, Slot::Empty) {
            *slot = match build_ring() {
                Ok(r) => Slot::Ready(Box::new(r)),
                Err(e) => {
                    if !RING_WARNED.swap(true, Ordering::Relaxed) {
                        tracing::warn!("io_uring ring setup failed ({e}); using pread instead");
                    }
                    Slot::Failed
                }
            };
        }
        match &mut *slot {
            Slot::Ready(ring) => Some(f(ring)),
            _ => None,
        }
    })
    .ok()
    .flatten()
}

/// Submits `sqes` (at most two) and waits for all their completions. Returns the results in
/// submission order, or `None` if nothing could be submitted (the caller falls back).
///
/// # Safety
/// Every buffer an SQE points to must stay valid, and unaliased for reads, until this returns.
/// It never returns while one of the SQEs is still in flight.
unsafe fn run(sqes: &[squeue::Entry]) -> Option<[i32; 2]> {
    debug_assert!(sqes.len() <= 2);
    with_ring(|ring| {
        {
            let mut sq = ring.submission();
            for (i, e) in sqes.iter().enumerate() {
                let e = e.clone().user_data(i as u64);
                // SAFETY: the caller guarantees the buffers outlive the request, and this
                // function waits for every completion before returning.
                if unsafe { sq.push(&e) }.is_err() {
                    return None;
                }
            }
        }
        let mut res = [0i32; 2];
        let mut got = 0usize;
        let mut errors = 0u32;
        while got < sqes.len() {
            if let Err(e) = ring.submit_and_wait(sqes.len() - got) {
                let transient = matches!(
                    e.raw_os_error(),
                    Some(libc::EINTR | libc::EAGAIN | libc::EBUSY)
                );
                if !transient && ring.submission().len() == sqes.len() && got == 0 {
                    // Nothing reached the kernel: drop the SQEs with the ring and fall back.
                    tracing::warn!("io_uring_enter failed ({e}); using pread on this thread");
                    return None;
                }
                errors += 1;
                if errors % 1000 == 1 && !transient {
                    tracing::error!("io_uring_enter failed with requests in flight: {e}");
                }
                std::thread::yield_now();
            }
            for cqe in ring.completion() {
                let i = cqe.user_data() as usize;
                if let Some(r) = res.get_mut(i) {
                    *r = cqe.result();
                    got += 1;
                }
            }
        }
        Some(res)
    })
    .flatten()
    .or_else(|| {
        // A ring that failed with nothing in flight is rebuilt next time on this thread.
        let _ = RING.try_with(|cell| {
            if let Ok(mut slot) = cell.try_borrow_mut() {
                if let Slot::Ready(ring) = &mut *slot {
                    if !ring.submission().is_empty() {
                        *slot = Slot::Empty;
                    }
                }
            }
        });
        None
    })
}

fn check(res: i32) -> io::Result<usize> {
    if res < 0 {
        return Err(io::Error::from_raw_os_error(-res));
    }
    Ok(res as usize)
}

/// A file or block device whose reads, writes and flushes go through io_uring.
pub struct UringDevice {
    sync: Box<dyn RawBacked>,
}

impl UringDevice {
    /// Wraps an open file backend. Fails when io_uring is unusable here ([`probe`]).
    pub fn from_file(dev: FileDevice) -> io::Result<Self> {
        probe()?;
        Ok(UringDevice {
            sync: Box::new(dev),
        })
    }

    /// Wraps an open block-device backend. Fails when io_uring is unusable here ([`probe`]).
    pub fn from_blockdev(dev: BlockDevDevice) -> io::Result<Self> {
        probe()?;
        Ok(UringDevice {
            sync: Box::new(dev),
        })
    }

    fn raw(&self) -> &RawDisk {
        self.sync.raw()
    }

    fn fd(&self) -> types::Fd {
        types::Fd(self.raw().file.as_raw_fd())
    }

    fn fsync_sqe(&self) -> squeue::Entry {
        opcode::Fsync::new(self.fd())
            .flags(types::FsyncFlags::DATASYNC)
            .build()
    }

    /// True when the request must take the pread path: misaligned for O_DIRECT, or too big for
    /// one SQE.
    fn needs_sync_path(&self, off: u64, len: usize) -> bool {
        len > MAX_SQE_BYTES || (self.raw().direct && !self.raw().offset_ok(off, len))
    }

    fn read(&self, buf: &mut [u8], off: u64) -> io::Result<()> {
        let raw = self.raw();
        if buf.is_empty() {
            return Ok(());
        }
        if self.needs_sync_path(off, buf.len()) {
            return raw.read_at(buf, off);
        }
        if raw.direct && !raw.mem_ok(buf.as_ptr()) {
            let mut bounce = AlignedBuf::new(buf.len(), raw.mem_align)?;
            self.read_ring(&mut bounce[..buf.len()], off)?;
            buf.copy_from_slice(&bounce[..buf.len()]);
            return Ok(());
        }
        if !raw.direct {
            // Page-cache hits are served by one non-blocking preadv2, cheaper than a ring round
            // trip (engine_bench: ring-only buffered reads ran at 0.6x of pread); only misses
            // go through the ring.
            let n = self.read_nowait(buf, off);
            if n == buf.len() {
                return Ok(());
            }
            return self.read_ring(&mut buf[n..], off + n as u64);
        }
        self.read_ring(buf, off)
    }

    /// `preadv2(RWF_NOWAIT)`: what the page cache holds right now; 0 when nothing (or when
    /// the kernel does not know the flag).
    fn read_nowait(&self, buf: &mut [u8], off: u64) -> usize {
        let iov = libc::iovec {
            iov_base: buf.as_mut_ptr().cast(),
            iov_len: buf.len(),
        };
        // SAFETY: iov describes `buf`, exclusively borrowed for the call.
        let n = unsafe {
            libc::preadv2(
                self.raw().file.as_raw_fd(),
                &iov,
                1,
                off as libc::off_t,
                libc::RWF_NOWAIT,
            )
        };
        if n <= 0 {
            return 0;
        }
        (n as usize).min(buf.len())
    }

    fn read_ring(&self, buf: &mut [u8], off: u64) -> io::Result<()> {
        let sqe = opcode::Read::new(self.fd(), buf.as_mut_ptr(), buf.len() as u32)
            .offset(off)
            .build();
        // SAFETY: `buf` is exclusively borrowed for the whole call and `run` waits for the
        // completion before returning.
        let Some(res) = (unsafe { run(std::slice::from_ref(&sqe)) }) else {
            return self.raw().read_at(buf, off);
        };
        let n = match check(res[0]) {
            Err(e) if e.raw_os_error() == Some(libc::EINTR) => 0,
            r => r?,
        };
        if n < buf.len() {
            // End of file or a short read: the buffered fd finishes it, zero-filling past EOF.
            pread_full(self.raw().buffered(), &mut buf[n..], off + n as u64)?;
        }
        Ok(())
    }

    fn write(&self, buf: &[u8], off: u64, preflush: bool, fua: bool) -> io::Result<()> {
        let raw = self.raw();
        // Only O_DIRECT writes to block devices use the ring. File systems complete
        // asynchronous direct writes through a workqueue, and io_uring punts buffered writes to
        // its worker threads: both lose to a blocking pwrite for a caller that waits anyway
        // (engine_bench: file direct 0.3x, file buffered 0.7x, block device buffered 0.4x).
        if buf.is_empty() || raw.regular || !raw.direct || self.needs_sync_path(off, buf.len()) {
            if preflush {
                self.flush()?;
            }
            return raw.write_at(buf, off, fua);
        }
        if raw.direct && !raw.mem_ok(buf.as_ptr()) {
            let mut bounce = AlignedBuf::new(buf.len(), raw.mem_align)?;
            bounce[..buf.len()].copy_from_slice(buf);
            return self.write_ring(&bounce[..buf.len()], off, preflush, fua);
        }
        self.write_ring(buf, off, preflush, fua)
    }

    fn write_ring(&self, buf: &[u8], off: u64, preflush: bool, fua: bool) -> io::Result<()> {
        let write = opcode::Write::new(self.fd(), buf.as_ptr(), buf.len() as u32)
            .offset(off)
            .rw_flags(if fua { libc::RWF_DSYNC } else { 0 })
            .build();
        let (sqes, wi) = if preflush {
            let flush = self.fsync_sqe().flags(squeue::Flags::IO_LINK);
            ([flush, write], 1)
        } else {
            ([write.clone(), write], 0)
        };
        let sqes = &sqes[..=wi];
        // SAFETY: `buf` is borrowed for the whole call and `run` waits for every completion
        // before returning.
        let Some(res) = (unsafe { run(sqes) }) else {
            if preflush {
                self.raw().sync()?;
            }
            return self.raw().write_at(buf, off, fua);
        };
        if preflush {
            check(res[0])?;
        }
        let n = check(res[wi])?;
        if n < buf.len() {
            self.raw().write_at(&buf[n..], off + n as u64, fua)?;
        }
        Ok(())
    }

    fn flush(&self) -> io::Result<()> {
        let sqe = self.fsync_sqe();
        // SAFETY: fsync carries no buffer.
        match unsafe { run(std::slice::from_ref(&sqe)) } {
            Some(res) => check(res[0]).map(|_| ()),
            None => self.raw().sync(),
        }
    }
}

impl BlockDevice for UringDevice {
    fn size(&self) -> u64 {
        self.raw().sectors
    }

    fn limits(&self) -> Limits {
        self.sync.limits()
    }

    fn read_only(&self) -> bool {
        self.raw().read_only
    }

    fn submit(&self, bio: Bio<'_>) -> Result<(), IoError> {
        self.raw().precheck(&bio, "io_uring")?;
        let kind = bio.kind();
        let sector = bio.sector;
        let os = |e| IoError::os(kind, sector, e);
        let off = sector * SECTOR_SIZE;
        let preflush = bio.flags.contains(BioFlags::PREFLUSH);
        let fua = bio.flags.contains(BioFlags::FUA);
        match bio.op {
            BioOp::Read(buf) => {
                if preflush {
                    self.flush().map_err(os)?;
                }
                self.read(buf, off).map_err(os)
            }
            BioOp::Write(buf) => self.write(buf, off, preflush, fua).map_err(os),
            BioOp::Flush => self.flush().map_err(os),
            BioOp::Discard(_) | BioOp::WriteZeroes(_) => self.sync.submit(bio),
        }
    }

    fn block_status(&self, sector: u64, sectors: u64) -> Result<Vec<Extent>, IoError> {
        self.sync.block_status(sector, sectors)
    }

    fn describe(&self) -> String {
        self.raw().describe("io_uring")
    }
}
