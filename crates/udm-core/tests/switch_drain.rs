//! A table switch drains the I/O in flight before the new table goes live (issue "Tests that
//! fail when the product is wrong", item 7). A write of the old table is parked in the device
//! below until the test releases it; a second write to the same block, sent once the switch has
//! returned, must land after it. A switch that does not drain returns while the first write is
//! still parked, so the second lands first and a read shows the stale first write.
//!
//! Deterministic in the passing direction: with a drain the switch cannot return before the
//! release, whatever the machine's load.

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests may panic on setup failures

use parking_lot::{Condvar, Mutex};
use std::sync::Arc;
use std::time::{Duration, Instant};
use udm_core::registry::{LoadFlags, ResumeOptions};
use udm_core::Registry;
use udm_io::backend::mem::MemDevice;
use udm_io::{Bio, BioKind, BlockDevice, IoError};
use udm_target::table::TableSpec;
use udm_testkit::core::{create, IP};
use udm_testkit::join_within;

const SECTORS: u64 = 8192;
const LIMIT: Duration = Duration::from_secs(30);

#[derive(Default)]
struct Park {
    /// The next write parks.
    armed: bool,
    /// Writes parked now.
    parked: u32,
    /// Parked writes may go on.
    released: bool,
}

/// A memory device that parks one armed write until [`ParkDev::release`]: an old-table write
/// that is still in flight at the moment of a switch.
struct ParkDev {
    mem: MemDevice,
    state: Mutex<Park>,
    cv: Condvar,
}

impl ParkDev {
    fn new() -> Self {
        ParkDev {
            mem: MemDevice::new(SECTORS),
            state: Mutex::new(Park::default()),
            cv: Condvar::new(),
        }
    }

    fn arm(&self) {
        let mut s = self.state.lock();
        s.armed = true;
        s.released = false;
    }

    /// Waits (bounded) until a write is parked.
    fn wait_parked(&self) {
        let deadline = Instant::now() + LIMIT;
        let mut s = self.state.lock();
        while s.parked == 0 {
            assert!(Instant::now() < deadline, "the armed write never arrived");
            self.cv.wait_for(&mut s, Duration::from_millis(50));
        }
    }

    fn release(&self) {
        let mut s = self.state.lock();
        s.released = true;
        self.cv.notify_all();
    }
}

impl BlockDevice for ParkDev {
    fn size(&self) -> u64 {
        SECTORS
    }

    fn submit(&self, bio: Bio<'_>) -> Result<(), IoError> {
        if bio.kind() == BioKind::Write {
            let mut s = self.state.lock();
            if s.armed {
                s.armed = false;
                s.parked += 1;
                self.cv.notify_all();
                while !s.released {
                    self.cv.wait(&mut s);
                }
                s.parked -= 1;
            }
        }
        self.mem.submit(bio)
    }
}

/// Parks a write of 0xaa to block 0 of `dev`, runs `switch` in a thread, and once it returns
/// (or after 2 s, when it is waiting for the drain) writes 0xbb there, then releases the parked
/// write. Block 0 must read 0xbb: the switch's return orders the parked write before the new one.
fn parked_write_across(
    reg: &Arc<Registry>,
    park: &Arc<ParkDev>,
    dev: &str,
    switch: fn(&Registry),
    what: &str,
) {
    let orig = reg.node(dev).unwrap();
    park.arm();
    let o = orig.clone();
    let first = std::thread::spawn(move || o.submit(Bio::write(0, &[0xaa; 4096])));
    park.wait_parked();
    let r = reg.clone();
    let switcher = std::thread::spawn(move || switch(&r));
    let deadline = Instant::now() + Duration::from_secs(2);
    while !switcher.is_finished() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(10));
    }
    if !switcher.is_finished() {
        // Waiting for the drain, as it should: let the old write complete.
        park.release();
    }
    join_within(switcher, LIMIT, what);
    orig.submit(Bio::write(0, &[0xbb; 4096])).unwrap();
    park.release();
    join_within(first, LIMIT, "the parked write").unwrap();
    let mut buf = vec![0u8; 4096];
    orig.submit(Bio::read(0, &mut buf)).unwrap();
    assert!(
        buf.iter().all(|b| *b == 0xbb),
        "{what}: block 0 reads {:#x}, the write sent before the switch landed after the write \
         sent once the switch had returned (the switch did not drain the I/O in flight)",
        buf[0]
    );
}

fn rig() -> (Arc<Registry>, Arc<ParkDev>) {
    let reg = Arc::new(Registry::new());
    let park = Arc::new(ParkDev::new());
    reg.add_disk_device("orig", park.clone()).unwrap();
    (reg, park)
}

/// A table swap that keeps the interposer (delay -> linear, same range): the mapped device's
/// own suspend must drain the redirected write parked below it.
#[test]
fn swap_drains_the_old_table() {
    let (reg, park) = rig();
    create(&reg, "ip", &format!("0 {SECTORS} delay orig 0 0"), IP).unwrap();
    parked_write_across(
        &reg,
        &park,
        "orig",
        |r| {
            let t = TableSpec::parse(&format!("0 {SECTORS} linear orig 0")).unwrap();
            r.load("ip", &t, IP).unwrap();
            r.resume("ip", &ResumeOptions::default()).unwrap();
        },
        "delay -> linear swap",
    );
}

/// Attaching an interposer must drain the direct write parked in the device before the
/// redirect starts.
#[test]
fn attach_drains_direct_io() {
    let (reg, park) = rig();
    parked_write_across(
        &reg,
        &park,
        "orig",
        |r| create(r, "ip", &format!("0 {SECTORS} linear orig 0"), IP).unwrap(),
        "attach",
    );
}

/// Detaching (remove) must drain the redirected write parked below the interposer before
/// I/O goes straight to the device again.
#[test]
fn detach_drains_redirected_io() {
    let (reg, park) = rig();
    create(&reg, "ip", &format!("0 {SECTORS} linear orig 0"), IP).unwrap();
    parked_write_across(
        &reg,
        &park,
        "orig",
        |r| r.remove("ip", false, false).unwrap(),
        "detach",
    );
}

/// A plain (not interposed) mapped device switched between two tables over the same device.
#[test]
fn plain_swap_drains() {
    let (reg, park) = rig();
    let plain = LoadFlags::default();
    create(&reg, "m", &format!("0 {SECTORS} delay orig 0 0"), plain).unwrap();
    parked_write_across(
        &reg,
        &park,
        "m",
        |r| {
            let t = TableSpec::parse(&format!("0 {SECTORS} linear orig 0")).unwrap();
            r.load("m", &t, LoadFlags::default()).unwrap();
            r.resume("m", &ResumeOptions::default()).unwrap();
        },
        "plain swap",
    );
}
