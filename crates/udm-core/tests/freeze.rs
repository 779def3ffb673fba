//! `--freeze`'s filesystem freeze (udm-core/src/freeze.rs) on a real filesystem: ext4 on a
//! loop device, mounted by the test. While frozen, a write to it waits; once the `Frozen` is
//! dropped it goes on. Needs root, mount and mkfs.ext4 (SKIPPED otherwise).

use std::path::Path;
use std::process::Command;
use std::sync::mpsc;
use std::time::Duration;

use udm_core::freeze::Frozen;
use udm_types::errno::HasErrno;
use udm_types::Errno;

/// An ext4 filesystem on a loop device, mounted at `dir`; unmounted when dropped.
struct Mounted {
    dir: tempfile::TempDir,
    _img: tempfile::TempDir,
}

impl Mounted {
    fn new() -> Option<Mounted> {
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            eprintln!("SKIPPED freeze: needs root to mount a filesystem");
            return None;
        }
        let img = tempfile::tempdir().expect("tempdir");
        let file = img.path().join("fs.img");
        std::fs::File::create(&file)
            .and_then(|f| f.set_len(32 << 20))
            .expect("image file");
        let ok = |c: &mut Command| c.status().map(|s| s.success()).unwrap_or(false);
        let mkfs = if Path::new("/sbin/mkfs.ext4").exists() {
            "/sbin/mkfs.ext4"
        } else {
            "mkfs.ext4"
        };
        if !ok(Command::new(mkfs).args(["-q", "-F"]).arg(&file)) {
            eprintln!("SKIPPED freeze: mkfs.ext4 failed or is missing");
            return None;
        }
        let dir = tempfile::tempdir().expect("tempdir");
        if !ok(Command::new("mount")
            .args(["-o", "loop"])
            .arg(&file)
            .arg(dir.path()))
        {
            eprintln!("SKIPPED freeze: cannot mount a loop device here");
            return None;
        }
        Some(Mounted { dir, _img: img })
    }
}

impl Drop for Mounted {
    fn drop(&mut self) {
        // Thawed first whatever the test did (EINVAL when not frozen): a filesystem left
        // frozen keeps its writers blocked in the kernel even after it is unmounted.
        if let Ok(d) = std::fs::File::open(self.dir.path()) {
            use std::os::unix::io::AsRawFd;
            // SAFETY: FITHAW takes an int argument that the kernel ignores; the fd is valid.
            unsafe { libc::ioctl(d.as_raw_fd(), 0xC004_5878_u64 as libc::c_ulong as _, 0) };
        }
        let _ = Command::new("umount").arg(self.dir.path()).status();
    }
}

/// Starts a write + fsync of a new file in `dir` on another thread; its end is sent on the
/// returned channel.
fn writer(dir: &Path, name: &str) -> mpsc::Receiver<()> {
    let path = dir.join(name);
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let f = std::fs::File::create(&path).and_then(|mut f| {
            std::io::Write::write_all(&mut f, &[7u8; 4096])?;
            f.sync_all()
        });
        f.expect("write to the mounted filesystem");
        let _ = tx.send(());
    });
    rx
}

#[test]
fn a_frozen_filesystem_holds_writes_until_thawed() {
    let Some(m) = Mounted::new() else { return };
    let frozen = Frozen::freeze(m.dir.path()).expect("freeze the mounted ext4");
    let done = writer(m.dir.path(), "during");
    assert!(
        done.recv_timeout(Duration::from_millis(500)).is_err(),
        "a write finished while the filesystem was frozen"
    );
    drop(frozen);
    done.recv_timeout(Duration::from_secs(10))
        .expect("the write still waits after the Frozen was dropped: not thawed");
    // Thawed for good: another write goes through at once.
    writer(m.dir.path(), "after")
        .recv_timeout(Duration::from_secs(10))
        .expect("a write after the thaw");
}

#[test]
fn freezing_what_cannot_be_frozen_is_an_error_naming_it() {
    // procfs has no freeze: the kernel says EOPNOTSUPP.
    let e = match Frozen::freeze(Path::new("/proc")) {
        Ok(_) => panic!("/proc was frozen"),
        Err(e) => e,
    };
    assert_eq!(e.errno(), Errno::EOPNOTSUPP, "{e}");
    assert!(e.to_string().contains("/proc"), "{e}");
    let e = match Frozen::freeze(Path::new("/nonexistent/udm-freeze")) {
        Ok(_) => panic!("a missing path was frozen"),
        Err(e) => e,
    };
    assert_eq!(e.errno(), Errno::ENOENT, "{e}");
}
