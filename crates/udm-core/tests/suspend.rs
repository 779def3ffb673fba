//! Suspend with I/O in flight (issue "Foundation", acceptance): suspend returns only after the
//! in-flight requests complete, requests arriving while suspended are held and complete after
//! resume, and nothing errors.

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests may panic on setup failures

use parking_lot::Mutex;
use std::cell::Cell;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use udm_core::registry::{LoadFlags, ResumeOptions, SuspendFlags};
use udm_core::Registry;
use udm_io::backend::mem::MemDevice;
use udm_io::{Bio, BlockDevice, IoError};
use udm_target::table::TableSpec;

thread_local! {
    /// When the device below finished this thread's last request (stamped inside the device,
    /// so before the mapped device counts the request as done).
    static COMPLETED: Cell<Option<Instant>> = const { Cell::new(None) };
}

/// A memory device that stamps [`COMPLETED`]: a writer's own clock reading after `submit`
/// returns can fall after a suspend that already waited for that request.
struct Stamped(Arc<MemDevice>);

impl BlockDevice for Stamped {
    fn size(&self) -> u64 {
        self.0.size()
    }

    fn submit(&self, bio: Bio<'_>) -> Result<(), IoError> {
        let r = self.0.submit(bio);
        COMPLETED.with(|c| c.set(Some(Instant::now())));
        r
    }
}

#[test]
fn suspend_drains_and_holds_then_resume_releases() {
    let reg = Arc::new(Registry::new());
    let mem = Arc::new(MemDevice::new(4096));
    // Every request takes 20 ms, so there is always something in flight.
    mem.set_latency(Duration::from_millis(20));
    reg.add_disk_device("d", Arc::new(Stamped(mem.clone())))
        .unwrap();
    let spec = TableSpec::parse("0 4096 linear d 0").unwrap();
    reg.create(
        "m",
        None,
        None,
        Some((&spec, LoadFlags::default())),
        &ResumeOptions::default(),
    )
    .unwrap();
    let dev = reg.node("m").unwrap();

    let stop = Arc::new(AtomicBool::new(false));
    let errors = Arc::new(AtomicU64::new(0));
    // (start, end) of every completed request.
    let done: Arc<Mutex<Vec<(Instant, Instant)>>> = Arc::default();
    let mut threads = Vec::new();
    for t in 0..4u64 {
        let (dev, stop, errors, done) = (dev.clone(), stop.clone(), errors.clone(), done.clone());
        threads.push(std::thread::spawn(move || {
            let buf = vec![t as u8; 4096];
            let mut i = 0u64;
            while !stop.load(Ordering::Relaxed) {
                let start = Instant::now();
                if dev
                    .submit(Bio::write((t * 512 + (i % 64) * 8) % 4096, &buf))
                    .is_err()
                {
                    errors.fetch_add(1, Ordering::Relaxed);
                }
                let end = COMPLETED.with(|c| c.take()).unwrap_or_else(Instant::now);
                done.lock().push((start, end));
                i += 1;
            }
        }));
    }
    std::thread::sleep(Duration::from_millis(100));
    let s0 = Instant::now();
    reg.suspend("m", SuspendFlags::default()).unwrap();
    let suspended_at = Instant::now();
    assert!(reg.info("m").unwrap().suspended);
    // Suspend waited for the requests in flight: some completed while it was draining.
    let drained = done
        .lock()
        .iter()
        .filter(|(_, e)| *e >= s0 && *e <= suspended_at)
        .count();
    assert!(
        drained > 0,
        "suspend returned without waiting for in-flight requests"
    );
    // While suspended nothing completes, and the writers are held. (A writer whose request
    // completed during the drain may still be recording it: give it a moment first.)
    std::thread::sleep(Duration::from_millis(50));
    let n = done.lock().len();
    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(done.lock().len(), n, "requests completed while suspended");
    reg.resume("m", &ResumeOptions::default()).unwrap();
    let resumed_at = Instant::now();
    std::thread::sleep(Duration::from_millis(100));
    stop.store(true, Ordering::Relaxed);
    for t in threads {
        t.join().unwrap();
    }
    assert_eq!(
        errors.load(Ordering::Relaxed),
        0,
        "requests failed around suspend/resume"
    );
    let done = done.lock();
    assert!(
        done.iter()
            .all(|(_, e)| *e <= suspended_at || *e >= resumed_at),
        "a request completed while the device was suspended"
    );
    // Each of the 4 writers was held and completed after resume.
    let held = done
        .iter()
        .filter(|(s, e)| *s < resumed_at && *e >= resumed_at)
        .count();
    assert_eq!(held, 4, "the 4 held requests complete after resume");
    // Suspending twice is a no-op; resuming an active device is not an error.
    reg.suspend("m", SuspendFlags::default()).unwrap();
    reg.suspend(
        "m",
        SuspendFlags {
            noflush: true,
            nolockfs: true,
        },
    )
    .unwrap();
    reg.resume("m", &ResumeOptions::default()).unwrap();
    reg.resume("m", &ResumeOptions::default()).unwrap();
}

#[test]
fn reload_while_suspended_swaps_tables_without_losing_held_io() {
    let reg = Arc::new(Registry::new());
    let a = Arc::new(MemDevice::new(64));
    let b = Arc::new(MemDevice::new(64));
    reg.add_disk_device("a", a.clone()).unwrap();
    reg.add_disk_device("b", b.clone()).unwrap();
    let spec = TableSpec::parse("0 64 linear a 0").unwrap();
    reg.create(
        "m",
        None,
        None,
        Some((&spec, LoadFlags::default())),
        &ResumeOptions::default(),
    )
    .unwrap();
    let dev = reg.node("m").unwrap();
    reg.suspend("m", SuspendFlags::default()).unwrap();
    let d2 = dev.clone();
    let writer = std::thread::spawn(move || d2.submit(Bio::write(0, &[7u8; 512])));
    std::thread::sleep(Duration::from_millis(50));
    assert!(!writer.is_finished(), "write must be held while suspended");
    reg.load(
        "m",
        &TableSpec::parse("0 64 linear b 0").unwrap(),
        LoadFlags::default(),
    )
    .unwrap();
    assert!(reg.info("m").unwrap().inactive_present);
    reg.resume("m", &ResumeOptions::default()).unwrap();
    writer.join().unwrap().unwrap();
    // The held write ran on the new table.
    assert_eq!(&b.contents()[..512], &[7u8; 512][..]);
    assert!(a.contents()[..512].iter().all(|x| *x == 0));
}
