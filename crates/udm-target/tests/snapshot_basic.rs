//! Constructor rules, status strings, overflow/invalidation, handover, merge of the snapshot
//! targets.
#![allow(clippy::unwrap_used)] // test helpers outside #[test] fns unwrap too

mod snapshot_common;

use snapshot_common::*;
use udm_io::backend::mem::Fault;
use udm_io::{Bio, BioKind};
use udm_target::snapshot::store::persistent::encode_header;
use udm_types::errno::HasErrno;
use udm_types::Errno;

const O: u64 = 1024;

fn setup(
    cow_sectors: u64,
) -> (
    Ctx,
    std::sync::Arc<udm_io::backend::mem::MemDevice>,
    std::sync::Arc<udm_io::backend::mem::MemDevice>,
) {
    let mut c = Ctx::new();
    let o = c.mem("o", O);
    let w = c.mem("c", cow_sectors);
    dev_write(&*o, 0, &pattern(1, 0, O));
    (c, o, w)
}

#[test]
fn fresh_status_and_table() {
    let (mut c, _o, _w) = setup(4096);
    let s = c.snapshot(O, "o c P 8").unwrap();
    assert_eq!(s.status(), "16/4096 16");
    assert_eq!(s.table_params(), format!("{} {} P 8", c.id("o"), c.id("c")));
    assert_eq!(s.max_io_len(), 8);
    let devs: Vec<_> = s.devices().iter().map(|d| d.id).collect();
    assert_eq!(devs, vec![c.id("o"), c.id("c")]);
    use udm_target::TargetType;
    let ty = |merge| udm_target::snapshot::snap::SnapshotType { merge };
    assert_eq!(
        (ty(false).version(), ty(true).version()),
        ([1, 16, 0], [1, 5, 0])
    );
    let s2 = c
        .snapshot(O, "o c2 po 16 2 discard_zeroes_cow discard_passdown_origin")
        .err();
    assert!(s2.is_some()); // no device c2
    c.mem("c2", 4096);
    let s2 = c
        .snapshot(O, "o c2 po 16 2 discard_zeroes_cow discard_passdown_origin")
        .unwrap();
    assert_eq!(
        s2.table_params(),
        format!(
            "{} {} PO 16 2 discard_zeroes_cow discard_passdown_origin",
            c.id("o"),
            c.id("c2")
        )
    );
    assert_eq!(s2.status(), "32/4096 32");
    c.mem("c3", 4096);
    let n = c.snapshot(O, "o c3 N 8").unwrap();
    assert_eq!(n.status(), "0/4096 0");
    assert_eq!(
        n.table_params(),
        format!("{} {} N 8", c.id("o"), c.id("c3"))
    );
    c.mem("c4", 4096);
    let d = c.snapshot(O, "o c4 P 0").unwrap();
    assert_eq!(d.status(), "64/4096 64", "default chunk 32");
    // Only a persistent store merges: a merge taking over a live transient snapshot is
    // refused when constructed, as by the kernel's __validate_exception_handover.
    c.mem("c5", 4096);
    let live = c.snapshot(O, "o c5 N 8").unwrap();
    activate(&*live);
    let e = c
        .merge(O, "o c5 N 8")
        .err()
        .expect("a transient store merged");
    assert!(
        e.msg.contains("does not support snapshot-merge"),
        "{}",
        e.msg
    );
}

#[test]
fn ctor_errors() {
    let (mut c, _o, w) = setup(4096);
    let bad = |c: &mut Ctx, args: &str| c.snapshot(O, args).err().map(|e| (e.errno, e.msg));
    assert!(bad(&mut c, "o c P")
        .unwrap()
        .1
        .contains("requires 4 or more"));
    assert!(bad(&mut c, "o c P 12").unwrap().1.contains("power of 2"));
    assert!(bad(&mut c, "o c X 8").unwrap().1.contains("not P or N"));
    assert!(bad(&mut c, "o c PX 8")
        .unwrap()
        .1
        .contains("Unsupported persistent store option"));
    assert!(bad(&mut c, "o o P 8")
        .unwrap()
        .1
        .contains("cannot be the same"));
    assert!(bad(&mut c, "o c N 0")
        .unwrap()
        .1
        .contains("Chunk size not set"));
    assert!(bad(&mut c, "o c P 8 1 discard_passdown_origin")
        .unwrap()
        .1
        .contains("depends on"));
    assert!(bad(&mut c, "o c P 8 3 a b c")
        .unwrap()
        .1
        .contains("feature arguments"));
    assert!(bad(&mut c, "o c P 8 1 bogus")
        .unwrap()
        .1
        .contains("Unrecognised feature"));
    // A chunk larger than the COW device: refused before any I/O. One as large as it passes
    // that check (and fails for want of room for the exception area).
    c.mem("tiny", 8);
    assert!(bad(&mut c, "o tiny P 16")
        .unwrap()
        .1
        .contains("larger than the COW device"));
    let same = bad(&mut c, "o tiny P 8").map(|e| e.1).unwrap_or_default();
    assert!(!same.contains("larger than the COW device"), "{same}");
    // Nothing was written by the failed attempts.
    assert!(w.contents().iter().all(|&b| b == 0));
    // Corrupt header: ENXIO, nothing written.
    let junk = vec![0x5au8; 512];
    dev_write(&*w, 0, &junk);
    let before = w.contents();
    let (errno, msg) = bad(&mut c, "o c P 8").unwrap();
    assert_eq!(errno, Errno::ENXIO);
    assert!(msg.contains("Invalid or corrupt snapshot"), "{msg}");
    assert_eq!(w.contents(), before);
    // Version 2: EINVAL.
    let mut h = vec![0u8; 512];
    encode_header(&mut h, true, 2, 8);
    dev_write(&*w, 0, &h);
    assert_eq!(bad(&mut c, "o c P 8").unwrap().0, Errno::EINVAL);
}

#[test]
fn origin_write_copies_and_snapshot_keeps_old_data() {
    let (mut c, o, _w) = setup(4096);
    let org = c.origin(O, "o").unwrap();
    let s = c.snapshot(O, "o c P 8").unwrap();
    // Not active yet: origin writes do not copy.
    write(&*org, 0, &pattern(2, 0, 8)).unwrap();
    assert_eq!(s.status(), "16/4096 16");
    activate(&*s);
    let before = dev_read(&*o, 0, O);
    write(&*org, 20, &pattern(3, 20, 10)).unwrap(); // chunks 2 and 3
                                                    // The write is acknowledged before its copies are allocated (write-back); a flush
                                                    // settles them.
    flush(&*org).unwrap();
    assert_eq!(s.status(), "32/4096 16");
    assert_eq!(read(&*s, 0, O).unwrap(), before);
    assert_eq!(read(&*org, 20, 10).unwrap(), pattern(3, 20, 10));
    // Snapshot write: partial chunk copies, full chunk does not need the origin.
    write(&*s, 100, &pattern(4, 100, 1)).unwrap();
    write(&*s, 200, &pattern(5, 200, 8)).unwrap();
    let mut want = before.clone();
    want[100 * 512..101 * 512].copy_from_slice(&pattern(4, 100, 1));
    want[200 * 512..208 * 512].copy_from_slice(&pattern(5, 200, 8));
    assert_eq!(read(&*s, 0, O).unwrap(), want);
    assert_eq!(s.status(), "48/4096 16");
    // Reload: same view.
    drop(s);
    let s = c.snapshot(O, "o c P 0").unwrap();
    assert_eq!(s.status(), "48/4096 16");
    activate(&*s);
    assert_eq!(read(&*s, 0, O).unwrap(), want);
}

#[test]
fn full_cow_invalidates_p_and_overflows_po() {
    // COW of 5 chunks of 8: header, area, 3 data chunks.
    let (mut c, o, w) = setup(40);
    let org = c.origin(O, "o").unwrap();
    let s = c.snapshot(O, "o c P 8").unwrap();
    activate(&*s);
    for ch in 0..3 {
        write(&*org, ch * 8, &pattern(9, ch * 8, 8)).unwrap();
    }
    flush(&*org).unwrap();
    assert_eq!(s.status(), "40/40 16");
    assert_eq!(c.events(), 0);
    write(&*org, 64, &pattern(9, 64, 8)).unwrap();
    flush(&*org).unwrap();
    assert_eq!(s.status(), "Invalid");
    assert_eq!(c.events(), 1);
    assert_eq!(read(&*s, 0, 8).unwrap_err().errno(), Errno::EIO);
    assert_eq!(dev_read(&*o, 64, 8), pattern(9, 64, 8));
    // Header now says invalid; a reload loads an invalid snapshot.
    assert_eq!(&w.contents()[4..8], &[0, 0, 0, 0]);
    drop(s);
    let s = c.snapshot(O, "o c P 8").unwrap();
    assert_eq!(s.status(), "Invalid");

    // PO: a snapshot write that cannot allocate overflows; reads keep working.
    c.mem("c2", 40);
    let p = c.snapshot(O, "o c2 PO 8").unwrap();
    activate(&*p);
    let img = read(&*p, 0, O).unwrap();
    for ch in 0..3u64 {
        write(&*p, ch * 8 + 1, &pattern(10, 0, 1)).unwrap();
    }
    let e = write(&*p, 100, &pattern(10, 0, 1)).unwrap_err();
    assert_eq!(e.errno(), Errno::EIO);
    assert_eq!(p.status(), "Overflow");
    assert_eq!(
        read(&*p, 200, 8).unwrap(),
        img[200 * 512..208 * 512].to_vec()
    );
    assert!(
        write(&*p, 1, &pattern(10, 0, 1)).is_err(),
        "writes fail once overflowed"
    );
    // P: the same snapshot write invalidates.
    c.mem("c3", 40);
    let q = c.snapshot(O, "o c3 P 8").unwrap();
    activate(&*q);
    for ch in 0..3u64 {
        write(&*q, ch * 8 + 1, &pattern(10, 0, 1)).unwrap();
    }
    assert!(write(&*q, 100, &pattern(10, 0, 1)).is_err());
    assert_eq!(q.status(), "Invalid");

    // N: a transient COW of 20 sectors holds two 8-sector chunks; the third copy finds it
    // full (invalid) and sends nothing past the COW's end.
    let t = c.mem("c4", 20);
    let n = c.snapshot(O, "o c4 N 8").unwrap();
    activate(&*n);
    for ch in 0..2 {
        write(&*org, 200 + ch * 8, &pattern(11, 200 + ch * 8, 8)).unwrap();
    }
    flush(&*org).unwrap();
    assert_eq!(n.status(), "16/20 0");
    let writes = t.count(BioKind::Write);
    write(&*org, 300, &pattern(11, 300, 8)).unwrap();
    flush(&*org).unwrap();
    assert_eq!(n.status(), "Invalid");
    assert_eq!(t.count(BioKind::Write), writes, "a copy went to a full COW");
}

#[test]
fn cow_eio_invalidates_but_origin_works() {
    let (mut c, o, w) = setup(4096);
    c.mem("c2", 4096);
    let org = c.origin(O, "o").unwrap();
    let s = c.snapshot(O, "o c P 8").unwrap();
    let s2 = c.snapshot(O, "o c2 N 16").unwrap();
    activate(&*s);
    activate(&*s2);
    let before = dev_read(&*o, 0, O);
    w.inject(Fault::range(0, 4096, Errno::EIO).ops(&[BioKind::Write]));
    write(&*org, 8, &pattern(11, 8, 16)).unwrap();
    flush(&*org).unwrap();
    assert_eq!(dev_read(&*o, 8, 16), pattern(11, 8, 16));
    assert_eq!(s.status(), "Invalid");
    assert!(c.events() >= 1);
    assert_eq!(s2.status(), "32/4096 0");
    assert_eq!(read(&*s2, 0, O).unwrap(), before);
    // A transient snapshot whose copy fails is invalid too.
    c.mem("c3", 4096)
        .inject(Fault::range(0, 4096, Errno::EIO).ops(&[BioKind::Write]));
    let n = c.snapshot(O, "o c3 N 8").unwrap();
    activate(&*n);
    write(&*org, 200, &pattern(13, 200, 8)).unwrap();
    flush(&*org).unwrap();
    assert_eq!(n.status(), "Invalid");
    // The invalid snapshot gets no more copies (its COW is not written at all).
    let cow_writes = w.count(BioKind::Write);
    write(&*org, 300, &pattern(12, 300, 3)).unwrap();
    flush(&*org).unwrap();
    assert_eq!(read(&*s2, 0, O).unwrap(), before);
    assert_eq!(
        w.count(BioKind::Write),
        cow_writes,
        "copies for an invalid snapshot"
    );
}

#[test]
fn several_snapshots_with_different_chunks() {
    let (mut c, o, _w) = setup(4096);
    c.mem("c2", 4096);
    let org = c.origin(O, "o").unwrap();
    let a = c.snapshot(O, "o c P 16").unwrap();
    activate(&*a);
    let img_a = dev_read(&*o, 0, O);
    write(&*org, 5, &pattern(20, 5, 30)).unwrap();
    let b = c.snapshot(O, "o c2 P 8").unwrap();
    activate(&*b);
    let img_b = dev_read(&*o, 0, O);
    write(&*org, 0, &pattern(21, 0, 64)).unwrap();
    assert_eq!(read(&*a, 0, O).unwrap(), img_a);
    assert_eq!(read(&*b, 0, O).unwrap(), img_b);
    assert_eq!(a.status(), "96/4096 32");
    assert_eq!(b.status(), "80/4096 16");
}

#[test]
fn discard_zeroes_cow() {
    let (mut c, o, _w) = setup(4096);
    let s = c.snapshot(O, "o c P 8 1 discard_zeroes_cow").unwrap();
    assert!(s.caps().discard);
    activate(&*s);
    write(&*s, 16, &pattern(30, 16, 8)).unwrap();
    s.map(Bio::discard(16, 8)).unwrap();
    assert_eq!(read(&*s, 16, 8).unwrap(), vec![0u8; 4096]);
    // Part of a remapped chunk: that part only.
    write(&*s, 24, &pattern(31, 24, 8)).unwrap();
    s.map(Bio::discard(26, 2)).unwrap();
    let mut want = pattern(31, 24, 8);
    want[1024..2048].fill(0);
    assert_eq!(
        read(&*s, 24, 8).unwrap(),
        want,
        "a partial discard zeroed more"
    );
    // Discard of an unremapped chunk is a no-op.
    s.map(Bio::discard(40, 8)).unwrap();
    assert_eq!(read(&*s, 40, 8).unwrap(), dev_read(&*o, 40, 8));
    // discard_passdown_origin also discards the origin (without copying anything out).
    c.mem("c2", 4096);
    let p = c
        .snapshot(O, "o c2 P 8 2 discard_zeroes_cow discard_passdown_origin")
        .unwrap();
    activate(&*p);
    let st = p.status();
    p.map(Bio::discard(64, 8)).unwrap();
    assert_eq!(dev_read(&*o, 64, 8), vec![0u8; 4096]);
    assert_eq!(p.status(), st);
    // Without the feature the target does not take discards at all.
    c.mem("c3", 4096);
    assert!(!c.snapshot(O, "o c3 P 8").unwrap().caps().discard);
}

#[test]
fn handover_moves_exceptions_at_resume() {
    let (mut c, o, _w) = setup(4096);
    let org = c.origin(O, "o").unwrap();
    let s = c.snapshot(O, "o c P 8").unwrap();
    activate(&*s);
    let img = dev_read(&*o, 0, O);
    write(&*org, 0, &pattern(40, 0, 100)).unwrap();
    flush(&*org).unwrap();
    let st = s.status();
    let s2 = c.snapshot(O, "o c PO 8").unwrap();
    // Source not suspended: refused.
    assert!(s2
        .preresume()
        .unwrap_err()
        .msg
        .contains("until source is suspended"));
    assert!(s
        .preresume()
        .unwrap_err()
        .msg
        .contains("until handover completes"));
    s.presuspend();
    s.postsuspend();
    s2.preresume().unwrap();
    s2.resume();
    assert_eq!(s2.status(), st);
    assert_eq!(s.status(), "Invalid");
    assert_eq!(read(&*s2, 0, O).unwrap(), img);
    assert!(s2.table_params().ends_with(" PO 8"));
    // While the old table exists, two tables already share the COW: a third is refused.
    assert!(c
        .snapshot(O, "o c P 8")
        .err()
        .unwrap()
        .msg
        .contains("handover failed"));
    drop(s);
    // A pending destination blocks another one.
    let s3 = c.snapshot(O, "o c P 8").unwrap();
    assert!(c
        .snapshot(O, "o c P 8")
        .err()
        .unwrap()
        .msg
        .contains("handover failed"));
    drop(s3);
    write(&*org, 200, &pattern(41, 200, 8)).unwrap();
    assert_eq!(read(&*s2, 0, O).unwrap(), img);
}

#[test]
fn merge_restores_origin_and_survives_restart() {
    let (mut c, o, w) = setup(4096);
    let org = c.origin(O, "o").unwrap();
    let s = c.snapshot(O, "o c P 8").unwrap();
    activate(&*s);
    let img = dev_read(&*o, 0, O);
    write(&*org, 0, &pattern(50, 0, O)).unwrap();
    write(&*s, 33, &pattern(51, 33, 2)).unwrap();
    let mut want = img.clone();
    want[33 * 512..35 * 512].copy_from_slice(&pattern(51, 33, 2));
    // lvconvert --merge: suspend origin + snapshot, replace origin table with snapshot-merge.
    org.presuspend();
    org.postsuspend();
    s.presuspend();
    s.postsuspend();
    drop(org);
    let m = c.merge(O, "o c P 8").unwrap();
    m.preresume().unwrap();
    m.resume();
    let st = wait_merged(&*m);
    assert_eq!(st, "16/4096 16");
    assert_eq!(dev_read(&*o, 0, O), want);
    assert_eq!(read(&*m, 0, O).unwrap(), want);
    // The worker raises the event once it finds nothing more to merge, just after the status
    // shows the last step.
    let t = std::time::Instant::now();
    while c.events() == 0 && t.elapsed().as_secs() < 10 {
        std::thread::sleep(std::time::Duration::from_millis(1));
    }
    assert!(c.events() >= 1, "no event at the end of the merge");
    drop(s);
    drop(m);
    // The on-disk state after the merge: area 0 empty.
    assert!(w.contents()[8 * 512..16 * 512].iter().all(|&b| b == 0));

    // Restart: a merge stopped half-way continues from the on-disk state, and leaves alone the
    // chunks it had merged (a client may have written them since).
    let (mut c, o, _w) = setup(4096 * 2);
    let org = c.origin(O, "o").unwrap();
    let s = c.snapshot(O, "o c P 8").unwrap();
    activate(&*s);
    let img = dev_read(&*o, 0, O);
    let changed: Vec<u64> = (0..O).step_by(16).collect();
    for &i in &changed {
        // non-consecutive exceptions so the merge takes many steps, highest chunk first
        write(&*org, i, &pattern(52, i, 1)).unwrap();
    }
    drop(org);
    s.presuspend();
    s.postsuspend();
    // A few milliseconds per merge step, so that it can be stopped half-way.
    o.set_latency(std::time::Duration::from_millis(5));
    let m = c.merge(O, "o c P 8").unwrap();
    m.preresume().unwrap();
    m.resume();
    let used = |t: &dyn udm_target::Target| -> u64 {
        let st = t.status();
        st.split('/')
            .next()
            .and_then(|u| u.parse().ok())
            .unwrap_or(0)
    };
    let start = used(&*m);
    let t = std::time::Instant::now();
    while used(&*m) + 3 * 8 > start {
        assert!(
            t.elapsed().as_secs() < 20,
            "no merge progress: {}",
            m.status()
        );
        std::thread::sleep(std::time::Duration::from_millis(1));
    }
    m.presuspend(); // stops after the current step
    o.set_latency(std::time::Duration::ZERO);
    let at_stop = dev_read(&*o, 0, O);
    let chunk = |i: u64| (i * 512) as usize..((i + 8) * 512) as usize;
    let merged: Vec<u64> = changed
        .iter()
        .copied()
        .filter(|&i| at_stop[chunk(i)] == img[chunk(i)])
        .collect();
    assert!(
        merged.len() >= 3 && merged.len() < changed.len(),
        "not a partial merge when stopped: {} of {} chunks merged",
        merged.len(),
        changed.len()
    );
    // Written after their merge, before the merge resumes: the resumed merge keeps them.
    let mut want = img.clone();
    for &i in &merged {
        let p = pattern(54, i, 8);
        write(&*m, i, &p).unwrap();
        want[chunk(i)].copy_from_slice(&p);
    }
    drop(m);
    drop(s);
    let m = c.merge(O, "o c P 8").unwrap();
    activate(&*m);
    assert_eq!(wait_merged(&*m), "16/8192 16");
    let got = dev_read(&*o, 0, O);
    for &i in &merged {
        assert!(
            got[chunk(i)] == want[chunk(i)],
            "sector {i} was written after its chunk was merged; the resumed merge reverted it"
        );
    }
    assert!(
        got == want,
        "the merged origin differs from the snapshot image"
    );
    // Writes through the merge target during/after merge reach the origin.
    write(&*m, 3, &pattern(53, 3, 1)).unwrap();
    assert_eq!(dev_read(&*o, 3, 1), pattern(53, 3, 1));
}

#[test]
fn merge_preserves_other_snapshots_and_reports_failure() {
    let (mut c, o, _w) = setup(4096);
    c.mem("c2", 4096);
    let org = c.origin(O, "o").unwrap();
    let a = c.snapshot(O, "o c P 8").unwrap();
    activate(&*a);
    let img_a = dev_read(&*o, 0, O);
    write(&*org, 0, &pattern(60, 0, 200)).unwrap();
    let b = c.snapshot(O, "o c2 P 16").unwrap();
    activate(&*b);
    let img_b = dev_read(&*o, 0, O);
    org.presuspend();
    org.postsuspend();
    drop(org);
    a.presuspend();
    a.postsuspend();
    let m = c.merge(O, "o c P 8").unwrap();
    activate(&*m);
    // I/O to the merging device is split at the smallest chunk among the origin's snapshots
    // (the kernel's get_origin_minimum_chunksize): here its own 8 sectors, not b's 16.
    assert_eq!(m.max_io_len(), 8);
    assert_eq!(wait_merged(&*m), "16/4096 16");
    assert_eq!(dev_read(&*o, 0, O), img_a);
    // The merge wrote the origin: b copied those chunks first.
    assert_eq!(read(&*b, 0, O).unwrap(), img_b);
    assert_eq!(a.status(), "Invalid", "the handover source is dead");
    drop(m);
    drop(a);
    drop(b);

    // A failing origin write stops the merge: "Merge failed".
    let (mut c, o, _w) = setup(4096);
    let org = c.origin(O, "o").unwrap();
    let s = c.snapshot(O, "o c P 8").unwrap();
    activate(&*s);
    write(&*org, 0, &pattern(61, 0, 64)).unwrap();
    drop(org);
    drop(s);
    o.inject(Fault::range(0, O, Errno::EIO).ops(&[BioKind::Write]));
    let m = c.merge(O, "o c P 8").unwrap();
    activate(&*m);
    let mut st = m.status();
    for _ in 0..2000 {
        if st == "Merge failed" {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(5));
        st = m.status();
    }
    assert_eq!(st, "Merge failed");
}

/// A read of a snapshot over a corrupt store: data, or the I/O error of an invalid snapshot.
fn read_or_eio(t: &dyn udm_target::Target, seed: u64, what: &str) {
    match read(t, 0, O) {
        Ok(_) => {}
        Err(e) => assert_eq!(e.errno(), Errno::EIO, "seed {seed}: {what}: {e}"),
    }
}

/// A status of a snapshot: one of the kernel's forms, never anything else.
fn status_is_well_formed(st: &str, seed: u64) {
    let usage = st.split_once(' ').is_some_and(|(a, m)| {
        a.split_once('/')
            .is_some_and(|(x, y)| x.parse::<u64>().is_ok() && y.parse::<u64>().is_ok())
            && m.parse::<u64>().is_ok()
    });
    assert!(
        usage || ["Invalid", "Merge failed", "Overflow"].contains(&st),
        "seed {seed}: status {st:?}"
    );
}

#[test]
fn corrupt_areas_never_panic() {
    // Errors are allowed here, panics are not: not on this thread, not on the merge worker.
    let watch = PanicWatch::start();
    let mut merged = 0;
    for seed in 0..40u64 {
        let (mut c, _o, w) = setup(4096);
        let mut h = vec![0u8; 4096];
        encode_header(&mut h, true, 1, 8);
        dev_write(&*w, 0, &h);
        let mut junk = vec![0u8; 8 * 4096];
        fill(seed, &mut junk);
        // Metadata area 0 (the first 4 KiB) gets entries that load: distinct old chunks of
        // the origin (128 chunks), distinct new chunks of the area's data (2..=257), in an
        // order and with runs that depend on the seed, and an end marker at a seed-chosen
        // place (or none). Every 4th seed mixes in wrong entries (past the origin, past the
        // area, repeated); every 8th keeps the random bytes.
        if seed % 8 != 7 {
            let end = (seed * 37 % 160) as usize;
            let (a, b) = (1 + 2 * (seed % 5), 1 + 2 * (seed % 7));
            for (i, e) in junk[..4096].chunks_mut(16).enumerate() {
                let i = i as u64;
                let (mut old, mut new) = ((i * a + seed) % 128, 2 + (i * b + seed) % 256);
                if seed % 4 == 3 && i % 29 == 5 {
                    (old, new) = (old + 120 * (i % 2), new + 250 * (i % 3));
                }
                e[0..8].copy_from_slice(&old.to_le_bytes());
                e[8..16].copy_from_slice(&new.to_le_bytes());
                if i as usize == end {
                    e.fill(0);
                }
            }
        }
        dev_write(&*w, 8, &junk);
        let Ok(s) = c.snapshot(O, "o c P 8") else {
            continue;
        };
        activate(&*s);
        read_or_eio(&*s, seed, "snapshot read");
        status_is_well_formed(&s.status(), seed);
        drop(s);
        if let Ok(m) = c.merge(O, "o c P 8") {
            activate(&*m);
            for _ in 0..100 {
                let st = m.status();
                status_is_well_formed(&st, seed);
                if st == "Merge failed" || st.starts_with("16/") {
                    break;
                }
                std::thread::sleep(std::time::Duration::from_millis(2));
            }
            read_or_eio(&*m, seed, "snapshot-merge read");
            merged += 1;
            // Stopping joins the merge worker.
            m.presuspend();
            m.postsuspend();
        }
        watch.assert_none();
    }
    // Most stores load (a test where every constructor refused would check nothing).
    assert!(merged >= 20, "only {merged} of 40 stores loaded and merged");
}

/// Block status of a snapshot: the origin's, except where an exception holds the chunk (data,
/// even where the origin has since become a hole). `udm backup` stores zero clusters from it.
#[test]
fn block_status_follows_origin_and_exceptions() {
    use udm_io::{BlockDevice, Extent, ExtentKind};
    let mut c = Ctx::new();
    let o = c.mem("o", O);
    c.mem("c", 4096);
    dev_write(&*o, 0, &pattern(1, 0, 64));
    let org = c.origin(O, "o").unwrap();
    let s = c.snapshot(O, "o c P 8").unwrap();
    activate(&*s);
    let ext = |sectors, kind| Extent { sectors, kind };
    let before = vec![ext(64, ExtentKind::Data), ext(O - 64, ExtentKind::HoleZero)];
    assert_eq!(s.block_status(0, O).unwrap(), before);
    assert_eq!(
        org.block_status(0, O).unwrap(),
        before,
        "the origin passes its status on"
    );
    // Origin writes into the hole and over the first chunk copy out first; then the first
    // chunk becomes a hole underneath (snapshot-origin takes no discards, as in the kernel).
    write(&*org, 512, &pattern(2, 512, 8)).unwrap();
    write(&*org, 0, &pattern(3, 0, 8)).unwrap();
    flush(&*org).unwrap();
    o.submit(Bio::discard(0, 8)).unwrap();
    assert_eq!(
        o.block_status(0, 8).unwrap(),
        vec![ext(8, ExtentKind::HoleZero)],
        "the origin's first chunk is a hole now"
    );
    assert_eq!(
        s.block_status(0, O).unwrap(),
        vec![
            ext(64, ExtentKind::Data),
            ext(448, ExtentKind::HoleZero),
            ext(8, ExtentKind::Data),
            ext(O - 520, ExtentKind::HoleZero),
        ]
    );
    // A range inside a chunk, and past the origin's status.
    assert_eq!(
        s.block_status(514, 4).unwrap(),
        vec![ext(4, ExtentKind::Data)]
    );
    assert_eq!(
        read(&*s, 0, 8).unwrap(),
        pattern(1, 0, 8),
        "the snapshot still reads the old data"
    );
    // The copied chunk at sector 512 becomes a hole on the origin too: still data in the
    // snapshot (its exception), the chunks around it the origin's holes.
    o.submit(Bio::discard(512, 8)).unwrap();
    assert_eq!(
        s.block_status(256, 512).unwrap(),
        vec![
            ext(256, ExtentKind::HoleZero),
            ext(8, ExtentKind::Data),
            ext(248, ExtentKind::HoleZero),
        ]
    );
}

#[test]
fn a_long_run_of_chunks_merges_in_pieces() {
    // 15.5 MiB rewritten in order: 496 consecutive 32 KiB exceptions, merged in one step whose
    // copy goes in 2 MiB pieces, the last one shorter.
    const LEN: u64 = 31744;
    let mut c = Ctx::new();
    let o = c.mem("o", LEN);
    let w = c.mem("c", LEN + 4096);
    dev_write(&*o, 0, &pattern(1, 0, LEN));
    let org = c.origin(LEN, "o").unwrap();
    let s = c.snapshot(LEN, "o c P 64").unwrap();
    activate(&*s);
    write(&*org, 0, &pattern(2, 0, LEN)).unwrap();
    flush(&*org).unwrap();
    let (writes, durable) = (o.count(BioKind::Write), w.flag_count(udm_io::BioFlags::FUA));
    let m = start_merge_of(&mut c, org, &*s, LEN, 64);
    wait_merged(&*m);
    assert!(
        dev_read(&*o, 0, LEN) == pattern(1, 0, LEN),
        "merged data differs"
    );
    // One step for the whole run (8 origin writes of at most 2 MiB), its commit durable.
    assert_eq!(
        o.count(BioKind::Write) - writes,
        8,
        "not merged in one step"
    );
    assert!(
        w.flag_count(udm_io::BioFlags::FUA) > durable,
        "the merge commit was not FUA"
    );
}

#[test]
fn a_suspended_merge_stops_and_a_resumed_one_goes_on() {
    let (mut c, o, _w) = setup(4096);
    let img = dev_read(&*o, 0, O);
    let org = c.origin(O, "o").unwrap();
    let s = c.snapshot(O, "o c P 8").unwrap();
    activate(&*s);
    // Chunks rewritten last to first: no two exceptions consecutive, one chunk per step.
    for chunk in (0..O / 8).rev() {
        write(&*org, chunk * 8, &pattern(3, chunk * 8, 8)).unwrap();
    }
    // Each step writes and flushes the origin: 4 ms each.
    o.set_latency(std::time::Duration::from_millis(2));
    let m = start_merge_of(&mut c, org, &*s, O, 8);
    let first = m.status();
    let t = std::time::Instant::now();
    while m.status() == first && t.elapsed().as_secs() < 10 {
        std::thread::sleep(std::time::Duration::from_millis(1));
    }
    m.presuspend();
    m.postsuspend();
    let stopped = m.status();
    assert_ne!(stopped, first, "the merge made no progress");
    std::thread::sleep(std::time::Duration::from_millis(100));
    assert_eq!(m.status(), stopped, "the merge went on while suspended");
    o.set_latency(std::time::Duration::ZERO);
    m.preresume().unwrap();
    m.resume();
    assert_eq!(wait_merged(&*m), "16/4096 16");
    assert!(dev_read(&*o, 0, O) == img, "merged data differs");
}
