//! The control block of one connection, shared by the connection's threads, the server (for
//! disconnects and the memory gauge) and the reaper (timeouts).

use super::{ConnSecurity, StreamControl};
use parking_lot::{Condvar, Mutex};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, Ordering};
use std::time::Instant;

/// Connection phases (`ConnCtl::phase`).
pub(super) const PHASE_HANDSHAKE: u8 = 0;
pub(super) const PHASE_TRANSMISSION: u8 = 1;
pub(super) const PHASE_TIMED_OUT: u8 = 2;

/// Control block of one connection, shared with the server for disconnects, timeouts and the
/// memory gauge.
pub(crate) struct ConnCtl {
    pub id: u64,
    pub stream: Box<dyn StreamControl>,
    /// Which exports the handshake may show, and the STARTTLS upgrade.
    pub security: ConnSecurity,
    /// Set when the server wants the connection gone (remove_export / shutdown).
    pub stopping: AtomicBool,
    /// Over the connection cap: only told so, then closed.
    pub(super) refused: bool,
    /// `PHASE_*`: the reaper closes connections still negotiating after `deadline`.
    pub(super) phase: AtomicU8,
    /// Watchdog clock (ns) by which the handshake must be over.
    pub(super) deadline: u64,
    /// Watchdog clock (ns) when the reply write in progress started, 0 when not writing.
    pub write_since: AtomicU64,
    /// Per-connection cap on `inflight` (from `NbdLimits::max_inflight_bytes`).
    pub max_inflight: u64,
    /// Payload bytes admitted and not yet answered.
    pub inflight: AtomicU64,
    /// Payload bytes held in request and reply buffers.
    pub buffered: AtomicU64,
    /// Bytes kept in the connection's buffer pool.
    pub pooled: AtomicU64,
    /// Requests read in transmission.
    pub requests: AtomicU64,
    /// Requests being executed (read, not yet answered).
    pub busy: AtomicU64,
    /// Reaper-only: `requests` at its last look, and when it last changed (watchdog clock).
    pub(super) idle_seen: AtomicU64,
    pub(super) idle_since: AtomicU64,
    pub(super) done: Mutex<bool>,
    pub(super) done_cv: Condvar,
}

impl ConnCtl {
    /// Asks the connection to stop reading and finish what is in flight.
    pub fn stop(&self) {
        self.stopping.store(true, Ordering::SeqCst);
        self.stream.stop_reading();
    }

    /// Moves to transmission; false if the handshake timed out first.
    pub fn enter_transmission(&self) -> bool {
        self.phase
            .compare_exchange(
                PHASE_HANDSHAKE,
                PHASE_TRANSMISSION,
                Ordering::SeqCst,
                Ordering::SeqCst,
            )
            .is_ok()
    }

    /// Waits for the connection to end, until `deadline`; true if it did.
    pub(super) fn wait_done_until(&self, deadline: Instant) -> bool {
        let mut d = self.done.lock();
        while !*d {
            if self.done_cv.wait_until(&mut d, deadline).timed_out() {
                return *d;
            }
        }
        true
    }

    pub(super) fn is_done(&self) -> bool {
        *self.done.lock()
    }

    pub(super) fn set_done(&self) {
        *self.done.lock() = true;
        self.done_cv.notify_all();
    }
}
