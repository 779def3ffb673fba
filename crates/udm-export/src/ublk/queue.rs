//! One hardware queue of a ublk device, served by its own thread: fetch a request from the
//! driver, run it on the udm device, commit the result and fetch the next, all as io_uring
//! commands on `/dev/ublkcN` from that thread (the driver binds a queue to the task that
//! fetched on it).

use super::abi::*;
use super::translate;
use io_uring::{opcode, squeue, types, IoUring};
use std::collections::VecDeque;
use std::fs::File;
use std::os::unix::io::AsRawFd;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{mpsc, Arc};
use std::time::Duration;
use udm_io::BlockDevice;

/// How often an idle queue thread checks whether it should stop.
const TICK: Duration = Duration::from_millis(100);

/// Traffic counters of one export (all queues).
#[derive(Debug, Default)]
pub(crate) struct Stats {
    pub requests: AtomicU64,
    pub errors: AtomicU64,
    pub bytes_read: AtomicU64,
    pub bytes_written: AtomicU64,
}

fn page_size() -> usize {
    // SAFETY: sysconf has no side effects.
    let p = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    usize::try_from(p).unwrap_or(4096).max(4096)
}

/// The mmapped request descriptors of one queue (read-only, written by the driver).
pub(crate) struct DescArea {
    ptr: *const IoDesc,
    len: usize,
    depth: u16,
}

// SAFETY: the area is a shared read-only mapping, valid until Drop; each queue thread owns its
// own area and reads only descriptors of tags the driver has handed to it.
unsafe impl Send for DescArea {}

impl DescArea {
    /// Maps queue `queue`'s descriptors. Queue `q` lives at `q` times the slot size for the
    /// driver's largest depth, whatever this device's depth is; a wrong offset would silently
    /// map queue 0's descriptors again (the driver only checks the length).
    pub(crate) fn map(cdev: &File, queue: u16, depth: u16) -> std::io::Result<DescArea> {
        let page = page_size();
        let len = (usize::from(depth) * std::mem::size_of::<IoDesc>()).div_ceil(page) * page;
        let off = UBLKSRV_CMD_BUF_OFFSET + (usize::from(queue) * cmd_buf_slot(page)) as i64;
        // SAFETY: a fresh shared read-only mapping of the ublk char device; the kernel checks
        // the offset and length against the queue layout.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ,
                libc::MAP_SHARED | libc::MAP_POPULATE,
                cdev.as_raw_fd(),
                off as libc::off_t,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(std::io::Error::last_os_error());
        }
        Ok(DescArea {
            ptr: ptr as *const IoDesc,
            len,
            depth,
        })
    }

    fn get(&self, tag: u16) -> Option<IoDesc> {
        if tag >= self.depth {
            return None;
        }
        // SAFETY: tag < depth, so the read is inside the mapping; volatile because the driver
        // writes it.
        Some(unsafe { std::ptr::read_volatile(self.ptr.add(usize::from(tag))) })
    }
}

impl Drop for DescArea {
    fn drop(&mut self) {
        // SAFETY: unmapping exactly the mapping created in `map`.
        unsafe {
            libc::munmap(self.ptr as *mut libc::c_void, self.len);
        }
    }
}

/// The data buffers of one queue: one anonymous mapping with a fixed slot per tag. The driver
/// copies a write's data into the slot before it hands the tag over and copies a read's data
/// out while the commit is processed; in between the tag belongs to the queue thread, and only
/// then does a Rust reference to that slot exist. The mapping is only unmapped after the
/// device is deleted (the export keeps it until then), so a late copy by the driver can never
/// land in memory reused for something else.
pub(crate) struct IoBufs {
    ptr: *mut u8,
    slot: usize,
    depth: usize,
}

// SAFETY: the mapping is owned by this value; slots are only referenced by the thread that
// owns the value, under the tag-ownership rule above.
unsafe impl Send for IoBufs {}

impl IoBufs {
    pub(crate) fn new(depth: u16, slot: u32) -> std::io::Result<IoBufs> {
        let slot = slot as usize;
        let depth = usize::from(depth);
        // SAFETY: a fresh private anonymous mapping; nothing else refers to it.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                depth * slot,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(std::io::Error::last_os_error());
        }
        Ok(IoBufs {
            ptr: ptr as *mut u8,
            slot,
            depth,
        })
    }

    /// The address handed to the driver for `tag` (no reference is made).
    fn addr(&self, tag: u16) -> u64 {
        self.ptr.wrapping_add(usize::from(tag) * self.slot) as u64
    }

    /// The slot of `tag`.
    ///
    /// # Safety
    /// The caller must own `tag`: its fetch has completed and its commit has not been sent, so
    /// the driver does not access the slot while the slice lives. `tag < depth`.
    unsafe fn slot_mut(&mut self, tag: u16) -> &mut [u8] {
        debug_assert!(usize::from(tag) < self.depth);
        // SAFETY: in bounds (tag < depth); exclusive per the caller's contract and `&mut self`.
        unsafe {
            std::slice::from_raw_parts_mut(self.ptr.add(usize::from(tag) * self.slot), self.slot)
        }
    }
}

impl Drop for IoBufs {
    fn drop(&mut self) {
        // SAFETY: unmapping exactly the mapping created in `new`.
        unsafe {
            libc::munmap(self.ptr as *mut libc::c_void, self.depth * self.slot);
        }
    }
}

/// Marks the queue thread as an I/O flusher (see the FUSE README: same deadlock, same cure).
fn mark_io_flusher() {
    if let Err(e) = udm_io::thread::mark_io_flusher() {
        tracing::debug!("ublk queue: PR_SET_IO_FLUSHER refused: {e}");
    }
}

/// What a queue thread serves.
pub(crate) struct Queue {
    pub cdev: Arc<File>,
    pub q: u16,
    pub depth: u16,
    pub descs: DescArea,
    pub bufs: IoBufs,
    pub dev: Arc<dyn BlockDevice>,
    pub stop: Arc<AtomicBool>,
    pub stats: Arc<Stats>,
}

impl Queue {
    fn sqe(&self, op: u32, tag: u16, result: i32) -> squeue::Entry {
        let c = IoCmd {
            q_id: self.q,
            tag,
            result,
            addr: self.bufs.addr(tag),
        };
        opcode::UringCmd16::new(types::Fd(self.cdev.as_raw_fd()), op)
            .cmd(c.to_cmd16())
            .build()
            .user_data(u64::from(tag))
    }

    /// Runs one request of `tag` and returns the result to commit.
    fn serve(&mut self, tag: u16) -> i32 {
        let Some(desc) = self.descs.get(tag) else {
            return -libc::EINVAL;
        };
        // SAFETY: the fetch of `tag` has just completed and its commit is sent only after this
        // returns, so the driver leaves the slot alone; tag < depth (checked by `get`).
        let buf = unsafe { self.bufs.slot_mut(tag) };
        let res = translate::handle(self.dev.as_ref(), &desc, buf);
        let st = &self.stats;
        st.requests.fetch_add(1, Ordering::Relaxed);
        if res < 0 {
            st.errors.fetch_add(1, Ordering::Relaxed);
        } else {
            let counter = match (desc.op_flags & 0xff) as u8 {
                UBLK_IO_OP_READ => Some(&st.bytes_read),
                UBLK_IO_OP_WRITE => Some(&st.bytes_written),
                _ => None,
            };
            if let Some(c) = counter {
                c.fetch_add(res as u64, Ordering::Relaxed);
            }
        }
        res
    }

    /// Serves the queue until the driver gives every tag up (device stopped or deleted) or
    /// `stop` is set and nothing happened for a tick. Returns the buffers, which must outlive
    /// the device (see [`IoBufs`]).
    pub(crate) fn run(mut self, ready: mpsc::Sender<Result<(), String>>) -> IoBufs {
        mark_io_flusher();
        let depth = usize::from(self.depth);
        let entries = u32::from(self.depth).next_power_of_two();
        let mut ring: IoUring = match IoUring::builder().setup_cqsize(entries * 2).build(entries) {
            Ok(r) => r,
            Err(e) => {
                let _ = ready.send(Err(format!("io_uring setup: {e}")));
                return self.bufs;
            }
        };
        // Commands not yet in the submission queue. A tag has at most one command outstanding
        // and the queue holds `depth` entries, so this only waits for the next submit; no tag
        // is ever dropped (a dropped tag would leave its request hanging in the kernel).
        let mut pending: VecDeque<squeue::Entry> = (0..self.depth)
            .map(|tag| self.sqe(U_IO_FETCH_REQ, tag, 0))
            .collect();
        push_pending(&mut ring, &mut pending);
        if let Err(e) = ring.submit() {
            let _ = ready.send(Err(format!("submitting fetches: {e}")));
            return self.bufs;
        }
        let _ = ready.send(Ok(()));
        let ts = types::Timespec::from(TICK);
        let mut gone = 0usize;
        let mut done: Vec<(u64, i32)> = Vec::with_capacity(depth);
        loop {
            push_pending(&mut ring, &mut pending);
            let args = types::SubmitArgs::new().timespec(&ts);
            match ring.submitter().submit_with_args(1, &args) {
                Ok(_) => {}
                Err(e)
                    if matches!(
                        e.raw_os_error(),
                        Some(libc::ETIME) | Some(libc::EINTR) | Some(libc::EBUSY)
                    ) => {}
                Err(e) => {
                    tracing::error!("ublk queue {}: io_uring wait failed: {e}", self.q);
                    break;
                }
            }
            done.clear();
            done.extend(ring.completion().map(|c| (c.user_data(), c.result())));
            for &(data, res) in &done {
                let Ok(tag) = u16::try_from(data) else {
                    continue;
                };
                if res != UBLK_IO_RES_OK {
                    // UBLK_IO_RES_ABORT (or an error): the driver will not use this tag again.
                    if res != UBLK_IO_RES_ABORT {
                        tracing::warn!("ublk queue {} tag {tag}: fetch ended with {res}", self.q);
                    }
                    gone += 1;
                    continue;
                }
                let result = self.serve(tag);
                pending.push_back(self.sqe(U_IO_COMMIT_AND_FETCH_REQ, tag, result));
            }
            let idle = done.is_empty() && pending.is_empty();
            if gone >= depth || (self.stop.load(Ordering::Acquire) && idle) {
                break;
            }
        }
        // Closing the ring cancels the outstanding fetches; the buffers go back to the export.
        drop(ring);
        self.bufs
    }
}

/// Moves commands into the submission queue as far as it has room.
fn push_pending(ring: &mut IoUring, pending: &mut VecDeque<squeue::Entry>) {
    while let Some(sqe) = pending.front() {
        // SAFETY: the buffer address in the command is a slot of the queue's IoBufs, which
        // outlive the ring and the device.
        if unsafe { ring.submission().push(sqe) }.is_err() {
            break;
        }
        pending.pop_front();
    }
}
