//! ublk export: a udm device as the kernel block device `/dev/ublkbN`, served through the ublk
//! driver's io_uring command interface (`ublk_drv`).
//!
//! The control path (`ctrl.rs`: add, set parameters, start, stop, delete on
//! `/dev/ublk-control`) and the per-queue I/O path (`queue.rs`: fetch a request, run it on the
//! device, commit its result and fetch the next on `/dev/ublkcN`) are written here on the
//! `io-uring` crate with the UAPI spelled out in `abi.rs`. libublk was considered: it needs
//! bindgen and libclang at build time (libublk-rs-sys) and brings its own async executor, while
//! udm's devices are synchronous and a queue thread per hardware queue is all the concurrency
//! the export needs; the subtle parts of the protocol (the per-queue descriptor offsets, tag
//! ownership of the buffers, buffers outliving the device) are written down where they are
//! used and checked on a real kernel (tests/vmlab/kernel-ublk.sh, Linux 6.12).
//!
//! Requirements: Linux 6.4 or later with `ublk_drv` (ioctl-encoded commands,
//! `UBLK_F_CMD_IOCTL_ENCODE`); no zero-copy, user-copy or recovery features are used, so
//! every ublk kernel from 6.4 on serves it. Data is copied by the driver between the request
//! pages and a per-tag buffer of the queue.

mod abi;
mod ctrl;
mod queue;
#[cfg(test)]
mod tests;
mod translate;

use abi::*;
use ctrl::Control;
use queue::{DescArea, IoBufs, Queue, Stats};
use std::fs::{File, OpenOptions};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};
use udm_io::BlockDevice;
use udm_types::errno::HasErrno;
use udm_types::Errno;

/// Default requests in flight per queue.
pub const DEFAULT_QUEUE_DEPTH: u16 = 64;
/// Most hardware queues udm creates for one device.
const MAX_QUEUES: u16 = 64;
/// How long removal waits for the driver (STOP_DEV waits for requests in flight, which may be
/// parked in a suspended device) before it lets the removal finish in the background.
const STOP_BOUND: Duration = Duration::from_secs(10);

pub use crate::export::UblkOptions;

/// Traffic counters of a ublk export.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct UblkStats {
    /// Requests served.
    pub requests: u64,
    /// Requests answered with an error.
    pub errors: u64,
    /// Bytes read by the kernel.
    pub bytes_read: u64,
    /// Bytes written by the kernel.
    pub bytes_written: u64,
}

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
    /// The wanted device id is served by a live process.
    #[error("ublk device {dev_id} is in use by process {pid}")]
    InUse {
        /// Device id.
        dev_id: u32,
        /// Its server's pid.
        pid: i32,
    },
    /// Queue count or depth out of range.
    #[error("ublk {what} must be 1..={max}, got {got}")]
    BadOption {
        /// `queues` or `queue depth`.
        what: &'static str,
        /// Largest value.
        max: u16,
        /// Value given.
        got: u16,
    },
    /// The device did not stop within the bound; removal goes on in the background.
    #[error("ublk device {dev_id} did not stop within {secs} s (requests in flight are parked, e.g. in a suspended device); it is removed when they finish")]
    StopTimeout {
        /// Device id.
        dev_id: u32,
        /// The bound.
        secs: u64,
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

impl From<UblkError> for crate::ExportError {
    fn from(e: UblkError) -> Self {
        crate::ExportError::kind(e)
    }
}

impl HasErrno for UblkError {
    fn errno(&self) -> Errno {
        match self {
            UblkError::NoDriver => Errno::ENODEV,
            UblkError::Control { errno, .. } => *errno,
            UblkError::Os { source, .. } => Errno::from_io(source),
            UblkError::Queue { .. } => Errno::EIO,
            UblkError::InUse { .. } => Errno::EBUSY,
            UblkError::BadOption { .. } => Errno::EINVAL,
            UblkError::StopTimeout { .. } => Errno::ETIMEDOUT,
        }
    }
}

pub(crate) fn os(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> UblkError {
    let what = what.into();
    move |source| UblkError::Os { what, source }
}

/// A running ublk export: `/dev/ublkbN` backed by a udm device.
pub struct UblkExport {
    inner: Device,
    stats: Arc<Stats>,
    path: PathBuf,
}

impl crate::Export for UblkExport {
    fn kind(&self) -> &'static str {
        "ublk"
    }

    fn location(&self) -> String {
        self.path.display().to_string()
    }

    fn stats(&self) -> crate::ExportStats {
        let s = UblkExport::stats(self);
        crate::ExportStats {
            clients: 0,
            requests: s.requests,
            errors: s.errors,
            bytes_read: s.bytes_read,
            bytes_written: s.bytes_written,
        }
    }

    fn stop(self: Box<Self>) -> Result<(), crate::ExportError> {
        Ok(UblkExport::stop(*self)?)
    }
}

/// What must be torn down, in order: the disk (STOP_DEV), the queue threads, the char device,
/// the device (DEL_DEV), and only then the queue buffers.
struct Device {
    name: String,
    dev_id: u32,
    ctrl: Control,
    cdev: Option<Arc<File>>,
    stop: Arc<AtomicBool>,
    queues: Vec<JoinHandle<IoBufs>>,
    running: bool,
}

/// Checks a queue count or depth option.
fn option_in(what: &'static str, v: Option<u16>, default: u16, max: u16) -> Result<u16, UblkError> {
    match v {
        None => Ok(default.clamp(1, max)),
        Some(got) if got == 0 || got > max => Err(UblkError::BadOption { what, max, got }),
        Some(got) => Ok(got),
    }
}

impl UblkExport {
    /// Creates and starts `/dev/ublkbN` for `dev`. `name` is for logs. Fails with ENODEV
    /// ([`UblkError::NoDriver`]) when the kernel has no ublk driver.
    pub fn start(
        name: &str,
        dev: Arc<dyn BlockDevice>,
        opts: &UblkOptions,
    ) -> Result<UblkExport, UblkError> {
        let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
        let nr_queues = option_in(
            "queues",
            opts.queues,
            u16::try_from(cpus).unwrap_or(MAX_QUEUES),
            MAX_QUEUES.min(UBLK_MAX_NR_QUEUES),
        )?;
        let depth = option_in(
            "queue depth",
            opts.depth,
            DEFAULT_QUEUE_DEPTH,
            UBLK_MAX_QUEUE_DEPTH,
        )?;
        let mut ctrl = Control::open()?;
        if let Some(id) = opts.dev_id {
            ctrl.reclaim_stale(id)?;
        }
        // SAFETY: getpid has no side effects.
        let pid = unsafe { libc::getpid() };
        let mut info = DevInfo {
            nr_hw_queues: nr_queues,
            queue_depth: depth,
            max_io_buf_bytes: translate::MAX_IO_BYTES,
            dev_id: opts.dev_id.unwrap_or(u32::MAX),
            ublksrv_pid: pid,
            flags: UBLK_F_CMD_IOCTL_ENCODE,
            ..DevInfo::default()
        };
        ctrl.add(&mut info)?;
        let dev_id = info.dev_id;
        let mut inner = Device {
            name: name.to_string(),
            dev_id,
            ctrl,
            cdev: None,
            stop: Arc::new(AtomicBool::new(false)),
            queues: Vec::new(),
            running: false,
        };
        // From here on, dropping `inner` on an error deletes the device again.
        let params = translate::params_for(dev.as_ref(), opts.read_only);
        inner.ctrl.set_params(dev_id, &params)?;
        let cdev = Arc::new(open_char_dev(dev_id)?);
        inner.cdev = Some(cdev.clone());
        let stats = Arc::new(Stats::default());
        let (tx, rx) = mpsc::channel();
        for q in 0..nr_queues {
            let descs = DescArea::map(&cdev, q, depth)
                .map_err(os(format!("mmap of queue {q} descriptors")))?;
            let bufs = IoBufs::new(depth, translate::MAX_IO_BYTES)
                .map_err(os(format!("buffers of queue {q}")))?;
            let queue = Queue {
                cdev: cdev.clone(),
                q,
                depth,
                descs,
                bufs,
                dev: dev.clone(),
                stop: inner.stop.clone(),
                stats: stats.clone(),
            };
            let tx = tx.clone();
            let h = std::thread::Builder::new()
                .name(format!("udm-ublk{dev_id}q{q}"))
                .spawn(move || queue.run(tx))
                .map_err(os("spawning a queue thread"))?;
            inner.queues.push(h);
        }
        for q in 0..nr_queues {
            let why = match rx.recv() {
                Ok(Ok(())) => continue,
                Ok(Err(why)) => why,
                Err(_) => "thread ended".into(),
            };
            return Err(UblkError::Queue {
                dev_id,
                queue: q,
                why,
            });
        }
        // START_DEV returns once every tag of every queue has been fetched and the disk is
        // added.
        inner.ctrl.cmd(
            U_CMD_START_DEV,
            "START_DEV",
            CtrlCmd {
                dev_id,
                queue_id: u16::MAX,
                data: [pid as u64],
                ..CtrlCmd::default()
            },
        )?;
        inner.running = true;
        let path = PathBuf::from(format!("/dev/ublkb{dev_id}"));
        tracing::info!(
            "ublk: {name} exported as {} ({nr_queues} queues, depth {depth})",
            path.display()
        );
        Ok(UblkExport { inner, stats, path })
    }

    /// The kernel block device, `/dev/ublkbN`.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The ublk device id `N`.
    pub fn dev_id(&self) -> u32 {
        self.inner.dev_id
    }

    /// Traffic so far.
    pub fn stats(&self) -> UblkStats {
        let s = &self.stats;
        UblkStats {
            requests: s.requests.load(Ordering::Relaxed),
            errors: s.errors.load(Ordering::Relaxed),
            bytes_read: s.bytes_read.load(Ordering::Relaxed),
            bytes_written: s.bytes_written.load(Ordering::Relaxed),
        }
    }

    /// Removes the block device and stops serving it. The kernel waits for requests in flight
    /// before the disk goes away; if one is held (a suspended device) for longer than a bound,
    /// this returns [`UblkError::StopTimeout`] and the removal completes in the background
    /// once the request does.
    pub fn stop(self) -> Result<(), UblkError> {
        let UblkExport { mut inner, .. } = self;
        let dev_id = inner.dev_id;
        let (tx, rx) = mpsc::channel();
        let spawned = std::thread::Builder::new()
            .name(format!("udm-ublk{dev_id}-stop"))
            .spawn(move || {
                let _ = tx.send(inner.teardown());
            });
        if let Err(e) = spawned {
            return Err(os("spawning the removal thread")(e));
        }
        match rx.recv_timeout(STOP_BOUND) {
            Ok(r) => r,
            Err(_) => Err(UblkError::StopTimeout {
                dev_id,
                secs: STOP_BOUND.as_secs(),
            }),
        }
    }
}

impl Device {
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
        let mut bufs = Vec::with_capacity(self.queues.len());
        for h in self.queues.drain(..) {
            match h.join() {
                Ok(b) => bufs.push(b),
                Err(_) => tracing::error!("ublk: a queue thread of {} panicked", self.name),
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
        // The device is gone: the driver can no longer copy into the buffers.
        drop(bufs);
        match first_err {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }
}

impl Drop for Device {
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
