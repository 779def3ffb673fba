//! The snapshot's chunk locks (snapshot/exception.rs `ChunkLocks`): an exclusive lock (a
//! pending exception, a merge step) waits for every shared holder (reads going to the origin)
//! and shared holders wait for an exclusive one; releasing one of several shared holds keeps
//! the others. Written against mutants cargo-mutants found missed (holds not counted, entries
//! dropped while still held, an exclusive lock not waiting for readers).

#![allow(clippy::unwrap_used)] // tests may unwrap

use std::sync::Arc;
use std::time::Duration;

use udm_target::snapshot::exception::ChunkLocks;

/// Runs `f` on a thread; true if it is still waiting after 100 ms. The thread is returned so
/// the caller can release what it waits for and join it.
fn waits(locks: &Arc<ChunkLocks>, f: fn(&ChunkLocks)) -> (bool, std::thread::JoinHandle<()>) {
    let l = locks.clone();
    let t = std::thread::spawn(move || f(&l));
    std::thread::sleep(Duration::from_millis(100));
    (!t.is_finished(), t)
}

#[test]
fn an_exclusive_lock_waits_for_every_shared_holder() {
    let locks = Arc::new(ChunkLocks::default());
    let a = locks.shared(7);
    let b = locks.shared(7);
    drop(a);
    let (waited, t) = waits(&locks, |l| {
        l.lock_many(&[7]);
        l.unlock_many(&[7]);
    });
    drop(b);
    t.join().unwrap();
    assert!(
        waited,
        "locked exclusively while a reader still held the chunk"
    );
    // Other chunks are not affected.
    let _c = locks.shared(8);
    let (waited, t) = waits(&locks, |l| {
        l.lock_many(&[9]);
        l.unlock_many(&[9]);
    });
    t.join().unwrap();
    assert!(!waited, "chunk 9 waited for chunk 8");
}

#[test]
fn shared_holders_wait_for_an_exclusive_one() {
    let locks = Arc::new(ChunkLocks::default());
    let x = locks.exclusive(3);
    let (waited, t) = waits(&locks, |l| drop(l.shared(3)));
    drop(x);
    t.join().unwrap();
    assert!(waited, "a reader got a chunk being copied");
    locks.lock_many(&[3, 4]);
    let (waited, t) = waits(&locks, |l| {
        l.shared_many(&[4, 5]);
        l.unlock_shared_many(&[4, 5]);
    });
    locks.unlock_many(&[3, 4]);
    t.join().unwrap();
    assert!(waited, "shared_many got a chunk held exclusively");
}

#[test]
fn shared_many_holds_count_until_each_is_released() {
    let locks = Arc::new(ChunkLocks::default());
    locks.shared_many(&[1, 2]);
    locks.shared_many(&[2]);
    locks.unlock_shared_many(&[1, 2]);
    // Chunk 1 is free, chunk 2 still held once.
    let (waited, t) = waits(&locks, |l| {
        l.lock_many(&[1]);
        l.unlock_many(&[1]);
    });
    t.join().unwrap();
    assert!(!waited, "chunk 1 still held after its release");
    let (waited, t) = waits(&locks, |l| {
        l.lock_many(&[2]);
        l.unlock_many(&[2]);
    });
    locks.unlock_shared_many(&[2]);
    t.join().unwrap();
    assert!(waited, "chunk 2 lost its second shared hold");
}
