//! Group commit: while one exception's metadata area is being written (PREFLUSH|FUA on the COW
//! device), other origin writers copy their chunks and record their exceptions, then share the
//! next area write instead of each writing the area in turn. FUA writes take the kernel's
//! path (each writer waits for its commit); plain writes are acknowledged at once and held
//! (write-back), and nothing reaches the origin before its commit.
#![allow(clippy::unwrap_used)] // test helpers outside #[test] fns unwrap too

mod snapshot_common;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use snapshot_common::gate::{wait_for, GateDev};
use snapshot_common::*;
use udm_io::{Bio, BioFlags, BlockDevice};

#[test]
fn concurrent_fua_origin_writers_share_area_writes() {
    share_area_writes(true);
}

#[test]
fn held_origin_writes_share_area_writes() {
    share_area_writes(false);
}

fn share_area_writes(fua: bool) {
    const OS: u64 = 2048;
    const WRITERS: u64 = 6;
    let mut c = Ctx::new();
    let o = c.mem("o", OS);
    dev_write(&*o, 0, &pattern(3, 0, OS));
    let cow = Arc::new(GateDev::new(OS * 2));
    c.add("c", cow.clone());
    let org = c.origin(OS, "o").unwrap();
    let snap = c.snapshot(OS, "o c P 8").unwrap();
    activate(&*snap);
    let areas0 = cow.area_writes.load(Ordering::SeqCst);
    let data0 = cow.data_writes.load(Ordering::SeqCst);
    let acked = AtomicU64::new(0);
    cow.set_closed(true);
    let org = &*org;
    let flags = if fua {
        BioFlags::FUA
    } else {
        BioFlags::empty()
    };
    std::thread::scope(|sc| {
        let acked = &acked;
        let writer = move |sector: u64| {
            let d = pattern(9, sector, 8);
            org.map(Bio::write(sector, &d).with_flags(flags)).unwrap();
            acked.fetch_add(1, Ordering::SeqCst);
        };
        // The first writer's area write blocks at the gate...
        sc.spawn(move || writer(0));
        wait_for("the first area write", || {
            cow.blocked.load(Ordering::SeqCst) == 1
        });
        for i in 1..WRITERS {
            sc.spawn(move || writer(i * 64));
        }
        if fua {
            // ...while the others copy their chunks (the store's lock is not held across it).
            wait_for("every copy", || {
                cow.data_writes.load(Ordering::SeqCst) - data0 == WRITERS
            });
            // Generous margin for the last writers to record their exceptions after their copy.
            std::thread::sleep(Duration::from_millis(300));
            assert_eq!(
                acked.load(Ordering::SeqCst),
                0,
                "FUA writes wait for their commit"
            );
        } else {
            // ...while every writer is acknowledged, and none of the data is on the origin.
            wait_for("every acknowledgement", || {
                acked.load(Ordering::SeqCst) == WRITERS
            });
            for i in 0..WRITERS {
                let sector = i * 64;
                assert_eq!(dev_read(org_dev(&c), sector, 8), pattern(3, sector, 8));
            }
        }
        assert_eq!(cow.area_writes.load(Ordering::SeqCst) - areas0, 1);
        cow.set_closed(false);
    });
    if !fua {
        flush(org).unwrap();
    }
    let areas = cow.area_writes.load(Ordering::SeqCst) - areas0;
    assert!(
        areas <= 3,
        "{WRITERS} writers made {areas} area writes: not shared"
    );
    // The snapshot still shows the old data and the origin the new.
    for i in 0..WRITERS {
        let sector = i * 64;
        assert_eq!(read(&*snap, sector, 8).unwrap(), pattern(3, sector, 8));
        assert_eq!(read(org, sector, 8).unwrap(), pattern(9, sector, 8));
    }
    // And the store reloads them all.
    drop(snap);
    let mut c2 = Ctx::new();
    let o2 = c2.mem("o", OS);
    dev_write(&*o2, 0, &dev_read(org_dev(&c), 0, OS));
    let w2 = c2.mem("c", OS * 2);
    dev_write(&*w2, 0, &dev_read(&*cow, 0, OS * 2));
    let s2 = c2.snapshot(OS, "o c P 8").unwrap();
    activate(&*s2);
    assert!(s2.status().starts_with(&format!("{}/", (2 + WRITERS) * 8)));
    for i in 0..WRITERS {
        let sector = i * 64;
        assert_eq!(read(&*s2, sector, 8).unwrap(), pattern(3, sector, 8));
    }
}

fn org_dev(c: &Ctx) -> &dyn BlockDevice {
    &*c.devs["o"].dev
}
