//! Edges of table switches that the mutation-testing pass (scripts/mutants.sh) found untested:
//! a switch whose new table fails its preresume is rolled back (the old table stays live, the
//! new one inactive, and the device is suspended exactly when it was before the `resume`), and
//! `remove --force` of an open device swaps in an error table (none when it has no table) and
//! removes it when its last opener closes meanwhile, and `remove` of a running device runs
//! its table's suspend hooks.

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests may panic on setup failures

use std::sync::Arc;
use std::time::Duration;
use udm_core::registry::{LoadFlags, ResumeOptions, SuspendFlags};
use udm_core::Registry;
use udm_io::backend::mem::MemDevice;
use udm_io::{Bio, BlockDevice};
use udm_target::table::TableSpec;
use udm_testkit::{join_within, within};
use udm_types::errno::HasErrno;
use udm_types::Errno;

#[allow(dead_code)] // not every helper is used here
use udm_testkit::core::create;

const SECTORS: u64 = 8192;

/// Disks `d` and `c`, a snapshot `s` of `d` in `c`, and `x` (zero) with an inactive snapshot
/// table on the same COW: its preresume fails (a handover needs `s` suspended).
fn rig() -> Arc<Registry> {
    let reg = Arc::new(Registry::new());
    reg.add_disk_device("d", Arc::new(MemDevice::new(SECTORS)))
        .unwrap();
    reg.add_disk_device("c", Arc::new(MemDevice::new(SECTORS)))
        .unwrap();
    let snap = format!("0 {SECTORS} snapshot d c P 8");
    create(&reg, "s", &snap, LoadFlags::default()).unwrap();
    create(
        &reg,
        "x",
        &format!("0 {SECTORS} zero"),
        LoadFlags::default(),
    )
    .unwrap();
    let spec = TableSpec::parse(&snap).unwrap();
    reg.load("x", &spec, LoadFlags::default()).unwrap();
    reg
}

/// A read of `x` completes (within 2 s: a suspended device would hold it).
fn read_x(reg: &Registry) {
    let x = reg.node("x").unwrap();
    within(Duration::from_secs(2), "a read of x", move || {
        let mut buf = vec![1u8; 4096];
        x.submit(Bio::read(0, &mut buf)).unwrap();
        assert!(buf.iter().all(|b| *b == 0), "x lost its zero table");
    });
}

fn resume_fails(reg: &Registry) {
    let err = reg.resume("x", &ResumeOptions::default()).unwrap_err();
    assert!(err.to_string().contains("preresume failed"), "{err}");
    let info = reg.info("x").unwrap();
    assert!(info.live_present && info.inactive_present, "{info:?}");
}

#[test]
fn a_running_device_keeps_running_when_its_new_table_fails_preresume() {
    let reg = rig();
    resume_fails(&reg);
    assert!(!reg.info("x").unwrap().suspended);
    read_x(&reg);
}

#[test]
fn a_suspended_device_stays_suspended_when_its_new_table_fails_preresume() {
    let reg = rig();
    reg.suspend("x", SuspendFlags::default()).unwrap();
    resume_fails(&reg);
    assert!(reg.info("x").unwrap().suspended);
    // The switch's marks are gone: the inactive table can be cleared and x resumed.
    reg.clear("x").unwrap();
    reg.resume("x", &ResumeOptions::default()).unwrap();
    read_x(&reg);
}

#[test]
fn force_remove_of_an_open_device_swaps_in_an_error_table() {
    let reg = rig();
    reg.clear("x").unwrap();
    let _x = reg.open_export("x", "test:x").unwrap();
    let err = reg.remove("x", true, false).unwrap_err();
    assert_eq!(err.errno(), Errno::EBUSY, "{err}");
    assert!(err.to_string().contains("error table"), "{err}");
    let table = reg.table("x", false).unwrap();
    assert_eq!(table.len(), 1, "{table:?}");
    assert_eq!(
        (table[0].len, table[0].target_type.as_str()),
        (SECTORS, "error")
    );
    // Without a table there is nothing to swap: still EBUSY, and still no table.
    reg.create("y", None, None, None, &ResumeOptions::default())
        .unwrap();
    let _y = reg.open_export("y", "test:y").unwrap();
    let err = reg.remove("y", true, false).unwrap_err();
    assert_eq!(err.errno(), Errno::EBUSY, "{err}");
    assert!(!reg.info("y").unwrap().live_present);
}

/// An export's node and a thread whose READ is parked.
type Parked = (
    Arc<udm_core::node::DeviceNode>,
    std::thread::JoinHandle<Result<(), udm_io::IoError>>,
);

/// Disk `d` <- `low` (linear) <- `x` (linear), `x` exported, and a READ of `x` parked in the
/// suspended `low`.
fn x_open_with_a_parked_read(reg: &Registry) -> Parked {
    reg.add_disk_device("d", Arc::new(MemDevice::new(SECTORS)))
        .unwrap();
    let lin = |dev: &str| format!("0 {SECTORS} linear {dev} 0");
    create(reg, "low", &lin("d"), LoadFlags::default()).unwrap();
    create(reg, "x", &lin("low"), LoadFlags::default()).unwrap();
    let export = reg.open_export("x", "test:x").unwrap();
    reg.suspend("low", SuspendFlags::default()).unwrap();
    let x = reg.node("x").unwrap();
    let reader = std::thread::spawn(move || x.submit(Bio::read(0, &mut [0u8; 4096])));
    std::thread::sleep(Duration::from_millis(100));
    assert!(!reader.is_finished(), "the READ was not held");
    (export, reader)
}

#[test]
fn force_remove_removes_a_device_whose_last_opener_closed_during_the_swap() {
    let reg = Arc::new(Registry::new());
    let (export, reader) = x_open_with_a_parked_read(&reg);
    let r = reg.clone();
    // The swap to the error table suspends `x`, which waits for the parked READ.
    let remove = std::thread::spawn(move || r.remove("x", true, false));
    std::thread::sleep(Duration::from_millis(200));
    assert!(!remove.is_finished(), "{:?}", remove.join());
    reg.close_export(export.id(), "test:x");
    reg.resume("low", &ResumeOptions::default()).unwrap();
    join_within(reader, Duration::from_secs(2), "the parked READ").unwrap();
    join_within(remove, Duration::from_secs(2), "remove --force").unwrap();
    assert!(reg.info("x").is_err(), "x still exists");
}

#[test]
fn remove_of_a_running_device_releases_what_its_delay_target_holds() {
    let reg = Arc::new(Registry::new());
    reg.add_disk_device("d", Arc::new(MemDevice::new(SECTORS)))
        .unwrap();
    let delay = format!("0 {SECTORS} delay d 0 20000");
    create(&reg, "x", &delay, LoadFlags::default()).unwrap();
    let x = reg.node("x").unwrap();
    let reader = std::thread::spawn(move || x.submit(Bio::read(0, &mut [0u8; 4096])));
    std::thread::sleep(Duration::from_millis(100));
    assert!(!reader.is_finished(), "the READ was not delayed");
    reg.remove("x", false, false).unwrap();
    // The presuspend hook releases it at once, not after 20 s.
    join_within(reader, Duration::from_secs(2), "the delayed READ").unwrap();
}
