//! Failures of the origin device while a snapshot is active. An origin write that copies
//! chunks is acknowledged once held by the write-back and reaches the origin later: when it
//! fails there, the next flush (or PREFLUSH write) must report it, as the page cache reports a
//! failed write-back at fsync, or an acknowledged write is lost silently.
#![allow(clippy::unwrap_used)] // test helpers outside #[test] fns unwrap too

mod snapshot_common;

use snapshot_common::*;
use udm_io::backend::mem::{Fault, MemDevice};
use udm_io::{Bio, BioFlags, BioKind};
use udm_target::Target;
use udm_types::errno::HasErrno;
use udm_types::Errno;

const O: u64 = 1024;

/// An origin with an active persistent snapshot.
struct Rig {
    /// Keeps the devices and the shared environment.
    _c: Ctx,
    o: std::sync::Arc<MemDevice>,
    org: Box<dyn Target>,
    s: Box<dyn Target>,
    /// The point-in-time image.
    img: Vec<u8>,
}

fn rig() -> Rig {
    let mut c = Ctx::new();
    let o = c.mem("o", O);
    c.mem("c", 4096);
    dev_write(&*o, 0, &pattern(1, 0, O));
    let org = c.origin(O, "o").unwrap();
    let s = c.snapshot(O, "o c P 8").unwrap();
    activate(&*s);
    let img = dev_read(&*o, 0, O);
    Rig {
        _c: c,
        o,
        org,
        s,
        img,
    }
}

#[test]
fn held_write_failing_on_the_origin_is_reported_by_the_next_flush() {
    let Rig {
        _c: _ctx,
        o,
        org,
        s,
        img,
    } = rig();
    o.inject(Fault::range(16, 24, Errno::EIO).ops(&[BioKind::Write]));
    // Both copy a chunk, so both are held; only the first fails on the origin.
    write(&*org, 16, &pattern(2, 16, 8)).unwrap();
    write(&*org, 64, &pattern(2, 64, 8)).unwrap();
    let e = flush(&*org).expect_err("a flush after a held write failed on the origin succeeded");
    assert_eq!(e.errno(), Errno::EIO, "{e}");
    // Reported once, as fsync reports a failed write-back once.
    flush(&*org).unwrap();
    assert_eq!(
        dev_read(&*o, 64, 8),
        pattern(2, 64, 8),
        "the other write landed"
    );
    assert_eq!(
        read(&*s, 0, O).unwrap(),
        img,
        "the snapshot keeps its image"
    );

    // A PREFLUSH write is a flush: it reports a failed held write too, and is not written.
    o.inject(Fault::range(40, 48, Errno::EIO).ops(&[BioKind::Write]));
    write(&*org, 40, &pattern(3, 40, 8)).unwrap();
    let p = pattern(4, 128, 8);
    let e = org
        .map(Bio::write(128, &p).with_flags(BioFlags::PREFLUSH))
        .expect_err("a PREFLUSH write after a held write failed on the origin succeeded");
    assert_eq!(e.errno(), Errno::EIO, "{e}");
    assert_eq!(dev_read(&*o, 128, 8), img[128 * 512..136 * 512]);
    flush(&*org).unwrap();
    o.clear_faults();
    // Once the origin works again, writes there are durable at the next flush.
    write(&*org, 16, &pattern(5, 16, 8)).unwrap();
    flush(&*org).unwrap();
    assert_eq!(dev_read(&*o, 16, 8), pattern(5, 16, 8));
    assert_eq!(read(&*s, 0, O).unwrap(), img);
}

#[test]
fn origin_flush_failure_is_reported_with_a_snapshot_active() {
    let Rig {
        _c: _ctx,
        o,
        org,
        s,
        img,
    } = rig();
    write(&*org, 8, &pattern(6, 8, 8)).unwrap();
    o.inject(
        Fault::range(0, O, Errno::EIO)
            .ops(&[BioKind::Flush])
            .times(1),
    );
    let e = flush(&*org).expect_err("the origin's flush failed, the flush succeeded");
    assert_eq!(e.errno(), Errno::EIO, "{e}");
    flush(&*org).unwrap();
    assert_eq!(dev_read(&*o, 8, 8), pattern(6, 8, 8));
    assert_eq!(read(&*s, 0, O).unwrap(), img);
}

#[test]
fn origin_read_failure_while_copying_invalidates_the_snapshot() {
    let Rig {
        _c: _ctx,
        o,
        org,
        s,
        ..
    } = rig();
    // The copy of the chunk reads the origin first: it fails, so the snapshot cannot keep the
    // old data. As in the kernel, the snapshot is invalidated and the origin write proceeds.
    o.inject(Fault::range(32, 40, Errno::EIO).ops(&[BioKind::Read]));
    write(&*org, 32, &pattern(7, 32, 8)).unwrap();
    flush(&*org).unwrap();
    o.clear_faults();
    assert_eq!(dev_read(&*o, 32, 8), pattern(7, 32, 8));
    assert_eq!(s.status(), "Invalid");
    assert!(read(&*s, 0, 8).is_err(), "an invalid snapshot fails reads");
}
