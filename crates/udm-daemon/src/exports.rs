//! The export manager: adds and removes NBD, FUSE and ublk exports of registry devices, holding
//! each exported device in the registry the way a mount holds a block device.

use parking_lot::Mutex;
use std::path::PathBuf;
use std::sync::Arc;
use udm_core::{CoreError, Registry};
use udm_export::fuse::FuseExports;
use udm_export::nbd::{NbdExportOptions, NbdServer};
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
}

/// Every export of the daemon.
pub struct Exports {
    registry: Arc<Registry>,
    nbd: Arc<NbdServer>,
    nbd_socket: PathBuf,
    fuse: FuseExports,
    entries: Mutex<Vec<Entry>>,
    /// Recorded exports that cannot be served now (their device is unavailable).
    pub pending: crate::restore::PendingExports,
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
            pending: Default::default(),
        }
    }

    /// The id an export of `device` of this kind has.
    pub fn id_for(device: &str, kind: &ExportKind) -> String {
        match kind {
            ExportKind::Nbd { name } => format!("nbd:{}", name.as_deref().unwrap_or(device)),
            ExportKind::Fuse { dir } => format!("fuse:{}", dir.join(device).display()),
            ExportKind::Ublk => format!("ublk:{device}"),
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
        let node = self.registry.open_export(device, &id)?;
        let dev_id = node.id();
        let dev: Arc<dyn BlockDevice> = node;
        let ro = read_only || dev.read_only();
        let r: Result<(), CoreError> = match kind {
            ExportKind::Nbd { name } => self
                .nbd
                .add_export(
                    name.as_deref().unwrap_or(device),
                    dev,
                    NbdExportOptions {
                        read_only: ro,
                        description: Some(format!("udm device {device}")),
                    },
                )
                .map_err(core_err),
            ExportKind::Fuse { dir } => self.fuse.add(dir, device, dev, ro).map_err(core_err),
            #[cfg(feature = "ublk")]
            ExportKind::Ublk => Ok(()),
            #[cfg(not(feature = "ublk"))]
            ExportKind::Ublk => Err(CoreError::new(
                Errno::EOPNOTSUPP,
                "this udmd was built without ublk support (cargo feature `ublk`)",
            )),
        };
        #[cfg(feature = "ublk")]
        let mut ublk = None;
        #[cfg(feature = "ublk")]
        let r = match (r, kind) {
            (Ok(()), ExportKind::Ublk) => match udm_export::ublk::UblkExport::start(
                device,
                self.registry
                    .node(device)
                    .map(|n| n as Arc<dyn BlockDevice>)?,
                ro,
            ) {
                Ok(u) => {
                    ublk = Some(u);
                    Ok(())
                }
                Err(e) => Err(core_err(e)),
            },
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
            kind: kind.clone(),
            read_only,
            #[cfg(feature = "ublk")]
            ublk,
        });
        tracing::info!(export = %id, device, "export added");
        Ok(id)
    }

    /// Removes an export (disconnecting its clients cleanly).
    pub fn remove(&self, id: &str) -> Result<(), CoreError> {
        if self.pending.take(id) {
            self.registry.forget_export(id);
            return Ok(());
        }
        let mut entries = self.entries.lock();
        let i = entries.iter().position(|e| e.id == id).ok_or_else(|| {
            CoreError::new(
                Errno::ENOENT,
                format!("no export {id} (see `udmsetup export list`)"),
            )
        })?;
        let e = &entries[i];
        match &e.kind {
            ExportKind::Nbd { name } => self
                .nbd
                .remove_export(name.as_deref().unwrap_or(&e.device))
                .map_err(core_err)?,
            ExportKind::Fuse { dir } => self.fuse.remove(dir, &e.device).map_err(core_err)?,
            ExportKind::Ublk => {}
        }
        let e = entries.remove(i);
        #[cfg(feature = "ublk")]
        if let Some(u) = e.ublk {
            u.stop();
        }
        self.registry.close_export(e.dev, &e.id);
        tracing::info!(export = %e.id, "export removed");
        Ok(())
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
                    ExportKind::Nbd { name } => {
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
                    ExportKind::Ublk => {
                        r.kind = "ublk".into();
                        #[cfg(feature = "ublk")]
                        if let Some(u) = &e.ublk {
                            r.location = u.path().display().to_string();
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
        #[cfg(feature = "ublk")]
        for e in self.entries.lock().iter_mut() {
            if let Some(u) = e.ublk.take() {
                u.stop();
            }
        }
    }
}
