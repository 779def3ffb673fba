//! The conformance suite (`udm_testkit::conformance`) on every layer that serves a device:
//! the backends (memory, file buffered and O_DIRECT with the pread and io_uring engines, a loop
//! device with every engine), a udm device node, a mapped (linear) device, a partition slice
//! and a device with an interposer attached (its clients' I/O goes through the mapped device).
#![allow(clippy::unwrap_used)] // tests may unwrap

use std::path::Path;
use std::sync::Arc;
use udm_core::registry::LoadFlags;
use udm_core::Registry;
use udm_io::backend::file::FileDevice;
use udm_io::backend::mem::MemDevice;
use udm_io::backend::open::{open_backend, Engine, OpenOptions};
use udm_io::slice::SliceDevice;
use udm_io::{Bio, BioFlags, BlockDevice};
use udm_testkit::conformance::{pattern, read, read_only_suite, suite, write, Caps, SECTORS};
use udm_testkit::core::{IP, PLAIN};
use udm_testkit::host::{tool_cmd, LoopDev};
use udm_types::errno::HasErrno;
use udm_types::Errno;

fn new_file(dir: &Path) -> std::path::PathBuf {
    let p = dir.join("disk.img");
    FileDevice::create(&p, SECTORS * 512).unwrap();
    p
}

fn opts(direct: bool, engine: Engine) -> OpenOptions {
    OpenOptions {
        read_only: false,
        direct,
        engine,
    }
}

/// Opens with io_uring and says so loudly when the fallback was taken.
fn open_uring(path: &Path, direct: bool) -> Arc<dyn BlockDevice> {
    let d = open_backend(path, &opts(direct, Engine::Uring)).unwrap();
    if !d.describe().contains("io_uring") {
        eprintln!("SKIPPED (partly): io_uring unavailable, tested the pread fallback instead");
    }
    d
}

#[test]
fn mem_backend() {
    let d = MemDevice::new(SECTORS);
    suite(&d, Caps::SPARSE);
    read_only_suite(&MemDevice::new(64).read_only());
}

#[test]
fn file_buffered_pread() {
    let dir = tempfile::tempdir().unwrap();
    let p = new_file(dir.path());
    let d = open_backend(&p, &opts(false, Engine::Auto)).unwrap();
    assert!(d.describe().contains("pread"), "{}", d.describe());
    suite(&*d, Caps::SPARSE);
    let ro = OpenOptions {
        read_only: true,
        ..Default::default()
    };
    read_only_suite(&*open_backend(&p, &ro).unwrap());
}

#[test]
fn file_direct_pread() {
    let dir = tempfile::tempdir().unwrap();
    let p = new_file(dir.path());
    let d = match open_backend(&p, &opts(true, Engine::Sync)) {
        Ok(d) => d,
        Err(e) => {
            eprintln!("SKIPPED: O_DIRECT unsupported on the temp dir: {e}");
            return;
        }
    };
    assert!(d.describe().contains("direct"));
    suite(&*d, Caps::SPARSE);
}

#[test]
fn file_buffered_uring() {
    let dir = tempfile::tempdir().unwrap();
    let p = new_file(dir.path());
    suite(&*open_uring(&p, false), Caps::SPARSE);
}

#[test]
fn file_direct_uring() {
    let dir = tempfile::tempdir().unwrap();
    let p = new_file(dir.path());
    // Auto picks io_uring for O_DIRECT files.
    let d = match open_backend(&p, &opts(true, Engine::Auto)) {
        Ok(d) => d,
        Err(e) => {
            eprintln!("SKIPPED: O_DIRECT unsupported on the temp dir: {e}");
            return;
        }
    };
    assert!(d.describe().contains("io_uring"), "{}", d.describe());
    suite(&*d, Caps::SPARSE);
    let ro = OpenOptions {
        read_only: true,
        direct: true,
        engine: Engine::Uring,
    };
    read_only_suite(&*open_backend(&p, &ro).unwrap());
}

#[test]
fn file_data_survives_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let p = new_file(dir.path());
    for (i, engine) in [Engine::Sync, Engine::Uring].into_iter().enumerate() {
        for direct in [false, true] {
            let seed = (i * 2 + direct as usize) as u8;
            let d = open_backend(&p, &opts(direct, engine)).unwrap();
            write(&*d, 77, &pattern(77, 16, seed), BioFlags::FUA);
            drop(d);
            let raw = std::fs::read(&p).unwrap();
            assert_eq!(&raw[77 * 512..93 * 512], &pattern(77, 16, seed)[..]);
        }
    }
}

#[test]
fn loop_device_all_engines() {
    let dir = tempfile::tempdir().unwrap();
    let p = new_file(dir.path());
    let Some(lo) = LoopDev::attach(&p, &[]) else {
        return;
    };
    let caps = Caps::PLAIN;
    for (direct, engine) in [
        (false, Engine::Sync),
        (true, Engine::Sync),
        (true, Engine::Uring),
        (false, Engine::Uring),
    ] {
        // Start each round from a zeroed device.
        std::fs::OpenOptions::new()
            .write(true)
            .open(&p)
            .unwrap()
            .set_len(0)
            .unwrap();
        std::fs::OpenOptions::new()
            .write(true)
            .open(&p)
            .unwrap()
            .set_len(SECTORS * 512)
            .unwrap();
        let flush = tool_cmd("blockdev")
            .arg("--flushbufs")
            .arg(&lo.path)
            .status();
        assert!(flush.is_ok_and(|s| s.success()));
        let d = open_backend(&lo.path, &opts(direct, engine)).unwrap();
        eprintln!("testing {}", d.describe());
        assert_eq!(d.limits().logical_block_size, 512);
        suite(&*d, caps);
    }
    let ro = OpenOptions {
        read_only: true,
        ..Default::default()
    };
    read_only_suite(&*open_backend(&lo.path, &ro).unwrap());
}

#[test]
fn tmpfs_file_zeroes_fallbacks() {
    // tmpfs punches holes but has no ZERO_RANGE: NO_UNMAP write-zeroes must fall back to zero
    // buffers, and refuse with EOPNOTSUPP under FAST_ZERO.
    let shm = Path::new("/dev/shm");
    if !shm.is_dir() {
        eprintln!("SKIPPED: no /dev/shm tmpfs");
        return;
    }
    let dir = tempfile::tempdir_in(shm).unwrap();
    let p = new_file(dir.path());
    let d = open_backend(&p, &opts(false, Engine::Sync)).unwrap();
    suite(&*d, Caps::SPARSE);
    write(&*d, 64, &pattern(64, 8, 1), BioFlags::empty());
    match d.submit(Bio::write_zeroes(64, 8).with_flags(BioFlags::NO_UNMAP | BioFlags::FAST_ZERO)) {
        Ok(()) => eprintln!("note: this tmpfs has ZERO_RANGE"),
        Err(e) => {
            assert_eq!(e.errno(), Errno::EOPNOTSUPP, "{e}");
            // Nothing was changed.
            assert_eq!(read(&*d, 64, 8), pattern(64, 8, 1));
        }
    }
    d.submit(Bio::write_zeroes(64, 8).with_flags(BioFlags::NO_UNMAP))
        .unwrap();
    assert!(read(&*d, 64, 8).iter().all(|&b| b == 0));
}

#[test]
fn uring_unavailable_falls_back_to_pread() {
    // Runs itself again with io_uring disabled, so the rest of this process is unaffected.
    const CHILD: &str = "UDM_IO_TEST_FALLBACK_CHILD";
    if std::env::var_os(CHILD).is_some() {
        let dir = tempfile::tempdir().unwrap();
        let p = new_file(dir.path());
        for direct in [false, true] {
            let d = open_backend(&p, &opts(direct, Engine::Uring)).unwrap();
            assert!(d.describe().contains("pread"), "{}", d.describe());
            write(&*d, 1, &pattern(1, 8, 2), BioFlags::FUA);
            assert_eq!(read(&*d, 1, 8), pattern(1, 8, 2));
        }
        return;
    }
    let out = std::process::Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "uring_unavailable_falls_back_to_pread",
            "--nocapture",
        ])
        .env(CHILD, "1")
        .env(udm_io::backend::uring::DISABLE_ENV, "1")
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(text.contains("1 passed"), "{text}");
}

/// A registry serving the memory disk `d` of [`SECTORS`] (and `e` when `two`).
fn registry(two: bool) -> Registry {
    let reg = Registry::new();
    reg.add_disk_device("d", Arc::new(MemDevice::new(SECTORS)))
        .unwrap();
    if two {
        reg.add_disk_device("e", Arc::new(MemDevice::new(SECTORS)))
            .unwrap();
    }
    reg
}

/// `create NAME --table TABLE` with `flags`, resumed.
fn create(reg: &Registry, name: &str, table: &str, flags: LoadFlags) {
    udm_testkit::core::create(reg, name, table, flags).unwrap();
}

#[test]
fn device_node_of_a_disk() {
    let reg = registry(false);
    suite(&*reg.node("d").unwrap(), Caps::SPARSE);
}

#[test]
fn mapped_linear_device() {
    let reg = registry(false);
    create(&reg, "lin", &format!("0 {SECTORS} linear d 0"), PLAIN);
    suite(&*reg.node("lin").unwrap(), Caps::SPARSE);
    create(
        &reg,
        "ro",
        "0 64 linear d 0",
        LoadFlags {
            read_only: true,
            interpose: false,
        },
    );
    read_only_suite(&*reg.node("ro").unwrap());
}

#[test]
fn mapped_device_of_two_segments() {
    // Requests crossing the target boundary at the middle are split between two disks.
    let reg = registry(true);
    let half = SECTORS / 2;
    create(
        &reg,
        "two",
        &format!("0 {half} linear e {half}\n{half} {half} linear d 0"),
        PLAIN,
    );
    suite(&*reg.node("two").unwrap(), Caps::SPARSE);
}

#[test]
fn partition_slice() {
    let disk = Arc::new(MemDevice::new(SECTORS + 4096));
    let part = SliceDevice::new(disk.clone(), 2048, SECTORS, "d1").unwrap();
    suite(&part, Caps::SPARSE);
    // Nothing outside the window was touched.
    assert!(read(&*disk, 0, 2048).iter().all(|&b| b == 0));
    assert!(read(&*disk, SECTORS + 2048, 2048).iter().all(|&b| b == 0));
    let ro: Arc<dyn BlockDevice> = Arc::new(MemDevice::new(128).read_only());
    read_only_suite(&SliceDevice::new(ro, 8, 64, "r1").unwrap());
}

#[test]
fn device_with_an_interposer() {
    // The disk's own clients go through the interposing linear device.
    let reg = registry(false);
    create(&reg, "ip", &format!("0 {SECTORS} linear d 0"), IP);
    suite(&*reg.node("d").unwrap(), Caps::SPARSE);
    assert!(
        reg.info("ip").unwrap().redirected > 0,
        "the suite's requests did not go through the interposer"
    );
}
