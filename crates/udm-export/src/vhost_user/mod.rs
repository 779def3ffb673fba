//! vhost-user-blk export: a udm device as a virtio-blk disk that a VMM (QEMU, cloud-hypervisor,
//! crosvm...) attaches to a VM through a Unix socket, as qemu-storage-daemon's vhost-user-blk
//! export does.
//!
//! The vhost-user protocol, virtqueues and guest memory are the rust-vmm crates'
//! (`vhost-user-backend`, `vhost`, `virtio-queue`, `vm-memory`); udm writes only the virtio-blk
//! device (`backend.rs`) and its pure request translation (`translate.rs`). One VMM is served
//! at a time, like qemu-storage-daemon: when it disconnects the socket accepts the next. Each
//! virtqueue has one thread that runs its requests on the device synchronously.

mod backend;
#[cfg(test)]
mod tests;
mod translate;

use backend::{BlkBackend, Mem};
use parking_lot::Mutex;
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::os::unix::io::AsRawFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{mpsc, Arc};
use std::time::Duration;
use udm_io::BlockDevice;
use udm_types::errno::HasErrno;
use udm_types::Errno;
use vhost::vhost_user::Listener;
use vhost_user_backend::{ShutdownHandle, VhostUserDaemon};
use vm_memory::GuestMemoryMmap;

/// Most virtqueues per device (`queues_per_thread` is a 64-bit mask).
pub const MAX_QUEUES: u16 = 64;
/// How often the accept loop looks at its stop flag.
const TICK: Duration = Duration::from_millis(100);
/// How long a stop waits for the serving thread, and a disconnect for running requests, before
/// giving up on them (a request parked on a suspended device completes later, into nothing).
const STOP_TIMEOUT: Duration = Duration::from_secs(2);

/// A failed vhost-user export operation.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum VhostUserError {
    /// The queue count is outside 1..=MAX_QUEUES.
    #[error("--num-queues {0} is out of range (1..={MAX_QUEUES})")]
    Queues(u16),
    /// The socket path is an existing file that is not a socket.
    #[error("{} exists and is not a socket", .0.display())]
    NotASocket(PathBuf),
    /// Another server is listening on the socket path.
    #[error("{} is in use by another server", .0.display())]
    InUse(PathBuf),
    /// An OS call failed.
    #[error("vhost-user {what} {}: {source}", path.display())]
    Os {
        /// What was being done.
        what: &'static str,
        /// The socket path.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
}

impl From<VhostUserError> for crate::ExportError {
    fn from(e: VhostUserError) -> Self {
        crate::ExportError::kind(e)
    }
}

impl HasErrno for VhostUserError {
    fn errno(&self) -> Errno {
        match self {
            VhostUserError::Queues(_) => Errno::EINVAL,
            VhostUserError::NotASocket(_) => Errno::EEXIST,
            VhostUserError::InUse(_) => Errno::EBUSY,
            VhostUserError::Os { source, .. } => Errno::from_io(source),
        }
    }
}

/// Counters of one export, over all its connections.
#[derive(Default, Debug)]
pub struct Stats {
    /// A VMM is connected (0 or 1).
    pub clients: AtomicU64,
    /// Requests completed.
    pub requests: AtomicU64,
    /// Requests completed with an error status.
    pub errors: AtomicU64,
    /// Bytes read by the guest.
    pub bytes_read: AtomicU64,
    /// Bytes written by the guest.
    pub bytes_written: AtomicU64,
}

impl Stats {
    fn request(&self, ok: bool) {
        self.requests.fetch_add(1, Ordering::Relaxed);
        if !ok {
            self.errors.fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// How a device is exported.
#[derive(Clone, Copy, Debug)]
pub struct VhostUserOptions {
    /// Refuse writes (and offer VIRTIO_BLK_F_RO).
    pub read_only: bool,
    /// Virtqueues (the guest's blk-mq hardware queues).
    pub num_queues: u16,
}

/// State shared by the export handle and its serving thread.
struct Shared {
    stop: AtomicBool,
    /// The connected VMM's socket, to cut it on stop.
    current: Mutex<Option<ShutdownHandle>>,
    stats: Arc<Stats>,
}

/// A served vhost-user-blk socket.
pub struct VhostUserExport {
    socket: PathBuf,
    shared: Arc<Shared>,
    done: mpsc::Receiver<()>,
}

impl VhostUserExport {
    /// Listens on `socket` (created with mode 0600; a stale socket file is replaced) and serves
    /// `dev` as device `name` to one VMM at a time.
    pub fn start(
        name: &str,
        socket: &Path,
        dev: Arc<dyn BlockDevice>,
        opts: VhostUserOptions,
    ) -> Result<VhostUserExport, VhostUserError> {
        if opts.num_queues == 0 || opts.num_queues > MAX_QUEUES {
            return Err(VhostUserError::Queues(opts.num_queues));
        }
        let listener = bind(socket)?;
        let shared = Arc::new(Shared {
            stop: AtomicBool::new(false),
            current: Mutex::new(None),
            stats: Arc::new(Stats::default()),
        });
        let (tx, done) = mpsc::channel();
        let (s2, name2) = (shared.clone(), name.to_string());
        std::thread::Builder::new()
            .name(format!("udm-vhost-{name}"))
            .spawn(move || {
                serve(listener, &name2, dev, opts, &s2);
                let _ = tx.send(());
            })
            .map_err(|source| VhostUserError::Os {
                what: "thread for",
                path: socket.to_path_buf(),
                source,
            })?;
        Ok(VhostUserExport {
            socket: socket.to_path_buf(),
            shared,
            done,
        })
    }

    /// The socket VMMs connect to.
    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// Traffic counters.
    pub fn stats(&self) -> &Stats {
        &self.shared.stats
    }

    /// Disconnects the VMM, stops listening and removes the socket. Bounded: returns after
    /// [`STOP_TIMEOUT`] even if a request is still parked on a suspended device (false then).
    pub fn stop(self) -> bool {
        self.shared.stop.store(true, Ordering::SeqCst);
        if let Some(h) = self.shared.current.lock().take() {
            h.shutdown();
        }
        // Serving thread: up to TICK to notice, then the VMM's teardown and running requests.
        let clean = self.done.recv_timeout(STOP_TIMEOUT + TICK * 2).is_ok();
        if !clean {
            tracing::warn!(socket = %self.socket.display(), "vhost-user export stopped with requests still running");
        }
        let _ = std::fs::remove_file(&self.socket);
        clean
    }
}

impl crate::Export for VhostUserExport {
    fn kind(&self) -> &'static str {
        "vhost-user"
    }

    fn location(&self) -> String {
        self.socket.display().to_string()
    }

    fn stats(&self) -> crate::ExportStats {
        let s = VhostUserExport::stats(self);
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        crate::ExportStats {
            clients: get(&s.clients),
            requests: get(&s.requests),
            errors: get(&s.errors),
            bytes_read: get(&s.bytes_read),
            bytes_written: get(&s.bytes_written),
        }
    }

    fn stop(self: Box<Self>) -> Result<(), crate::ExportError> {
        let socket = self.socket.display().to_string();
        if VhostUserExport::stop(*self) {
            Ok(())
        } else {
            Err(crate::ExportError::StillRunning(format!(
                "vhost-user export {socket}"
            )))
        }
    }
}

/// Binds the socket, replacing a stale one but never another file or a live server.
fn bind(path: &Path) -> Result<Listener, VhostUserError> {
    let os = |what, source| VhostUserError::Os {
        what,
        path: path.to_path_buf(),
        source,
    };
    if let Ok(m) = std::fs::symlink_metadata(path) {
        if !m.file_type().is_socket() {
            return Err(VhostUserError::NotASocket(path.to_path_buf()));
        }
        if UnixStream::connect(path).is_ok() {
            return Err(VhostUserError::InUse(path.to_path_buf()));
        }
        std::fs::remove_file(path).map_err(|e| os("remove stale socket", e))?;
    }
    let l = UnixListener::bind(path).map_err(|e| os("bind", e))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
        .map_err(|e| os("chmod", e))?;
    l.set_nonblocking(true).map_err(|e| os("listen", e))?;
    Ok(Listener::from(l))
}

/// True when a connection is waiting on `l` (or after TICK without one).
fn readable(l: &Listener) -> bool {
    let mut p = libc::pollfd {
        fd: l.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: `p` is one valid pollfd for the duration of the call.
    let n = unsafe { libc::poll(&mut p, 1, TICK.as_millis() as libc::c_int) };
    n > 0 && p.revents & libc::POLLIN != 0
}

/// The serving thread: accepts one VMM at a time until stopped.
fn serve(
    mut listener: Listener,
    name: &str,
    dev: Arc<dyn BlockDevice>,
    opts: VhostUserOptions,
    shared: &Shared,
) {
    while !shared.stop.load(Ordering::SeqCst) {
        if !readable(&listener) {
            continue;
        }
        let mem = Mem::new(GuestMemoryMmap::new());
        let backend = Arc::new(BlkBackend::new(
            dev.clone(),
            name,
            opts.read_only,
            opts.num_queues,
            mem.clone(),
            shared.stats.clone(),
        ));
        let mut daemon =
            match VhostUserDaemon::new(format!("udm-vhost-{name}"), backend.clone(), mem) {
                Ok(d) => d,
                Err(e) => {
                    tracing::error!(export = name, "vhost-user daemon: {e}");
                    std::thread::sleep(TICK);
                    continue;
                }
            };
        if let Err(e) = daemon.start(&mut listener) {
            tracing::warn!(export = name, "vhost-user connection refused: {e}");
            continue;
        }
        {
            let mut cur = shared.current.lock();
            *cur = daemon.shutdown_handle();
            // A stop that came before the handle was published cuts the connection now.
            if shared.stop.load(Ordering::SeqCst) {
                if let Some(h) = cur.take() {
                    h.shutdown();
                }
            }
        }
        shared.stats.clients.store(1, Ordering::Relaxed);
        tracing::info!(export = name, "vhost-user VMM connected");
        match daemon.wait() {
            Ok(()) => tracing::info!(export = name, "vhost-user VMM disconnected"),
            Err(e) => tracing::info!(export = name, "vhost-user VMM disconnected: {e}"),
        }
        shared.current.lock().take();
        for h in daemon.get_epoll_handlers() {
            h.send_exit_event();
        }
        if !backend.wait_idle(STOP_TIMEOUT) {
            tracing::warn!(
                export = name,
                "vhost-user queue still running a request after disconnect"
            );
        }
        shared.stats.clients.store(0, Ordering::Relaxed);
    }
}
