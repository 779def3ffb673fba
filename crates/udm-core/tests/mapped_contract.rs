//! What a mapped device promises its clients and `udmsetup`, checked on the device itself (its
//! node's backend) over a memory disk: flushes reach the disk, empty reads do not, `-r` tables
//! are read-only, block status is cut at the end, its description and errors name it (after a
//! rename too), the event counter behind `wait` and `info`'s event number, and the kernel's "no
//! block device" state. Each test was written against a mutant cargo-mutants found missed
//! (`scripts/mutants.sh`): the scope runs only udm-core's own tests.

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests may panic on setup failures

use std::sync::Arc;
use std::time::{Duration, Instant};

use udm_core::registry::{LoadFlags, ResumeOptions};
use udm_core::Registry;
use udm_io::backend::mem::MemDevice;
use udm_io::{Bio, BioKind, BlockDevice, ExtentKind};
use udm_target::table::TableSpec;
use udm_types::errno::HasErrno;
use udm_types::Errno;

/// A registry with disk `d` (4096 sectors, data only in its first 8) and mapped device `m`
/// (`linear d 0` over all of it, loaded with `flags`).
fn setup(flags: LoadFlags) -> (Registry, Arc<MemDevice>) {
    let reg = Registry::new();
    let mem = Arc::new(MemDevice::new(4096));
    mem.submit(Bio::write(0, &[1u8; 4096])).unwrap();
    reg.add_disk_device("d", mem.clone()).unwrap();
    let spec = TableSpec::parse("0 4096 linear d 0").unwrap();
    reg.create(
        "m",
        None,
        None,
        Some((&spec, flags)),
        &ResumeOptions::default(),
    )
    .unwrap();
    (reg, mem)
}

/// A registry with one memory disk `d` of 2048 sectors.
fn with_disk_d() -> Registry {
    let reg = Registry::new();
    reg.add_disk_device("d", Arc::new(MemDevice::new(2048)))
        .unwrap();
    reg
}

fn mapped(reg: &Registry, name: &str) -> Arc<dyn BlockDevice> {
    reg.node(name).unwrap().backend().clone()
}

#[test]
fn flushes_reach_the_disk_and_empty_reads_do_not() {
    let (reg, mem) = setup(LoadFlags::default());
    let m = mapped(&reg, "m");
    let (flushes, reads) = (mem.count(BioKind::Flush), mem.count(BioKind::Read));
    m.submit(Bio::flush()).unwrap();
    assert_eq!(
        mem.count(BioKind::Flush),
        flushes + 1,
        "a flush of the mapped device did not reach its disk"
    );
    m.submit(Bio::read(8, &mut [])).unwrap();
    assert_eq!(
        mem.count(BioKind::Read),
        reads,
        "an empty read reached the disk"
    );
}

#[test]
fn read_only_follows_the_table_flag() {
    let (reg, _) = setup(LoadFlags::default());
    assert!(!mapped(&reg, "m").read_only());
    let (reg, mem) = setup(LoadFlags {
        read_only: true,
        ..LoadFlags::default()
    });
    let m = mapped(&reg, "m");
    assert!(m.read_only());
    let e = m.submit(Bio::write(0, &[0u8; 512])).unwrap_err();
    assert!(e.to_string().contains('m'), "{e}");
    assert_eq!(
        mem.contents()[0],
        1,
        "a write went through a read-only table"
    );
}

#[test]
fn block_status_past_the_end_is_cut_there() {
    let (reg, _) = setup(LoadFlags::default());
    let m = mapped(&reg, "m");
    let ext = m.block_status(4088, 64).unwrap();
    let total: u64 = ext.iter().map(|e| e.sectors).sum();
    assert_eq!(
        total, 8,
        "extents past the end of a 4096-sector device: {ext:?}"
    );
    // Inside: the whole range, data where written, a hole after.
    let ext = m.block_status(0, 4096).unwrap();
    assert_eq!(ext.iter().map(|e| e.sectors).sum::<u64>(), 4096, "{ext:?}");
    assert_eq!(ext[0].kind, ExtentKind::Data, "{ext:?}");
}

#[test]
fn the_device_is_named_in_descriptions_and_errors_after_a_rename() {
    let (reg, _) = setup(LoadFlags::default());
    let m = mapped(&reg, "m");
    let id = reg.info("m").unwrap();
    assert_eq!(m.describe(), format!("m ({}:{})", id.major, id.minor));
    reg.rename("m", "renamed").unwrap();
    assert_eq!(m.describe(), format!("renamed ({}:{})", id.major, id.minor));
    reg.clear("renamed").unwrap();
    reg.suspend("renamed", Default::default()).unwrap();
    reg.resume("renamed", &ResumeOptions::default()).unwrap();
    // Still live (clear drops only the inactive table): the write works.
    m.submit(Bio::write(8, &[2u8; 512])).unwrap();
}

#[test]
fn a_device_without_a_live_table_names_itself_in_the_error() {
    let reg = Registry::new();
    reg.create("empty", None, None, None, &ResumeOptions::default())
        .unwrap();
    let e = mapped(&reg, "empty")
        .submit(Bio::write(0, &[0u8; 512]))
        .unwrap_err();
    assert!(e.to_string().contains("empty has no live table"), "{e}");
}

#[test]
fn events_count_and_wake_waiters() {
    let (reg, _) = setup(LoadFlags::default());
    let first = reg.info("m").unwrap().event_nr;
    reg.rename("m", "m2").unwrap();
    let after = reg.info("m2").unwrap().event_nr;
    assert_eq!(after, first.wrapping_add(1), "a rename raises one event");
    // A number already passed returns at once.
    let t = Instant::now();
    assert_eq!(
        reg.wait_event("m2", first, Duration::from_secs(5)).unwrap(),
        after
    );
    assert!(
        t.elapsed() < Duration::from_secs(2),
        "waited for an event already raised"
    );
    // Nothing new: waits the whole timeout and returns the same number.
    let t = Instant::now();
    assert_eq!(
        reg.wait_event("m2", after, Duration::from_millis(200))
            .unwrap(),
        after
    );
    assert!(
        t.elapsed() >= Duration::from_millis(150),
        "returned before the timeout"
    );
    // An event raised meanwhile wakes the waiter with the new number.
    let ev = reg.events("m2").unwrap();
    let waiter = std::thread::spawn(move || ev.wait(after, Duration::from_secs(10)));
    std::thread::sleep(Duration::from_millis(100));
    reg.set_uuid("m2", "UUID-1").unwrap();
    let t = Instant::now();
    assert_eq!(waiter.join().unwrap(), after.wrapping_add(1));
    assert!(
        t.elapsed() < Duration::from_secs(5),
        "the waiter was not woken"
    );
    assert_eq!(reg.info("m2").unwrap().event_nr, after.wrapping_add(1));
}

#[test]
fn no_block_device_until_a_table_is_loaded_and_after() {
    let reg = Registry::new();
    reg.add_disk_device("d", Arc::new(MemDevice::new(4096)))
        .unwrap();
    reg.create("e", None, None, None, &ResumeOptions::default())
        .unwrap();
    assert!(
        reg.info("e").unwrap().no_block_device,
        "created without a table"
    );
    let spec = TableSpec::parse("0 4096 linear d 0").unwrap();
    reg.load("e", &spec, LoadFlags::default()).unwrap();
    assert!(
        !reg.info("e").unwrap().no_block_device,
        "an inactive table is loaded"
    );
    reg.clear("e").unwrap();
    assert!(
        !reg.info("e").unwrap().no_block_device,
        "the kernel's gendisk stays once a table was loaded"
    );
}

#[test]
fn suspend_and_resume_run_the_live_tables_hooks() {
    // era's hooks show: postsuspend archives the era, preresume starts the next one.
    let reg = with_disk_d();
    reg.add_disk_device("meta", Arc::new(MemDevice::new(8 * 64)))
        .unwrap();
    udm_testkit::core::create(&reg, "e", "0 2048 era meta d 128", LoadFlags::default()).unwrap();
    let era = |reg: &Registry| {
        let p = reg.status("e", false).unwrap()[0].params.clone();
        p.split_whitespace().nth(2).unwrap().parse::<u32>().unwrap()
    };
    let before = era(&reg);
    reg.suspend("e", Default::default()).unwrap();
    reg.resume("e", &ResumeOptions::default()).unwrap();
    assert_eq!(
        era(&reg),
        before + 1,
        "a resume without a new table runs preresume"
    );
}

#[test]
fn targets_lists_every_target_type_with_its_version() {
    let reg = Registry::new();
    let targets = reg.targets();
    for name in [
        "linear",
        "striped",
        "snapshot",
        "snapshot-origin",
        "era",
        "delay",
        "flakey",
    ] {
        let (_, v) = targets
            .iter()
            .find(|(n, _)| n == name)
            .unwrap_or_else(|| panic!("{name} missing from {targets:?}"));
        assert!(v[0] >= 1, "{name} version {v:?}");
    }
    let mut names: Vec<&str> = targets.iter().map(|(n, _)| n.as_str()).collect();
    names.sort_unstable();
    names.dedup();
    assert_eq!(
        names.len(),
        targets.len(),
        "a target listed twice: {targets:?}"
    );
}

#[test]
fn an_interposed_table_holds_its_device_until_removed() {
    let reg = with_disk_d();
    udm_testkit::core::create(
        &reg,
        "ip",
        "0 2048 linear [interpose]d 0",
        LoadFlags::default(),
    )
    .unwrap();
    let e = reg.remove_disk("d").unwrap_err();
    assert!(
        e.to_string()
            .contains("1 shared open(s) by interposed tables"),
        "{e}"
    );
    reg.remove("ip", false, false).unwrap();
    reg.remove_disk("d").unwrap();
}

#[test]
fn disks_report_read_only_and_are_held_by_their_tables() {
    let reg = Registry::new();
    let ro = reg
        .add_disk_device("r", Arc::new(MemDevice::new(2048).read_only()))
        .unwrap();
    assert!(ro.read_only, "a read-only device added as a disk: {ro:?}");
    let rw = reg
        .add_disk_device("w", Arc::new(MemDevice::new(2048)))
        .unwrap();
    assert!(!rw.read_only);
    udm_testkit::core::create(&reg, "t", "0 2048 linear w 0", LoadFlags::default()).unwrap();
    let e = reg.remove_disk("w").unwrap_err();
    assert!(e.to_string().contains("in use by mapped device t"), "{e}");
    reg.remove("t", false, false).unwrap();
    reg.remove_disk("w").unwrap();
    let left: Vec<String> = reg.disks().into_iter().map(|d| d.name).collect();
    assert_eq!(left, ["r"], "the other disk is still listed");
}

#[test]
fn core_messages_cancel_a_deferred_removal_and_refuse_the_rest() {
    let (reg, _) = setup(LoadFlags::default());
    let msg = |argv: &[&str]| {
        let argv: Vec<String> = argv.iter().map(|s| s.to_string()).collect();
        reg.message("m", 0, &argv)
    };
    let e = msg(&["@cancel_deferred_remove"]).unwrap_err();
    assert_eq!(e.errno(), Errno::ENXIO, "not scheduled: {e}");
    let _open = reg.open_export("m", "nbd:m").unwrap();
    reg.remove("m", false, true).unwrap();
    assert!(
        reg.info("m").unwrap().deferred_remove,
        "open: removal deferred"
    );
    msg(&["@cancel_deferred_remove"]).unwrap();
    assert!(!reg.info("m").unwrap().deferred_remove, "cancelled");
    let e = msg(&["@other"]).unwrap_err();
    assert_eq!(e.errno(), Errno::EINVAL, "{e}");
    assert!(
        e.to_string().contains("unsupported core message @other"),
        "{e}"
    );
    let e = msg(&[]).unwrap_err();
    assert!(e.to_string().contains("empty message"), "{e}");
}

#[test]
fn an_interposed_table_marking_two_ranges_is_refused_not_cut_to_one() {
    // One interposer per table: two [interpose] lines over two halves of d would be two, and
    // are refused whole (a table that silently interposed one half would leave the other
    // half's writes untracked).
    let reg = with_disk_d();
    let table = "0 1024 linear [interpose]d 0\n1024 1024 linear [interpose]d 1024";
    let e = udm_testkit::core::create(&reg, "ip", table, LoadFlags::default()).unwrap_err();
    assert!(e.to_string().contains("would attach 2"), "{e}");
}

/// A DOS table: one extended partition at 2048 holding a chain of `n` logical partitions of 100
/// sectors (numbered 5, 6, ...).
fn dos_with_logicals(n: u32) -> MemDevice {
    let mem = MemDevice::new(16384);
    let entry = |s: &mut [u8], slot: usize, ptype: u8, start: u32, len: u32| {
        let e = &mut s[0x1be + 16 * slot..0x1be + 16 * (slot + 1)];
        e[4] = ptype;
        e[8..12].copy_from_slice(&start.to_le_bytes());
        e[12..16].copy_from_slice(&len.to_le_bytes());
        s[510] = 0x55;
        s[511] = 0xaa;
    };
    let mut mbr = [0u8; 512];
    entry(&mut mbr, 0, 0x05, 2048, 200 * n);
    mem.submit(Bio::write(0, &mbr)).unwrap();
    for k in 0..n {
        let mut ebr = [0u8; 512];
        entry(&mut ebr, 0, 0x83, 2, 100);
        if k + 1 < n {
            entry(&mut ebr, 1, 0x05, 200 * (k + 1), 200);
        }
        mem.submit(Bio::write(u64::from(2048 + 200 * k), &ebr))
            .unwrap();
    }
    mem
}

#[test]
fn partitions_from_16_on_get_extended_numbers() {
    let reg = Registry::new();
    let d = reg
        .add_disk_device("p", Arc::new(dos_with_logicals(13)))
        .unwrap();
    let by_number = |n: u32| {
        let p = d.partitions.iter().find(|p| p.number == n);
        p.unwrap_or_else(|| panic!("no partition {n}: {:?}", d.partitions))
    };
    let disk_minor: u32 = d.dev.split(':').nth(1).unwrap().parse().unwrap();
    for n in [5, 15] {
        assert_eq!(
            by_number(n).dev,
            format!("8:{}", disk_minor + n),
            "partition {n}"
        );
    }
    for n in [16, 17] {
        assert!(
            by_number(n).dev.starts_with("259:"),
            "partition {n}: {}",
            by_number(n).dev
        );
    }
    let mut devs: Vec<&str> = d.partitions.iter().map(|p| p.dev.as_str()).collect();
    devs.sort_unstable();
    devs.dedup();
    assert_eq!(devs.len(), d.partitions.len(), "{:?}", d.partitions);
}
