//! The export manager: adds and removes NBD, FUSE, ublk and vhost-user exports of registry devices, holding
//! each exported device in the registry the way a mount holds a block device.
//!
//! Removal has two steps so that the control lock is never held while waiting for clients:
//! [`Exports::take`] (under the control lock, never waits for I/O) takes the export out of the
//! table, so it is no longer recorded, and [`Exports::finish`] (without the control lock)
//! disconnects its clients, which may wait for requests parked on a suspended device until a
//! `resume` releases them. While an export is being torn down its id is refused with EBUSY.

use parking_lot::Mutex;
use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use udm_core::{CoreError, Registry};
use udm_export::fuse::FuseExports;
use udm_export::nbd::{NbdExportOptions, NbdServer};
use udm_export::vhost_user::{VhostUserExport, VhostUserOptions};
use udm_io::BlockDevice;
use udm_proto::{ExportKind, ExportRecord};
use udm_types::errno::HasErrno;
use udm_types::{DevId, Errno};

struct Entry {
    id: String,
    device: String,
    dev: DevId,
    kind: ExportKind,
    read_only: bool,
    #[cfg(feature = "ublk")]
    ublk: Option<udm_export::ublk::UblkExport>,
    vhost: Option<VhostUserExport>,
}

impl Entry {
    /// Disconnects a vhost-user export's VMM and closes its socket (bounded).
    fn stop_vhost(&mut self) {
        if let Some(v) = self.vhost.take() {
            if !v.stop() {
                tracing::warn!(export = %self.id, "vhost-user export stopped with a request still running");
            }
        }
    }
}

/// Every export of the daemon.
pub struct Exports {
    registry: Arc<Registry>,
    nbd: Arc<NbdServer>,
    nbd_socket: PathBuf,
    fuse: FuseExports,
    entries: Mutex<Vec<Entry>>,
    /// Recorded exports that cannot be served now (their device is unavailable).
    pub pending: PendingExports,
    /// Ids taken out of `entries` whose clients are still being disconnected.
    removing: Mutex<BTreeSet<String>>,
}

/// An export taken out of the table by [`Exports::take`], to be torn down by
/// [`Exports::finish`] without the control lock.
#[must_use = "an export taken out of the table must be finished"]
pub struct Removal {
    /// `None` when nothing is left to tear down (a FUSE export is removed within `take`).
    entry: Option<Entry>,
}

fn core_err(e: impl HasErrno + std::fmt::Display) -> CoreError {
    CoreError::new(e.errno(), e.to_string())
}

impl Exports {
    /// A manager over the daemon's NBD server.
    pub fn new(registry: Arc<Registry>, nbd: Arc<NbdServer>, nbd_socket: PathBuf) -> Self {
        Exports {
            registry,
            nbd,
            nbd_socket,
            fuse: FuseExports::new(),
            entries: Mutex::new(Vec::new()),
            removing: Mutex::new(BTreeSet::new()),
            pending: Default::default(),
        }
    }

    /// The id an export of `device` of this kind has.
    pub fn id_for(device: &str, kind: &ExportKind) -> String {
        match kind {
            ExportKind::Nbd { name, .. } => format!("nbd:{}", name.as_deref().unwrap_or(device)),
            ExportKind::Fuse { dir } => format!("fuse:{}", dir.join(device).display()),
            ExportKind::Ublk { .. } => format!("ublk:{device}"),
            ExportKind::VhostUser { socket, .. } => format!("vhost-user:{}", socket.display()),
        }
    }

    /// Adds an export; returns its id.
    pub fn add(
        &self,
        device: &str,
        kind: &ExportKind,
        read_only: bool,
    ) -> Result<String, CoreError> {
        let id = Self::id_for(device, kind);
        let mut entries = self.entries.lock();
        if entries.iter().any(|e| e.id == id) || self.pending.contains(&id) {
            return Err(CoreError::Exists(format!("export {id} already exists")));
        }
        if self.removing.lock().contains(&id) {
            return Err(CoreError::Busy(format!(
                "export {id} is still being removed (its clients are being disconnected; a \
                 request parked on a suspended device completes after `resume`); try again"
            )));
        }
        let node = self.registry.open_export(device, &id)?;
        let dev_id = node.id();
        let dev: Arc<dyn BlockDevice> = node;
        let ro = read_only || dev.read_only();
        let mut vhost = None;
        let r: Result<(), CoreError> = match kind {
            ExportKind::Nbd { name, insecure_tcp } => self
                .nbd
                .add_export(
                    name.as_deref().unwrap_or(device),
                    dev.clone(),
                    NbdExportOptions {
                        read_only: ro,
                        description: Some(format!("udm device {device}")),
                        insecure_tcp: *insecure_tcp,
                    },
                )
                .map_err(core_err),
            ExportKind::Fuse { dir } => self
                .fuse
                .add(dir, device, dev.clone(), ro)
                .map_err(core_err),
            ExportKind::VhostUser { socket, num_queues } => {
                let opts = VhostUserOptions {
                    read_only: ro,
                    num_queues: *num_queues,
                };
                VhostUserExport::start(device, socket, dev.clone(), opts)
                    .map(|v| vhost = Some(v))
                    .map_err(core_err)
            }
            #[cfg(feature = "ublk")]
            ExportKind::Ublk { .. } => Ok(()),
            #[cfg(not(feature = "ublk"))]
            ExportKind::Ublk { .. } => Err(CoreError::new(
                Errno::EOPNOTSUPP,
                "this udmd was built without ublk support (cargo feature `ublk`)",
            )),
        };
        #[cfg(feature = "ublk")]
        let mut ublk = None;
        #[allow(unused_mut)] // only the ublk export records what it got
        let mut kind = kind.clone();
        #[cfg(feature = "ublk")]
        let r = match (r, &mut kind) {
            (Ok(()), ExportKind::Ublk { id, queues, depth }) => {
                let opts = udm_export::ublk::UblkOptions {
                    dev_id: *id,
                    queues: *queues,
                    depth: *depth,
                    read_only: ro,
                };
                match udm_export::ublk::UblkExport::start(device, dev.clone(), &opts) {
                    Ok(u) => {
                        // Recorded, so a restart brings back the same /dev/ublkbN.
                        *id = Some(u.dev_id());
                        ublk = Some(u);
                        Ok(())
                    }
                    Err(e) => Err(core_err(e)),
                }
            }
            (r, _) => r,
        };
        if let Err(e) = r {
            self.registry.close_export(dev_id, &id);
            return Err(e);
        }
        entries.push(Entry {
            id: id.clone(),
            device: device.to_string(),
            dev: dev_id,
            kind,
            read_only,
            #[cfg(feature = "ublk")]
            ublk,
            vhost,
        });
        tracing::info!(export = %id, device, "export added");
        Ok(id)
    }

    /// Removes an export (disconnecting its clients cleanly): [`Exports::take`] then
    /// [`Exports::finish`]. Waits for the clients' in-flight requests: callers holding a lock
    /// that `resume` needs must use the two steps instead.
    pub fn remove(&self, id: &str) -> Result<(), CoreError> {
        let r = self.take(id)?;
        self.finish(r);
        Ok(())
    }

    /// First step of a removal: takes export `id` out of the table (it is no longer listed or
    /// recorded) and marks its id busy until [`Exports::finish`]. Never waits for client I/O:
    /// a FUSE export is removed here (it refuses with EBUSY while its file is open instead of
    /// waiting), an NBD or ublk export is only unlisted.
    pub fn take(&self, id: &str) -> Result<Removal, CoreError> {
        if self.pending.take(id) {
            self.registry.forget_export(id);
            return Ok(Removal { entry: None });
        }
        let mut entries = self.entries.lock();
        let i = entries.iter().position(|e| e.id == id).ok_or_else(|| {
            let busy = self.removing.lock().contains(id);
            if busy {
                CoreError::Busy(format!("export {id} is already being removed"))
            } else {
                CoreError::new(
                    Errno::ENOENT,
                    format!("no export {id} (see `udmsetup export list`)"),
                )
            }
        })?;
        if let ExportKind::Fuse { dir } = &entries[i].kind {
            self.fuse
                .remove(dir, &entries[i].device)
                .map_err(core_err)?;
            let e = entries.remove(i);
            self.registry.close_export(e.dev, &e.id);
            tracing::info!(export = %e.id, "export removed");
            return Ok(Removal { entry: None });
        }
        let e = entries.remove(i);
        self.removing.lock().insert(e.id.clone());
        Ok(Removal { entry: Some(e) })
    }

    /// Second step of a removal: disconnects the clients of an export taken by
    /// [`Exports::take`], waiting for their in-flight requests, and releases the device. Must
    /// not be called with the control lock held.
    pub fn finish(&self, r: Removal) {
        let Some(e) = r.entry else { return };
        if let ExportKind::Nbd { name, .. } = &e.kind {
            if let Err(err) = self.nbd.remove_export(name.as_deref().unwrap_or(&e.device)) {
                tracing::warn!(export = %e.id, "NBD export removal: {err}");
            }
        }
        let mut e = e;
        e.stop_vhost();
        #[cfg(feature = "ublk")]
        let e = {
            if let Some(u) = e.ublk.take() {
                if let Err(err) = u.stop() {
                    tracing::warn!(export = %e.id, "ublk device not removed cleanly: {err}");
                }
            }
            e
        };
        self.registry.close_export(e.dev, &e.id);
        self.removing.lock().remove(&e.id);
        tracing::info!(export = %e.id, "export removed");
    }

    /// What to record: (device, kind, read_only) of every export.
    pub fn config(&self) -> Vec<(String, ExportKind, bool)> {
        let mut v: Vec<_> = self
            .entries
            .lock()
            .iter()
            .map(|e| (e.device.clone(), e.kind.clone(), e.read_only))
            .collect();
        v.extend(self.pending.config());
        v
    }

    /// Export records with live counters.
    pub fn list(&self) -> Vec<ExportRecord> {
        let nbd = self.nbd.exports();
        let fuse = self.fuse.list();
        let mut v: Vec<ExportRecord> = self
            .entries
            .lock()
            .iter()
            .map(|e| {
                let mut r = ExportRecord {
                    id: e.id.clone(),
                    device: e.device.clone(),
                    kind: String::new(),
                    location: String::new(),
                    read_only: e.read_only,
                    clients: 0,
                    requests: 0,
                    errors: 0,
                    bytes_read: 0,
                    bytes_written: 0,
                    unavailable: None,
                };
                match &e.kind {
                    ExportKind::Nbd { name, .. } => {
                        let n = name.as_deref().unwrap_or(&e.device);
                        r.kind = "nbd".into();
                        r.location =
                            format!("nbd+unix:///{n}?socket={}", self.nbd_socket.display());
                        if let Some(s) = nbd.iter().find(|s| s.name == n) {
                            let st = &s.stats;
                            r.clients = s.clients as u64;
                            r.requests = st.reads
                                + st.writes
                                + st.flushes
                                + st.trims
                                + st.write_zeroes
                                + st.caches
                                + st.block_status
                                + st.unknown;
                            r.errors = st.errors;
                            r.bytes_read = st.bytes_read;
                            r.bytes_written = st.bytes_written;
                        }
                    }
                    ExportKind::Fuse { dir } => {
                        r.kind = "fuse".into();
                        r.location = dir.join(&e.device).display().to_string();
                        if let Some(s) = fuse.iter().find(|s| s.dir == *dir && s.name == e.device) {
                            r.clients = s.open_handles;
                            r.requests = s.reads + s.writes + s.fsyncs + s.fallocates;
                            r.errors = s.errors;
                            r.bytes_read = s.bytes_read;
                            r.bytes_written = s.bytes_written;
                        }
                    }
                    ExportKind::VhostUser { socket, .. } => {
                        r.kind = "vhost-user".into();
                        r.location = socket.display().to_string();
                        if let Some(v) = &e.vhost {
                            let s = v.stats();
                            let get = |c: &std::sync::atomic::AtomicU64| {
                                c.load(std::sync::atomic::Ordering::Relaxed)
                            };
                            r.clients = get(&s.clients);
                            r.requests = get(&s.requests);
                            r.errors = get(&s.errors);
                            r.bytes_read = get(&s.bytes_read);
                            r.bytes_written = get(&s.bytes_written);
                        }
                    }
                    ExportKind::Ublk { .. } => {
                        r.kind = "ublk".into();
                        #[cfg(feature = "ublk")]
                        if let Some(u) = &e.ublk {
                            r.location = u.path().display().to_string();
                            let st = u.stats();
                            r.requests = st.requests;
                            r.errors = st.errors;
                            r.bytes_read = st.bytes_read;
                            r.bytes_written = st.bytes_written;
                        }
                    }
                }
                r
            })
            .collect();
        v.extend(self.pending.records(&self.nbd_socket));
        v
    }

    /// Disconnects every client and unmounts every FUSE export (shutdown). The exports stay
    /// recorded, so a restart brings them back.
    pub fn shutdown(&self) {
        self.nbd.shutdown();
        self.fuse.shutdown();
        for e in self.entries.lock().iter_mut() {
            e.stop_vhost();
        }
        #[cfg(feature = "ublk")]
        for e in self.entries.lock().iter_mut() {
            if let Some(u) = e.ublk.take() {
                if let Err(err) = u.stop() {
                    tracing::warn!(export = %e.id, "ublk device not removed at shutdown: {err}");
                }
            }
        }
    }

    /// Starts the pending exports whose device can be served now; returns their ids.
    pub fn retry_pending(&self) -> Vec<String> {
        let mut back = Vec::new();
        for mut p in self.pending.drain() {
            match self.add(&p.device, &p.kind, p.read_only) {
                Ok(id) => {
                    tracing::info!(export = %id, "pending export is served again");
                    back.push(id);
                }
                Err(e) => {
                    p.reason = e.to_string();
                    self.pending.keep(p);
                }
            }
        }
        back
    }
}

/// A recorded export that is not served now.
#[derive(Clone, Debug)]
pub struct PendingExport {
    /// The exported device.
    pub device: String,
    /// How it is exported.
    pub kind: ExportKind,
    /// Read-only export.
    pub read_only: bool,
    /// Why it is not served.
    pub reason: String,
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

    /// Keeps `p` until its device can be served.
    pub fn keep(&self, p: PendingExport) {
        self.0.lock().push(p);
    }

    fn drain(&self) -> Vec<PendingExport> {
        std::mem::take(&mut *self.0.lock())
    }
}
