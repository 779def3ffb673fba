//! The FUSE export with real clients: std::fs on the exported file, and `losetup` (buffered and
//! `--direct-io=on`) + mkfs.ext4 + mount + copy + sha256sum + e2fsck on top of it.
//! Needs /dev/fuse and, when not root, fusermount3 (unprivileged mounts are supported, and as
//! root one test runs the export again as an unprivileged user through setpriv); the loop tests
//! need root, losetup, mkfs.ext4 and e2fsck (e2fsprogs). Each test says SKIPPED when something
//! is missing.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::ffi::CString;
use std::fs::{File, OpenOptions};
use std::os::unix::fs::{FileExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use udm_export::fuse::{FuseError, FuseExports};
use udm_io::backend::file::FileDevice;
use udm_io::backend::mem::MemDevice;
use udm_io::BlockDevice;
use udm_types::errno::HasErrno;
use udm_types::Errno;

/// Loop devices are a machine-wide resource: one loop test at a time.
static LOOP_LOCK: Mutex<()> = Mutex::new(());

fn have(tool: &str) -> bool {
    Command::new("sh")
        .arg("-c")
        .arg(format!("command -v {tool}"))
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false)
}

fn is_root() -> bool {
    // SAFETY: geteuid has no side effects.
    unsafe { libc::geteuid() == 0 }
}

/// Why FUSE tests cannot run here, if they cannot. Not being root is no reason: the export
/// mounts through fusermount3 then.
fn fuse_missing() -> Option<String> {
    if !Path::new("/dev/fuse").exists() {
        return Some("no /dev/fuse".into());
    }
    if !is_root() && !have("fusermount3") {
        return Some("not root and fusermount3 not installed (apt-get install fuse3)".into());
    }
    let dev = CString::new("/dev/fuse").unwrap();
    // SAFETY: dev is a valid NUL-terminated path; access does not keep the pointer.
    if !is_root() && unsafe { libc::access(dev.as_ptr(), libc::R_OK | libc::W_OK) } != 0 {
        return Some("not root and /dev/fuse is not 0666 as udev sets it (scripts/deps.sh)".into());
    }
    None
}

fn loop_missing() -> Option<String> {
    if let Some(r) = fuse_missing() {
        return Some(r);
    }
    if !is_root() {
        return Some("loop devices need root".into());
    }
    if !Path::new("/dev/loop-control").exists() {
        return Some("no /dev/loop-control".into());
    }
    for t in [
        "losetup",
        "mkfs.ext4",
        "e2fsck",
        "sha256sum",
        "mount",
        "umount",
    ] {
        if !have(t) {
            return Some(format!(
                "{t} not installed (apt-get install e2fsprogs util-linux)"
            ));
        }
    }
    None
}

fn run(cmd: &str, args: &[&str]) -> String {
    let out = Command::new(cmd)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd}: {e}"));
    assert!(
        out.status.success(),
        "{cmd} {args:?} failed ({}): {}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

fn is_mounted(dir: &Path) -> bool {
    let dir = dir.to_string_lossy().to_string();
    std::fs::read_to_string("/proc/self/mountinfo")
        .unwrap()
        .lines()
        .any(|l| l.split(' ').nth(4) == Some(dir.as_str()))
}

/// Undoes everything a test set up, in reverse order, even when the test panics.
struct Cleanup {
    exports: Arc<FuseExports>,
    fs_mounts: Vec<PathBuf>,
    loops: Vec<String>,
}

impl Cleanup {
    fn new(exports: Arc<FuseExports>) -> Cleanup {
        Cleanup {
            exports,
            fs_mounts: Vec::new(),
            loops: Vec::new(),
        }
    }
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        for m in self.fs_mounts.drain(..).rev() {
            if is_mounted(&m) {
                let _ = Command::new("umount").arg("-l").arg(&m).status();
            }
        }
        for l in self.loops.drain(..) {
            let _ = Command::new("losetup").arg("-d").arg(&l).status();
        }
        self.exports.shutdown();
    }
}

fn pattern(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    (0..len)
        .map(|_| {
            x = x
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            (x >> 33) as u8
        })
        .collect()
}

fn backing_file(dir: &Path, len: usize, seed: u64) -> PathBuf {
    let p = dir.join("backing.img");
    std::fs::write(&p, pattern(len, seed)).unwrap();
    p
}

fn errno_of(e: &std::io::Error) -> i32 {
    e.raw_os_error().unwrap_or(0)
}

#[test]
fn fuse_file_reads_writes_and_fallocate_reach_the_device() {
    if let Some(why) = fuse_missing() {
        eprintln!("SKIPPED: {why}");
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let mnt = tmp.path().join("exports");
    std::fs::create_dir(&mnt).unwrap();
    let backing = backing_file(tmp.path(), 4 << 20, 1);
    let dev: Arc<dyn BlockDevice> = Arc::new(FileDevice::open(&backing, false).unwrap());
    let exports = Arc::new(FuseExports::new());
    let _cleanup = Cleanup::new(exports.clone());
    exports.add(&mnt, "disk", dev.clone(), false).unwrap();
    let e = exports.add(&mnt, "disk", dev.clone(), false).unwrap_err();
    assert_eq!(e.errno(), Errno::EEXIST);
    let file = mnt.join("disk");

    let md = std::fs::metadata(&file).unwrap();
    assert!(md.is_file());
    assert_eq!(md.len(), 4 << 20);
    assert_eq!(md.mode() & 0o777, 0o600);
    // SAFETY: geteuid has no side effects.
    assert_eq!(md.uid(), unsafe { libc::geteuid() });

    // Whole-file read equals the backing bytes.
    assert_eq!(
        std::fs::read(&file).unwrap(),
        std::fs::read(&backing).unwrap()
    );

    // Unaligned and sub-sector writes.
    let f = OpenOptions::new()
        .read(true)
        .write(true)
        .open(&file)
        .unwrap();
    let mut model = std::fs::read(&backing).unwrap();
    for (i, &(off, len)) in [
        (1000u64, 3000usize),
        (7, 1),
        (511, 2),
        (65536, 131072),
        (4 * 1024 * 1024 - 5, 5),
    ]
    .iter()
    .enumerate()
    {
        let data = pattern(len, 100 + i as u64);
        f.write_all_at(&data, off).unwrap();
        model[off as usize..off as usize + len].copy_from_slice(&data);
    }
    f.sync_all().unwrap();
    assert_eq!(std::fs::read(&backing).unwrap(), model);
    let mut back = vec![0u8; 3000];
    f.read_exact_at(&mut back, 1000).unwrap();
    assert_eq!(back, model[1000..4000]);

    // Past the end: short write, then ENOSPC; reads stop at the end.
    let n = f.write_at(&[9u8; 100], (4 << 20) - 10).unwrap();
    assert_eq!(n, 10);
    model[(4 << 20) - 10..].fill(9);
    let e = f.write_at(&[9u8; 1], 4 << 20).unwrap_err();
    assert_eq!(errno_of(&e), libc::ENOSPC, "{e}");
    let mut b = [0u8; 16];
    assert_eq!(f.read_at(&mut b, 4 << 20).unwrap(), 0);

    // fallocate: punch hole, zero range, plain allocation, unsupported modes.
    let fd = std::os::unix::io::AsRawFd::as_raw_fd(&f);
    let falloc = |mode: i32, off: i64, len: i64| -> i32 {
        // SAFETY: fallocate on an fd we own, integer arguments only.
        let r = unsafe { libc::fallocate(fd, mode, off, len) };
        if r == 0 {
            0
        } else {
            errno_of(&std::io::Error::last_os_error())
        }
    };
    assert_eq!(
        falloc(
            libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
            10_000,
            70_000
        ),
        0
    );
    model[10_000..80_000].fill(0);
    assert_eq!(
        falloc(
            libc::FALLOC_FL_ZERO_RANGE | libc::FALLOC_FL_KEEP_SIZE,
            200_001,
            3
        ),
        0
    );
    model[200_001..200_004].fill(0);
    assert_eq!(falloc(libc::FALLOC_FL_ZERO_RANGE, 1 << 20, 1 << 20), 0);
    model[1 << 20..2 << 20].fill(0);
    assert_eq!(falloc(0, 0, 4 << 20), 0);
    assert_eq!(falloc(0, 0, 8 << 20), libc::EFBIG);
    assert_eq!(
        falloc(libc::FALLOC_FL_COLLAPSE_RANGE, 0, 4096),
        libc::EOPNOTSUPP
    );
    f.sync_all().unwrap();
    assert_eq!(std::fs::read(&backing).unwrap(), model);
    assert_eq!(std::fs::read(&file).unwrap(), model);
    // Truncation cannot resize the device.
    assert!(f.set_len(1 << 20).is_err());
    f.set_len(4 << 20).unwrap();

    // O_DIRECT opens work (FUSE direct I/O), with aligned buffers.
    let d = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_DIRECT)
        .open(&file)
        .unwrap();
    let mut layout = vec![0u8; 8192 + 4096];
    let off = layout.as_ptr().align_offset(4096);
    let buf = &mut layout[off..off + 8192];
    d.read_exact_at(buf, 8192).unwrap();
    assert_eq!(buf, &model[8192..16384]);
    drop(d);

    // A second device in the same directory is a second file; removing it keeps the mount.
    let mem = Arc::new(MemDevice::new(2048));
    exports.add(&mnt, "mem", mem.clone(), true).unwrap();
    let mut names: Vec<String> = std::fs::read_dir(&mnt)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().to_string())
        .collect();
    names.sort();
    assert_eq!(names, ["disk", "mem"]);
    let mmd = std::fs::metadata(mnt.join("mem")).unwrap();
    assert_eq!((mmd.len(), mmd.mode() & 0o777), (1 << 20, 0o400));
    let e = OpenOptions::new()
        .write(true)
        .open(mnt.join("mem"))
        .unwrap_err();
    // The kernel's permission check (mode 0400) stops an ordinary owner first; root gets past
    // it to the export's own EROFS.
    let want = if is_root() { libc::EROFS } else { libc::EACCES };
    assert_eq!(errno_of(&e), want, "{e}");
    assert_eq!(std::fs::read(mnt.join("mem")).unwrap(), vec![0u8; 1 << 20]);

    // Open handles are counted and block removal with EBUSY.
    let held = File::open(mnt.join("mem")).unwrap();
    let info = exports.list();
    assert_eq!(info.len(), 2);
    let mi = info.iter().find(|i| i.name == "mem").unwrap();
    assert_eq!((mi.open_handles, mi.read_only, mi.size), (1, true, 1 << 20));
    let di = info.iter().find(|i| i.name == "disk").unwrap();
    assert!(di.writes >= 6 && di.bytes_written > 0 && di.fallocates >= 4 && di.fsyncs >= 1);
    assert!(di.bytes_read >= 8 << 20);
    let e = exports.remove(&mnt, "mem").unwrap_err();
    assert_eq!(e.errno(), Errno::EBUSY, "{e}");
    drop(held);
    remove_retrying(&exports, &mnt, "mem");
    assert!(!mnt.join("mem").exists());
    assert!(is_mounted(&mnt));
    assert_eq!(exports.list().len(), 1);
    let e = exports.remove(&mnt, "mem").unwrap_err();
    assert_eq!(e.errno(), Errno::ENOENT);

    // The last file unmounts.
    drop(f);
    remove_retrying(&exports, &mnt, "disk");
    assert!(!is_mounted(&mnt));
    assert!(exports.list().is_empty());
    // And the directory can be used again.
    exports.add(&mnt, "again", dev, false).unwrap();
    assert_eq!(std::fs::metadata(mnt.join("again")).unwrap().len(), 4 << 20);
    exports.remove(&mnt, "again").unwrap();
    assert!(!is_mounted(&mnt));
}

/// Removes an export, retrying while a just-closed handle's release is still on its way.
fn remove_retrying(exports: &FuseExports, dir: &Path, name: &str) {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        match exports.remove(dir, name) {
            Ok(()) => return,
            Err(e @ FuseError::Busy { .. }) if Instant::now() < deadline => {
                eprintln!("remove {name}: {e}; retrying");
                std::thread::sleep(Duration::from_millis(100));
            }
            Err(e) => panic!("remove {name}: {e}"),
        }
    }
}

#[test]
fn fuse_device_errors_reach_the_client_as_errno() {
    if let Some(why) = fuse_missing() {
        eprintln!("SKIPPED: {why}");
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let mem = Arc::new(MemDevice::new(64));
    mem.inject(udm_io::backend::mem::Fault::range(8, 9, Errno::EIO));
    mem.inject(
        udm_io::backend::mem::Fault::range(16, 17, Errno::ENOSPC).ops(&[udm_io::BioKind::Write]),
    );
    let exports = Arc::new(FuseExports::new());
    let _cleanup = Cleanup::new(exports.clone());
    exports
        .add(tmp.path(), "faulty", mem.clone(), false)
        .unwrap();
    let f = OpenOptions::new()
        .read(true)
        .write(true)
        .open(tmp.path().join("faulty"))
        .unwrap();
    let mut b = [0u8; 512];
    assert_eq!(
        errno_of(&f.read_at(&mut b, 8 * 512).unwrap_err()),
        libc::EIO
    );
    f.read_exact_at(&mut b, 0).unwrap();
    assert_eq!(
        errno_of(&f.write_at(&b, 16 * 512).unwrap_err()),
        libc::ENOSPC
    );
    let info = exports.list();
    assert_eq!(info[0].errors, 2);
    drop(f);
    remove_retrying(&exports, tmp.path(), "faulty");
}

fn sha256(path: &Path) -> String {
    run("sha256sum", &[path.to_str().unwrap()])
        .split_whitespace()
        .next()
        .unwrap()
        .to_string()
}

/// losetup + mkfs.ext4 + mount + copy + verify + e2fsck over the FUSE file.
fn loop_ext4(direct_io: bool) {
    if let Some(why) = loop_missing() {
        eprintln!("SKIPPED: {why}");
        return;
    }
    let _serial = LOOP_LOCK.lock().unwrap_or_else(|p| p.into_inner());
    let tmp = tempfile::tempdir().unwrap();
    let exp = tmp.path().join("exp");
    let fsmnt = tmp.path().join("fs");
    let src = tmp.path().join("src");
    for d in [&exp, &fsmnt, &src] {
        std::fs::create_dir(d).unwrap();
    }
    let backing = tmp.path().join("backing.img");
    let size: u64 = 128 << 20;
    File::create(&backing).unwrap().set_len(size).unwrap();
    let dev: Arc<dyn BlockDevice> = Arc::new(FileDevice::open(&backing, false).unwrap());
    let exports = Arc::new(FuseExports::new());
    let mut cleanup = Cleanup::new(exports.clone());
    exports.add(&exp, "vol", dev, false).unwrap();
    let file = exp.join("vol");

    let mut args = vec!["-f", "--show"];
    if direct_io {
        args.push("--direct-io=on");
    }
    let file_s = file.to_str().unwrap().to_string();
    args.push(&file_s);
    let lo = run("losetup", &args);
    cleanup.loops.push(lo.clone());
    let name = lo.trim_start_matches("/dev/");
    let dio = std::fs::read_to_string(format!("/sys/block/{name}/loop/dio"))
        .unwrap_or_default()
        .trim()
        .to_string();
    eprintln!("loop {lo} over {file_s}: direct-io requested {direct_io}, loop dio={dio}");
    if direct_io {
        assert_eq!(dio, "1", "loop did not enable direct I/O on the FUSE file");
    }

    // While the loop device holds the file, removing the export is refused, naming it.
    let e = exports.remove(&exp, "vol").unwrap_err();
    assert_eq!(e.errno(), Errno::EBUSY);
    assert!(e.to_string().contains(&lo), "{e}");

    let t = Instant::now();
    run("mkfs.ext4", &["-q", "-F", &lo]);
    eprintln!("mkfs.ext4 took {:?}", t.elapsed());
    run("mount", &[&lo, fsmnt.to_str().unwrap()]);
    cleanup.fs_mounts.push(fsmnt.clone());

    let sizes = [1usize, 4095, 65536, 3 << 20, 17 << 20];
    let mut sums = Vec::new();
    for (i, &len) in sizes.iter().enumerate() {
        let p = src.join(format!("f{i}"));
        std::fs::write(&p, pattern(len, 1000 + i as u64)).unwrap();
        sums.push(sha256(&p));
        std::fs::copy(&p, fsmnt.join(format!("f{i}"))).unwrap();
    }
    run("sync", &[]);
    run("umount", &[fsmnt.to_str().unwrap()]);
    // Mount again so the files are read back through loop and FUSE, not the page cache.
    run("mount", &[&lo, fsmnt.to_str().unwrap()]);
    for (i, want) in sums.iter().enumerate() {
        assert_eq!(&sha256(&fsmnt.join(format!("f{i}"))), want, "file f{i}");
    }
    run("umount", &[fsmnt.to_str().unwrap()]);
    cleanup.fs_mounts.clear();
    run("e2fsck", &["-fn", &lo]);

    // Sequential throughput through loop + FUSE (information only).
    let t = Instant::now();
    run(
        "dd",
        &[
            "if=/dev/zero",
            &format!("of={lo}"),
            "bs=1M",
            "count=64",
            "oflag=direct",
            "status=none",
        ],
    );
    let w = t.elapsed();
    let t = Instant::now();
    run(
        "dd",
        &[
            &format!("if={lo}"),
            "of=/dev/null",
            "bs=1M",
            "count=64",
            "iflag=direct",
            "status=none",
        ],
    );
    let r = t.elapsed();
    eprintln!(
        "loop over FUSE (dio={dio}): 64 MiB O_DIRECT write {:.0} MB/s, read {:.0} MB/s",
        64.0 * 1.048_576 / w.as_secs_f64(),
        64.0 * 1.048_576 / r.as_secs_f64()
    );

    run("losetup", &["-d", &lo]);
    cleanup.loops.clear();
    remove_retrying(&exports, &exp, "vol");
    assert!(!is_mounted(&exp));
}

#[test]
fn fuse_loop_ext4_buffered() {
    loop_ext4(false);
}

#[test]
fn fuse_loop_ext4_direct_io() {
    loop_ext4(true);
}

/// Shutting down with a loop device still attached must not hang: the mount is detached and its
/// connection aborted, and the loop device then reports errors until it is detached.
#[test]
fn fuse_shutdown_with_loop_attached_does_not_hang() {
    if let Some(why) = loop_missing() {
        eprintln!("SKIPPED: {why}");
        return;
    }
    let _serial = LOOP_LOCK.lock().unwrap_or_else(|p| p.into_inner());
    let tmp = tempfile::tempdir().unwrap();
    let mem: Arc<dyn BlockDevice> = Arc::new(MemDevice::new(8192));
    let exports = Arc::new(FuseExports::new());
    let mut cleanup = Cleanup::new(exports.clone());
    exports.add(tmp.path(), "held", mem, false).unwrap();
    let file = tmp.path().join("held");
    let lo = run("losetup", &["-f", "--show", file.to_str().unwrap()]);
    cleanup.loops.push(lo.clone());
    let t = Instant::now();
    exports.shutdown();
    let took = t.elapsed();
    eprintln!("shutdown with {lo} attached took {took:?}");
    assert!(took < Duration::from_secs(30), "shutdown took {took:?}");
    assert!(!is_mounted(tmp.path()));
    assert!(exports.list().is_empty());
    // The loop device now fails instead of hanging.
    let f = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_DIRECT)
        .open(&lo)
        .unwrap();
    let mut layout = vec![0u8; 8192];
    let off = layout.as_ptr().align_offset(4096);
    assert!(f.read_at(&mut layout[off..off + 4096], 0).is_err());
}

/// Concurrent unaligned writers touching the same sectors at different bytes never lose each
/// other's updates (read-modify-write is serialized per file).
#[test]
fn fuse_concurrent_unaligned_writers_lose_nothing() {
    if let Some(why) = fuse_missing() {
        eprintln!("SKIPPED: {why}");
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let mem = Arc::new(MemDevice::new(64));
    let exports = Arc::new(FuseExports::new());
    let _cleanup = Cleanup::new(exports.clone());
    // Latency widens the read-modify-write window, so a lost update would show.
    mem.set_latency(Duration::from_micros(300));
    exports
        .add(tmp.path(), "shared", mem.clone(), false)
        .unwrap();
    let file = tmp.path().join("shared");
    const WRITERS: usize = 4;
    const SLOT: usize = 100;
    let threads: Vec<_> = (0..WRITERS)
        .map(|w| {
            let file = file.clone();
            std::thread::spawn(move || {
                let f = OpenOptions::new().write(true).open(&file).unwrap();
                for round in 0..20u8 {
                    // Writer w owns bytes [slot*SLOT*WRITERS + w*SLOT, +SLOT) of every group.
                    for group in 0..8 {
                        let off = (group * SLOT * WRITERS + w * SLOT) as u64;
                        f.write_all_at(&[round.wrapping_add(w as u8 * 60); SLOT], off)
                            .unwrap();
                    }
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    let data = mem.contents();
    for w in 0..WRITERS {
        for group in 0..8 {
            let off = group * SLOT * WRITERS + w * SLOT;
            let want = 19u8.wrapping_add(w as u8 * 60);
            assert!(
                data[off..off + SLOT].iter().all(|&b| b == want),
                "writer {w} group {group} lost an update"
            );
        }
    }
    remove_retrying(&exports, tmp.path(), "shared");
}

/// As root, runs the read/write/fallocate test again as an unprivileged user (uid 65534), so the
/// fusermount3 mount and unmount paths are exercised even where CI runs everything as root.
#[test]
fn fuse_export_as_unprivileged_user() {
    if !is_root() {
        eprintln!("NOTE fuse_export_as_unprivileged_user: not root, so the other tests already run unprivileged");
        return;
    }
    if let Some(why) = fuse_missing() {
        eprintln!("SKIPPED fuse_export_as_unprivileged_user: {why}");
        return;
    }
    for t in ["setpriv", "fusermount3"] {
        if !have(t) {
            eprintln!(
                "SKIPPED fuse_export_as_unprivileged_user: {t} not installed (util-linux, fuse3)"
            );
            return;
        }
    }
    // Unprivileged mounts open /dev/fuse as the user (fuser directly, fusermount3 with its
    // fsuid dropped): udev makes it 0666, a container may leave it 0600 (scripts/deps.sh fixes).
    let mode = std::fs::metadata("/dev/fuse").unwrap().mode() & 0o777;
    if mode & 0o006 != 0o006 {
        eprintln!(
            "SKIPPED fuse_export_as_unprivileged_user: /dev/fuse is mode {mode:o}, not 0666 as \
             udev sets it, so no unprivileged user can mount (chmod 0666 /dev/fuse; scripts/deps.sh does)"
        );
        return;
    }
    let exe = std::env::current_exe().unwrap();
    let out = Command::new("setpriv")
        .args([
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
            "--inh-caps=-all",
        ])
        .arg(&exe)
        .args([
            "--exact",
            "fuse_file_reads_writes_and_fallocate_reach_the_device",
            "--nocapture",
            "--test-threads=1",
        ])
        .env("TMPDIR", "/tmp")
        .env_remove("XDG_RUNTIME_DIR")
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.success() && text.contains("1 passed") && !text.contains("SKIPPED"),
        "the FUSE export as uid 65534 did not pass ({}):\n{text}",
        out.status
    );
}
