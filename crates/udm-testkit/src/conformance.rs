//! The block-device conformance suite: one contract (round trips at odd offsets and with
//! misaligned buffers, flush/FUA/PREFLUSH, write-zeroes, discard, block status, range errors,
//! concurrent writers, the read-only contract) that every layer serving a device must keep:
//! the backends, device nodes, mapped devices, partition slices and interposed devices
//! (`tests/conformance.rs` runs it on each).

use udm_io::{Bio, BioFlags, BlockDevice, ExtentKind, IoError};
use udm_types::errno::HasErrno;
use udm_types::Errno;

/// Device size the suite expects: 8 MiB.
pub const SECTORS: u64 = 16384;

/// What a backend is expected to do beyond the common contract.
#[derive(Clone, Copy, Debug)]
pub struct Caps {
    /// block_status reports never-written and discarded ranges as HoleZero.
    pub sparse: bool,
    /// Discarded ranges read back as zeroes.
    pub discard_zeroes: bool,
}

impl Caps {
    /// A sparse file or memory device: holes reported, discards read back as zeroes.
    pub const SPARSE: Caps = Caps {
        sparse: true,
        discard_zeroes: true,
    };
    /// A device that promises neither (a loop device).
    pub const PLAIN: Caps = Caps {
        sparse: false,
        discard_zeroes: false,
    };
}

/// A deterministic pattern: every byte depends on its absolute position and a seed.
pub fn pattern(sector: u64, sectors: u64, seed: u8) -> Vec<u8> {
    (0..sectors * 512)
        .map(|i| {
            let x = sector * 512 + i;
            (x ^ (x >> 9) ^ (x >> 17)) as u8 ^ seed
        })
        .collect()
}

/// Reads `sectors` at `sector`, panicking with the device's description on failure.
pub fn read(dev: &dyn BlockDevice, sector: u64, sectors: u64) -> Vec<u8> {
    let mut b = vec![0xa5u8; (sectors * 512) as usize];
    dev.submit(Bio::read(sector, &mut b))
        .unwrap_or_else(|e| panic!("{}: read {sector}+{sectors}: {e}", dev.describe()));
    b
}

/// Writes `data` at `sector` with `flags`, panicking with the device's description on failure.
pub fn write(dev: &dyn BlockDevice, sector: u64, data: &[u8], flags: BioFlags) {
    dev.submit(Bio::write(sector, data).with_flags(flags))
        .unwrap_or_else(|e| panic!("{}: write at {sector}: {e}", dev.describe()));
}

/// Panics with the device and the error (the suite's assertion for calls that must succeed).
fn fail<T>(dev: &dyn BlockDevice, e: IoError) -> T {
    panic!("{}: {e}", dev.describe())
}

fn errno_of(r: Result<(), IoError>) -> Errno {
    match r {
        Ok(()) => panic!("request succeeded but should have failed"),
        Err(e) => e.errno(),
    }
}

/// Runs the whole contract on `dev`, a fresh (all-zero) writable device of [`SECTORS`].
pub fn suite(dev: &dyn BlockDevice, caps: Caps) {
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
        let ext = dev
            .block_status(0, SECTORS)
            .unwrap_or_else(|e| fail(dev, e));
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
        dev.submit(Bio::read(sector, &mut back[3..]))
            .unwrap_or_else(|e| fail(dev, e));
        assert_eq!(
            &back[3..],
            &odd[1..],
            "{name}: misaligned {sector}+{sectors}"
        );
    }

    // Flush, FUA, PREFLUSH and both.
    dev.submit(Bio::flush()).unwrap_or_else(|e| fail(dev, e));
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
        .unwrap_or_else(|e| fail(dev, e));

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
    dev.submit(Bio::discard(d_start, 2048))
        .unwrap_or_else(|e| fail(dev, e));
    dev.submit(Bio::discard(d_start + 1, 3))
        .unwrap_or_else(|e| fail(dev, e));
    if caps.discard_zeroes {
        assert!(read(dev, d_start, 2048).iter().all(|&b| b == 0), "{name}");
    }
    if caps.sparse {
        let ext = dev
            .block_status(d_start, 2048)
            .unwrap_or_else(|e| fail(dev, e));
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
        let ext = dev.block_status(s, n).unwrap_or_else(|e| fail(dev, e));
        let total: u64 = ext.iter().map(|e| e.sectors).sum();
        assert!(
            total >= 1 && total <= n.min(SECTORS - s),
            "{name}: {s}+{n}: {ext:?}"
        );
        assert!(ext.iter().all(|e| e.sectors > 0));
    }
    if caps.sparse {
        let ext = dev.block_status(100, 256).unwrap_or_else(|e| fail(dev, e));
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
    dev.submit(Bio::flush()).unwrap_or_else(|e| fail(dev, e));
}

/// Read-only contract: reads and flushes work, anything that writes is EROFS.
pub fn read_only_suite(dev: &dyn BlockDevice) {
    assert!(dev.read_only(), "{}", dev.describe());
    read(dev, 0, 8);
    dev.submit(Bio::flush()).unwrap_or_else(|e| fail(dev, e));
    let w = vec![0u8; 512];
    assert_eq!(errno_of(dev.submit(Bio::write(0, &w))), Errno::EROFS);
    assert_eq!(errno_of(dev.submit(Bio::discard(0, 1))), Errno::EROFS);
    assert_eq!(errno_of(dev.submit(Bio::write_zeroes(0, 1))), Errno::EROFS);
}
