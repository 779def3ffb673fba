//! One conformance suite run against every backend: memory, file (buffered and O_DIRECT, pread
//! and io_uring engines) and block device (a loop device, all engines).
#![allow(clippy::unwrap_used)] // tests may unwrap

mod common;

use common::LoopDev;
use std::path::Path;
use std::sync::Arc;
use udm_io::backend::file::FileDevice;
use udm_io::backend::mem::MemDevice;
use udm_io::backend::open::{open_backend, Engine, OpenOptions};
use udm_io::{Bio, BioFlags, BlockDevice, ExtentKind, IoError};
use udm_types::errno::HasErrno;
use udm_types::Errno;

/// Device size used by the suite: 8 MiB.
const SECTORS: u64 = 16384;

/// What a backend is expected to do beyond the common contract.
#[derive(Clone, Copy)]
struct Caps {
    /// block_status reports never-written and discarded ranges as HoleZero.
    sparse: bool,
    /// Discarded ranges read back as zeroes.
    discard_zeroes: bool,
}

/// A deterministic pattern: every byte depends on its absolute position and a seed.
fn pattern(sector: u64, sectors: u64, seed: u8) -> Vec<u8> {
    (0..sectors * 512)
        .map(|i| {
            let x = sector * 512 + i;
            (x ^ (x >> 9) ^ (x >> 17)) as u8 ^ seed
        })
        .collect()
}

fn read(dev: &dyn BlockDevice, sector: u64, sectors: u64) -> Vec<u8> {
    let mut b = vec![0xa5u8; (sectors * 512) as usize];
    dev.submit(Bio::read(sector, &mut b))
        .unwrap_or_else(|e| panic!("{}: read {sector}+{sectors}: {e}", dev.describe()));
    b
}

fn write(dev: &dyn BlockDevice, sector: u64, data: &[u8], flags: BioFlags) {
    dev.submit(Bio::write(sector, data).with_flags(flags))
        .unwrap_or_else(|e| panic!("{}: write at {sector}: {e}", dev.describe()));
}

fn errno_of(r: Result<(), IoError>) -> Errno {
    match r {
        Ok(()) => panic!("request succeeded but should have failed"),
        Err(e) => e.errno(),
    }
}

fn suite(dev: &dyn BlockDevice, caps: Caps) {
    let name = dev.describe();
    assert_eq!(dev.size(), SECTORS, "{name}");
    assert!(!dev.read_only());
    let lim = dev.limits();
    assert!(lim.logical_block_size >= 512 && lim.logical_block_size.is_power_of_two());

    // Fresh device: zeroes everywhere, reported as holes by sparse backends.
    assert!(
        read(dev, 0, 64).iter().all(|&b| b == 0),
        "{name}: fresh device not zero"
    );
    if caps.sparse {
        let ext = dev.block_status(0, SECTORS).unwrap();
        assert_eq!(ext.len(), 1, "{name}: {ext:?}");
        assert_eq!(ext[0].kind, ExtentKind::HoleZero);
    }

    // Read/write round trips: various offsets and lengths, aligned and misaligned buffers.
    for (i, &(sector, sectors)) in [(0, 1), (1, 7), (8, 8), (100, 256), (3, 1), (SECTORS - 9, 9)]
        .iter()
        .enumerate()
    {
        let data = pattern(sector, sectors, i as u8);
        write(dev, sector, &data, BioFlags::empty());
        assert_eq!(
            read(dev, sector, sectors),
            data,
            "{name}: {sector}+{sectors}"
        );
        // Misaligned caller buffers (O_DIRECT backends must bounce them).
        let mut odd = vec![0u8; data.len() + 1];
        odd[1..].copy_from_slice(&pattern(sector, sectors, !(i as u8)));
        write(dev, sector, &odd[1..], BioFlags::empty());
        let mut back = vec![0u8; data.len() + 3];
        dev.submit(Bio::read(sector, &mut back[3..])).unwrap();
        assert_eq!(
            &back[3..],
            &odd[1..],
            "{name}: misaligned {sector}+{sectors}"
        );
    }

    // Flush, FUA, PREFLUSH and both.
    dev.submit(Bio::flush()).unwrap();
    for (k, flags) in [
        BioFlags::FUA,
        BioFlags::PREFLUSH,
        BioFlags::FUA | BioFlags::PREFLUSH,
    ]
    .into_iter()
    .enumerate()
    {
        let data = pattern(2000, 8, 0x40 + k as u8);
        write(dev, 2000, &data, flags);
        assert_eq!(read(dev, 2000, 8), data, "{name}: {flags:?}");
    }
    let mut rb = vec![0u8; 512];
    dev.submit(Bio::read(2000, &mut rb).with_flags(BioFlags::PREFLUSH))
        .unwrap();

    // Write-zeroes, with and without unmap, and FUA.
    let wz_start = 4096;
    for flags in [
        BioFlags::empty(),
        BioFlags::NO_UNMAP,
        BioFlags::FUA | BioFlags::PREFLUSH,
    ] {
        write(dev, wz_start, &pattern(wz_start, 64, 7), BioFlags::empty());
        dev.submit(Bio::write_zeroes(wz_start + 3, 50).with_flags(flags))
            .unwrap_or_else(|e| panic!("{name}: write-zeroes {flags:?}: {e}"));
        let back = read(dev, wz_start, 64);
        let want = pattern(wz_start, 64, 7);
        assert_eq!(&back[..3 * 512], &want[..3 * 512], "{name}");
        assert!(
            back[3 * 512..53 * 512].iter().all(|&b| b == 0),
            "{name}: {flags:?}"
        );
        assert_eq!(&back[53 * 512..], &want[53 * 512..], "{name}");
    }
    // FAST_ZERO: either done quickly or refused with EOPNOTSUPP, never half-done.
    write(dev, wz_start, &pattern(wz_start, 16, 9), BioFlags::empty());
    match dev.submit(Bio::write_zeroes(wz_start, 16).with_flags(BioFlags::FAST_ZERO)) {
        Ok(()) => assert!(read(dev, wz_start, 16).iter().all(|&b| b == 0), "{name}"),
        Err(e) => assert_eq!(e.errno(), Errno::EOPNOTSUPP, "{name}: {e}"),
    }

    // Discard: never fails in range; zeroes where the backend says so; holes where sparse.
    let d_start = 8192;
    write(dev, d_start, &pattern(d_start, 2048, 3), BioFlags::empty());
    dev.submit(Bio::discard(d_start, 2048)).unwrap();
    dev.submit(Bio::discard(d_start + 1, 3)).unwrap();
    if caps.discard_zeroes {
        assert!(read(dev, d_start, 2048).iter().all(|&b| b == 0), "{name}");
    }
    if caps.sparse {
        let ext = dev.block_status(d_start, 2048).unwrap();
        assert_eq!(ext.len(), 1, "{name}: {ext:?}");
        assert_eq!(ext[0].kind, ExtentKind::HoleZero, "{name}");
        assert_eq!(ext[0].sectors, 2048);
    }

    // block_status: extents are non-empty, within the range, and cover at least one sector.
    for (s, n) in [
        (0, SECTORS),
        (5, 1),
        (100, 300),
        (SECTORS - 1, 1),
        (SECTORS - 3, 100),
    ] {
        let ext = dev.block_status(s, n).unwrap();
        let total: u64 = ext.iter().map(|e| e.sectors).sum();
        assert!(
            total >= 1 && total <= n.min(SECTORS - s),
            "{name}: {s}+{n}: {ext:?}"
        );
        assert!(ext.iter().all(|e| e.sectors > 0));
    }
    if caps.sparse {
        let ext = dev.block_status(100, 256).unwrap();
        assert_eq!(ext[0].kind, ExtentKind::Data, "{name}: {ext:?}");
        assert!(ext[0].sectors >= 256 || ext.len() == 1);
    }

    // Out of range: reads EINVAL, writes ENOSPC, nothing written.
    let mut b = vec![0u8; 1024];
    assert_eq!(
        errno_of(dev.submit(Bio::read(SECTORS, &mut b))),
        Errno::EINVAL
    );
    assert_eq!(
        errno_of(dev.submit(Bio::read(SECTORS - 1, &mut b))),
        Errno::EINVAL
    );
    assert_eq!(
        errno_of(dev.submit(Bio::read(u64::MAX, &mut b))),
        Errno::EINVAL
    );
    let w = vec![1u8; 1024];
    assert_eq!(
        errno_of(dev.submit(Bio::write(SECTORS - 1, &w))),
        Errno::ENOSPC
    );
    assert_eq!(
        errno_of(dev.submit(Bio::discard(SECTORS - 1, 2))),
        Errno::ENOSPC
    );
    assert_eq!(
        errno_of(dev.submit(Bio::write_zeroes(u64::MAX - 1, 4))),
        Errno::ENOSPC
    );
    assert_eq!(
        read(dev, SECTORS - 1, 1),
        pattern(SECTORS - 9, 9, !5)[8 * 512..].to_vec()
    );

    // Many threads at once, each on its own region.
    std::thread::scope(|s| {
        for t in 0..8u64 {
            s.spawn(move || {
                for round in 0..20u64 {
                    let sector = 10240 + t * 512 + (round % 8) * 64;
                    let data = pattern(sector, 8, (t * 31 + round) as u8);
                    write(dev, sector, &data, BioFlags::empty());
                    assert_eq!(read(dev, sector, 8), data);
                }
            });
        }
    });
    dev.submit(Bio::flush()).unwrap();
}

/// Read-only contract: reads and flushes work, anything that writes is EROFS.
fn read_only_suite(dev: &dyn BlockDevice) {
    assert!(dev.read_only(), "{}", dev.describe());
    read(dev, 0, 8);
    dev.submit(Bio::flush()).unwrap();
    let w = vec![0u8; 512];
    assert_eq!(errno_of(dev.submit(Bio::write(0, &w))), Errno::EROFS);
    assert_eq!(errno_of(dev.submit(Bio::discard(0, 1))), Errno::EROFS);
    assert_eq!(errno_of(dev.submit(Bio::write_zeroes(0, 1))), Errno::EROFS);
}

fn file_caps() -> Caps {
    Caps {
        sparse: true,
        discard_zeroes: true,
    }
}

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
    suite(&d, file_caps());
    read_only_suite(&MemDevice::new(64).read_only());
}

#[test]
fn file_buffered_pread() {
    let dir = tempfile::tempdir().unwrap();
    let p = new_file(dir.path());
    let d = open_backend(&p, &opts(false, Engine::Auto)).unwrap();
    assert!(d.describe().contains("pread"), "{}", d.describe());
    suite(&*d, file_caps());
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
    suite(&*d, file_caps());
}

#[test]
fn file_buffered_uring() {
    let dir = tempfile::tempdir().unwrap();
    let p = new_file(dir.path());
    suite(&*open_uring(&p, false), file_caps());
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
    suite(&*d, file_caps());
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
    let caps = Caps {
        sparse: false,
        discard_zeroes: false,
    };
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
        let flush = common::tool_cmd("blockdev")
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
    suite(&*d, file_caps());
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
