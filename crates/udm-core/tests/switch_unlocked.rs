//! Interposer switches never hold the registry lock while they wait for I/O (issues "Trustworthy
//! daemon" and "Architecture"): with a request parked in a suspended device below the
//! interposed one, a `create --interpose` (or the `remove` that detaches an interposer) waits for
//! that request without the lock, so queries answer at once, conflicting operations are refused
//! with EBUSY, and the `resume` that releases the request proceeds and lets the switch complete.
//! Every wait is bounded: a hang fails the test.

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests may panic on setup failures

use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;
use udm_core::registry::{LoadFlags, ResumeOptions, SuspendFlags};
use udm_core::Registry;
use udm_io::backend::mem::MemDevice;
use udm_io::{Bio, BlockDevice};
use udm_target::table::TableSpec;
use udm_testkit::{join_within, within};
use udm_types::errno::HasErrno;
use udm_types::Errno;

mod common;
use common::{create, IP};

const SECTORS: u64 = 8192;

/// `d` (memory) <- `low` (linear) <- `o` (linear); `low` suspended and a READ of `o` parked in
/// it. Returns the registry and the reader.
fn parked() -> (Arc<Registry>, JoinHandle<Vec<u8>>) {
    let reg = Arc::new(Registry::new());
    let mem = Arc::new(MemDevice::new(SECTORS));
    mem.submit(Bio::write(0, &[0x5a; 4096])).unwrap();
    reg.add_disk_device("d", mem).unwrap();
    let lin = |dev: &str| format!("0 {SECTORS} linear {dev} 0");
    create(&reg, "low", &lin("d"), LoadFlags::default()).unwrap();
    create(&reg, "o", &lin("low"), LoadFlags::default()).unwrap();
    reg.suspend("low", SuspendFlags::default()).unwrap();
    let o = reg.node("o").unwrap();
    let reader = std::thread::spawn(move || {
        let mut buf = vec![0u8; 4096];
        o.submit(Bio::read(0, &mut buf)).unwrap();
        buf
    });
    std::thread::sleep(Duration::from_millis(100));
    assert!(
        !reader.is_finished(),
        "the READ was not held by the suspend"
    );
    (reg, reader)
}

/// While a switch waits for the parked READ: queries answer within 100 ms and conflicting
/// operations are refused with EBUSY.
fn queries_answer_and_conflicts_are_refused(reg: &Arc<Registry>, switching: &str) {
    let fast = Duration::from_millis(100);
    for dev in [switching, "o", "low"] {
        let r = reg.clone();
        let d = dev.to_string();
        within(fast, &format!("info {dev}"), move || r.info(&d)).unwrap();
        let r = reg.clone();
        let d = dev.to_string();
        within(fast, &format!("status {dev}"), move || r.status(&d, false)).unwrap();
        let r = reg.clone();
        let d = dev.to_string();
        within(fast, &format!("table {dev}"), move || r.table(&d, false)).unwrap();
    }
    let r = reg.clone();
    let names = within(fast, "list_mapped", move || r.list_mapped());
    assert!(names.iter().any(|(n, _)| n == switching), "{names:?}");
    let r = reg.clone();
    within(fast, "devices", move || r.devices());
    let r = reg.clone();
    within(fast, "disks", move || r.disks());

    let busy = |what: &str, r: udm_core::Result<()>| match r {
        Err(e) => assert_eq!(e.errno(), Errno::EBUSY, "{what}: {e}"),
        Ok(()) => panic!("{what} succeeded during the switch of {switching}"),
    };
    let r = reg.clone();
    let s = switching.to_string();
    busy(
        "suspend",
        within(fast, "suspend", move || {
            r.suspend(&s, SuspendFlags::default())
        }),
    );
    let r = reg.clone();
    let s = switching.to_string();
    busy(
        "remove",
        within(fast, "remove", move || r.remove(&s, false, false)),
    );
    let r = reg.clone();
    let s = switching.to_string();
    busy(
        "load",
        within(fast, "load", move || {
            let spec = TableSpec::parse(&format!("0 {SECTORS} zero")).unwrap();
            r.load(&s, &spec, LoadFlags::default())
        }),
    );
    let r = reg.clone();
    busy(
        "remove o",
        within(fast, "remove o", move || r.remove("o", false, false)),
    );
    // A second interposer of `o` waits for nothing: the device is held by the first switch.
    let r = reg.clone();
    busy(
        "second interposer",
        within(fast, "create ip2 --interpose", move || {
            create(&r, "ip2", &format!("0 {SECTORS} linear o 0"), IP)
        }),
    );
}

/// Releases the parked READ with `resume low` (within 1 s) and checks what it read.
fn resume_low(reg: &Arc<Registry>, reader: JoinHandle<Vec<u8>>) {
    let r = reg.clone();
    within(Duration::from_secs(1), "resume low", move || {
        r.resume("low", &ResumeOptions::default())
    })
    .unwrap();
    let buf = join_within(reader, Duration::from_secs(2), "the parked READ");
    assert!(
        buf.iter().all(|b| *b == 0x5a),
        "the READ returned wrong data"
    );
}

#[test]
fn create_interpose_waits_for_parked_io_without_the_registry_lock() {
    let (reg, reader) = parked();
    let r = reg.clone();
    let switch =
        std::thread::spawn(move || create(&r, "ip", &format!("0 {SECTORS} linear o 0"), IP));
    std::thread::sleep(Duration::from_millis(200));
    assert!(
        !switch.is_finished(),
        "create --interpose did not wait for the parked READ: {:?}",
        switch.join()
    );
    queries_answer_and_conflicts_are_refused(&reg, "ip");
    resume_low(&reg, reader);
    join_within(switch, Duration::from_secs(2), "create --interpose").expect("create --interpose");
    let info = reg.info("ip").unwrap();
    assert_eq!(info.interposers.len(), 1, "{info:?}");
    assert!(info.interposers[0].attached, "{info:?}");
    // The switch's marks are gone: the interposer can be suspended, resumed and removed.
    reg.suspend("ip", SuspendFlags::default()).unwrap();
    reg.resume("ip", &ResumeOptions::default()).unwrap();
    let mut buf = vec![0u8; 4096];
    reg.node("o")
        .unwrap()
        .submit(Bio::read(0, &mut buf))
        .unwrap();
    assert!(info.redirected == 0 && reg.info("ip").unwrap().redirected > 0);
    reg.remove("ip", false, false).unwrap();
    assert!(
        reg.node("o").unwrap().hooks().is_empty(),
        "o is still interposed"
    );
}

#[test]
fn remove_detaching_an_interposer_waits_for_parked_io_without_the_registry_lock() {
    let reg = Arc::new(Registry::new());
    let mem = Arc::new(MemDevice::new(SECTORS));
    mem.submit(Bio::write(0, &[0x5a; 4096])).unwrap();
    reg.add_disk_device("d", mem).unwrap();
    let lin = |dev: &str| format!("0 {SECTORS} linear {dev} 0");
    create(&reg, "low", &lin("d"), LoadFlags::default()).unwrap();
    create(&reg, "o", &lin("low"), LoadFlags::default()).unwrap();
    create(&reg, "ip", &lin("o"), IP).unwrap();
    reg.suspend("low", SuspendFlags::default()).unwrap();
    // The READ goes o -> ip (redirected) -> o's table -> low, where it is held.
    let o = reg.node("o").unwrap();
    let reader = std::thread::spawn(move || {
        let mut buf = vec![0u8; 4096];
        o.submit(Bio::read(0, &mut buf)).unwrap();
        buf
    });
    std::thread::sleep(Duration::from_millis(100));
    assert!(
        !reader.is_finished(),
        "the READ was not held by the suspend"
    );
    assert_eq!(reg.info("ip").unwrap().redirected, 1);
    let r = reg.clone();
    let remove = std::thread::spawn(move || r.remove("ip", false, false));
    std::thread::sleep(Duration::from_millis(200));
    assert!(
        !remove.is_finished(),
        "remove did not wait for the parked READ: {:?}",
        remove.join()
    );
    queries_answer_and_conflicts_are_refused(&reg, "ip");
    resume_low(&reg, reader);
    join_within(remove, Duration::from_secs(2), "remove ip").expect("remove ip");
    assert!(reg.info("ip").is_err(), "ip still exists");
    assert!(
        reg.node("o").unwrap().hooks().is_empty(),
        "o is still interposed"
    );
}

#[test]
fn reload_of_a_device_with_parked_io_does_not_hold_the_registry_lock() {
    // Not an interposer: `resume o` with a new table suspends `o`, which waits for the READ
    // parked below it.
    let (reg, reader) = parked();
    let spec = TableSpec::parse(&format!("0 {SECTORS} linear low 0")).unwrap();
    reg.load("o", &spec, LoadFlags::default()).unwrap();
    let r = reg.clone();
    let switch = std::thread::spawn(move || r.resume("o", &ResumeOptions::default()));
    std::thread::sleep(Duration::from_millis(200));
    assert!(
        !switch.is_finished(),
        "resume o did not wait for the parked READ"
    );
    let r = reg.clone();
    within(Duration::from_millis(100), "info o", move || r.info("o")).unwrap();
    let r = reg.clone();
    within(Duration::from_millis(100), "list_mapped", move || {
        r.list_mapped()
    });
    resume_low(&reg, reader);
    join_within(switch, Duration::from_secs(2), "resume o").expect("resume o");
    let info = reg.info("o").unwrap();
    assert!(!info.inactive_present && !info.suspended, "{info:?}");
}

#[test]
fn deferred_removal_of_an_interposer_detaches_without_the_registry_lock() {
    let reg = Arc::new(Registry::new());
    let mem = Arc::new(MemDevice::new(SECTORS));
    mem.submit(Bio::write(0, &[0x5a; 4096])).unwrap();
    reg.add_disk_device("d", mem).unwrap();
    let lin = |dev: &str| format!("0 {SECTORS} linear {dev} 0");
    create(&reg, "low", &lin("d"), LoadFlags::default()).unwrap();
    create(&reg, "o", &lin("low"), LoadFlags::default()).unwrap();
    create(&reg, "ip", &lin("o"), IP).unwrap();
    let ip = reg.open_export("ip", "test:ip").unwrap();
    reg.remove("ip", false, true).unwrap();
    assert!(reg.info("ip").unwrap().deferred_remove);
    reg.suspend("low", SuspendFlags::default()).unwrap();
    let o = reg.node("o").unwrap();
    let reader = std::thread::spawn(move || {
        let mut buf = vec![0u8; 4096];
        o.submit(Bio::read(0, &mut buf)).unwrap();
        buf
    });
    std::thread::sleep(Duration::from_millis(100));
    assert!(
        !reader.is_finished(),
        "the READ was not held by the suspend"
    );
    // The last close runs the deferred removal, which detaches the interposer.
    let r = reg.clone();
    let close = std::thread::spawn(move || r.close_export(ip.id(), "test:ip"));
    std::thread::sleep(Duration::from_millis(200));
    assert!(
        !close.is_finished(),
        "the removal did not wait for the READ"
    );
    let r = reg.clone();
    within(Duration::from_millis(100), "info o", move || r.info("o")).unwrap();
    let r = reg.clone();
    within(Duration::from_millis(100), "list_mapped", move || {
        r.list_mapped()
    });
    let r = reg.clone();
    let busy = within(Duration::from_millis(100), "export of ip", move || {
        r.open_export("ip", "test:again").map(|_| ())
    });
    assert_eq!(busy.unwrap_err().errno(), Errno::EBUSY);
    resume_low(&reg, reader);
    join_within(close, Duration::from_secs(2), "close_export");
    assert!(reg.info("ip").is_err(), "ip still exists");
    assert!(
        reg.node("o").unwrap().hooks().is_empty(),
        "o is still interposed"
    );
}

#[test]
fn removing_an_origin_with_held_writes_settles_them_without_the_registry_lock() {
    // A write to a snapshot origin is acknowledged once held; it reaches the origin after its
    // chunk is copied to the COW device, which is suspended here. The removal's postsuspend
    // settles the held write: it waits for `resume cow`, which must not wait for it.
    let reg = Arc::new(Registry::new());
    reg.add_disk_device("d", Arc::new(MemDevice::new(SECTORS)))
        .unwrap();
    reg.add_disk_device("c", Arc::new(MemDevice::new(SECTORS)))
        .unwrap();
    create(
        &reg,
        "cow",
        &format!("0 {SECTORS} linear c 0"),
        LoadFlags::default(),
    )
    .unwrap();
    create(
        &reg,
        "o",
        &format!("0 {SECTORS} snapshot-origin d"),
        LoadFlags::default(),
    )
    .unwrap();
    create(
        &reg,
        "s",
        &format!("0 {SECTORS} snapshot d cow P 8"),
        LoadFlags::default(),
    )
    .unwrap();
    reg.suspend("cow", SuspendFlags::default()).unwrap();
    let o = reg.node("o").unwrap();
    within(Duration::from_secs(2), "a held origin write", move || {
        o.submit(Bio::write(0, &[0xab; 4096])).unwrap()
    });
    let r = reg.clone();
    let remove = std::thread::spawn(move || r.remove("o", false, false));
    std::thread::sleep(Duration::from_millis(200));
    assert!(
        !remove.is_finished(),
        "remove did not wait for the held write: {:?}",
        remove.join()
    );
    let r = reg.clone();
    within(Duration::from_millis(100), "info s", move || r.info("s")).unwrap();
    let r = reg.clone();
    within(Duration::from_millis(100), "list_mapped", move || {
        r.list_mapped()
    });
    let r = reg.clone();
    within(Duration::from_secs(1), "resume cow", move || {
        r.resume("cow", &ResumeOptions::default())
    })
    .unwrap();
    join_within(remove, Duration::from_secs(5), "remove o").expect("remove o");
    assert!(reg.info("o").is_err(), "o still exists");
    let mut buf = vec![0u8; 4096];
    reg.node("d")
        .unwrap()
        .submit(Bio::read(0, &mut buf))
        .unwrap();
    assert!(buf.iter().all(|b| *b == 0xab), "the held write was lost");
}

#[test]
fn loading_a_snapshot_whose_cow_is_suspended_does_not_hold_the_registry_lock() {
    // The snapshot's constructor reads the COW's metadata, which waits for `resume cow`.
    let reg = Arc::new(Registry::new());
    reg.add_disk_device("d", Arc::new(MemDevice::new(SECTORS)))
        .unwrap();
    reg.add_disk_device("c", Arc::new(MemDevice::new(SECTORS)))
        .unwrap();
    create(
        &reg,
        "cow",
        &format!("0 {SECTORS} linear c 0"),
        LoadFlags::default(),
    )
    .unwrap();
    reg.suspend("cow", SuspendFlags::default()).unwrap();
    let r = reg.clone();
    let load = std::thread::spawn(move || {
        create(
            &r,
            "s",
            &format!("0 {SECTORS} snapshot d cow P 8"),
            LoadFlags::default(),
        )
    });
    std::thread::sleep(Duration::from_millis(200));
    assert!(
        !load.is_finished(),
        "the snapshot did not read its COW: {:?}",
        load.join()
    );
    let r = reg.clone();
    within(Duration::from_millis(100), "info cow", move || {
        r.info("cow")
    })
    .unwrap();
    let r = reg.clone();
    within(Duration::from_millis(100), "list_mapped", move || {
        r.list_mapped()
    });
    let r = reg.clone();
    within(Duration::from_secs(1), "resume cow", move || {
        r.resume("cow", &ResumeOptions::default())
    })
    .unwrap();
    join_within(load, Duration::from_secs(5), "create s").expect("create s");
    let info = reg.info("s").unwrap();
    assert!(info.live_present && !info.suspended, "{info:?}");
    let deps = reg.deps("s", false).unwrap();
    assert_eq!(deps.len(), 2, "{deps:?}");
    assert!(reg.disks()[0].holders.iter().any(|h| h.contains('s')));
}

#[test]
fn a_table_built_without_the_lock_is_checked_again_before_it_is_entered() {
    // While the snapshot's build waits for its COW, its origin disk is exported: the table
    // must not then claim it (it would be refused had the export come first).
    let reg = Arc::new(Registry::new());
    reg.add_disk_device("d", Arc::new(MemDevice::new(SECTORS)))
        .unwrap();
    reg.add_disk_device("c", Arc::new(MemDevice::new(SECTORS)))
        .unwrap();
    create(
        &reg,
        "cow",
        &format!("0 {SECTORS} linear c 0"),
        LoadFlags::default(),
    )
    .unwrap();
    reg.suspend("cow", SuspendFlags::default()).unwrap();
    let r = reg.clone();
    let load = std::thread::spawn(move || {
        create(
            &r,
            "s",
            &format!("0 {SECTORS} snapshot d cow P 8"),
            LoadFlags::default(),
        )
    });
    std::thread::sleep(Duration::from_millis(200));
    assert!(!load.is_finished(), "the snapshot did not read its COW");
    let r = reg.clone();
    within(Duration::from_millis(100), "export d", move || {
        r.open_export("d", "test:d").map(|_| ())
    })
    .unwrap();
    reg.resume("cow", &ResumeOptions::default()).unwrap();
    let err = join_within(load, Duration::from_secs(5), "create s").unwrap_err();
    assert_eq!(err.errno(), Errno::EBUSY, "{err}");
    assert!(reg.info("s").is_err(), "s was left behind");
    let holders = &reg.disks()[0].holders;
    assert_eq!(holders, &vec!["export test:d".to_string()]);
}
