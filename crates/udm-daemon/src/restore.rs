//! Restoring the recorded state at start-up without losing any of it, and bringing back what
//! was unavailable: exports whose device cannot be served are kept (recorded, listed with the
//! reason) and started when the device returns, by the periodic retry or by
//! `udmsetup disk retry` / `disk add` of the same disk.

use crate::control::Daemon;
use crate::exports::Exports;
use crate::state::DaemonState;
use parking_lot::Mutex;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;
use udm_core::CoreError;
use udm_proto::{ExportKind, ExportRecord};

/// A recorded export that is not served now.
#[derive(Clone, Debug)]
struct PendingExport {
    device: String,
    kind: ExportKind,
    read_only: bool,
    reason: String,
}

/// Recorded exports waiting for their device.
#[derive(Default)]
pub struct PendingExports(Mutex<Vec<PendingExport>>);

impl PendingExports {
    /// True when an export with this id is pending.
    pub fn contains(&self, id: &str) -> bool {
        self.0
            .lock()
            .iter()
            .any(|p| Exports::id_for(&p.device, &p.kind) == id)
    }

    /// Forgets the pending export `id` (`export remove`); false when there is none.
    pub fn take(&self, id: &str) -> bool {
        let mut v = self.0.lock();
        let before = v.len();
        v.retain(|p| Exports::id_for(&p.device, &p.kind) != id);
        v.len() != before
    }

    /// True when nothing is pending.
    pub fn is_empty(&self) -> bool {
        self.0.lock().is_empty()
    }

    /// What to record: (device, kind, read_only), as for served exports.
    pub fn config(&self) -> Vec<(String, ExportKind, bool)> {
        self.0
            .lock()
            .iter()
            .map(|p| (p.device.clone(), p.kind.clone(), p.read_only))
            .collect()
    }

    /// Listing records, with the reason.
    pub fn records(&self, nbd_socket: &Path) -> Vec<ExportRecord> {
        self.0
            .lock()
            .iter()
            .map(|p| {
                let (kind, location) = match &p.kind {
                    ExportKind::Nbd { name, .. } => (
                        "nbd",
                        format!(
                            "nbd+unix:///{}?socket={}",
                            name.as_deref().unwrap_or(&p.device),
                            nbd_socket.display()
                        ),
                    ),
                    ExportKind::Fuse { dir } => ("fuse", dir.join(&p.device).display().to_string()),
                    ExportKind::Ublk { .. } => ("ublk", String::new()),
                    ExportKind::VhostUser { socket, .. } => {
                        ("vhost-user", socket.display().to_string())
                    }
                };
                ExportRecord {
                    id: Exports::id_for(&p.device, &p.kind),
                    device: p.device.clone(),
                    kind: kind.into(),
                    location,
                    read_only: p.read_only,
                    clients: 0,
                    requests: 0,
                    errors: 0,
                    bytes_read: 0,
                    bytes_written: 0,
                    unavailable: Some(p.reason.clone()),
                }
            })
            .collect()
    }

    fn keep(&self, p: PendingExport) {
        self.0.lock().push(p);
    }

    fn drain(&self) -> Vec<PendingExport> {
        std::mem::take(&mut *self.0.lock())
    }
}

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

/// Starts the pending exports whose device can be served now; returns their ids.
pub fn retry_exports(exports: &Exports) -> Vec<String> {
    let mut back = Vec::new();
    for mut p in exports.pending.drain() {
        match exports.add(&p.device, &p.kind, p.read_only) {
            Ok(id) => {
                tracing::info!(export = %id, "pending export is served again");
                back.push(id);
            }
            Err(e) => {
                p.reason = e.to_string();
                exports.pending.keep(p);
            }
        }
    }
    back
}

/// Retries unavailable devices (all, or `name`) and then pending exports. Returns what came
/// back; with `name`, ENODEV when that device is still unavailable. The caller holds the change
/// lock and records the state afterwards.
pub fn retry(daemon: &Daemon, name: Option<&str>) -> Result<Vec<String>, CoreError> {
    let r = daemon.registry.retry_unavailable(name);
    let exports = retry_exports(&daemon.exports);
    let mut back = r?;
    back.extend(exports);
    Ok(back)
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
            match retry(&daemon, None) {
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
