//! Unit tests of the byte-range layer and the export bookkeeping that need no FUSE mount.

use super::io::{self, Fallocate, Geometry, Scratch, ZeroMode};
use super::*;
use parking_lot::RwLock;
use udm_io::backend::mem::{Fault, MemDevice};
use udm_io::{BioKind, Limits};

fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
        .collect()
}

fn filled(sectors: u64) -> (MemDevice, Vec<u8>) {
    let d = MemDevice::new(sectors);
    let data = pattern((sectors * 512) as usize, 7);
    d.submit(udm_io::Bio::write(0, &data)).unwrap();
    (d, data)
}

#[test]
fn unaligned_reads_match_model() {
    let (d, model) = filled(64);
    let geo = Geometry::of(&d);
    let mut s = Scratch::default();
    for &(off, len) in &[
        (0u64, 512u64),
        (1, 1),
        (511, 2),
        (100, 3000),
        (32 * 1024 - 3, 10),
        (32 * 1024 - 3, 100),
        (32 * 1024, 10),
    ] {
        let got = io::read_at(&d, &geo, off, len, &mut s).unwrap().to_vec();
        let end = ((off + len) as usize).min(model.len());
        let want = if (off as usize) < model.len() {
            &model[off as usize..end]
        } else {
            &[][..]
        };
        assert_eq!(got, want, "read at {off} len {len}");
    }
}

#[test]
fn unaligned_writes_match_model() {
    for lbs in [512u32, 4096] {
        let d = MemDevice::with_limits(
            64,
            Limits {
                logical_block_size: lbs,
                ..Limits::default()
            },
        );
        let mut model = vec![0u8; 64 * 512];
        let geo = Geometry::of(&d);
        assert_eq!(geo.unit, u64::from(lbs));
        let rmw = RwLock::new(());
        let mut s = Scratch::default();
        for (i, &(off, len)) in [
            (0u64, 512usize),
            (1, 1),
            (511, 2),
            (100, 3000),
            (4095, 4098),
            (8192, 4096),
            (64 * 512 - 5, 5),
            (7, 64 * 512 - 7),
        ]
        .iter()
        .enumerate()
        {
            let data = pattern(len, i as u8 + 1);
            let n = io::write_at(&d, &geo, off, &data, false, &rmw, &mut s).unwrap();
            assert_eq!(n, len);
            model[off as usize..off as usize + len].copy_from_slice(&data);
            assert_eq!(d.contents(), model, "lbs {lbs} write at {off} len {len}");
        }
    }
}

#[test]
fn writes_past_end_are_short_then_enospc() {
    let d = MemDevice::new(8);
    let geo = Geometry::of(&d);
    let rmw = RwLock::new(());
    let mut s = Scratch::default();
    let n = io::write_at(&d, &geo, 4000, &[1u8; 200], false, &rmw, &mut s).unwrap();
    assert_eq!(n, 96);
    let e = io::write_at(&d, &geo, 4096, &[1u8; 1], false, &rmw, &mut s).unwrap_err();
    assert_eq!(e.errno(), Errno::ENOSPC);
    assert!(io::read_at(&d, &geo, 4096, 10, &mut s).unwrap().is_empty());
    assert_eq!(io::read_at(&d, &geo, 4090, 10, &mut s).unwrap().len(), 6);
}

#[test]
fn fua_reaches_device_and_errors_keep_errno() {
    let d = MemDevice::new(8);
    d.inject(Fault::range(2, 3, Errno::EIO).ops(&[BioKind::Read]));
    let geo = Geometry::of(&d);
    let rmw = RwLock::new(());
    let mut s = Scratch::default();
    let e = io::read_at(&d, &geo, 1024, 1, &mut s).unwrap_err();
    assert_eq!(e.errno(), Errno::EIO);
    // An unaligned write into the faulty sector fails in its read phase.
    let e = io::write_at(&d, &geo, 1025, &[1], false, &rmw, &mut s).unwrap_err();
    assert_eq!(e.errno(), Errno::EIO);
    // An aligned write does not read.
    io::write_at(&d, &geo, 1024, &[1; 512], true, &rmw, &mut s).unwrap();
    let ro = MemDevice::new(8).read_only();
    let e = io::write_at(&ro, &geo, 0, &[1; 512], false, &rmw, &mut s).unwrap_err();
    assert_eq!(e.errno(), Errno::EROFS);
}

#[test]
fn max_io_splits_requests() {
    let d = MemDevice::with_limits(
        64,
        Limits {
            max_io_sectors: 8,
            ..Limits::default()
        },
    );
    let geo = Geometry::of(&d);
    let rmw = RwLock::new(());
    let mut s = Scratch::default();
    let data = pattern(64 * 512, 3);
    io::write_at(&d, &geo, 0, &data, false, &rmw, &mut s).unwrap();
    assert_eq!(d.count(BioKind::Write), 8);
    assert_eq!(
        io::read_at(&d, &geo, 0, 64 * 512, &mut s).unwrap(),
        &data[..]
    );
    assert_eq!(d.count(BioKind::Read), 8);
}

#[test]
fn zero_range_and_punch_hole() {
    for (write_zeroes, discard) in [(true, true), (false, true), (false, false)] {
        let d = MemDevice::with_limits(
            64,
            Limits {
                write_zeroes,
                discard,
                ..Limits::default()
            },
        );
        let mut model = pattern(64 * 512, 9);
        d.submit(udm_io::Bio::write(0, &model)).unwrap();
        let geo = Geometry::of(&d);
        let rmw = RwLock::new(());
        let mut s = Scratch::default();
        io::zero_range(&d, &geo, 100, 5000, ZeroMode::ZeroRange, &rmw, &mut s).unwrap();
        model[100..5100].fill(0);
        assert_eq!(d.contents(), model);
        // Inside one sector.
        io::zero_range(&d, &geo, 6000, 10, ZeroMode::ZeroRange, &rmw, &mut s).unwrap();
        model[6000..6010].fill(0);
        assert_eq!(d.contents(), model);
        let r = io::zero_range(&d, &geo, 7000, 9000, ZeroMode::PunchHole, &rmw, &mut s);
        if discard || write_zeroes {
            r.unwrap();
            // The partial edges always read back as zeroes; MemDevice zeroes discards too.
            model[7000..16000].fill(0);
            assert_eq!(d.contents(), model);
        } else {
            assert_eq!(r.unwrap_err().errno(), Errno::EOPNOTSUPP);
        }
        let used_zeroes = d.count(BioKind::WriteZeroes) > 0;
        assert_eq!(used_zeroes, write_zeroes);
        // Past the end: clipped, no error.
        io::zero_range(
            &d,
            &geo,
            64 * 512 - 10,
            100,
            ZeroMode::ZeroRange,
            &rmw,
            &mut s,
        )
        .unwrap();
    }
}

#[test]
fn fallocate_modes() {
    use libc::{FALLOC_FL_COLLAPSE_RANGE, FALLOC_FL_KEEP_SIZE, FALLOC_FL_PUNCH_HOLE};
    use libc::{FALLOC_FL_INSERT_RANGE, FALLOC_FL_ZERO_RANGE as ZR};
    let size = 4096;
    assert_eq!(io::fallocate_action(0, 0, 4096, size), Fallocate::Nothing);
    assert_eq!(
        io::fallocate_action(0, 0, 4097, size),
        Fallocate::Refuse(Errno::EFBIG)
    );
    assert_eq!(
        io::fallocate_action(FALLOC_FL_KEEP_SIZE, 0, 1 << 20, size),
        Fallocate::Nothing
    );
    assert_eq!(
        io::fallocate_action(FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, 0, 10, size),
        Fallocate::Zero(ZeroMode::PunchHole)
    );
    assert_eq!(
        io::fallocate_action(FALLOC_FL_PUNCH_HOLE, 0, 10, size),
        Fallocate::Refuse(Errno::EOPNOTSUPP)
    );
    assert_eq!(
        io::fallocate_action(ZR, 0, 10, size),
        Fallocate::Zero(ZeroMode::ZeroRange)
    );
    assert_eq!(
        io::fallocate_action(ZR, 0, 5000, size),
        Fallocate::Refuse(Errno::EFBIG)
    );
    assert_eq!(
        io::fallocate_action(ZR | FALLOC_FL_KEEP_SIZE, 0, 5000, size),
        Fallocate::Zero(ZeroMode::ZeroRange)
    );
    for m in [FALLOC_FL_COLLAPSE_RANGE, FALLOC_FL_INSERT_RANGE] {
        assert_eq!(
            io::fallocate_action(m, 0, 512, size),
            Fallocate::Refuse(Errno::EOPNOTSUPP)
        );
    }
}

#[test]
fn names_are_checked_and_errors_have_errnos() {
    let x = FuseExports::new();
    let dev: Arc<dyn BlockDevice> = Arc::new(MemDevice::new(8));
    for bad in ["", ".", "..", "a/b", "a\0b"] {
        let e = x
            .add(Path::new("/nonexistent-udm"), bad, dev.clone(), false)
            .unwrap_err();
        assert_eq!(e.errno(), Errno::EINVAL, "{bad:?}");
    }
    let e = x
        .add(Path::new("/nonexistent-udm-dir"), "d", dev.clone(), false)
        .unwrap_err();
    assert_eq!(e.errno(), Errno::ENOENT);
    let f = tempfile::NamedTempFile::new().unwrap();
    let e = x.add(f.path(), "d", dev, false).unwrap_err();
    assert_eq!(e.errno(), Errno(libc::ENOTDIR));
    let e = x
        .remove(Path::new("/nonexistent-udm-dir"), "d")
        .unwrap_err();
    assert_eq!(e.errno(), Errno::ENOENT);
    assert!(x.list().is_empty());
    let busy = FuseError::Busy {
        path: "/x/d".into(),
        handles: 1,
        holders: vec!["/dev/loop3".into()],
    };
    assert_eq!(busy.errno(), Errno::EBUSY);
    let msg = busy.to_string();
    assert!(
        msg.contains("/dev/loop3") && msg.contains("losetup -d"),
        "{msg}"
    );
}

#[test]
fn state_refuses_removal_while_open() {
    let st = fs::MountState::new();
    assert!(st.insert("a", Arc::new(MemDevice::new(8)), false));
    assert!(!st.insert("a", Arc::new(MemDevice::new(8)), false));
    let e = st.entries()[0].clone();
    e.handles.fetch_add(1, Ordering::AcqRel);
    assert!(matches!(st.begin_remove("a"), Err(RemoveRefused::Busy(1))));
    e.handles.fetch_sub(1, Ordering::AcqRel);
    let e = st.begin_remove("a").ok().unwrap();
    assert!(matches!(st.begin_remove("a"), Err(RemoveRefused::NotFound)));
    st.finish_remove(&e);
    assert_eq!(st.len(), 0);
}
