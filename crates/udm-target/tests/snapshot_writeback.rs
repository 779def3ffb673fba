//! The origin's write-back (held writes) as clients see it, while the COW's commit is held at a
//! gate so the held writes cannot reach the origin: reads lay held data over the origin's,
//! a write overlapping a held write waits for it and lands after it, a disjoint or adjacent
//! write does not wait, a flush waits for every held write, the memory held is bounded, and a
//! transient snapshot being destroyed is not filled with the copies still queued for it.
//! Written for the mutation-testing pass (scripts/mutants.sh) of `writeback.rs`.
#![allow(clippy::unwrap_used)] // test helpers outside #[test] fns unwrap too

mod snapshot_common;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use snapshot_common::gate::{wait_for, GateDev};
use snapshot_common::*;
use udm_io::backend::mem::{Fault, MemDevice};
use udm_io::{BioKind, BlockDevice};
use udm_target::writeback::{held_limit, set_held_limit, MAX_HELD_BYTES, MAX_HELD_WRITES};
use udm_target::Target;
use udm_types::errno::HasErrno;
use udm_types::Errno;

/// An origin of `os` sectors (pattern 1) with an active persistent snapshot of chunk size
/// `chunk` on a gated COW.
struct Rig {
    c: Ctx,
    cow: Arc<GateDev>,
    org: Box<dyn Target>,
    snap: Box<dyn Target>,
}

/// Opens the gate first: a failed test must not leave the origin's drop (which settles the
/// held writes) waiting for it.
impl Drop for Rig {
    fn drop(&mut self) {
        self.cow.set_closed(false);
    }
}

fn rig(os: u64, chunk: u64) -> Rig {
    rig_with_origin(os, chunk).0
}

/// [`rig`], also returning the origin's memory device (for faults and latency).
fn rig_with_origin(os: u64, chunk: u64) -> (Rig, Arc<MemDevice>) {
    rig_with_store(os, chunk, "P")
}

/// [`rig_with_origin`] with a snapshot of the given store kind (`P`, `PO` or `N`).
fn rig_with_store(os: u64, chunk: u64, store: &str) -> (Rig, Arc<MemDevice>) {
    let mut c = Ctx::new();
    let o = c.mem("o", os);
    let mut img = vec![0u8; (os * 512) as usize];
    fill(1, &mut img);
    dev_write(&*o, 0, &img);
    let cow = Arc::new(GateDev::new(os * 2 + 4096));
    c.add("c", cow.clone());
    let org = c.origin(os, "o").unwrap();
    let snap = c.snapshot(os, &format!("o c {store} {chunk}")).unwrap();
    activate(&*snap);
    (Rig { c, cow, org, snap }, o)
}

impl Rig {
    fn origin_dev(&self) -> &dyn BlockDevice {
        &*self.c.devs["o"].dev
    }

    /// Closes the gate and holds a write of pattern `seed` at `sector` (one that copies a
    /// chunk), waiting until its commit is stuck at the gate.
    fn hold(&self, seed: u64, sector: u64, sectors: u64) {
        self.cow.set_closed(true);
        let before = self.cow.blocked.load(Ordering::SeqCst);
        write(&*self.org, sector, &pattern(seed, sector, sectors)).unwrap();
        wait_for("the commit to reach the gate", || {
            self.cow.blocked.load(Ordering::SeqCst) > before
        });
    }
}

/// Writes `data` at `sector` on a thread and fails unless it is acknowledged within 5 s while
/// the gate is closed (opening the gate first, so that no thread stays blocked).
fn acked(r: &Rig, sector: u64, data: &[u8]) {
    let done = AtomicBool::new(false);
    let ok = std::thread::scope(|s| {
        s.spawn(|| {
            write(&*r.org, sector, data).unwrap();
            done.store(true, Ordering::SeqCst);
        });
        let t = Instant::now();
        while !done.load(Ordering::SeqCst) && t.elapsed() < Duration::from_secs(5) {
            std::thread::sleep(Duration::from_millis(2));
        }
        let ok = done.load(Ordering::SeqCst);
        if !ok {
            r.cow.set_closed(false);
        }
        ok
    });
    assert!(ok, "the write at sector {sector} waited for a held write");
}

/// True when the thread that sets `done` is still running after a grace period (it waits).
fn still_waits(done: &AtomicBool) -> bool {
    std::thread::sleep(Duration::from_millis(300));
    !done.load(Ordering::SeqCst)
}

#[test]
fn reads_lay_held_writes_over_the_origin() {
    let r = rig(256, 8);
    let old = dev_read(r.origin_dev(), 0, 256);
    let sec = |s: u64, n: u64| old[(s * 512) as usize..((s + n) * 512) as usize].to_vec();
    r.hold(2, 12, 8);
    let new = pattern(2, 12, 8);
    // The origin does not have it yet; reads through the origin target do.
    assert_eq!(dev_read(r.origin_dev(), 12, 8), sec(12, 8));
    let got = read(&*r.org, 8, 16).unwrap();
    assert_eq!(&got[..4 * 512], &sec(8, 4)[..], "before the held write");
    assert_eq!(&got[4 * 512..12 * 512], &new[..], "the held write");
    assert_eq!(&got[12 * 512..], &sec(20, 4)[..], "after the held write");
    // Reads covering part of it, from either side or inside.
    assert_eq!(read(&*r.org, 14, 2).unwrap(), pattern(2, 14, 2));
    let got = read(&*r.org, 16, 8).unwrap();
    assert_eq!(&got[..4 * 512], &pattern(2, 16, 4)[..]);
    assert_eq!(&got[4 * 512..], &sec(20, 4)[..]);
    let got = read(&*r.org, 10, 4).unwrap();
    assert_eq!(&got[..2 * 512], &sec(10, 2)[..]);
    assert_eq!(&got[2 * 512..], &pattern(2, 12, 2)[..]);
    // Reads next to it see the origin only.
    assert_eq!(read(&*r.org, 4, 8).unwrap(), sec(4, 8));
    assert_eq!(read(&*r.org, 20, 8).unwrap(), sec(20, 8));
    r.cow.set_closed(false);
    flush(&*r.org).unwrap();
    assert_eq!(dev_read(r.origin_dev(), 12, 8), new);
    assert_eq!(read(&*r.snap, 12, 8).unwrap(), sec(12, 8));
}

/// Writes next to a held write (one that copies a chunk, one whose chunk is already copied)
/// are not held up by it; a write overlapping it where no chunk is left to copy is held
/// behind it (acknowledged without waiting for its commit), reads see both in order, and it
/// reaches the origin after it.
#[test]
fn writes_over_a_held_write_are_held_behind_it() {
    let r = rig(256, 8);
    // Chunks 1 and 2 are copied and committed: writes there go straight to the origin.
    write(&*r.org, 8, &pattern(5, 8, 16)).unwrap();
    flush(&*r.org).unwrap();
    // Held: chunk 3 needs its copy.
    r.hold(2, 16, 16);
    acked(&r, 8, &pattern(3, 8, 8));
    assert_eq!(dev_read(r.origin_dev(), 8, 8), pattern(3, 8, 8));
    acked(&r, 32, &pattern(4, 32, 8));
    acked(&r, 12, &pattern(6, 12, 8));
    assert_eq!(
        dev_read(r.origin_dev(), 12, 8),
        pattern(3, 12, 4)
            .into_iter()
            .chain(pattern(5, 16, 4))
            .collect::<Vec<u8>>(),
        "not on the origin before the held write it overlaps"
    );
    let got = read(&*r.org, 8, 24).unwrap();
    assert_eq!(&got[..4 * 512], &pattern(3, 8, 4)[..]);
    assert_eq!(
        &got[4 * 512..12 * 512],
        &pattern(6, 12, 8)[..],
        "the later write on top"
    );
    assert_eq!(&got[12 * 512..], &pattern(2, 20, 12)[..]);
    r.cow.set_closed(false);
    flush(&*r.org).unwrap();
    // The later write wins where they overlap.
    assert_eq!(dev_read(r.origin_dev(), 8, 4), pattern(3, 8, 4));
    assert_eq!(dev_read(r.origin_dev(), 12, 8), pattern(6, 12, 8));
    assert_eq!(dev_read(r.origin_dev(), 20, 12), pattern(2, 20, 12));
    assert_eq!(dev_read(r.origin_dev(), 32, 8), pattern(4, 32, 8));
}

#[test]
fn a_flush_waits_for_held_writes() {
    let r = rig(256, 8);
    r.hold(2, 32, 8);
    let done = AtomicBool::new(false);
    std::thread::scope(|s| {
        let (org, done) = (&*r.org, &done);
        s.spawn(move || {
            flush(org).unwrap();
            done.store(true, Ordering::SeqCst);
        });
        let waited = still_waits(done);
        r.cow.set_closed(false);
        assert!(waited, "a flush did not wait for a held write");
    });
    assert_eq!(dev_read(r.origin_dev(), 32, 8), pattern(2, 32, 8));
}

/// Exactly the configured bound may be held; one more write waits for the commit. The test
/// sets a bound below the default (the only test here that changes it; the others hold less).
#[test]
fn held_memory_is_bounded() {
    set_held_limit(8 << 20);
    let limit = held_limit();
    assert!(limit < MAX_HELD_BYTES);
    let half = (limit / 2 / 512) as u64;
    let r = rig(2 * half + 256, 256);
    let mut data = vec![0u8; limit / 2];
    fill(7, &mut data);
    r.cow.set_closed(true);
    acked(&r, 0, &data);
    acked(&r, half, &data);
    let done = AtomicBool::new(false);
    std::thread::scope(|s| {
        let (org, done) = (&*r.org, &done);
        s.spawn(move || {
            write(org, 2 * half, &pattern(8, 2 * half, 8)).unwrap();
            done.store(true, Ordering::SeqCst);
        });
        let waited = still_waits(done);
        r.cow.set_closed(false);
        assert!(waited, "more than the bound was held");
    });
    flush(&*r.org).unwrap();
    assert_eq!(dev_read(r.origin_dev(), half, half), data);
    assert_eq!(
        dev_read(r.origin_dev(), 2 * half, 8),
        pattern(8, 2 * half, 8)
    );
}

/// At most [`MAX_HELD_WRITES`] writes are held, however small: one more waits for the commit.
#[test]
fn held_writes_are_bounded_in_number() {
    let n = MAX_HELD_WRITES as u64;
    let r = rig((n + 2) * 8, 8);
    r.cow.set_closed(true);
    let done = AtomicBool::new(false);
    std::thread::scope(|s| {
        let (org, done) = (&*r.org, &done);
        s.spawn(move || {
            for i in 0..n {
                write(org, i * 8, &pattern(3, i * 8, 1)).unwrap();
            }
            done.store(true, Ordering::SeqCst);
        });
        wait_for("the bound's worth of writes acknowledged", || {
            done.load(Ordering::SeqCst)
        });
    });
    let done = AtomicBool::new(false);
    std::thread::scope(|s| {
        let (org, done) = (&*r.org, &done);
        s.spawn(move || {
            write(org, n * 8, &pattern(4, n * 8, 1)).unwrap();
            done.store(true, Ordering::SeqCst);
        });
        let waited = still_waits(done);
        r.cow.set_closed(false);
        assert!(waited, "more writes than the bound were held");
    });
    flush(&*r.org).unwrap();
    assert_eq!(dev_read(r.origin_dev(), 5 * 8, 1), pattern(3, 5 * 8, 1));
    assert_eq!(dev_read(r.origin_dev(), n * 8, 1), pattern(4, n * 8, 1));
}

/// A single write larger than [`MAX_HELD_BYTES`] is held alone instead of waiting forever.
#[test]
fn a_write_over_the_bound_is_held_alone() {
    let over = MAX_HELD_BYTES / 512 + 128;
    let r = rig(over as u64 + 256, 256);
    let mut data = vec![0u8; over * 512];
    fill(9, &mut data);
    write(&*r.org, 0, &data).unwrap();
    flush(&*r.org).unwrap();
    assert_eq!(dev_read(r.origin_dev(), 0, over as u64), data);
}

/// Writes held together reach the origin in parts: a flush returns only once every one of
/// them is there, and reports (once) the one the origin refused, in whichever part it was.
#[test]
fn a_batch_of_held_writes_is_applied_whole_and_a_failure_is_reported() {
    // The first write's commit waits at the gate with that write alone; the other 73 are
    // committed together after it: a part of 64 writes and one of 9.
    let n = 74u64;
    let (r, o) = rig_with_origin(n * 8 + 256, 8);
    let bad = 70 * 8;
    o.inject(Fault::range(bad, bad + 8, Errno::EIO).ops(&[BioKind::Write]));
    r.cow.set_closed(true);
    for i in 0..n {
        acked(&r, i * 8, &pattern(30 + i, i * 8, 8));
    }
    // Slow origin writes: the parts are still being applied when the flush arrives.
    o.set_latency(Duration::from_micros(300));
    r.cow.set_closed(false);
    let e = flush(&*r.org).expect_err("the refused held write was not reported");
    assert_eq!(e.errno(), Errno::EIO, "{e}");
    // Last written first, still slow: a part not yet applied is found before it could be.
    for i in (0..n).rev().filter(|&i| i * 8 != bad) {
        assert_eq!(
            dev_read(&*o, i * 8, 8),
            pattern(30 + i, i * 8, 8),
            "held write {i} was not on the origin when the flush returned"
        );
    }
    flush(&*r.org).expect("the failure is reported once");
    o.set_latency(Duration::ZERO);
}

/// A write whose buffer is lent (as the NBD export lends its payloads) is held without a copy:
/// the write-back keeps the buffer itself until the write is on the origin, then lets it go,
/// and what reaches the origin is the buffer's data. A small part of a larger lent buffer is
/// copied instead (it would pin the whole buffer).
#[test]
fn held_writes_keep_a_lent_buffer_instead_of_copying_it() {
    let r = rig(256, 8);
    r.cow.set_closed(true);
    let lent: udm_io::LentBuf = Arc::new(pattern(3, 40, 8));
    r.org
        .map(udm_io::Bio::write(40, &lent).lend(&lent))
        .unwrap();
    assert_eq!(
        Arc::strong_count(&lent),
        3,
        "kept by the queue and the held ranges"
    );
    assert_eq!(
        read(&*r.org, 40, 8).unwrap(),
        *lent,
        "reads see the held data"
    );
    // Another chunk's write from the first sector of a 4-sector lent buffer: copied.
    let big: udm_io::LentBuf = Arc::new(pattern(4, 80, 4));
    r.org
        .map(udm_io::Bio::write(80, &big[..512]).lend(&big))
        .unwrap();
    assert_eq!(
        Arc::strong_count(&big),
        1,
        "a quarter of the buffer is copied"
    );
    r.cow.set_closed(false);
    flush(&*r.org).unwrap();
    assert_eq!(Arc::strong_count(&lent), 1, "released once on the origin");
    assert_eq!(dev_read(r.origin_dev(), 40, 8), *lent);
    assert_eq!(dev_read(r.origin_dev(), 80, 1), big[..512]);
}

/// A transient snapshot destroyed while origin writes wait for their copies into it (held
/// because a persistent snapshot needs copies too): the copies not yet made are skipped
/// (nobody can read it any more), the writes still reach the origin, and the destructor does
/// not wait for a queue of copies.
#[test]
fn a_dropped_transient_snapshot_is_not_filled_with_queued_copies() {
    const OS: u64 = 1024;
    let mut c = Ctx::new();
    let o = c.mem("o", OS);
    let cow = Arc::new(GateDev::new(OS * 2));
    c.add("c", cow.clone());
    c.mem("p", OS * 2);
    let org = c.origin(OS, "o").unwrap();
    let snap = c.snapshot(OS, "o c N 8").unwrap();
    let keep = c.snapshot(OS, "o p P 8").unwrap();
    activate(&*snap);
    activate(&*keep);
    // Every origin read (the copies) and write (applying) takes 40 ms.
    o.set_latency(Duration::from_millis(40));
    let chunks: Vec<u64> = (0..20).map(|i| i * 32).collect();
    let t0 = Instant::now();
    for &s in &chunks {
        write(&*org, s, &pattern(7, s, 8)).unwrap();
    }
    assert!(
        t0.elapsed() < Duration::from_millis(500),
        "held, not copied inline"
    );
    drop(snap);
    let copies = cow.data_writes.load(Ordering::SeqCst);
    assert!(
        copies <= 3,
        "{copies} of 20 copies made after the destructor began"
    );
    o.set_latency(Duration::ZERO);
    flush(&*org).unwrap();
    for &s in &chunks {
        assert_eq!(dev_read(&*o, s, 8), pattern(7, s, 8), "held write at {s}");
    }
    let zeros = vec![0u8; (OS * 512) as usize];
    assert!(
        read(&*keep, 0, OS).unwrap() == zeros,
        "the persistent snapshot lost its data"
    );
}

/// A write whose copies all go to transient stores is copied and written by its writer (a
/// transient store has nothing to make durable, so nothing is held): when it returns, the
/// COW holds the old chunk and the origin the new data, with no write-back in between.
#[test]
fn writes_copying_only_into_transient_stores_are_not_held() {
    const OS: u64 = 1024;
    let (r, o) = rig_with_store(OS, 8, "N");
    for (i, s) in [0u64, 64, 512].into_iter().enumerate() {
        write(&*r.org, s, &pattern(7, s, 8)).unwrap();
        assert_eq!(
            r.cow.data_writes.load(Ordering::SeqCst),
            i as u64 + 1,
            "copy of {s} made"
        );
        assert_eq!(
            dev_read(&*o, s, 8),
            pattern(7, s, 8),
            "write at {s} on the origin"
        );
    }
    let mut img = vec![0u8; (OS * 512) as usize];
    fill(1, &mut img);
    assert!(
        read(&*r.snap, 0, OS).unwrap() == img,
        "the snapshot lost its data"
    );
}

/// A write over a run of fresh chunks copies them with one COW write (their exceptions are
/// allocated in order), a run longer than the copy limit (8192 sectors) with one write per
/// limit, and every chunk lands in its own exception. (Exceptions are contiguous within a
/// metadata area: 256 of 8-sector chunks, 2048 of 64-sector ones.)
#[test]
fn runs_of_chunks_are_copied_with_one_write_each() {
    for (chunk, at, len, writes) in [(8u64, 64u64, 128u64, 1u64), (64, 1024, 16384, 2)] {
        let r = rig(20480, chunk);
        let before = r.cow.data_writes.load(Ordering::SeqCst);
        write(&*r.org, at, &pattern(9, at, len)).unwrap();
        flush(&*r.org).unwrap();
        assert_eq!(
            r.cow.data_writes.load(Ordering::SeqCst) - before,
            writes,
            "{len} sectors of {chunk}-sector chunks in a row not copied with {writes} write(s)"
        );
        let mut img = vec![0u8; 20480 * 512];
        fill(1, &mut img);
        assert!(
            read(&*r.snap, 0, 20480).unwrap() == img,
            "the snapshot lost its data"
        );
        assert_eq!(dev_read(r.origin_dev(), at, len), pattern(9, at, len));
    }
}

/// A snapshot read of unchanged chunks is one origin read per run of them, split only at a
/// chunk with an exception (read from the COW), from whatever sector it starts at.
#[test]
fn snapshot_reads_go_to_the_origin_in_runs() {
    let (r, o) = rig_with_origin(1024, 8);
    let mut img = vec![0u8; 1024 * 512];
    fill(1, &mut img);
    let sec = |s: u64, n: u64| img[(s * 512) as usize..((s + n) * 512) as usize].to_vec();
    let reads = |at: u64, n: u64| {
        let before = o.count(BioKind::Read);
        assert_eq!(read(&*r.snap, at, n).unwrap(), sec(at, n), "read {at}+{n}");
        o.count(BioKind::Read) - before
    };
    assert_eq!(reads(0, 128), 1, "16 unchanged chunks");
    assert_eq!(reads(4, 120), 1, "15 chunks, starting inside one");
    assert_eq!(reads(12, 3), 1, "inside one chunk");
    // Chunk 5 copied: origin 0..5, COW 5, origin 6..16.
    write(&*r.org, 40, &pattern(2, 40, 8)).unwrap();
    flush(&*r.org).unwrap();
    let cow = r.cow.inner.count(BioKind::Read);
    assert_eq!(reads(0, 128), 2, "16 chunks around a copied one");
    assert_eq!(r.cow.inner.count(BioKind::Read) - cow, 1);
}

/// A snapshot read waits only for the chunks it covers: the chunk after it, locked by an
/// origin write whose copy is not committed, does not hold it up.
#[test]
fn a_snapshot_read_does_not_wait_for_the_chunk_after_it() {
    let r = rig(1024, 8);
    r.hold(2, 128, 8);
    let done = AtomicBool::new(false);
    let waited = std::thread::scope(|s| {
        s.spawn(|| {
            read(&*r.snap, 0, 128).unwrap();
            done.store(true, Ordering::SeqCst);
        });
        let waited = still_waits(&done);
        r.cow.set_closed(false);
        waited
    });
    assert!(!waited, "a read of chunks 0-15 waited for chunk 16");
}

/// Several snapshots copying the same origin range for one write read it once; each still
/// gets its own copy.
#[test]
fn snapshots_copying_one_range_read_the_origin_once() {
    let mut c = Ctx::new();
    let o = c.mem("o", 2048);
    let mut img = vec![0u8; 2048 * 512];
    fill(1, &mut img);
    dev_write(&*o, 0, &img);
    let org = c.origin(2048, "o").unwrap();
    let mut snaps = Vec::new();
    for (cow, chunk) in [("c1", 8), ("c2", 8), ("c3", 16)] {
        c.mem(cow, 4096);
        let s = c.snapshot(2048, &format!("o {cow} P {chunk}")).unwrap();
        activate(&*s);
        snaps.push(s);
    }
    let reads = |at: u64, n: u64| {
        let before = o.count(BioKind::Read);
        write(&*org, at, &pattern(2, at, n)).unwrap();
        flush(&*org).unwrap();
        o.count(BioKind::Read) - before
    };
    assert_eq!(reads(512, 256), 1, "three snapshots, one range");
    assert_eq!(reads(520, 8), 0, "copied for all three already");
    // 8-sector chunks for two, a 16-sector one for the third: the 16 sectors are read once.
    assert_eq!(reads(1024, 4), 1, "8- and 16-sector chunks of one write");
    for s in &snaps {
        assert!(
            read(&**s, 0, 2048).unwrap() == img,
            "a snapshot lost its data"
        );
    }
    assert_eq!(dev_read(&*o, 1024, 4), pattern(2, 1024, 4));
    // A read failure is every snapshot's: each is invalidated, the origin write proceeds.
    o.inject(Fault::range(1536, 1552, Errno::EIO).ops(&[BioKind::Read]));
    write(&*org, 1536, &pattern(3, 1536, 8)).unwrap();
    flush(&*org).unwrap();
    o.clear_faults();
    assert_eq!(dev_read(&*o, 1536, 8), pattern(3, 1536, 8));
    for s in &snaps {
        assert_eq!(s.status(), "Invalid");
    }
}
