//! The server-wide watchdog thread: starts readers for stalled connections and gets deferred
//! replies that waited too long sent. It never touches a socket itself (a client that stops
//! reading must not stall the other connections): writes are left to the connection's threads.

use parking_lot::{Condvar, Mutex};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

/// Watchdog period.
pub(super) const TICK: Duration = Duration::from_millis(2);

/// What the watchdog looks after (a connection in transmission).
pub(super) trait Tick: Send + Sync {
    /// Called every [`TICK`] with the watchdog clock; must not block.
    fn tick(self: Arc<Self>, now: u64);
}

/// One thread per server: starts readers for stalled connections and flushes deferred replies
/// that waited too long.
pub(crate) struct Watchdog {
    epoch: Instant,
    conns: Mutex<Vec<Weak<dyn Tick>>>,
    cv: Condvar,
    running: AtomicBool,
    stop: AtomicBool,
}

impl Watchdog {
    pub(crate) fn new() -> Arc<Watchdog> {
        Arc::new(Watchdog {
            epoch: Instant::now(),
            conns: Mutex::new(Vec::new()),
            cv: Condvar::new(),
            running: AtomicBool::new(false),
            stop: AtomicBool::new(false),
        })
    }

    /// Nanoseconds since the watchdog was made, plus one (0 means "not set" to callers).
    pub(crate) fn now(&self) -> u64 {
        self.epoch.elapsed().as_nanos() as u64 + 1
    }

    pub(super) fn register(self: &Arc<Self>, c: Weak<dyn Tick>) {
        self.conns.lock().push(c);
        self.cv.notify_all();
        if !self.running.swap(true, Ordering::SeqCst) {
            let me = self.clone();
            if std::thread::Builder::new()
                .name("nbd-watchdog".into())
                .spawn(move || me.run())
                .is_err()
            {
                self.running.store(false, Ordering::SeqCst);
            }
        }
    }

    pub(crate) fn stop(&self) {
        self.stop.store(true, Ordering::SeqCst);
        self.cv.notify_all();
    }

    fn run(self: Arc<Self>) {
        loop {
            let live: Vec<Arc<dyn Tick>> = {
                let mut g = self.conns.lock();
                g.retain(|w| w.strong_count() > 0);
                while g.is_empty() && !self.stop.load(Ordering::SeqCst) {
                    self.cv.wait(&mut g);
                    g.retain(|w| w.strong_count() > 0);
                }
                if self.stop.load(Ordering::SeqCst) {
                    self.running.store(false, Ordering::SeqCst);
                    return;
                }
                g.iter().filter_map(|w| w.upgrade()).collect()
            };
            let now = self.now();
            for c in &live {
                c.clone().tick(now);
            }
            drop(live);
            std::thread::sleep(TICK);
        }
    }
}
