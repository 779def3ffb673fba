//! A merge step as clients and the other snapshots of the origin see it, held at its commit
//! (the COW's FLUSH|FUA write waits at a gate): reads of chunks not merged yet come from the
//! COW, a write to the chunk being merged waits for the step and lands on the origin, a
//! snapshot handover stops the merge around it and starts it again, and neither a handover
//! nor a second resume restarts or doubles the merge worker. Written for the mutation-testing
//! pass (scripts/mutants.sh): `merge_map_piece`'s chunk, the step's chunk locks, `resume`'s
//! search for a running merge, `is_running`, `start_merge`.
#![allow(clippy::unwrap_used)] // test helpers outside #[test] fns unwrap too

mod snapshot_common;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use snapshot_common::gate::{wait_for, GateDev};
use snapshot_common::*;
use udm_io::backend::mem::MemDevice;
use udm_target::Target;

const O: u64 = 1024;

/// An origin of `O` sectors (pattern 1), its origin target, and snapshot `o c P 8` on a gated
/// COW whose chunks `rewritten` the origin target then rewrote (pattern 2, flushed).
struct Rig {
    c: Ctx,
    o: Arc<MemDevice>,
    cow: Arc<GateDev>,
    org: Option<Box<dyn Target>>,
    snap: Box<dyn Target>,
}

/// Opens the gate first, so that a failed test leaves no merge step waiting at it.
impl Drop for Rig {
    fn drop(&mut self) {
        self.cow.set_closed(false);
    }
}

fn rig(rewritten: &[u64]) -> Rig {
    let mut c = Ctx::new();
    let o = c.mem("o", O);
    dev_write(&*o, 0, &pattern(1, 0, O));
    let cow = Arc::new(GateDev::new(4096));
    c.add("c", cow.clone());
    let org = c.origin(O, "o").unwrap();
    let snap = c.snapshot(O, "o c P 8").unwrap();
    activate(&*snap);
    for &ch in rewritten {
        write(&*org, ch * 8, &pattern(2, ch * 8, 8)).unwrap();
    }
    flush(&*org).unwrap();
    Rig {
        c,
        o,
        cow,
        org: Some(org),
        snap,
    }
}

impl Rig {
    /// Closes the gate and starts merging the snapshot; returns the merge target once its
    /// first step waits at its commit.
    fn merge_held(&mut self) -> Merging {
        self.cow.set_closed(true);
        let before = self.cow.blocked.load(Ordering::SeqCst);
        let org = self.org.take().unwrap();
        let m = start_merge_of(&mut self.c, org, &*self.snap, O, 8);
        wait_for("the merge step's commit to reach the gate", || {
            self.cow.blocked.load(Ordering::SeqCst) > before
        });
        Merging {
            m,
            cow: self.cow.clone(),
        }
    }
}

/// The merge target of [`Rig::merge_held`]. Dropping it opens the gate first: its merge
/// worker, stopped on drop, may wait there (a failed assertion must fail, not hang).
struct Merging {
    m: Box<dyn Target>,
    cow: Arc<GateDev>,
}

impl Drop for Merging {
    fn drop(&mut self) {
        self.cow.set_closed(false);
    }
}

impl std::ops::Deref for Merging {
    type Target = dyn Target;
    fn deref(&self) -> &(dyn Target + 'static) {
        &*self.m
    }
}

/// Runs `f` on a thread; true if it is still running after 300 ms. Then opens the gate and
/// waits for it.
fn waits_for_the_gate(cow: &GateDev, f: impl FnOnce() + Send) -> bool {
    let done = AtomicBool::new(false);
    std::thread::scope(|s| {
        s.spawn(|| {
            f();
            done.store(true, Ordering::SeqCst);
        });
        std::thread::sleep(Duration::from_millis(300));
        let waited = !done.load(Ordering::SeqCst);
        cow.set_closed(false);
        waited
    })
}

#[test]
fn reads_and_writes_during_a_merge_step() {
    // Chunks 3 and 10 rewritten: two steps, the last exception (chunk 10) first.
    let mut r = rig(&[3, 10]);
    let m = r.merge_held();
    // Neither is merged yet: the merging device reads them from the COW (the snapshot's data).
    assert_eq!(
        read(&*m, 24, 8).unwrap(),
        pattern(1, 24, 8),
        "chunk 3 not read from the COW"
    );
    assert_eq!(read(&*m, 80, 8).unwrap(), pattern(1, 80, 8));
    assert_eq!(read(&*m, 40, 8).unwrap(), pattern(1, 40, 8));
    // A write to the chunk being merged waits for the step: written to the COW before the
    // step drops the exception, it would be lost.
    let waited = waits_for_the_gate(&r.cow, || write(&*m, 80, &pattern(5, 80, 8)).unwrap());
    assert!(waited, "a write to the chunk being merged did not wait");
    wait_merged(&*m);
    assert_eq!(
        dev_read(&*r.o, 80, 8),
        pattern(5, 80, 8),
        "the write was lost"
    );
    assert_eq!(dev_read(&*r.o, 24, 8), pattern(1, 24, 8));
}

#[test]
fn a_handover_stops_a_running_merge_and_starts_it_again() {
    let mut r = rig(&[1, 4, 7]);
    let img_a = pattern(1, 0, O);
    // Another snapshot of the origin, taken after the rewrite.
    r.c.mem("c2", 4096);
    let b = r.c.snapshot(O, "o c2 P 16").unwrap();
    activate(&*b);
    let img_b = dev_read(&*r.o, 0, O);
    let m = r.merge_held();
    // Reload b: the new table takes its exceptions over at resume, with the merge stopped
    // (its step in flight finishes first).
    b.presuspend();
    b.postsuspend();
    let b2 = r.c.snapshot(O, "o c2 P 16").unwrap();
    b2.preresume().unwrap();
    let waited = waits_for_the_gate(&r.cow, || b2.resume());
    assert!(
        waited,
        "the handover did not wait for the merge step in flight"
    );
    assert_eq!(b.status(), "Invalid", "the handover source is dead");
    drop(b);
    // Started again: the merge ends, and the other snapshot kept its data.
    assert_eq!(wait_merged(&*m), "16/4096 16", "the merge did not go on");
    assert!(dev_read(&*r.o, 0, O) == img_a, "merged data differs");
    assert!(
        read(&*b2, 0, O).unwrap() == img_b,
        "the other snapshot changed"
    );

    // A merge that has ended is not started again by the next handover ("Merge complete" is
    // raised by each run of the worker that finds nothing to merge).
    std::thread::sleep(Duration::from_millis(100));
    let events = r.c.events();
    b2.presuspend();
    b2.postsuspend();
    let b3 = r.c.snapshot(O, "o c2 P 16").unwrap();
    activate(&*b3);
    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(
        r.c.events(),
        events,
        "a handover restarted a merge that had ended"
    );
    drop(b2);
    assert!(read(&*b3, 0, O).unwrap() == img_b);
}

#[test]
fn a_second_resume_leaves_the_running_merge_alone() {
    let mut r = rig(&[2, 6]);
    let m = r.merge_held();
    // Without a suspend between, the worker is running: nothing to start, nothing to wait for.
    let waited = waits_for_the_gate(&r.cow, || m.resume());
    assert!(!waited, "a resume waited for the running merge");
    assert_eq!(wait_merged(&*m), "16/4096 16");
    assert!(dev_read(&*r.o, 0, O) == pattern(1, 0, O));
}
