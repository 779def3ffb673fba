//! Model-based test: seeded random interleavings of origin writes, snapshot writes and reads of
//! both, over memory devices with small chunks, against a plain byte-array model that also
//! predicts exception allocation, full-COW invalidation, `PO` overflow and COW write failures.
//! A second test hammers one origin from several threads while others read the snapshot.
#![allow(clippy::unwrap_used)] // test helpers outside #[test] fns unwrap too

mod snapshot_common;

use std::sync::Arc;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use snapshot_common::*;
use udm_io::backend::mem::{Fault, MemDevice};
use udm_io::BioKind;
use udm_target::Target;
use udm_types::Errno;

const OS: u64 = 512;

#[derive(Clone, Copy, PartialEq)]
enum Kind {
    P,
    Po,
    N,
}

struct MSnap {
    kind: Kind,
    cs: u64,
    cap: usize,
    cow_sectors: u64,
    cow: Arc<MemDevice>,
    t: Box<dyn Target>,
    image: Vec<u8>,
    exc: std::collections::HashSet<u64>,
    valid: bool,
    overflowed: bool,
    cow_fail: bool,
}

impl MSnap {
    fn status(&self) -> String {
        if !self.valid {
            return "Invalid".into();
        }
        if self.overflowed {
            return "Overflow".into();
        }
        let n = self.exc.len() as u64;
        match self.kind {
            Kind::N => format!("{}/{} 0", n * self.cs, self.cow_sectors),
            _ => format!("{}/{} {}", (2 + n) * self.cs, self.cow_sectors, 2 * self.cs),
        }
    }

    /// A new exception is needed for chunk `c`; returns false when the snapshot fails.
    fn allocate(&mut self, c: u64, from_snapshot_write: bool, invalidations: &mut u64) -> bool {
        if self.exc.len() == self.cap {
            if from_snapshot_write && self.kind == Kind::Po {
                self.overflowed = true;
            } else {
                self.valid = false;
                *invalidations += 1;
            }
            return false;
        }
        if self.cow_fail {
            self.valid = false;
            *invalidations += 1;
            return false;
        }
        self.exc.insert(c);
        true
    }
}

fn run_seed(seed: u64) {
    let mut rng = StdRng::seed_from_u64(seed);
    let mut c = Ctx::new();
    let o = c.mem("o", OS);
    let mut init = vec![0u8; (OS * 512) as usize];
    fill(rng.gen(), &mut init);
    dev_write(&*o, 0, &init);
    let mut origin_model = init.clone();
    let org = c.origin(OS, "o").unwrap();
    let specs = [(Kind::P, 8u64), (Kind::Po, 16), (Kind::N, 8)];
    let mut snaps: Vec<MSnap> = Vec::new();
    for (i, (kind, cs)) in specs.iter().enumerate() {
        let cap = rng.gen_range(3..30usize);
        let chunks = match kind {
            Kind::N => cap as u64,
            _ => cap as u64 + 2,
        };
        let name = format!("c{i}");
        let cow = c.mem(&name, chunks * cs);
        let k = match kind {
            Kind::P => "P",
            Kind::Po => "PO",
            Kind::N => "N",
        };
        let t = c.snapshot(OS, &format!("o {name} {k} {cs}")).unwrap();
        activate(&*t);
        snaps.push(MSnap {
            kind: *kind,
            cs: *cs,
            cap,
            cow_sectors: chunks * cs,
            cow,
            t,
            image: origin_model.clone(),
            exc: Default::default(),
            valid: true,
            overflowed: false,
            cow_fail: false,
        });
    }
    let mut invalidations = 0u64;
    let fail_at = rng.gen_range(0..600);
    for step in 0..400 {
        if step == fail_at {
            snaps[0]
                .cow
                .inject(Fault::range(0, u64::MAX, Errno::EIO).ops(&[BioKind::Write]));
            snaps[0].cow_fail = true;
        }
        let op = rng.gen_range(0..10);
        let sector = rng.gen_range(0..OS);
        let len = rng.gen_range(1..=40u64.min(OS - sector));
        match op {
            0..=3 => {
                let mut data = vec![0u8; (len * 512) as usize];
                fill(rng.gen(), &mut data);
                write(&*org, sector, &data).unwrap();
                let invalidations_before = invalidations;
                // Model: per 8-sector piece (the smallest chunk), copy into every snapshot.
                let mut s = sector;
                while s < sector + len {
                    let end = ((s / 8 + 1) * 8).min(sector + len);
                    for m in snaps.iter_mut() {
                        if !m.valid {
                            continue;
                        }
                        let ch = s / m.cs;
                        if !m.exc.contains(&ch) {
                            m.allocate(ch, false, &mut invalidations);
                        }
                    }
                    let a = (s * 512) as usize;
                    let b = (end * 512) as usize;
                    let d0 = ((s - sector) * 512) as usize;
                    origin_model[a..b].copy_from_slice(&data[d0..d0 + (b - a)]);
                    s = end;
                }
                if invalidations != invalidations_before {
                    // A copy the COW refused invalidates once the write-back thread made it
                    // (asynchronously, as the kernel's kcopyd does): settle it.
                    flush(&*org).unwrap();
                }
            }
            4..=5 => {
                let i = rng.gen_range(0..snaps.len());
                let m = &mut snaps[i];
                let mut data = vec![0u8; (len * 512) as usize];
                fill(rng.gen(), &mut data);
                let r = write(&*m.t, sector, &data);
                let mut ok = true;
                let mut s = sector;
                while s < sector + len {
                    let end = ((s / m.cs + 1) * m.cs).min(sector + len);
                    if !m.valid || m.overflowed {
                        ok = false;
                        break;
                    }
                    let ch = s / m.cs;
                    if !m.exc.contains(&ch) && !m.allocate(ch, true, &mut invalidations) {
                        ok = false;
                        break;
                    }
                    if m.cow_fail {
                        ok = false;
                        break;
                    }
                    let a = (s * 512) as usize;
                    let b = (end * 512) as usize;
                    let d0 = ((s - sector) * 512) as usize;
                    m.image[a..b].copy_from_slice(&data[d0..d0 + (b - a)]);
                    s = end;
                }
                assert_eq!(
                    r.is_ok(),
                    ok,
                    "seed {seed} step {step}: snapshot {i} write {r:?}"
                );
            }
            6..=7 => {
                let i = rng.gen_range(0..snaps.len());
                let m = &snaps[i];
                let r = read(&*m.t, sector, len);
                if m.valid {
                    let a = (sector * 512) as usize;
                    let got = r.unwrap();
                    assert!(
                        got == m.image[a..a + got.len()],
                        "seed {seed} step {step}: snapshot {i} read {sector}+{len} differs"
                    );
                } else {
                    assert!(r.is_err());
                }
            }
            8 => {
                let a = (sector * 512) as usize;
                let got = read(&*org, sector, len).unwrap();
                assert!(
                    got == origin_model[a..a + got.len()],
                    "seed {seed} step {step}: origin"
                );
            }
            _ => {
                // Origin writes are acknowledged before their exceptions are allocated
                // (write-back): statuses are exact once a flush settled them.
                flush(&*org).unwrap();
                for (i, m) in snaps.iter().enumerate() {
                    assert_eq!(
                        m.t.status(),
                        m.status(),
                        "seed {seed} step {step}: status of {i}"
                    );
                    if m.valid {
                        assert!(
                            read(&*m.t, 0, OS).unwrap() == m.image,
                            "seed {seed} step {step}: image {i}"
                        );
                    }
                }
                assert_eq!(c.events(), invalidations, "seed {seed} step {step}: events");
            }
        }
    }
    flush(&*org).unwrap();
    for (i, m) in snaps.iter().enumerate() {
        assert_eq!(m.t.status(), m.status(), "seed {seed} end: status of {i}");
    }
    assert!(dev_read(&*o, 0, OS) == origin_model);
    // Reload the persistent store that has no injected fault: same image, same status.
    let m = &snaps[1];
    if m.valid {
        let img = m.image.clone();
        let st = m.status();
        snaps.remove(1);
        let t = c.snapshot(OS, "o c1 PO 16").unwrap();
        assert_eq!(t.status(), st, "seed {seed}: reload status");
        assert!(
            read(&*t, 0, OS).unwrap() == img,
            "seed {seed}: reload image"
        );
    }
}

#[test]
fn random_interleavings_match_model() {
    for seed in 0..40 {
        run_seed(seed);
    }
}

#[test]
fn concurrent_origin_writers_never_leak_into_snapshot() {
    let mut c = Ctx::new();
    let o = c.mem("o", 2048);
    let mut init = vec![0u8; 2048 * 512];
    fill(9, &mut init);
    dev_write(&*o, 0, &init);
    c.mem("c1", 4096);
    c.mem("c2", 4096);
    c.mem("c3", 4096);
    let org: Arc<dyn Target> = Arc::from(c.origin(2048, "o").unwrap());
    let s1: Arc<dyn Target> = Arc::from(c.snapshot(2048, "o c1 P 8").unwrap());
    let s2: Arc<dyn Target> = Arc::from(c.snapshot(2048, "o c2 N 32").unwrap());
    let s3: Arc<dyn Target> = Arc::from(c.snapshot(2048, "o c3 PO 16").unwrap());
    activate(&*s1);
    activate(&*s2);
    activate(&*s3);
    let init = Arc::new(init);
    let mut hs = Vec::new();
    for t in 0..4u64 {
        let org = org.clone();
        hs.push(std::thread::spawn(move || {
            let mut rng = StdRng::seed_from_u64(100 + t);
            for _ in 0..400 {
                let s = rng.gen_range(0..2000);
                let n = rng.gen_range(1..=40);
                let mut d = vec![0u8; n * 512];
                fill(rng.gen(), &mut d);
                write(&*org, s, &d).unwrap();
            }
        }));
    }
    for (t, s) in [(0u64, s1.clone()), (1, s2.clone()), (2, s3.clone())] {
        let init = init.clone();
        hs.push(std::thread::spawn(move || {
            let mut rng = StdRng::seed_from_u64(200 + t);
            for _ in 0..600 {
                let a = rng.gen_range(0..2040u64);
                let n = rng.gen_range(1..=8u64);
                let got = read(&*s, a, n).unwrap();
                let off = (a * 512) as usize;
                assert!(
                    got == init[off..off + got.len()],
                    "snapshot read saw new data"
                );
            }
        }));
    }
    for h in hs {
        h.join().unwrap();
    }
    assert!(read(&*s1, 0, 2048).unwrap() == *init);
    assert!(read(&*s2, 0, 2048).unwrap() == *init);
    assert!(read(&*s3, 0, 2048).unwrap() == *init);
    // Reload of the persistent one gives the same image.
    drop(s1);
    let s1 = c.snapshot(2048, "o c1 P 8").unwrap();
    assert!(read(&*s1, 0, 2048).unwrap() == *init);
}

/// Origin writes are acknowledged before they reach the origin (write-back): every read after
/// an acknowledged write sees it, a rewrite of a held range wins over the first write, and after
/// a flush the origin device holds exactly the last writes while the snapshots kept the old data.
#[test]
fn held_origin_writes_are_read_back_in_order() {
    let mut c = Ctx::new();
    let o = c.mem("o", 4096);
    let mut init = vec![0u8; 4096 * 512];
    fill(21, &mut init);
    dev_write(&*o, 0, &init);
    c.mem("c1", 8192);
    c.mem("c2", 8192);
    let org: Arc<dyn Target> = Arc::from(c.origin(4096, "o").unwrap());
    let s1 = c.snapshot(4096, "o c1 P 8").unwrap();
    let s2 = c.snapshot(4096, "o c2 PO 32").unwrap();
    activate(&*s1);
    activate(&*s2);
    // Four writers, each on its own quarter, each with its own exact model.
    let mut hs = Vec::new();
    for t in 0..4u64 {
        let org = org.clone();
        let mut model = init[(t * 1024 * 512) as usize..((t + 1) * 1024 * 512) as usize].to_vec();
        hs.push(std::thread::spawn(move || {
            let mut rng = StdRng::seed_from_u64(300 + t);
            let base = t * 1024;
            for _ in 0..300 {
                let s = rng.gen_range(0..1000u64);
                let n = rng.gen_range(1..=24u64);
                for _ in 0..rng.gen_range(1..=2) {
                    // Sometimes twice: the second write of a held range must win.
                    let mut d = vec![0u8; (n * 512) as usize];
                    fill(rng.gen(), &mut d);
                    write(&*org, base + s, &d).unwrap();
                    model[(s * 512) as usize..((s + n) * 512) as usize].copy_from_slice(&d);
                }
                let a = rng.gen_range(0..1000u64);
                let m = rng.gen_range(1..=24u64);
                let got = read(&*org, base + a, m).unwrap();
                assert!(
                    got == model[(a * 512) as usize..((a + m) * 512) as usize],
                    "writer {t}: read after write missed an acknowledged write"
                );
            }
            model
        }));
    }
    let mut want = Vec::new();
    for h in hs {
        want.extend(h.join().unwrap());
    }
    flush(&*org).unwrap();
    assert!(dev_read(&*o, 0, 4096) == want, "origin after the flush");
    assert!(read(&*s1, 0, 4096).unwrap() == init);
    assert!(read(&*s2, 0, 4096).unwrap() == init);
}

#[test]
fn racing_snapshot_and_origin_writes_allocate_each_chunk_once() {
    let mut c = Ctx::new();
    let o = c.mem("o", 256);
    let mut init = vec![0u8; 256 * 512];
    fill(5, &mut init);
    dev_write(&*o, 0, &init);
    c.mem("c", 4096);
    let org: Arc<dyn Target> = Arc::from(c.origin(256, "o").unwrap());
    let s: Arc<dyn Target> = Arc::from(c.snapshot(256, "o c P 8").unwrap());
    activate(&*s);
    let mut hs = Vec::new();
    for t in 0..3u64 {
        let org = org.clone();
        let s = s.clone();
        hs.push(std::thread::spawn(move || {
            let mut rng = StdRng::seed_from_u64(t);
            for _ in 0..300 {
                let a = rng.gen_range(0..250u64);
                let d = vec![t as u8 + 1; 512];
                if rng.gen_bool(0.5) {
                    write(&*org, a, &d).unwrap();
                } else {
                    // Snapshot writes only to the upper half, so the lower half keeps init.
                    write(&*s, 128 + a / 2, &d).unwrap();
                }
            }
        }));
    }
    for h in hs {
        h.join().unwrap();
    }
    // Every chunk was allocated at most once: 32 chunks of 8 sectors at most, plus header and
    // area.
    let st = s.status();
    let alloc: u64 = st.split('/').next().unwrap().parse().unwrap();
    assert!(alloc <= (2 + 32) * 8, "{st}");
    assert!(read(&*s, 0, 128).unwrap() == init[..128 * 512]);
    drop(s);
    let s = c.snapshot(256, "o c P 8").unwrap();
    assert_eq!(s.status(), st, "reload sees the same allocation");
    assert!(read(&*s, 0, 128).unwrap() == init[..128 * 512]);
}
