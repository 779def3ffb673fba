//! The snapshot-origin target's contract beyond its data path: a suspend (presuspend and
//! postsuspend), a write-back drain and the table's destruction each return only once the
//! writes acknowledged before them are on the origin; its table line, version, capabilities
//! and devices are the kernel's; block status is asked at the target's place in the table, and
//! a snapshot counts what the origin's block status left out as data.
//! Written against mutants cargo-mutants found missed in snapshot/origin.rs (each hook
//! emptied, the line and capabilities replaced, the table offset dropped).

#![allow(clippy::unwrap_used)] // tests may unwrap (helpers included)

mod snapshot_common;

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use snapshot_common::gate::{wait_for, GateDev};
use snapshot_common::*;
use udm_io::{BlockDevice, ExtentKind};
use udm_target::snapshot::origin::OriginType;
use udm_target::{Target, TargetType};

const OS: u64 = 1024;

#[test]
fn suspend_drain_and_destruction_wait_for_held_writes() {
    for hook in ["presuspend", "postsuspend", "drain_writeback", "drop"] {
        let mut c = Ctx::new();
        let o = c.mem("o", OS);
        let cow = Arc::new(GateDev::new(OS * 2));
        c.add("c", cow.clone());
        let org = c.origin(OS, "o").unwrap();
        let snap = c.snapshot(OS, "o c P 8").unwrap();
        activate(&*snap);
        // A first write to a chunk is held while its copy's commit waits at the gate.
        cow.set_closed(true);
        let before = cow.blocked.load(Ordering::SeqCst);
        write(&*org, 64, &pattern(5, 64, 8)).unwrap();
        wait_for("the commit at the gate", || {
            cow.blocked.load(Ordering::SeqCst) > before
        });
        assert_ne!(dev_read(&*o, 64, 8), pattern(5, 64, 8), "not held");
        // The target comes back (but for "drop"): its destruction settles too.
        let t = std::thread::spawn(move || {
            match hook {
                "presuspend" => org.presuspend(),
                "postsuspend" => org.postsuspend(),
                "drain_writeback" => org.drain_writeback(),
                _ => return None,
            }
            Some(org)
        });
        std::thread::sleep(Duration::from_millis(150));
        let waited = !t.is_finished();
        cow.set_closed(false);
        let org = t.join().unwrap();
        assert!(waited, "{hook} did not wait for the held write");
        assert_eq!(
            dev_read(&*o, 64, 8),
            pattern(5, 64, 8),
            "{hook} returned before the held write reached the origin"
        );
        drop(org);
        drop(snap);
    }
}

#[test]
fn line_version_caps_and_devices_are_the_kernels() {
    let mut c = Ctx::new();
    c.mem("o", OS);
    let org = c.origin(OS, "o").unwrap();
    assert_eq!(org.table_params(), c.id("o").to_string());
    assert_eq!(OriginType.version(), [1, 9, 0]);
    let caps = org.caps();
    assert!(
        caps.flush,
        "flushes must reach the origin (they settle held writes)"
    );
    assert!(!caps.discard && !caps.write_zeroes);
    let devs: Vec<_> = org.devices().iter().map(|d| d.id).collect();
    assert_eq!(devs, vec![c.id("o")]);
}

/// `t`'s block status of `sectors` at `sector` as (length, kind) pairs.
fn kinds(t: &dyn Target, sector: u64, sectors: u64) -> Vec<(u64, ExtentKind)> {
    t.block_status(sector, sectors)
        .unwrap()
        .into_iter()
        .map(|e| (e.sectors, e.kind))
        .collect()
}

#[test]
fn block_status_is_asked_at_the_targets_place() {
    let mut c = Ctx::new();
    let o = c.mem("o", OS);
    // Data at origin sectors [100, 108) only; the target starts at table sector 64, which is
    // origin sector 64 (snapshot-origin maps one to one), so its sector 36 is sector 100.
    o.submit(udm_io::Bio::write(100, &[1u8; 4096])).unwrap();
    c.begin = 64;
    let org = c.origin(OS - 64, "o").unwrap();
    assert_eq!(
        kinds(&*org, 32, 16),
        vec![
            (4, ExtentKind::HoleZero),
            (8, ExtentKind::Data),
            (4, ExtentKind::HoleZero)
        ]
    );
}

/// An origin whose block status describes only the first half of what it is asked.
struct ShortStatus(Arc<udm_io::backend::mem::MemDevice>);

impl BlockDevice for ShortStatus {
    fn size(&self) -> u64 {
        self.0.size()
    }
    fn submit(&self, bio: udm_io::Bio<'_>) -> Result<(), udm_io::IoError> {
        self.0.submit(bio)
    }
    fn block_status(
        &self,
        sector: u64,
        sectors: u64,
    ) -> Result<Vec<udm_io::Extent>, udm_io::IoError> {
        self.0.block_status(sector, sectors / 2)
    }
}

#[test]
fn snapshot_block_status_counts_what_the_origin_left_out_as_data() {
    let mut c = Ctx::new();
    let o = Arc::new(udm_io::backend::mem::MemDevice::new(OS));
    c.add("o", Arc::new(ShortStatus(o)));
    c.mem("c", OS * 2);
    let snap = c.snapshot(OS, "o c P 8").unwrap();
    activate(&*snap);
    // Sectors [100, 200) asked: the origin describes [100, 150) (a hole); the rest is
    // unknown, so data (never a hole a backup would skip).
    let want = vec![(50, ExtentKind::HoleZero), (50, ExtentKind::Data)];
    assert_eq!(kinds(&*snap, 100, 100), want);
    assert_eq!(kinds(&*snap, 0, 100), want, "from sector 0 too");
}
