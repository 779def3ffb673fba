//! The reaper thread of a server: closes connections whose handshake takes longer than
//! `NbdLimits::handshake_timeout` and connections whose reply write made no progress for
//! `NbdLimits::send_timeout` (a client that stopped reading). Closing the stream unblocks the
//! connection's threads; they clean up as for any disconnect.

use super::{NbdServer, PHASE_HANDSHAKE, PHASE_TIMED_OUT};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Weak};
use std::time::Duration;

/// Period of the reaper.
const REAP_TICK: Duration = Duration::from_millis(100);

impl NbdServer {
    /// Starts the reaper thread if it is not running.
    pub(super) fn start_reaper(self: &Arc<Self>) {
        let mut running = self.reaper.lock();
        if *running || self.is_shut() {
            return;
        }
        let me = Arc::downgrade(self);
        if std::thread::Builder::new()
            .name("nbd-reaper".into())
            .spawn(move || reap(me))
            .is_ok()
        {
            *running = true;
        }
    }

    /// One reaper pass: closes connections whose handshake is over time or whose reply write
    /// has been stuck longer than the send timeout.
    fn reap_once(&self) {
        let now = self.watchdog.now();
        let send_ns = self
            .limits
            .send_timeout
            .map(|t| t.as_nanos().min(u128::from(u64::MAX)) as u64);
        for c in self.conns.lock().values() {
            if now > c.deadline
                && c.phase
                    .compare_exchange(
                        PHASE_HANDSHAKE,
                        PHASE_TIMED_OUT,
                        Ordering::SeqCst,
                        Ordering::SeqCst,
                    )
                    .is_ok()
            {
                if !c.refused {
                    tracing::info!(
                        timeout = ?self.limits.handshake_timeout,
                        "NBD handshake timed out; dropping the client"
                    );
                }
                c.stream.close();
            }
            let ws = c.write_since.load(Ordering::Relaxed);
            if let Some(t) = send_ns {
                if ws != 0 && now.saturating_sub(ws) > t && !c.stopping.swap(true, Ordering::SeqCst)
                {
                    tracing::warn!(
                        timeout = ?self.limits.send_timeout,
                        "NBD client stopped reading replies; dropping it"
                    );
                    c.stream.close();
                }
            }
        }
    }
}

/// The reaper thread: every `REAP_TICK` enforces handshake and send timeouts; exits when the
/// server is shut down or dropped.
fn reap(server: Weak<NbdServer>) {
    loop {
        let Some(s) = server.upgrade() else { return };
        if s.is_shut() {
            return;
        }
        s.reap_once();
        let mut running = s.reaper.lock();
        if !*running {
            return;
        }
        s.reaper_cv.wait_for(&mut running, REAP_TICK);
        if !*running {
            return;
        }
    }
}
