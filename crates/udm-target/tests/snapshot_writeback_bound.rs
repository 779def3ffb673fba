//! The write-back's memory bound and its threads (udm-target/src/writeback.rs), driven directly
//! with jobs whose commit the test holds. A test binary of its own: the bound is process-wide
//! (`set_held_limit`, udmd's `--snapshot-writeback-mib`). Written against mutants cargo-mutants
//! found missed: the bound ignored (`set_held_limit` doing nothing), a write's length
//! miscomputed when deciding whether it may be held, the write-back threads not marked as I/O
//! flushers, the default `Jobs::run_inline` neither preparing nor committing.

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests may panic on setup failures

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use udm_io::backend::mem::MemDevice;
use udm_io::{Bio, BlockDevice};
use udm_target::writeback::{held_limit, set_held_limit, Jobs};

mod writeback_common;
use writeback_common::{first_byte, hold_gated, setup, Gate};

/// The tests of this binary share the process-wide bound: one at a time.
static SERIAL: Mutex<()> = Mutex::new(());

#[test]
fn the_byte_bound_decides_what_is_held_and_a_write_past_it_waits() {
    let _one = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    set_held_limit(64 << 10);
    assert_eq!(held_limit(), 64 << 10, "set_held_limit not in force");
    let (wb, mem, dev, gate) = setup();
    hold_gated(&wb, &dev, 0, &[1u8; 32 << 10], &gate).unwrap();
    assert!(wb.has_room(32 << 10), "32 KiB held of 64: room for 32 more");
    assert!(!wb.has_room((32 << 10) + 1), "room past the 64 KiB bound");
    // A plain 64 KiB write over the held one would exceed the bound: not held behind it but
    // waiting until the held write is applied, then written through.
    let (wb2, dev2) = (wb.clone(), dev.clone());
    let big = std::thread::spawn(move || {
        let data = vec![2u8; 64 << 10];
        wb2.write_through(&dev2, Bio::write(0, &data))
    });
    std::thread::sleep(Duration::from_millis(150));
    assert!(
        !big.is_finished(),
        "a write past the bound was held (its length taken wrongly?)"
    );
    assert_eq!(first_byte(&mem, 0), 0, "held data reached the device early");
    // A small plain write over the held one fits: held behind it, returns at once.
    wb.write_through(&dev, Bio::write(4, &[3u8; 512])).unwrap();
    gate.open();
    big.join().unwrap().unwrap();
    assert_eq!(
        first_byte(&mem, 0),
        2,
        "a write past the bound was held instead of written through"
    );
    wb.settle();
    assert_eq!(first_byte(&mem, 0), 2);
    assert_eq!(
        first_byte(&mem, 4),
        2,
        "the held writes overwrote a later one"
    );
    assert_eq!(first_byte(&mem, 127), 2);
    assert!(wb.has_room(64 << 10));
    // Away from sector 0: a 16 KiB write over a held 32 KiB one fits the bound and is held
    // behind it (a length taken from the sector numbers themselves would not fit).
    let gate = Arc::new(Gate::default());
    hold_gated(&wb, &dev, 1000, &[5u8; 32 << 10], &gate).unwrap();
    let (wb2, dev2) = (wb.clone(), dev.clone());
    let medium = std::thread::spawn(move || {
        let data = vec![6u8; 16 << 10];
        wb2.write_through(&dev2, Bio::write(1008, &data))
    });
    std::thread::sleep(Duration::from_millis(150));
    let held_behind = medium.is_finished();
    gate.open();
    medium.join().unwrap().unwrap();
    assert!(
        held_behind,
        "a write within the bound waited instead of being held"
    );
    wb.settle();
    assert_eq!(first_byte(&mem, 1000), 5);
    assert_eq!(first_byte(&mem, 1008), 6, "applied out of order");
    assert_eq!(first_byte(&mem, 1040), 5);
    set_held_limit(udm_target::writeback::MAX_HELD_BYTES);
}

#[test]
fn a_hold_past_the_bound_waits_for_the_commit_in_progress() {
    let _one = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    set_held_limit(8 << 10);
    let (wb, mem, dev, gate) = setup();
    hold_gated(&wb, &dev, 0, &[1u8; 8 << 10], &gate).unwrap();
    let (wb2, dev2, g2) = (wb.clone(), dev.clone(), gate.clone());
    let second = std::thread::spawn(move || hold_gated(&wb2, &dev2, 100, &[2u8; 4096], &g2));
    std::thread::sleep(Duration::from_millis(150));
    assert!(!second.is_finished(), "held 12 KiB under an 8 KiB bound");
    gate.open();
    second.join().unwrap().unwrap();
    wb.settle();
    assert_eq!(first_byte(&mem, 0), 1);
    assert_eq!(first_byte(&mem, 100), 2);
    set_held_limit(udm_target::writeback::MAX_HELD_BYTES);
}

/// The kernel's PF_MEMALLOC_NOIO (`include/linux/sched.h`), set by PR_SET_IO_FLUSHER.
const PF_MEMALLOC_NOIO: u64 = 0x0008_0000;

/// The `flags` field of a thread's `/proc/self/task/TID/stat`, by thread name.
fn thread_flags(prefix: &str) -> Vec<(String, u64)> {
    let mut out = Vec::new();
    for t in std::fs::read_dir("/proc/self/task").unwrap().flatten() {
        let comm = std::fs::read_to_string(t.path().join("comm")).unwrap_or_default();
        let comm = comm.trim().to_string();
        if !comm.starts_with(prefix) {
            continue;
        }
        let stat = std::fs::read_to_string(t.path().join("stat")).unwrap_or_default();
        // Fields after the parenthesised name: state ppid pgrp session tty_nr tpgid flags.
        let after = stat.rsplit_once(')').map(|x| x.1).unwrap_or("");
        if let Some(f) = after.split_whitespace().nth(7).and_then(|f| f.parse().ok()) {
            out.push((comm, f));
        }
    }
    out
}

#[test]
fn write_back_threads_are_io_flushers() {
    // PR_SET_IO_FLUSHER needs CAP_SYS_RESOURCE: asked for on a thread of its own to know, as
    // threads inherit the flag (the write-back's must not get it from the test's thread).
    let allowed = std::thread::spawn(|| {
        // SAFETY: prctl with integer arguments only changes flags of the calling thread.
        unsafe {
            libc::prctl(57 /* PR_SET_IO_FLUSHER */, 1, 0, 0, 0) == 0
        }
    });
    if !allowed.join().unwrap() {
        eprintln!("SKIPPED write_back_threads_are_io_flushers: PR_SET_IO_FLUSHER refused (no CAP_SYS_RESOURCE)");
        return;
    }
    let _one = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let (wb, _mem, dev, gate) = setup();
    hold_gated(&wb, &dev, 0, &[1u8; 4096], &gate).unwrap();
    // Both threads run while the commit waits at the gate.
    let mut flags = Vec::new();
    for _ in 0..100 {
        flags = thread_flags("udm-wb-");
        if flags.len() >= 2 {
            break;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    gate.open();
    wb.settle();
    assert!(flags.len() >= 2, "write-back threads not found: {flags:?}");
    for (name, f) in &flags {
        assert!(
            f & PF_MEMALLOC_NOIO != 0,
            "{name} is not an I/O flusher (flags {f:#x})"
        );
    }
}

/// Counts what the default `run_inline` does.
#[derive(Default)]
struct Counted(Option<Arc<AtomicUsize>>, bool);

impl Jobs for Counted {
    fn append(&mut self, _other: Self) {}
    fn prepare(&mut self, _dev: &dyn BlockDevice) {
        if let Some(c) = &self.0 {
            c.fetch_add(1, Ordering::SeqCst);
        }
    }
    fn commit(self) -> Result<(), String> {
        if let Some(c) = &self.0 {
            c.fetch_add(10, Ordering::SeqCst);
        }
        if self.1 {
            return Err("commit failed".into());
        }
        Ok(())
    }
}

#[test]
fn run_inline_prepares_then_commits_and_reports_the_commits_error() {
    let dev = MemDevice::new(8);
    let n = Arc::new(AtomicUsize::new(0));
    Counted(Some(n.clone()), false).run_inline(&dev).unwrap();
    assert_eq!(n.load(Ordering::SeqCst), 11, "prepare and commit each once");
    let err = Counted(Some(n.clone()), true).run_inline(&dev);
    assert_eq!(err, Err("commit failed".to_string()));
    assert_eq!(n.load(Ordering::SeqCst), 22);
}
