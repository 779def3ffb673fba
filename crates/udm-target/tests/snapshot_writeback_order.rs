//! The write-back shared by snapshot-origin and era (udm-target/src/writeback.rs), driven
//! directly with jobs whose commit the test holds: a write that must not be held (FUA) and
//! overlaps a held write reaches the device only after it, reads and block status see held
//! data, and a plain overlapping write is held behind it, so the device ends with the later
//! data. Written against the mutants cargo-mutants found missed (`wait_clear` removed let the
//! FUA write land first and the held one overwrite it).

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests may panic on setup failures

use std::time::Duration;

use udm_io::{Bio, BioFlags, ExtentKind};

mod writeback_common;
use writeback_common::{first_byte, hold_gated, setup};

#[test]
fn a_fua_write_over_a_held_write_lands_after_it() {
    let (wb, mem, dev, gate) = setup();
    hold_gated(&wb, &dev, 0, &[1u8; 4096], &gate).unwrap();
    assert!(wb.holds(0, 8), "the held write is seen as held");
    // Reads and block status see the held data before it reaches the device.
    let mut buf = [0u8; 512];
    wb.read(&*dev, 0, &mut buf, BioFlags::empty()).unwrap();
    assert_eq!(buf[0], 1, "a read does not see the held write");
    assert_eq!(
        first_byte(&mem, 0),
        0,
        "held data reached the device before its commit"
    );
    let ext = wb.block_status(&*dev, 0, 8).unwrap();
    assert!(ext.iter().all(|e| e.kind == ExtentKind::Data), "{ext:?}");
    // A FUA write over it must wait for it: it may not land first and be overwritten.
    let (wb2, dev2) = (wb.clone(), dev.clone());
    let fua = std::thread::spawn(move || {
        let data = [2u8; 512];
        wb2.write_through(&dev2, Bio::write(0, &data).with_flags(BioFlags::FUA))
    });
    std::thread::sleep(Duration::from_millis(100));
    assert!(
        !fua.is_finished(),
        "the FUA write did not wait for the held write"
    );
    gate.open();
    fua.join().unwrap().unwrap();
    wb.settle();
    assert_eq!(
        first_byte(&mem, 0),
        2,
        "the earlier held write overwrote the FUA write"
    );
    assert!(!wb.holds(0, 8));
}

#[test]
fn a_plain_write_over_a_held_write_is_held_behind_it() {
    let (wb, mem, dev, gate) = setup();
    hold_gated(&wb, &dev, 8, &[1u8; 4096], &gate).unwrap();
    // Overlapping the held write's end: held too (returns at once), applied after it.
    let data = [3u8; 1024];
    wb.write_through(&dev, Bio::write(14, &data)).unwrap();
    assert_eq!(
        first_byte(&mem, 14),
        0,
        "went to the device ahead of the held write"
    );
    let mut buf = [0u8; 512];
    wb.read(&*dev, 14, &mut buf, BioFlags::empty()).unwrap();
    assert_eq!(
        buf[0], 3,
        "a read must see the later write over the earlier one"
    );
    gate.open();
    wb.settle();
    assert_eq!(first_byte(&mem, 8), 1);
    assert_eq!(first_byte(&mem, 14), 3, "applied out of order");
    assert_eq!(first_byte(&mem, 16), 0);
    // Not overlapping anything now: straight to the device.
    wb.write_through(&dev, Bio::write(100, &[4u8; 512]))
        .unwrap();
    assert_eq!(first_byte(&mem, 100), 4);
    assert!(wb.has_room(4096));
}

#[test]
fn room_runs_out_at_the_count_bound_and_comes_back_when_applied() {
    let (wb, mem, dev, gate) = setup();
    assert!(wb.has_room(512));
    for i in 0..udm_target::writeback::MAX_HELD_WRITES as u64 {
        hold_gated(&wb, &dev, i % 2048, &[5u8; 512], &gate).unwrap();
    }
    assert!(!wb.has_room(512), "1024 writes held and still room");
    gate.open();
    wb.settle();
    assert!(wb.has_room(512));
    assert_eq!(first_byte(&mem, 1023), 5);
}
