//! Live workflows on a real filesystem: ext4 on a kernel loop device over udm's FUSE export,
//! under a write load, while interposers come and go (issue "Live interposition") and while a
//! snapshot is taken with a filesystem freeze (issue "Snapshots"). The files are checked in the
//! backing image after unmount and drop_caches, so a write the page cache still holds but the
//! device never got is caught. Needs root, losetup, mkfs.ext4, e2fsck and /dev/fuse; skips loudly
//! otherwise.

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests may panic on setup failures

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use udm_testkit::{have, root, sh, Udmd};

fn can_run(test: &str) -> bool {
    root(test)
        && have("losetup", test)
        && have("mkfs.ext4", test)
        && have("e2fsck", test)
        && (Path::new("/dev/fuse").exists() || {
            eprintln!("SKIPPED {test}: no /dev/fuse");
            false
        })
}

/// Loop device + mount, torn down on drop even when the test fails.
struct Mounted {
    loopdev: String,
    mp: PathBuf,
    mounted: bool,
}

impl Mounted {
    fn new(file: &Path, mp: &Path, read_only: bool, mkfs: bool) -> Mounted {
        let ro = if read_only { "-r" } else { "" };
        let (ok, out, err) = sh(&format!("losetup {ro} -f --show {}", file.display()));
        assert!(ok, "losetup: {err}");
        let loopdev = out.trim().to_string();
        let mut m = Mounted {
            loopdev,
            mp: mp.to_path_buf(),
            mounted: false,
        };
        if mkfs {
            let (ok, _, err) = sh(&format!("mkfs.ext4 -q -F {}", m.loopdev));
            assert!(ok, "mkfs: {err}");
        }
        std::fs::create_dir_all(mp).unwrap();
        let opts = if read_only { "-o ro,noload" } else { "" };
        let (ok, _, err) = sh(&format!("mount {opts} {} {}", m.loopdev, mp.display()));
        assert!(ok, "mount: {err}");
        m.mounted = true;
        m
    }

    fn umount(&mut self) {
        if self.mounted {
            let (ok, _, err) = sh(&format!("umount {}", self.mp.display()));
            assert!(ok, "umount: {err}");
            self.mounted = false;
        }
    }

    fn fsck(&mut self) -> (bool, String) {
        self.umount();
        let (ok, out, err) = sh(&format!("e2fsck -fn {}", self.loopdev));
        (ok, format!("{out}{err}"))
    }
}

impl Drop for Mounted {
    fn drop(&mut self) {
        if self.mounted {
            sh(&format!("umount -l {}", self.mp.display()));
        }
        sh(&format!("losetup -d {}", self.loopdev));
    }
}

/// Deterministic content of file `i`.
fn content(i: u64) -> Vec<u8> {
    let len = 16384 + (i % 13) as usize * 8192;
    (0..len)
        .map(|j| (i as usize * 131 + j * 7 + j / 511) as u8)
        .collect()
}

/// A writer creating f0, f1, ... in `dir` (each written in 4 pieces, fsync every 8th file),
/// recording when each file was started and finished.
struct Writer {
    stop: Arc<AtomicBool>,
    log: Arc<Mutex<Vec<(u64, Instant, Instant)>>>,
    handle: Option<std::thread::JoinHandle<Result<(), String>>>,
}

impl Writer {
    fn start(dir: &Path) -> Writer {
        let stop = Arc::new(AtomicBool::new(false));
        let log: Arc<Mutex<Vec<(u64, Instant, Instant)>>> = Arc::default();
        let (s, l, d) = (stop.clone(), log.clone(), dir.to_path_buf());
        let handle = std::thread::spawn(move || -> Result<(), String> {
            use std::io::Write;
            let mut i = 0u64;
            while !s.load(Ordering::Relaxed) {
                let t0 = Instant::now();
                let data = content(i);
                let mut f = std::fs::File::create(d.join(format!("f{i}")))
                    .map_err(|e| format!("create f{i}: {e}"))?;
                for piece in data.chunks(data.len() / 4 + 1) {
                    f.write_all(piece).map_err(|e| format!("write f{i}: {e}"))?;
                }
                if i % 8 == 0 {
                    f.sync_all().map_err(|e| format!("fsync f{i}: {e}"))?;
                }
                drop(f);
                l.lock().unwrap().push((i, t0, Instant::now()));
                i += 1;
            }
            Ok(())
        });
        Writer {
            stop,
            log,
            handle: Some(handle),
        }
    }

    fn wait_files(&self, n: usize) {
        let deadline = Instant::now() + Duration::from_secs(60);
        while self.log.lock().unwrap().len() < n {
            assert!(Instant::now() < deadline, "writer made no progress");
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    fn finish(mut self) -> Vec<(u64, Instant, Instant)> {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(h) = self.handle.take() {
            h.join().unwrap().unwrap();
        }
        self.log.lock().unwrap().clone()
    }
}

fn verify_all(dir: &Path, log: &[(u64, Instant, Instant)], what: &str) {
    for (i, _, _) in log {
        let got = std::fs::read(dir.join(format!("f{i}"))).unwrap();
        assert!(got == content(*i), "f{i} differs {what}");
    }
}

/// Checks what reached the device rather than what the page cache remembers: unmounts `m` and
/// detaches its loop device, drops the kernel's caches, then mounts the backing image `img`
/// read-only on a fresh loop device (no FUSE, no udmd in between), compares every file of
/// `log` and runs e2fsck there.
fn verify_on_device(m: Mounted, img: &Path, mp: &Path, log: &[(u64, Instant, Instant)]) {
    drop(m);
    let (ok, _, err) = sh("sync && echo 3 > /proc/sys/vm/drop_caches");
    assert!(ok, "drop_caches: {err}");
    let mut back = Mounted::new(img, mp, true, false);
    verify_all(
        mp,
        log,
        "in the backing image after unmount and drop_caches",
    );
    let (clean, out) = back.fsck();
    assert!(clean, "e2fsck of the backing image:\n{out}");
}

/// A daemon serving a 256 MiB disk `vol` as the FUSE file `fuse/vol`, with ext4 made on a loop
/// device over it and mounted at `mnt`.
fn ext4_on_fuse() -> (Udmd, PathBuf, PathBuf, Mounted) {
    let d = Udmd::start();
    let img = d.path("vol.img");
    d.ok(&[
        "disk",
        "add",
        "vol",
        "--file",
        img.to_str().unwrap(),
        "--create",
        "256M",
    ]);
    let fdir = d.path("fuse");
    std::fs::create_dir_all(&fdir).unwrap();
    d.ok(&["export", "add", "vol", "--fuse", fdir.to_str().unwrap()]);
    let mp = d.path("mnt");
    let m = Mounted::new(&fdir.join("vol"), &mp, false, true);
    (d, fdir, mp, m)
}

#[test]
fn ext4_on_fuse_loop_survives_interposer_switches_under_load() {
    let test = "ext4_on_fuse_loop_survives_interposer_switches_under_load";
    if !can_run(test) {
        return;
    }
    let (d, fdir, mp, m) = ext4_on_fuse();
    let w = Writer::start(&mp);
    w.wait_files(20);
    let sectors = 256 * 2048;
    let tables = [
        format!("0 {sectors} linear vol 0"),
        format!("0 {sectors} delay vol 0 2"),
        format!("0 {sectors} flakey vol 0 3600 1"),
    ];
    for round in 0..30 {
        let t = &tables[round % 3];
        d.ok(&["create", "ip", "--interpose", "--table", t]);
        std::thread::sleep(Duration::from_millis(30));
        d.ok(&["remove", "ip"]);
    }
    // Once more with the filesystem frozen around the switch.
    d.ok(&[
        "create",
        "ip",
        "--interpose",
        "--freeze",
        mp.to_str().unwrap(),
        "--table",
        &tables[0],
    ]);
    d.ok(&["remove", "ip"]);
    let log = w.finish();
    assert!(log.len() > 20);
    verify_all(&mp, &log, "in the mounted filesystem");
    verify_on_device(m, &d.path("vol.img"), &d.path("check"), &log);
    d.ok(&[
        "export",
        "remove",
        &format!("fuse:{}", fdir.join("vol").display()),
    ]);
}

#[test]
fn snapshot_with_freeze_of_mounted_ext4_is_the_point_in_time() {
    let test = "snapshot_with_freeze_of_mounted_ext4_is_the_point_in_time";
    if !can_run(test) {
        return;
    }
    let (d, _fdir, mp, m) = ext4_on_fuse();
    let w = Writer::start(&mp);
    w.wait_files(30);
    let sdir = d.path("snaps");
    let t_start = Instant::now();
    let o = d.udm(&[
        "snapshot",
        "take",
        "vol",
        "--cow",
        d.path("vol.cow").to_str().unwrap(),
        "--size",
        "128M",
        "--freeze",
        mp.to_str().unwrap(),
        "--export",
        "fuse",
        "--fuse-dir",
        sdir.to_str().unwrap(),
    ]);
    let t_end = Instant::now();
    assert!(
        o.status.success(),
        "snapshot take: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    let done_at_snapshot = w.log.lock().unwrap().len();
    w.wait_files(done_at_snapshot + 30); // the origin keeps serving
    let log = w.finish();
    // The snapshot: fsck clean, and exactly the files of the freeze point.
    let smp = d.path("snapmnt");
    let mut s = Mounted::new(&sdir.join("vol-snap"), &smp, true, false);
    let mut present = 0;
    for (i, t0, t1) in &log {
        let p = smp.join(format!("f{i}"));
        let want = content(*i);
        if *t1 < t_start {
            let got = std::fs::read(&p).unwrap_or_else(|e| {
                panic!("f{i} finished before the snapshot but is missing: {e}")
            });
            assert!(got == want, "f{i} differs in the snapshot");
            present += 1;
        } else if *t0 > t_end {
            assert!(
                !p.exists(),
                "f{i} was written after the snapshot but is in it"
            );
        } else if let Ok(got) = std::fs::read(&p) {
            assert!(
                want.starts_with(&got),
                "f{i} (written across the freeze) is not a prefix of its content"
            );
        }
    }
    assert!(present >= 30);
    let (clean, out) = s.fsck();
    assert!(clean, "e2fsck of the snapshot:\n{out}");
    drop(s);
    let o = d.udm(&["snapshot", "drop", "vol-snap"]);
    assert!(
        o.status.success(),
        "snapshot drop: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    // The origin is whole and clean.
    verify_all(&mp, &log, "in the mounted origin");
    verify_on_device(m, &d.path("vol.img"), &d.path("check"), &log);
}
