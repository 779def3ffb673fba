//! ublk export: a udm device as the kernel block device `/dev/ublkbN`, served through the ublk
//! driver's io_uring command interface (Linux 6.0+, `ublk_drv`).
//!
//! The control path (`/dev/ublk-control`: add, set parameters, start, stop, delete) and the
//! per-queue I/O path (`/dev/ublkcN`: fetch a request, run it on the device, commit its result
//! and fetch the next) are written here on the `io-uring` crate with the UAPI spelled out in
//! `abi.rs`, so the build needs neither kernel headers nor libclang (libublk needs bindgen).
//!
//! Honesty note: the machines this was written on have no `ublk_drv`, so only the pure
//! translations (parameters, request decoding, errno mapping, ABI layout) are tested; the
//! runtime path has not been run against a kernel yet.

mod abi;
#[cfg(test)]
mod tests;
mod translate;

use abi::*;
use io_uring::{cqueue, opcode, squeue, types, IoUring};
use std::fs::{File, OpenOptions};
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};
use udm_io::BlockDevice;
use udm_types::errno::HasErrno;
use udm_types::Errno;

/// Hardware queues (one serving thread each: the device's `submit` is synchronous, so queues
/// are the concurrency).
const NR_QUEUES: u16 = 4;
/// Requests in flight per queue.
const QUEUE_DEPTH: u16 = 32;
/// How often an idle queue thread checks whether it should stop.
const TICK: Duration = Duration::from_millis(100);

/// A failed ublk operation.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum UblkError {
    /// The kernel has no ublk driver (no `/dev/ublk-control`).
    #[error("{CONTROL_PATH} is missing: load the ublk_drv module (Linux 6.0+)")]
    NoDriver,
    /// A control command was refused by the driver.
    #[error("ublk {cmd} for device {dev_id} failed: {errno}")]
    Control {
        /// Command name.
        cmd: &'static str,
        /// Device id (u32::MAX before one is assigned).
        dev_id: u32,
        /// Errno returned by the driver.
        errno: Errno,
    },
    /// An OS call on the ublk nodes or io_uring failed.
    #[error("ublk {what}: {source}")]
    Os {
        /// What was being done.
        what: String,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// A queue thread could not start.
    #[error("ublk queue {queue} of device {dev_id} failed to start: {why}")]
    Queue {
        /// Device id.
        dev_id: u32,
        /// Queue index.
        queue: u16,
        /// Why.
        why: String,
    },
}

impl HasErrno for UblkError {
    fn errno(&self) -> Errno {
        match self {
            UblkError::NoDriver => Errno::ENODEV,
            UblkError::Control { errno, .. } => *errno,
            UblkError::Os { source, .. } => Errno::from_io(source),
            UblkError::Queue { .. } => Errno::EIO,
        }
    }
}

fn os(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> UblkError {
    let what = what.into();
    move |source| UblkError::Os { what, source }
}

/// The control node and a small SQE128 ring to send it commands.
struct Control {
    file: File,
    ring: IoUring<squeue::Entry128, cqueue::Entry>,
}

impl Control {
    fn open() -> Result<Control, UblkError> {
        let file = match OpenOptions::new().read(true).write(true).open(CONTROL_PATH) {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Err(UblkError::NoDriver),
            Err(e) => return Err(os(format!("open {CONTROL_PATH}"))(e)),
        };
        Control::with_file(file)
    }

    /// A control channel on an already open file (the control node, or any file in tests).
    fn with_file(file: File) -> Result<Control, UblkError> {
        let ring = IoUring::<squeue::Entry128, cqueue::Entry>::builder()
            .build(4)
            .map_err(os("io_uring setup (SQE128) for control commands"))?;
        Ok(Control { file, ring })
    }

    /// Sends one control command and waits for its completion.
    fn cmd(&mut self, op: u32, name: &'static str, c: CtrlCmd) -> Result<i32, UblkError> {
        let sqe = opcode::UringCmd80::new(types::Fd(self.file.as_raw_fd()), op)
            .cmd(c.to_cmd80())
            .build()
            .user_data(1);
        // SAFETY: the buffer `c.addr` points to (if any) is owned by the caller and outlives
        // this call, which waits for the command's completion before returning.
        unsafe {
            self.ring
                .submission()
                .push(&sqe)
                .map_err(|_| os(name)(std::io::Error::other("submission queue full")))?;
        }
        loop {
            match self.ring.submit_and_wait(1) {
                Ok(_) => break,
                Err(e) if e.raw_os_error() == Some(libc::EINTR) => continue,
                Err(e) => return Err(os(format!("io_uring submit of {name}"))(e)),
            }
        }
        let res = self
            .ring
            .completion()
            .next()
            .map(|c| c.result())
            .ok_or_else(|| os(name)(std::io::Error::other("no completion")))?;
        if res < 0 {
            return Err(UblkError::Control {
                cmd: name,
                dev_id: c.dev_id,
                errno: Errno(-res),
            });
        }
        Ok(res)
    }

    fn simple(&mut self, op: u32, name: &'static str, dev_id: u32) -> Result<i32, UblkError> {
        self.cmd(
            op,
            name,
            CtrlCmd {
                dev_id,
                queue_id: u16::MAX,
                ..CtrlCmd::default()
            },
        )
    }
}

/// The mmapped request descriptors of one queue (read-only, written by the driver).
struct DescArea {
    ptr: *const IoDesc,
    len: usize,
}

// SAFETY: the area is a shared read-only mapping, valid until Drop; each queue thread owns its
// own area and reads only descriptors of tags the driver has handed to it.
unsafe impl Send for DescArea {}

impl DescArea {
    fn map(cdev: &File, queue: u16, depth: u16) -> std::io::Result<DescArea> {
        // SAFETY: sysconf has no side effects.
        let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) }.max(4096) as usize;
        let len = (usize::from(depth) * std::mem::size_of::<IoDesc>()).div_ceil(page) * page;
        let off = UBLKSRV_CMD_BUF_OFFSET + (usize::from(queue) * len) as i64;
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
        })
    }

    fn get(&self, tag: u16) -> IoDesc {
        // SAFETY: tag < depth (the driver only completes fetches for tags we submitted), so the
        // read is inside the mapping; volatile because the driver writes it.
        unsafe { std::ptr::read_volatile(self.ptr.add(usize::from(tag))) }
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

/// Marks the calling thread as an I/O flusher (see the FUSE README: same deadlock, same cure).
fn mark_io_flusher() {
    // SAFETY: prctl with integer arguments only changes flags of the calling thread.
    unsafe {
        libc::prctl(57 /* PR_SET_IO_FLUSHER */, 1, 0, 0, 0);
    }
}

/// Serves one hardware queue until `stop` is set and the driver has no request for it.
fn queue_loop(
    cdev: Arc<File>,
    queue: u16,
    descs: DescArea,
    dev: Arc<dyn BlockDevice>,
    stop: Arc<AtomicBool>,
    ready: mpsc::Sender<Result<(), String>>,
) {
    mark_io_flusher();
    let depth = usize::from(QUEUE_DEPTH);
    let buf_len = translate::MAX_IO_BYTES as usize;
    // Declared before the ring so that it is dropped after it on every path: the kernel may
    // hold buffer addresses of submitted fetches until the ring is gone.
    let mut mem = vec![0u8; depth * buf_len + 4096];
    let mut ring: IoUring = match IoUring::new(u32::from(QUEUE_DEPTH) * 2) {
        Ok(r) => r,
        Err(e) => {
            let _ = ready.send(Err(format!("io_uring setup: {e}")));
            return;
        }
    };
    let base = mem.as_ptr().align_offset(4096);
    let addr_of = |mem: &mut Vec<u8>, tag: usize| mem[base + tag * buf_len..].as_mut_ptr() as u64;
    let fd = types::Fd(cdev.as_raw_fd());
    let io_sqe = |op: u32, tag: u16, result: i32, addr: u64| {
        let c = IoCmd {
            q_id: queue,
            tag,
            result,
            addr,
        };
        opcode::UringCmd16::new(fd, op)
            .cmd(c.to_cmd16())
            .build()
            .user_data(u64::from(tag))
    };
    for tag in 0..QUEUE_DEPTH {
        let sqe = io_sqe(U_IO_FETCH_REQ, tag, 0, addr_of(&mut mem, usize::from(tag)));
        // SAFETY: the buffer address stays valid while the ring lives (mem outlives the ring's
        // use: the ring is dropped first at the end of this function).
        if unsafe { ring.submission().push(&sqe) }.is_err() {
            let _ = ready.send(Err("submission queue full".into()));
            return;
        }
    }
    if let Err(e) = ring.submit() {
        let _ = ready.send(Err(format!("submitting fetches: {e}")));
        return;
    }
    let _ = ready.send(Ok(()));
    let ts = types::Timespec::from(TICK);
    let mut aborted = 0usize;
    let mut done: Vec<(u16, i32)> = Vec::with_capacity(depth);
    loop {
        let args = types::SubmitArgs::new().timespec(&ts);
        match ring.submitter().submit_with_args(1, &args) {
            Ok(_) => {}
            Err(e) if matches!(e.raw_os_error(), Some(libc::ETIME) | Some(libc::EINTR)) => {}
            Err(e) => {
                tracing::error!("ublk queue {queue}: io_uring wait failed: {e}");
                break;
            }
        }
        done.clear();
        done.extend(
            ring.completion()
                .map(|c| (c.user_data() as u16, c.result())),
        );
        for &(tag, res) in &done {
            if res != UBLK_IO_RES_OK {
                // UBLK_IO_RES_ABORT (or an error): the driver will not use this tag again.
                if res != UBLK_IO_RES_ABORT {
                    tracing::warn!("ublk queue {queue} tag {tag}: fetch completed with {res}");
                }
                aborted += 1;
                continue;
            }
            let desc = descs.get(tag);
            let start = base + usize::from(tag) * buf_len;
            let result = translate::handle(dev.as_ref(), &desc, &mut mem[start..start + buf_len]);
            let sqe = io_sqe(
                U_IO_COMMIT_AND_FETCH_REQ,
                tag,
                result,
                addr_of(&mut mem, usize::from(tag)),
            );
            // SAFETY: as for the fetches above.
            if unsafe { ring.submission().push(&sqe) }.is_err() {
                tracing::error!("ublk queue {queue}: submission queue full");
            }
        }
        if aborted >= depth || (stop.load(Ordering::Acquire) && done.is_empty()) {
            break;
        }
    }
    // Dropping the ring cancels the outstanding fetch commands before the buffers go away.
    drop(ring);
    drop(mem);
}

/// A running ublk export: `/dev/ublkbN` backed by a udm device.
pub struct UblkExport {
    name: String,
    dev_id: u32,
    path: PathBuf,
    ctrl: Control,
    cdev: Option<Arc<File>>,
    stop: Arc<AtomicBool>,
    queues: Vec<JoinHandle<()>>,
    running: bool,
}

impl UblkExport {
    /// Creates and starts `/dev/ublkbN` for `dev`. `name` is for logs. Fails with ENODEV
    /// ([`UblkError::NoDriver`]) when the kernel has no ublk driver.
    pub fn start(
        name: &str,
        dev: Arc<dyn BlockDevice>,
        read_only: bool,
    ) -> Result<UblkExport, UblkError> {
        let mut ctrl = Control::open()?;
        // SAFETY: getpid has no side effects.
        let pid = unsafe { libc::getpid() };
        let mut info = DevInfo {
            nr_hw_queues: NR_QUEUES,
            queue_depth: QUEUE_DEPTH.min(UBLK_MAX_QUEUE_DEPTH),
            max_io_buf_bytes: translate::MAX_IO_BYTES,
            dev_id: u32::MAX,
            ublksrv_pid: pid,
            flags: UBLK_F_CMD_IOCTL_ENCODE,
            ..DevInfo::default()
        };
        ctrl.cmd(
            U_CMD_ADD_DEV,
            "ADD_DEV",
            CtrlCmd {
                dev_id: u32::MAX,
                queue_id: u16::MAX,
                len: std::mem::size_of::<DevInfo>() as u16,
                addr: &mut info as *mut DevInfo as u64,
                ..CtrlCmd::default()
            },
        )?;
        let dev_id = info.dev_id;
        let mut export = UblkExport {
            name: name.to_string(),
            dev_id,
            path: PathBuf::from(format!("/dev/ublkb{dev_id}")),
            ctrl,
            cdev: None,
            stop: Arc::new(AtomicBool::new(false)),
            queues: Vec::new(),
            running: false,
        };
        // From here on, dropping `export` on an error deletes the device again.
        let params = translate::params_for(dev.as_ref(), read_only);
        export.ctrl.cmd(
            U_CMD_SET_PARAMS,
            "SET_PARAMS",
            CtrlCmd {
                dev_id,
                queue_id: u16::MAX,
                len: std::mem::size_of::<Params>() as u16,
                addr: &params as *const Params as u64,
                ..CtrlCmd::default()
            },
        )?;
        let cdev = Arc::new(open_char_dev(dev_id)?);
        export.cdev = Some(cdev.clone());
        let (tx, rx) = mpsc::channel();
        for q in 0..NR_QUEUES {
            let descs = DescArea::map(&cdev, q, QUEUE_DEPTH)
                .map_err(os(format!("mmap of queue {q} descriptors")))?;
            let (cdev, dev, stop, tx) =
                (cdev.clone(), dev.clone(), export.stop.clone(), tx.clone());
            let h = std::thread::Builder::new()
                .name(format!("udm-ublk{dev_id}q{q}"))
                .spawn(move || queue_loop(cdev, q, descs, dev, stop, tx))
                .map_err(os("spawning a queue thread"))?;
            export.queues.push(h);
        }
        for q in 0..NR_QUEUES {
            match rx.recv() {
                Ok(Ok(())) => {}
                Ok(Err(why)) => {
                    return Err(UblkError::Queue {
                        dev_id,
                        queue: q,
                        why,
                    })
                }
                Err(_) => {
                    return Err(UblkError::Queue {
                        dev_id,
                        queue: q,
                        why: "thread ended".into(),
                    })
                }
            }
        }
        // START_DEV returns once every tag has been fetched and the disk is added.
        export.ctrl.cmd(
            U_CMD_START_DEV,
            "START_DEV",
            CtrlCmd {
                dev_id,
                queue_id: u16::MAX,
                data: [pid as u64],
                ..CtrlCmd::default()
            },
        )?;
        export.running = true;
        tracing::info!("ublk: {name} exported as {}", export.path.display());
        Ok(export)
    }

    /// The kernel block device, `/dev/ublkbN`.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The ublk device id `N`.
    pub fn dev_id(&self) -> u32 {
        self.dev_id
    }

    /// Removes the block device and stops serving it.
    pub fn stop(mut self) -> Result<(), UblkError> {
        self.teardown()
    }

    fn teardown(&mut self) -> Result<(), UblkError> {
        let mut first_err = None;
        if self.running {
            // Stop first: the queues keep serving until the disk is gone.
            if let Err(e) = self.ctrl.simple(U_CMD_STOP_DEV, "STOP_DEV", self.dev_id) {
                first_err.get_or_insert(e);
            }
            self.running = false;
        }
        self.stop.store(true, Ordering::Release);
        for h in self.queues.drain(..) {
            if h.join().is_err() {
                tracing::error!("ublk: a queue thread of {} panicked", self.name);
            }
        }
        // DEL_DEV waits until the char device is released.
        self.cdev = None;
        if self.dev_id != u32::MAX {
            if let Err(e) = self.ctrl.simple(U_CMD_DEL_DEV, "DEL_DEV", self.dev_id) {
                first_err.get_or_insert(e);
            }
            self.dev_id = u32::MAX;
        }
        match first_err {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }
}

impl Drop for UblkExport {
    fn drop(&mut self) {
        if let Err(e) = self.teardown() {
            tracing::warn!("ublk: stopping {}: {e}", self.name);
        }
    }
}

/// Opens `/dev/ublkcN`, waiting a little for udev to create the node.
fn open_char_dev(dev_id: u32) -> Result<File, UblkError> {
    let path = format!("/dev/ublkc{dev_id}");
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        match OpenOptions::new().read(true).write(true).open(&path) {
            Ok(f) => return Ok(f),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound && Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(20));
            }
            Err(e) => return Err(os(format!("open {path}"))(e)),
        }
    }
}
