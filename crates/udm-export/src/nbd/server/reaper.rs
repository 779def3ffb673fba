//! The reaper thread of a server: closes connections whose handshake takes longer than
//! `NbdLimits::handshake_timeout` and connections whose reply write made no progress for
//! `NbdLimits::send_timeout` (a client that stopped reading), and, when configured, clients
//! idle for `NbdLimits::idle_timeout`. Closing the stream unblocks the connection's threads;
//! they clean up as for any disconnect.

use super::super::ctl::{PHASE_HANDSHAKE, PHASE_TIMED_OUT, PHASE_TRANSMISSION};
use super::NbdServer;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Weak};
use std::time::Duration;

/// Period of the reaper.
const REAP_TICK: Duration = Duration::from_millis(100);

impl NbdServer {
    /// Starts the reaper thread if it is not running.
    pub(in crate::nbd) fn start_reaper(self: &Arc<Self>) {
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

    /// One reaper pass: closes connections whose handshake is over time, whose reply write
    /// has been stuck longer than the send timeout, or that idled too long.
    fn reap_once(&self) {
        let now = self.watchdog.now();
        let ns = |t: Duration| t.as_nanos().min(u128::from(u64::MAX)) as u64;
        let send_ns = self.limits.send_timeout.map(ns);
        let idle_ns = self.limits.idle_timeout.map(ns);
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
            if let Some(t) = idle_ns {
                let n = c.requests.load(Ordering::Relaxed);
                let busy = c.busy.load(Ordering::SeqCst) != 0 || ws != 0;
                if c.idle_seen.swap(n, Ordering::Relaxed) != n
                    || busy
                    || c.idle_since.load(Ordering::Relaxed) == 0
                {
                    c.idle_since.store(now, Ordering::Relaxed);
                } else if c.phase.load(Ordering::SeqCst) == PHASE_TRANSMISSION
                    && now.saturating_sub(c.idle_since.load(Ordering::Relaxed)) > t
                    && !c.stopping.swap(true, Ordering::SeqCst)
                {
                    tracing::info!(
                        timeout = ?self.limits.idle_timeout,
                        "NBD client idle; dropping it"
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
