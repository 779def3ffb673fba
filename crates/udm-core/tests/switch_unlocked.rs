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

use udm_testkit::core::{create, IP};

const SECTORS: u64 = 8192;

/// `d` (memory, 0x5a in its first 4 KiB) <- `low` (linear) <- `o` (linear), and `ip`
/// interposing `o` when `interposed`.
fn stack(interposed: bool) -> Arc<Registry> {
    let reg = Arc::new(Registry::new());
    let mem = Arc::new(MemDevice::new(SECTORS));
    mem.submit(Bio::write(0, &[0x5a; 4096])).unwrap();
    reg.add_disk_device("d", mem).unwrap();
    let lin = |dev: &str| format!("0 {SECTORS} linear {dev} 0");
    create(&reg, "low", &lin("d"), LoadFlags::default()).unwrap();
    create(&reg, "o", &lin("low"), LoadFlags::default()).unwrap();
    if interposed {
        create(&reg, "ip", &lin("o"), IP).unwrap();
    }
    reg
}

/// Suspends `low` of the [`stack`] and parks a READ of `o` in it; returns the reader.
fn park_read_of_o(reg: &Registry) -> JoinHandle<Vec<u8>> {
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
    reader
}

/// The [`stack`] without an interposer and a READ of `o` parked in the suspended `low`.
fn parked() -> (Arc<Registry>, JoinHandle<Vec<u8>>) {
    let reg = stack(false);
    let reader = park_read_of_o(&reg);
    (reg, reader)
}

/// Memory disks `d` and `c`, and `cow` (linear) on `c`.
fn cow_rig() -> Arc<Registry> {
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
    reg
}

/// The [`cow_rig`] with `cow` suspended and `create s` of a snapshot of `d` in `cow` waiting
/// for it (the snapshot's constructor reads the COW's metadata).
fn snapshot_waiting_for_its_cow() -> (Arc<Registry>, JoinHandle<udm_core::Result<()>>) {
    let reg = cow_rig();
    reg.suspend("cow", SuspendFlags::default()).unwrap();
    let load = waiting(&reg, "the snapshot did not read its COW", |r| {
        create(
            r,
            "s",
            &format!("0 {SECTORS} snapshot d cow P 8"),
            LoadFlags::default(),
        )
    });
    (reg, load)
}

/// Runs `f` on the registry from another thread; it must return within 100 ms (a query, or a
/// change refused at once).
fn quick<T: Send + 'static>(
    reg: &Arc<Registry>,
    what: &str,
    f: impl FnOnce(&Registry) -> T + Send + 'static,
) -> T {
    let r = reg.clone();
    within(Duration::from_millis(100), what, move || f(&r))
}

/// Starts `f` on the registry on a thread and checks that it still waits 200 ms later.
fn waiting<T: Send + std::fmt::Debug + 'static>(
    reg: &Arc<Registry>,
    what: &str,
    f: impl FnOnce(&Registry) -> T + Send + 'static,
) -> JoinHandle<T> {
    let r = reg.clone();
    let t = std::thread::spawn(move || f(&r));
    std::thread::sleep(Duration::from_millis(200));
    assert!(!t.is_finished(), "{what}: {:?}", t.join());
    t
}

/// `resume NAME`, which must succeed within 1 s.
fn resume_within_1s(reg: &Arc<Registry>, name: &str) {
    let r = reg.clone();
    let n = name.to_string();
    within(
        Duration::from_secs(1),
        &format!("resume {name}"),
        move || r.resume(&n, &ResumeOptions::default()),
    )
    .unwrap();
}

/// While a switch waits for the parked READ: queries answer within 100 ms and conflicting
/// operations are refused with EBUSY.
fn queries_answer_and_conflicts_are_refused(reg: &Arc<Registry>, switching: &str) {
    for dev in [switching, "o", "low"] {
        let d = dev.to_string();
        quick(reg, &format!("info {dev}"), move |r| r.info(&d)).unwrap();
        let d = dev.to_string();
        quick(reg, &format!("status {dev}"), move |r| r.status(&d, false)).unwrap();
        let d = dev.to_string();
        quick(reg, &format!("table {dev}"), move |r| r.table(&d, false)).unwrap();
    }
    let names = quick(reg, "list_mapped", |r| r.list_mapped());
    assert!(names.iter().any(|(n, _)| n == switching), "{names:?}");
    quick(reg, "devices", |r| r.devices());
    quick(reg, "disks", |r| r.disks());

    let busy = |what: &str, r: udm_core::Result<()>| match r {
        Err(e) => assert_eq!(e.errno(), Errno::EBUSY, "{what}: {e}"),
        Ok(()) => panic!("{what} succeeded during the switch of {switching}"),
    };
    let s = switching.to_string();
    busy(
        "suspend",
        quick(reg, "suspend", move |r| {
            r.suspend(&s, SuspendFlags::default())
        }),
    );
    let s = switching.to_string();
    busy(
        "remove",
        quick(reg, "remove", move |r| r.remove(&s, false, false)),
    );
    let s = switching.to_string();
    busy(
        "load",
        quick(reg, "load", move |r| {
            let spec = TableSpec::parse(&format!("0 {SECTORS} zero")).unwrap();
            r.load(&s, &spec, LoadFlags::default())
        }),
    );
    busy(
        "remove o",
        quick(reg, "remove o", |r| r.remove("o", false, false)),
    );
    // A second interposer of `o` waits for nothing: the device is held by the first switch.
    busy(
        "second interposer",
        quick(reg, "create ip2 --interpose", |r| {
            create(r, "ip2", &format!("0 {SECTORS} linear o 0"), IP)
        }),
    );
}

/// Releases the parked READ with `resume low` (within 1 s) and checks what it read.
fn resume_low(reg: &Arc<Registry>, reader: JoinHandle<Vec<u8>>) {
    resume_within_1s(reg, "low");
    let buf = join_within(reader, Duration::from_secs(2), "the parked READ");
    assert!(
        buf.iter().all(|b| *b == 0x5a),
        "the READ returned wrong data"
    );
}

#[test]
fn create_interpose_waits_for_parked_io_without_the_registry_lock() {
    let (reg, reader) = parked();
    let switch = waiting(
        &reg,
        "create --interpose did not wait for the parked READ",
        |r| create(r, "ip", &format!("0 {SECTORS} linear o 0"), IP),
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
    let reg = stack(true);
    // The READ goes o -> ip (redirected) -> o's table -> low, where it is held.
    let reader = park_read_of_o(&reg);
    assert_eq!(reg.info("ip").unwrap().redirected, 1);
    let remove = waiting(&reg, "remove did not wait for the parked READ", |r| {
        r.remove("ip", false, false)
    });
    queries_answer_and_conflicts_are_refused(&reg, "ip");
    // Nothing may open the device being removed meanwhile: not an export, not a table.
    let export = quick(&reg, "export of ip", |r| {
        r.open_export("ip", "test:ip").map(|_| ())
    });
    assert_eq!(export.unwrap_err().errno(), Errno::EBUSY);
    let table = quick(&reg, "a table on ip", |r| {
        create(
            r,
            "up",
            &format!("0 {SECTORS} linear ip 0"),
            LoadFlags::default(),
        )
    });
    assert_eq!(table.unwrap_err().errno(), Errno::EBUSY);
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
    let switch = waiting(&reg, "resume o did not wait for the parked READ", |r| {
        r.resume("o", &ResumeOptions::default())
    });
    quick(&reg, "info o", |r| r.info("o")).unwrap();
    quick(&reg, "list_mapped", |r| r.list_mapped());
    resume_low(&reg, reader);
    join_within(switch, Duration::from_secs(2), "resume o").expect("resume o");
    let info = reg.info("o").unwrap();
    assert!(!info.inactive_present && !info.suspended, "{info:?}");
}

#[test]
fn deferred_removal_of_an_interposer_detaches_without_the_registry_lock() {
    let reg = stack(true);
    let ip = reg.open_export("ip", "test:ip").unwrap();
    reg.remove("ip", false, true).unwrap();
    assert!(reg.info("ip").unwrap().deferred_remove);
    let reader = park_read_of_o(&reg);
    // The last close runs the deferred removal, which detaches the interposer.
    let close = waiting(&reg, "the removal did not wait for the READ", move |r| {
        r.close_export(ip.id(), "test:ip")
    });
    quick(&reg, "info o", |r| r.info("o")).unwrap();
    quick(&reg, "list_mapped", |r| r.list_mapped());
    let busy = quick(&reg, "export of ip", |r| {
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
    let reg = cow_rig();
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
    let remove = waiting(&reg, "remove did not wait for the held write", |r| {
        r.remove("o", false, false)
    });
    quick(&reg, "info s", |r| r.info("s")).unwrap();
    quick(&reg, "list_mapped", |r| r.list_mapped());
    resume_within_1s(&reg, "cow");
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
    let (reg, load) = snapshot_waiting_for_its_cow();
    quick(&reg, "info cow", |r| r.info("cow")).unwrap();
    quick(&reg, "list_mapped", |r| r.list_mapped());
    resume_within_1s(&reg, "cow");
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
    let (reg, load) = snapshot_waiting_for_its_cow();
    quick(&reg, "export d", |r| {
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
