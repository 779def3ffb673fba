//! Restoring the recorded state at start-up without losing any of it, and bringing back what
//! was unavailable: exports whose device cannot be served are kept (recorded, listed with the
//! reason: [`crate::exports::PendingExports`]) and started when the device returns, by the
//! periodic retry here or by `udmsetup disk retry` / `disk add` of the same disk
//! ([`Daemon::retry`]).

use crate::control::Daemon;
use crate::exports::{Exports, PendingExport};
use crate::state::DaemonState;
use std::sync::Arc;
use std::time::Duration;

/// Restores devices and exports from the recorded state. Nothing recorded is dropped: what
/// cannot be restored is kept as unavailable and retried later.
pub fn restore(daemon: &Daemon, st: &DaemonState) {
    for e in &st.exports {
        daemon
            .registry
            .expect_export(&e.device, &Exports::id_for(&e.device, &e.export));
    }
    for p in daemon.registry.restore(&st.registry) {
        tracing::error!("restore: {p}");
    }
    for e in &st.exports {
        if let Err(err) = daemon.exports.add(&e.device, &e.export, e.read_only) {
            tracing::error!(device = %e.device, "restore: export kept, not served now: {err}");
            daemon.exports.pending.keep(PendingExport {
                device: e.device.clone(),
                kind: e.export.clone(),
                read_only: e.read_only,
                reason: err.to_string(),
            });
        }
    }
}

/// Retries every `every` while anything is unavailable, recording the state when something
/// came back.
pub fn spawn_retry(daemon: Arc<Daemon>, every: Duration) -> std::io::Result<()> {
    std::thread::Builder::new()
        .name("udm-retry".into())
        .spawn(move || loop {
            std::thread::sleep(every);
            if !daemon.registry.has_unavailable() && daemon.exports.pending.is_empty() {
                continue;
            }
            let _g = daemon.change.lock();
            match daemon.retry(None) {
                Ok(back) if !back.is_empty() => {
                    tracing::info!(?back, "unavailable devices or exports are back");
                    if let Err(e) = daemon.save() {
                        tracing::error!("cannot record state: {e:#}");
                    }
                }
                Ok(_) => {}
                Err(e) => tracing::debug!("retry: {e}"),
            }
        })
        .map(|_| ())
}
