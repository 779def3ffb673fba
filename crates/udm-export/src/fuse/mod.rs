//! FUSE file export: a device shown as the regular file `DIR/NAME` of the device's size, so that
//! `losetup` can turn it into a real kernel block device (to format, mount, fsck).
//!
//! One FUSE mount per directory holds one file per exported device: exporting a second device
//! to the same directory adds a file, removing the last file unmounts. The mount is made with
//! `fuser` in pure Rust (mount(2) on `/dev/fuse` as root, `fusermount3` otherwise) and served
//! by several worker threads. Files are opened in FUSE direct-I/O mode, so both `losetup` and
//! `losetup --direct-io=on` work and nothing is cached twice; see `README.md` beside this file
//! for the measures against the loop-over-FUSE memory-pressure deadlock.

mod fs;
mod handle;
mod io;
mod sys;
#[cfg(test)]
mod tests;

pub use handle::FuseExport;

use fs::{DeviceFs, MountState, RemoveRefused, ROOT_INO};
use parking_lot::Mutex;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};
use udm_io::BlockDevice;
use udm_types::errno::HasErrno;
use udm_types::Errno;

/// Worker threads per mount. Requests block in the device, so there are more workers than
/// cores; each holds a 16 MiB receive buffer (virtual until touched).
const WORKER_THREADS: usize = 8;

/// How long `remove` waits for releases of just-closed handles before reporting EBUSY.
const RELEASE_GRACE: Duration = Duration::from_secs(1);

/// How long `remove`/`shutdown` wait for the workers to stop after an unmount before aborting
/// the connection through fusectl.
const STOP_GRACE: Duration = Duration::from_secs(5);

/// A failed FUSE export operation, with the directory and file it concerns.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum FuseError {
    /// The file is already exported in that directory.
    #[error("{} is already exported", dir.join(name).display())]
    Exists {
        /// Mount directory.
        dir: PathBuf,
        /// File name.
        name: String,
    },
    /// No such exported file.
    #[error("{} is not a FUSE export", dir.join(name).display())]
    NotFound {
        /// Mount directory.
        dir: PathBuf,
        /// File name.
        name: String,
    },
    /// The file name cannot be a single path component.
    #[error("invalid FUSE export file name {name:?}: {why}")]
    InvalidName {
        /// The name given.
        name: String,
        /// What is wrong with it.
        why: &'static str,
    },
    /// The directory is missing or is not a directory.
    #[error("FUSE export directory {}: {source}", dir.display())]
    Directory {
        /// The directory given.
        dir: PathBuf,
        /// Why it cannot be used.
        #[source]
        source: std::io::Error,
    },
    /// The directory is a dead FUSE mount (its daemon died without unmounting).
    #[error(
        "{} is a stale FUSE mount (transport endpoint is not connected); run umount {} first",
        dir.display(),
        dir.display()
    )]
    StaleMount {
        /// The directory given.
        dir: PathBuf,
    },
    /// The file is still open, typically by a loop device.
    #[error(
        "{} is still open ({handles} handle(s){}); detach it first{}",
        path.display(),
        holders_text(holders),
        detach_hint(holders)
    )]
    Busy {
        /// The exported file.
        path: PathBuf,
        /// Open handles.
        handles: u64,
        /// Loop devices backed by the file.
        holders: Vec<PathBuf>,
    },
    /// Mounting failed.
    #[error("cannot mount FUSE export at {}: {source}", dir.display())]
    Mount {
        /// Mount directory.
        dir: PathBuf,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// Unmounting failed (EBUSY: a process still uses the directory).
    #[error("cannot unmount FUSE export at {}: {source}", dir.display())]
    Unmount {
        /// Mount directory.
        dir: PathBuf,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
}

fn holders_text(holders: &[PathBuf]) -> String {
    if holders.is_empty() {
        String::new()
    } else {
        let v: Vec<String> = holders.iter().map(|h| h.display().to_string()).collect();
        format!(", backing {}", v.join(", "))
    }
}

fn detach_hint(holders: &[PathBuf]) -> String {
    match holders.first() {
        Some(h) => format!(" (losetup -d {})", h.display()),
        None => String::new(),
    }
}

impl From<FuseError> for crate::ExportError {
    fn from(e: FuseError) -> Self {
        crate::ExportError::kind(e)
    }
}

impl HasErrno for FuseError {
    fn errno(&self) -> Errno {
        match self {
            FuseError::Exists { .. } => Errno::EEXIST,
            FuseError::NotFound { .. } => Errno::ENOENT,
            FuseError::InvalidName { .. } => Errno::EINVAL,
            FuseError::Directory { source, .. }
            | FuseError::Mount { source, .. }
            | FuseError::Unmount { source, .. } => Errno::from_io(source),
            FuseError::Busy { .. } => Errno::EBUSY,
            FuseError::StaleMount { .. } => Errno(libc::ENOTCONN),
        }
    }
}

/// What `export list` shows for one FUSE file.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FuseExportInfo {
    /// Mount directory (canonical).
    pub dir: PathBuf,
    /// File name inside it.
    pub name: String,
    /// Refuses writes.
    pub read_only: bool,
    /// Current size in bytes.
    pub size: u64,
    /// Open file handles (a loop device holds one).
    pub open_handles: u64,
    /// Read requests served.
    pub reads: u64,
    /// Write requests served.
    pub writes: u64,
    /// fsync requests served.
    pub fsyncs: u64,
    /// fallocate requests served.
    pub fallocates: u64,
    /// Requests that failed in the device.
    pub errors: u64,
    /// Bytes returned to readers.
    pub bytes_read: u64,
    /// Bytes written.
    pub bytes_written: u64,
}

/// One FUSE mount and its worker threads.
struct Mount {
    state: Arc<MountState>,
    notifier: fuser::Notifier,
    conn: Option<u64>,
    worker: Option<JoinHandle<std::io::Result<()>>>,
}

impl Mount {
    /// Waits for the workers to end after the mount went away; aborts the connection if they
    /// do not (a lazily detached mount still in use).
    fn join(&mut self, dir: &Path) {
        let Some(worker) = self.worker.take() else {
            return;
        };
        let mut deadline = Instant::now() + STOP_GRACE;
        let mut aborted = false;
        while !worker.is_finished() {
            if Instant::now() >= deadline {
                if aborted {
                    tracing::error!(
                        "fuse: workers of {} did not stop; leaving them",
                        dir.display()
                    );
                    return;
                }
                aborted = true;
                if let Some(id) = self.conn {
                    tracing::warn!(
                        "fuse: aborting connection {id} of {} (still in use)",
                        dir.display()
                    );
                    sys::abort_connection(id);
                }
                deadline = Instant::now() + STOP_GRACE;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        match worker.join() {
            Ok(Ok(())) => {}
            Ok(Err(e)) => tracing::warn!("fuse: session of {} ended: {e}", dir.display()),
            Err(_) => tracing::error!("fuse: session thread of {} panicked", dir.display()),
        }
    }
}

/// All FUSE exports of the daemon, by mount directory.
pub struct FuseExports {
    mounts: Mutex<BTreeMap<PathBuf, Mount>>,
}

impl Default for FuseExports {
    fn default() -> Self {
        FuseExports::new()
    }
}

fn check_name(name: &str) -> Result<(), FuseError> {
    let bad = |why| {
        Err(FuseError::InvalidName {
            name: name.to_string(),
            why,
        })
    };
    if name.is_empty() {
        return bad("empty");
    }
    if name == "." || name == ".." {
        return bad("'.' and '..' are reserved");
    }
    if name.contains('/') || name.contains('\0') {
        return bad("contains '/' or NUL");
    }
    if name.len() > 255 {
        return bad("longer than 255 bytes");
    }
    Ok(())
}

/// True when fusermount refused the mount because allow_root needs `user_allow_other`.
fn refuses_allow_root(e: &std::io::Error) -> bool {
    e.kind() == std::io::ErrorKind::PermissionDenied && e.to_string().contains("user_allow_other")
}

fn canonical_dir(dir: &Path) -> Result<PathBuf, FuseError> {
    let err = |source| FuseError::Directory {
        dir: dir.to_path_buf(),
        source,
    };
    let c = dir.canonicalize().map_err(|e| {
        if e.raw_os_error() == Some(libc::ENOTCONN) {
            FuseError::StaleMount {
                dir: dir.to_path_buf(),
            }
        } else {
            err(e)
        }
    })?;
    let md = std::fs::metadata(&c).map_err(err)?;
    if !md.is_dir() {
        return Err(err(std::io::Error::from_raw_os_error(libc::ENOTDIR)));
    }
    Ok(c)
}

impl FuseExports {
    /// No exports yet; mounts are made on the first `add` for each directory.
    pub fn new() -> FuseExports {
        FuseExports {
            mounts: Mutex::new(BTreeMap::new()),
        }
    }

    /// Exports `dev` as the file `dir/name`, mounting `dir` if this is its first file.
    /// Fails with EEXIST when that file is already exported.
    pub fn add(
        &self,
        dir: &Path,
        name: &str,
        dev: Arc<dyn BlockDevice>,
        read_only: bool,
    ) -> Result<(), FuseError> {
        check_name(name)?;
        let read_only = read_only || dev.read_only();
        let mut mounts = self.mounts.lock();
        // An existing mount is found under its canonical path; canonicalizing the mount point
        // itself goes through our own filesystem, which answers from the worker threads.
        let key = match mounts.keys().find(|k| k.as_path() == dir) {
            Some(k) => k.clone(),
            None => canonical_dir(dir)?,
        };
        if let Some(m) = mounts.get(&key) {
            if !m.state.insert(name, dev, read_only) {
                return Err(FuseError::Exists {
                    dir: key,
                    name: name.to_string(),
                });
            }
            return Ok(());
        }
        let state = Arc::new(MountState::new());
        state.insert(name, dev, read_only);
        let mut config = fuser::Config::default();
        config.mount_options = vec![
            fuser::MountOption::FSName("udm".to_string()),
            fuser::MountOption::Subtype("udm".to_string()),
            fuser::MountOption::DefaultPermissions,
            fuser::MountOption::NoAtime,
            fuser::MountOption::NoExec,
        ];
        config.n_threads = Some(WORKER_THREADS);
        config.clone_fd = true;
        // Root owns the mount and is the only user that can reach it (loop workers run as
        // root). An unprivileged daemon must let root in (allow_root, which needs
        // user_allow_other in /etc/fuse.conf), or loop devices would get EACCES.
        config.acl = if sys::owner().0 == 0 {
            fuser::SessionACL::Owner
        } else {
            fuser::SessionACL::RootAndOwner
        };
        let fs = DeviceFs {
            state: state.clone(),
        };
        let session = match fuser::Session::new(fs, &key, &config) {
            // fusermount3 refuses allow_root unless /etc/fuse.conf has user_allow_other (off by
            // default): mount for the owner alone rather than not at all.
            Err(e) if config.acl != fuser::SessionACL::Owner && refuses_allow_root(&e) => {
                tracing::warn!(
                    "fuse: {}: allow_root refused ({}); mounted for its owner only, so root \
                     (and losetup) cannot open the files: set user_allow_other in /etc/fuse.conf",
                    key.display(),
                    e.to_string().trim()
                );
                config.acl = fuser::SessionACL::Owner;
                let fs = DeviceFs {
                    state: state.clone(),
                };
                fuser::Session::new(fs, &key, &config)
            }
            r => r,
        }
        .map_err(|source| FuseError::Mount {
            dir: key.clone(),
            source,
        })?;
        let notifier = session.notifier();
        let worker = std::thread::Builder::new()
            .name("udm-fuse".to_string())
            .spawn(move || session.run())
            .map_err(|source| FuseError::Mount {
                dir: key.clone(),
                source,
            })?;
        // Only now: stat of the mount root is answered by the workers just started.
        let conn = sys::connection_id(&key);
        tracing::info!("fuse: mounted {} (export {name})", key.display());
        sys::memory_lock();
        mounts.insert(
            key,
            Mount {
                state,
                notifier,
                conn,
                worker: Some(worker),
            },
        );
        Ok(())
    }

    /// Stops exporting `dir/name`; unmounts `dir` when it was the last file and returns once
    /// the mount is gone. A file still open (a loop device attached to it) is refused with
    /// EBUSY, naming the loop device, instead of waiting.
    pub fn remove(&self, dir: &Path, name: &str) -> Result<(), FuseError> {
        let mut mounts = self.mounts.lock();
        let not_found = || FuseError::NotFound {
            dir: dir.to_path_buf(),
            name: name.to_string(),
        };
        if mounts.is_empty() {
            // Nothing mounted (or all unmounted by `shutdown`): no path to resolve.
            return Err(not_found());
        }
        let key = match mounts.keys().find(|k| k.as_path() == dir) {
            Some(k) => k.clone(),
            None => dir.canonicalize().unwrap_or_else(|_| dir.to_path_buf()),
        };
        let Some(m) = mounts.get_mut(&key) else {
            return Err(not_found());
        };
        let path = key.join(name);
        // The kernel sends RELEASE asynchronously after close(2): give a just-closed handle a
        // moment to arrive, but never wait for a loop device or any other long-lived holder.
        let deadline = Instant::now() + RELEASE_GRACE;
        let entry = loop {
            match m.state.begin_remove(name) {
                Ok(e) => break e,
                Err(RemoveRefused::NotFound) => return Err(not_found()),
                Err(RemoveRefused::Busy(handles)) => {
                    let holders = sys::loop_holders(&path);
                    if holders.is_empty() && Instant::now() < deadline {
                        std::thread::sleep(Duration::from_millis(10));
                        continue;
                    }
                    return Err(FuseError::Busy {
                        path,
                        handles,
                        holders,
                    });
                }
            }
        };
        if m.state.len() > 1 {
            m.state.finish_remove(&entry);
            // Drop the kernel's cached name; failure only means it had none.
            let _ = m
                .notifier
                .inval_entry(fuser::INodeNo(ROOT_INO), std::ffi::OsStr::new(name));
            return Ok(());
        }
        if let Err(source) = sys::unmount(&key) {
            entry.closing.store(false, Ordering::Release);
            return Err(FuseError::Unmount { dir: key, source });
        }
        m.state.finish_remove(&entry);
        m.join(&key);
        mounts.remove(&key);
        sys::memory_unlock();
        tracing::info!("fuse: unmounted {}", key.display());
        Ok(())
    }

    /// Every exported file with its counters, by directory then name.
    pub fn list(&self) -> Vec<FuseExportInfo> {
        let mounts = self.mounts.lock();
        let mut out = Vec::new();
        for (dir, m) in mounts.iter() {
            for e in m.state.entries() {
                if e.closing.load(Ordering::Acquire) {
                    continue;
                }
                let c = &e.counters;
                out.push(FuseExportInfo {
                    dir: dir.clone(),
                    name: e.name.clone(),
                    read_only: e.read_only,
                    size: e.dev.size().saturating_mul(udm_types::SECTOR_SIZE),
                    open_handles: e.handles.load(Ordering::Relaxed),
                    reads: c.reads.load(Ordering::Relaxed),
                    writes: c.writes.load(Ordering::Relaxed),
                    fsyncs: c.fsyncs.load(Ordering::Relaxed),
                    fallocates: c.fallocates.load(Ordering::Relaxed),
                    errors: c.errors.load(Ordering::Relaxed),
                    bytes_read: c.bytes_read.load(Ordering::Relaxed),
                    bytes_written: c.bytes_written.load(Ordering::Relaxed),
                });
            }
        }
        out
    }

    /// Unmounts everything (daemon exit). A mount still in use (a loop device attached) is
    /// detached lazily and its connection aborted, so users get errors instead of hanging.
    pub fn shutdown(&self) {
        let mut mounts = self.mounts.lock();
        for (dir, mut m) in std::mem::take(&mut *mounts) {
            if let Err(e) = sys::unmount(&dir) {
                tracing::warn!(
                    "fuse: {} busy at shutdown ({e}); detaching it",
                    dir.display()
                );
                if let Err(e) = sys::detach(&dir) {
                    tracing::error!("fuse: cannot detach {}: {e}", dir.display());
                }
                if let Some(id) = m.conn {
                    sys::abort_connection(id);
                }
            }
            m.state.clear();
            m.join(&dir);
            sys::memory_unlock();
        }
    }
}

impl Drop for FuseExports {
    fn drop(&mut self) {
        self.shutdown();
    }
}
