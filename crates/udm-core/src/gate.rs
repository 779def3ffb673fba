//! The I/O gate: counts requests in flight through a device and can hold new ones while the
//! in-flight ones drain. Suspend uses it on a mapped device; interposer switches use it on the
//! interposed device. The fast path is two atomic operations and takes no lock.

use parking_lot::{Condvar, Mutex};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// Classes of requests counted separately, so a drain can wait for some and not others.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Flow {
    /// Requests that go straight to the device's backend.
    Direct = 0,
    /// Requests an interposer redirected into a mapped device.
    Redirected = 1,
}

/// A gate that can be closed (new requests wait) and drained (wait for in-flight ones).
#[derive(Default)]
pub struct IoGate {
    inflight: [AtomicU64; 2],
    closed: AtomicBool,
    lock: Mutex<()>,
    cv: Condvar,
    held: AtomicU64,
}

/// Proof of passage through the gate; dropping it marks the request complete.
pub struct GateGuard<'a> {
    gate: &'a IoGate,
    flow: Flow,
}

impl IoGate {
    /// An open gate.
    pub fn new() -> Self {
        Self::default()
    }

    /// Enters the gate, waiting while it is closed.
    pub fn enter(&self, flow: Flow) -> GateGuard<'_> {
        let counter = &self.inflight[flow as usize];
        loop {
            counter.fetch_add(1, Ordering::SeqCst);
            if !self.closed.load(Ordering::SeqCst) {
                return GateGuard { gate: self, flow };
            }
            // Closed: back out (waking a drainer that may be waiting for us) and wait.
            self.exit(flow);
            self.held.fetch_add(1, Ordering::Relaxed);
            let mut g = self.lock.lock();
            while self.closed.load(Ordering::SeqCst) {
                self.cv.wait(&mut g);
            }
            drop(g);
            self.held.fetch_sub(1, Ordering::Relaxed);
        }
    }

    fn exit(&self, flow: Flow) {
        let prev = self.inflight[flow as usize].fetch_sub(1, Ordering::SeqCst);
        if prev == 1 && self.closed.load(Ordering::SeqCst) {
            let _g = self.lock.lock();
            self.cv.notify_all();
        }
    }

    /// Closes the gate: requests arriving from now on wait in [`IoGate::enter`].
    pub fn close(&self) {
        let _g = self.lock.lock();
        self.closed.store(true, Ordering::SeqCst);
    }

    /// Waits until no request of the given flows is in flight. Returns the time spent waiting.
    pub fn drain(&self, flows: &[Flow]) -> Duration {
        let start = Instant::now();
        let busy = || {
            flows
                .iter()
                .any(|f| self.inflight[*f as usize].load(Ordering::SeqCst) > 0)
        };
        let mut g = self.lock.lock();
        while busy() {
            // The timeout is a safety net against a missed wake-up, not the mechanism.
            self.cv.wait_for(&mut g, Duration::from_millis(50));
        }
        start.elapsed()
    }

    /// Opens the gate and releases every held request.
    pub fn open(&self) {
        let _g = self.lock.lock();
        self.closed.store(false, Ordering::SeqCst);
        self.cv.notify_all();
    }

    /// Requests in flight of a flow.
    pub fn inflight(&self, flow: Flow) -> u64 {
        self.inflight[flow as usize].load(Ordering::SeqCst)
    }

    /// Requests currently waiting at the closed gate.
    pub fn held(&self) -> u64 {
        self.held.load(Ordering::Relaxed)
    }
}

impl GateGuard<'_> {
    /// Moves this request to another flow without ever leaving the gate (the new flow is counted
    /// before the old one is released, so no drain can miss it).
    pub fn reclassify(&mut self, flow: Flow) {
        if flow == self.flow {
            return;
        }
        self.gate.inflight[flow as usize].fetch_add(1, Ordering::SeqCst);
        self.gate.exit(self.flow);
        self.flow = flow;
    }
}

impl Drop for GateGuard<'_> {
    fn drop(&mut self) {
        self.gate.exit(self.flow);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[test]
    fn close_drain_open() {
        let gate = Arc::new(IoGate::new());
        assert_eq!(gate.held(), 0);
        let g = gate.enter(Flow::Direct);
        assert_eq!(gate.inflight(Flow::Direct), 1);
        assert_eq!(gate.inflight(Flow::Redirected), 0);
        gate.close();
        let g2 = gate.clone();
        let t = std::thread::spawn(move || {
            let _x = g2.enter(Flow::Direct);
            Instant::now()
        });
        std::thread::sleep(Duration::from_millis(50));
        assert_eq!(gate.held(), 1);
        let gg = gate.clone();
        let drainer = std::thread::spawn(move || gg.drain(&[Flow::Direct]));
        std::thread::sleep(Duration::from_millis(50));
        assert!(!drainer.is_finished());
        drop(g);
        drainer.join().unwrap();
        let opened = Instant::now();
        gate.open();
        let entered = t.join().unwrap();
        assert!(entered >= opened);
        assert_eq!(gate.inflight(Flow::Direct), 0);
        assert_eq!(gate.held(), 0);
    }

    #[test]
    fn reclassify_moves_a_request_between_flows() {
        let gate = IoGate::new();
        let mut g = gate.enter(Flow::Redirected);
        g.reclassify(Flow::Redirected);
        assert_eq!(gate.inflight(Flow::Redirected), 1, "same flow: unchanged");
        g.reclassify(Flow::Direct);
        assert_eq!(gate.inflight(Flow::Direct), 1);
        assert_eq!(gate.inflight(Flow::Redirected), 0);
        gate.close();
        gate.drain(&[Flow::Redirected]);
        drop(g);
        assert_eq!(gate.inflight(Flow::Direct), 0);
        gate.open();
    }

    /// The last request out wakes a drainer itself; the drainer's 50 ms timed wait is only a
    /// safety net (the best of a few tries, so a slow wake-up on a busy machine does not count).
    #[test]
    fn the_last_exit_wakes_a_drainer_at_once() {
        let best = (0..5)
            .map(|_| {
                let gate = Arc::new(IoGate::new());
                let g = gate.enter(Flow::Direct);
                gate.close();
                let gg = gate.clone();
                let drainer = std::thread::spawn(move || {
                    gg.drain(&[Flow::Direct]);
                    Instant::now()
                });
                std::thread::sleep(Duration::from_millis(5));
                let released = Instant::now();
                drop(g);
                let woke = drainer.join().unwrap();
                gate.open();
                woke.saturating_duration_since(released)
            })
            .min()
            .unwrap();
        assert!(
            best < Duration::from_millis(25),
            "drain woke {best:?} after the last exit"
        );
    }

    #[test]
    fn drain_ignores_other_flow() {
        let gate = IoGate::new();
        let _r = gate.enter(Flow::Redirected);
        gate.close();
        gate.drain(&[Flow::Direct]);
        gate.open();
    }
}
