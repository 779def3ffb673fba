//! Operating-system helpers of the FUSE export: unmounting, aborting a connection, finding the
//! loop devices that hold a file, and the memory-pressure measures (see README.md beside this).

use std::cell::Cell;
use std::ffi::CString;
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Once;

/// CAP_IPC_LOCK, the capability that lets mlockall ignore RLIMIT_MEMLOCK.
const CAP_IPC_LOCK: u32 = 14;

thread_local! {
    static IO_FLUSHER_DONE: Cell<bool> = const { Cell::new(false) };
}

/// Marks the calling thread as an I/O flusher, once per thread: its allocations then never
/// recurse into filesystem or block I/O for reclaim (PF_MEMALLOC_NOIO) and it is exempt from
/// dirty-page throttling (PF_LOCAL_THROTTLE), as the kernel's own loop workers are. Called at the
/// start of every FUSE request; after the first call on a thread it is one thread-local read.
pub(crate) fn mark_io_flusher() {
    if IO_FLUSHER_DONE.with(|d| d.replace(true)) {
        return;
    }
    if let Err(e) = udm_io::thread::mark_io_flusher() {
        static WARN: Once = Once::new();
        WARN.call_once(|| {
            tracing::warn!(
                "fuse: PR_SET_IO_FLUSHER refused ({e}); FUSE workers are not protected from \
                 reclaim recursion (needs CAP_SYS_RESOURCE)"
            )
        });
    }
}

/// True when the process may lock memory without limit (CAP_IPC_LOCK in the effective set).
fn has_cap_ipc_lock() -> bool {
    let Ok(status) = std::fs::read_to_string("/proc/self/status") else {
        return false;
    };
    status
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))
        .and_then(|v| u64::from_str_radix(v.trim(), 16).ok())
        .is_some_and(|caps| caps & (1 << CAP_IPC_LOCK) != 0)
}

/// Number of live FUSE mounts in the process, and whether memory is locked for them.
static MEMORY_LOCK: parking_lot::Mutex<(usize, bool)> = parking_lot::Mutex::new((0, false));

/// Called when a FUSE mount comes up: the first one locks the process's memory (current and
/// future, as pages are first touched) when the process has CAP_IPC_LOCK. A daemon serving
/// loop-over-FUSE must not have its pages swapped out to storage it serves itself. Without the
/// capability nothing is done, because MCL_FUTURE under a small RLIMIT_MEMLOCK would make later
/// allocations fail. Balanced by [`memory_unlock`].
pub(crate) fn memory_lock() {
    let mut st = MEMORY_LOCK.lock();
    st.0 += 1;
    if st.0 > 1 {
        return;
    }
    if !has_cap_ipc_lock() {
        tracing::info!("fuse: no CAP_IPC_LOCK, daemon memory is not locked");
        return;
    }
    // SAFETY: mlockall only takes flags; it changes the locking of our own mappings.
    let r = unsafe { libc::mlockall(libc::MCL_CURRENT | libc::MCL_FUTURE | libc::MCL_ONFAULT) };
    if r == 0 {
        st.1 = true;
    } else {
        tracing::warn!("fuse: mlockall failed: {}", io::Error::last_os_error());
    }
}

/// Called when a FUSE mount is gone: the last one unlocks the memory again, so a daemon that
/// no longer serves FUSE does not keep everything it ever touched resident.
pub(crate) fn memory_unlock() {
    let mut st = MEMORY_LOCK.lock();
    st.0 = st.0.saturating_sub(1);
    if st.0 > 0 || !st.1 {
        return;
    }
    // SAFETY: munlockall takes no arguments; it only unlocks our own mappings.
    if unsafe { libc::munlockall() } != 0 {
        tracing::warn!("fuse: munlockall failed: {}", io::Error::last_os_error());
        return;
    }
    st.1 = false;
    tracing::info!("fuse: last mount gone, daemon memory unlocked");
}

fn cpath(p: &Path) -> io::Result<CString> {
    CString::new(p.as_os_str().as_bytes())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "path contains a NUL byte"))
}

fn fusermount(args: &[&str], dir: &Path) -> io::Result<()> {
    let mut last = io::Error::from_raw_os_error(libc::EPERM);
    for bin in ["fusermount3", "fusermount"] {
        match Command::new(bin).args(args).arg(dir).output() {
            Ok(out) if out.status.success() => return Ok(()),
            Ok(out) => {
                let msg = String::from_utf8_lossy(&out.stderr).trim().to_string();
                let errno = if msg.contains("busy") {
                    libc::EBUSY
                } else {
                    libc::EPERM
                };
                return Err(io::Error::new(
                    io::Error::from_raw_os_error(errno).kind(),
                    format!("{bin} {}: {msg}", args.join(" ")),
                ));
            }
            Err(e) => last = e,
        }
    }
    Err(last)
}

/// Unmounts `dir` (not lazily): fails with EBUSY while anything still uses the mount.
/// Unprivileged daemons go through `fusermount3 -u`.
pub(crate) fn unmount(dir: &Path) -> io::Result<()> {
    let c = cpath(dir)?;
    // SAFETY: c is a valid NUL-terminated path; umount2 does not keep the pointer.
    let r = unsafe { libc::umount2(c.as_ptr(), 0) };
    if r == 0 {
        return Ok(());
    }
    let e = io::Error::last_os_error();
    if e.raw_os_error() == Some(libc::EPERM) {
        return fusermount(&["-u"], dir);
    }
    Err(e)
}

/// Detaches `dir` lazily, for shutdown when a regular unmount is refused.
pub(crate) fn detach(dir: &Path) -> io::Result<()> {
    let c = cpath(dir)?;
    // SAFETY: c is a valid NUL-terminated path; umount2 does not keep the pointer.
    let r = unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) };
    if r == 0 {
        return Ok(());
    }
    let e = io::Error::last_os_error();
    if e.raw_os_error() == Some(libc::EPERM) {
        return fusermount(&["-u", "-z"], dir);
    }
    Err(e)
}

/// The fusectl connection number of the FUSE mount at `dir`: the kernel's encoding of the
/// superblock's device number.
pub(crate) fn connection_id(dir: &Path) -> Option<u64> {
    let dev = std::fs::metadata(dir).ok()?.dev();
    let major = libc::major(dev) as u64;
    let minor = libc::minor(dev) as u64;
    Some((major << 20) | minor)
}

/// Aborts a FUSE connection through fusectl, so that a lazily detached mount still in use stops
/// waiting for this process. Returns false when fusectl is not mounted.
pub(crate) fn abort_connection(id: u64) -> bool {
    let dir = Path::new(FUSECTL);
    let p = dir.join(id.to_string()).join("abort");
    if !p.exists() {
        // fusectl is usually mounted at boot; mount it if it is not (root only).
        let none = c"fusectl";
        if let Ok(target) = cpath(dir) {
            // SAFETY: valid NUL-terminated strings; mount does not keep the pointers.
            let r = unsafe {
                libc::mount(
                    none.as_ptr(),
                    target.as_ptr(),
                    none.as_ptr(),
                    0,
                    std::ptr::null(),
                )
            };
            if r != 0 {
                tracing::warn!(
                    "fuse: cannot mount fusectl on {FUSECTL}: {}",
                    io::Error::last_os_error()
                );
            }
        }
    }
    std::fs::write(p, "1").is_ok()
}

/// Where the FUSE control filesystem lives.
const FUSECTL: &str = "/sys/fs/fuse/connections";

/// The loop devices whose backing file is `file`, for a helpful EBUSY message.
pub(crate) fn loop_holders(file: &Path) -> Vec<PathBuf> {
    let Ok(entries) = std::fs::read_dir("/sys/block") else {
        return Vec::new();
    };
    let want = file.as_os_str().as_bytes();
    let mut out: Vec<PathBuf> = entries
        .flatten()
        .filter(|e| e.file_name().as_bytes().starts_with(b"loop"))
        .filter(|e| {
            std::fs::read(e.path().join("loop/backing_file"))
                .map(|b| b.strip_suffix(b"\n").unwrap_or(&b) == want)
                .unwrap_or(false)
        })
        .map(|e| Path::new("/dev").join(e.file_name()))
        .collect();
    out.sort();
    out
}

/// The effective uid and gid, the owner the exported files show.
pub(crate) fn owner() -> (u32, u32) {
    // SAFETY: geteuid/getegid cannot fail and have no side effects.
    unsafe { (libc::geteuid(), libc::getegid()) }
}
