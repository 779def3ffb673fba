//! Crash test: the origin and COW devices model a volatile write cache (writes are durable only
//! after a flush, a PREFLUSH or with FUA) and a crash after the N-th write (later writes are
//! dropped; each unflushed write survives or not at random). After reloading the store from the
//! surviving bytes, the snapshot must show exactly the point-in-time image, and every origin
//! write made durable before the crash must be there.
#![allow(clippy::unwrap_used)] // test helpers outside #[test] fns unwrap too

mod snapshot_common;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use parking_lot::Mutex;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use snapshot_common::*;
use udm_io::backend::mem::MemDevice;
use udm_io::{Bio, BioFlags, BioOp, BlockDevice, IoError};
use udm_target::Target;

struct Clock {
    writes: AtomicU64,
    limit: u64,
}

impl Clock {
    fn tick(&self) -> bool {
        self.writes.fetch_add(1, Ordering::SeqCst) < self.limit
    }
    fn crashed(&self) -> bool {
        self.writes.load(Ordering::SeqCst) >= self.limit
    }
}

struct CState {
    view: Vec<u8>,
    durable: Vec<u8>,
    /// Writes since the last flush, in order; FUA ones must survive, the others may.
    volatile: Vec<(usize, Vec<u8>, bool)>,
}

struct CrashDev {
    clock: Arc<Clock>,
    st: Mutex<CState>,
}

impl CrashDev {
    fn new(clock: Arc<Clock>, init: Vec<u8>) -> Self {
        CrashDev {
            clock,
            st: Mutex::new(CState {
                view: init.clone(),
                durable: init,
                volatile: Vec::new(),
            }),
        }
    }

    fn persist(st: &mut CState) {
        for (off, d, _) in std::mem::take(&mut st.volatile) {
            st.durable[off..off + d.len()].copy_from_slice(&d);
        }
    }

    fn survivors(&self, rng: &mut StdRng) -> Vec<u8> {
        let st = self.st.lock();
        let mut out = st.durable.clone();
        for (off, d, fua) in &st.volatile {
            if *fua || rng.gen_bool(0.5) {
                out[*off..off + d.len()].copy_from_slice(d);
            }
        }
        out
    }
}

impl BlockDevice for CrashDev {
    fn size(&self) -> u64 {
        self.st.lock().view.len() as u64 / 512
    }

    fn submit(&self, bio: Bio<'_>) -> Result<(), IoError> {
        udm_io::device::check_range(&bio, self.size())?;
        let mut st = self.st.lock();
        let off = (bio.sector * 512) as usize;
        let data: Vec<u8> = match &bio.op {
            BioOp::Read(_) => Vec::new(),
            BioOp::Write(b) => b.to_vec(),
            BioOp::Flush => {
                if !self.clock.crashed() {
                    Self::persist(&mut st);
                }
                return Ok(());
            }
            BioOp::Discard(n) | BioOp::WriteZeroes(n) => vec![0u8; (*n * 512) as usize],
        };
        if let BioOp::Read(buf) = bio.op {
            let n = buf.len();
            buf.copy_from_slice(&st.view[off..off + n]);
            return Ok(());
        }
        st.view[off..off + data.len()].copy_from_slice(&data);
        if self.clock.tick() {
            if bio.flags.contains(BioFlags::PREFLUSH) {
                Self::persist(&mut st);
            }
            let fua = bio.flags.contains(BioFlags::FUA);
            st.volatile.push((off, data, fua));
        }
        Ok(())
    }
}

const OS: u64 = 4096;
const CS: u64 = 8192;

/// An origin and an active persistent snapshot (chunk 8) on crash devices that stop after
/// `limit` writes; the origin starts with `init`.
struct Rig {
    init: Vec<u8>,
    clock: Arc<Clock>,
    o: Arc<CrashDev>,
    w: Arc<CrashDev>,
    org: Box<dyn Target>,
    s: Box<dyn Target>,
    _c: Ctx,
}

fn rig(seed: u64, limit: u64) -> Rig {
    let mut init = vec![0u8; (OS * 512) as usize];
    fill(seed, &mut init);
    let clock = Arc::new(Clock {
        writes: AtomicU64::new(0),
        limit,
    });
    let o = Arc::new(CrashDev::new(clock.clone(), init.clone()));
    let w = Arc::new(CrashDev::new(clock.clone(), vec![0u8; (CS * 512) as usize]));
    let mut c = Ctx::new();
    c.add("o", o.clone());
    c.add("c", w.clone());
    let org = c.origin(OS, "o").unwrap();
    let s = c.snapshot(OS, "o c P 8").unwrap();
    activate(&*s);
    Rig {
        init,
        clock,
        o,
        w,
        org,
        s,
        _c: c,
    }
}

/// Runs the workload with a crash after `limit` writes; returns the total number of writes
/// the workload would issue, after checking the invariants when a crash happened.
fn run(seed: u64, limit: u64) -> u64 {
    let mut rng = StdRng::seed_from_u64(seed);
    let Rig {
        init,
        clock,
        o,
        w,
        org,
        s,
        _c,
    } = rig(seed, limit);
    // Per sector: the durable origin content, and whether a later write may or may not have
    // survived.
    let mut durable = init.clone();
    let mut current = init.clone();
    let mut dirty = vec![false; OS as usize];
    for _ in 0..240 {
        let sector = rng.gen_range(0..OS - 32);
        let n = rng.gen_range(1..=32u64);
        let mut d = vec![0u8; (n * 512) as usize];
        fill(rng.gen(), &mut d);
        let fua = rng.gen_bool(0.2);
        let flags = if fua {
            BioFlags::FUA
        } else {
            BioFlags::empty()
        };
        org.map(Bio::write(sector, &d).with_flags(flags)).unwrap();
        let a = (sector * 512) as usize;
        current[a..a + d.len()].copy_from_slice(&d);
        let done_before_crash = !clock.crashed();
        for x in sector..sector + n {
            dirty[x as usize] = true;
        }
        if fua && done_before_crash {
            durable[a..a + d.len()].copy_from_slice(&d);
            for x in sector..sector + n {
                dirty[x as usize] = false;
            }
        }
        if rng.gen_bool(0.1) {
            org.map(Bio::flush()).unwrap();
            if !clock.crashed() {
                durable.copy_from_slice(&current);
                dirty.fill(false);
            }
        }
    }
    let total = clock.writes.load(Ordering::SeqCst);
    if total < limit {
        return total;
    }
    drop(s);
    drop(org);
    // Reload from the surviving bytes.
    let so = o.survivors(&mut rng);
    let sw = w.survivors(&mut rng);
    for x in 0..OS as usize {
        if !dirty[x] {
            assert!(
                so[x * 512..(x + 1) * 512] == durable[x * 512..(x + 1) * 512],
                "seed {seed} crash after {limit} writes: durable origin sector {x} lost"
            );
        }
    }
    reopen_and_check(
        &so,
        &sw,
        &init,
        &format!("seed {seed} crash after {limit} writes"),
    );
    total
}

/// Rebuilds origin and COW from the bytes that survived a crash, reopens the snapshot and
/// checks it is valid and exactly the point-in-time image `init`.
fn reopen_and_check(origin: &[u8], cow: &[u8], init: &[u8], what: &str) {
    let mo = Arc::new(MemDevice::new(OS));
    dev_write(&*mo, 0, origin);
    let mw = Arc::new(MemDevice::new(CS));
    dev_write(&*mw, 0, cow);
    let mut c2 = Ctx::new();
    c2.add("o", mo);
    c2.add("c", mw);
    let s = c2.snapshot(OS, "o c P 8").unwrap();
    let st = s.status();
    assert!(!st.starts_with("Invalid"), "{what}: {st}");
    activate(&*s);
    let view = read(&*s, 0, OS).unwrap();
    assert!(
        view == init,
        "{what}: snapshot image differs from the point in time"
    );
}

#[test]
fn crash_at_random_points_keeps_point_in_time_image() {
    let mut points = 0;
    for seed in 0..3u64 {
        let total = run(seed, u64::MAX);
        assert!(total > 300, "workload too small: {total} writes");
        let mut rng = StdRng::seed_from_u64(1000 + seed);
        for _ in 0..18 {
            let limit = rng.gen_range(0..total);
            run(seed, limit);
            points += 1;
        }
        // Edges: right at the start, right at the end.
        run(seed, 0);
        run(seed, total - 1);
        points += 2;
    }
    assert!(points >= 50);
}

/// Several origin writers at once (group commit: area writes shared, taken and written outside
/// the store's lock, areas filling up), crash after `limit` writes: the reloaded snapshot must
/// still be the point-in-time image. Returns the number of writes issued.
fn run_concurrent(seed: u64, limit: u64) -> u64 {
    const THREADS: u64 = 4;
    let Rig {
        init,
        clock,
        o,
        w,
        org,
        s,
        _c,
    } = rig(seed, limit);
    let org = &*org;
    std::thread::scope(|sc| {
        for t in 0..THREADS {
            sc.spawn(move || {
                let mut rng = StdRng::seed_from_u64(seed * 100 + t);
                let region = OS / THREADS;
                for _ in 0..50 {
                    let n = rng.gen_range(1..=32u64);
                    let sector = t * region + rng.gen_range(0..region - n);
                    let mut d = vec![0u8; (n * 512) as usize];
                    fill(rng.gen(), &mut d);
                    org.map(Bio::write(sector, &d)).unwrap();
                }
            });
        }
    });
    let total = clock.writes.load(Ordering::SeqCst);
    if total < limit {
        return total;
    }
    drop(s);
    let mut rng = StdRng::seed_from_u64(seed ^ limit);
    let so = o.survivors(&mut rng);
    let sw = w.survivors(&mut rng);
    reopen_and_check(
        &so,
        &sw,
        &init,
        &format!("seed {seed} crash after {limit} writes (concurrent)"),
    );
    total
}

#[test]
fn concurrent_writers_crash_keeps_point_in_time_image() {
    for seed in 0..3u64 {
        let total = run_concurrent(seed, u64::MAX);
        assert!(total > 200, "workload too small: {total} writes");
        let mut rng = StdRng::seed_from_u64(2000 + seed);
        for _ in 0..15 {
            run_concurrent(seed, rng.gen_range(0..total));
        }
        run_concurrent(seed, total - 1);
    }
}
