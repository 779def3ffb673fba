//! The export manager: adds and removes NBD, FUSE, ublk and vhost-user exports of registry devices, holding
//! each exported device in the registry the way a mount holds a block device. Every running
//! export is a `Box<dyn udm_export::Export>`: only [`Exports::add`] looks at the kind, to pick
//! its constructor; stopping, listing and counting go through the trait.
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
use udm_export::fuse::{FuseExport, FuseExports};
use udm_export::nbd::{NbdBitmap, NbdExport, NbdExportOptions, NbdServer};
use udm_export::vhost_user::{VhostUserExport, VhostUserOptions};
use udm_export::{Detached, Export, ExportError, UblkOptions};
use udm_io::BlockDevice;
use udm_proto::{BitmapSpec, ExportKind, ExportRecord};
use udm_types::errno::HasErrno;
use udm_types::{BitmapError, DevId, DirtyBitmap, Errno, SECTOR_SIZE};

struct Entry {
    id: String,
    device: String,
    dev: DevId,
    kind: ExportKind,
    read_only: bool,
    /// `None` once stopped at shutdown (the export stays recorded).
    export: Option<Box<dyn Export>>,
}

/// Every export of the daemon.
pub struct Exports {
    registry: Arc<Registry>,
    nbd: Arc<NbdServer>,
    nbd_socket: PathBuf,
    fuse: Arc<FuseExports>,
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
            fuse: Arc::new(FuseExports::new()),
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

    /// Starts serving `dev` as `kind` says: the one place that picks a constructor per kind.
    /// A ublk export records the device id it got in `kind`, so a restart brings back the
    /// same /dev/ublkbN.
    fn start(
        &self,
        device: &str,
        kind: &mut ExportKind,
        dev: Arc<dyn BlockDevice>,
        ro: bool,
    ) -> Result<Box<dyn Export>, ExportError> {
        Ok(match kind {
            ExportKind::Nbd {
                name,
                insecure_tcp,
                bitmaps,
            } => {
                let bitmaps = load_bitmaps(bitmaps, dev.size().saturating_mul(SECTOR_SIZE))
                    .map_err(ExportError::kind)?;
                let opts = NbdExportOptions {
                    read_only: ro,
                    description: Some(format!("udm device {device}")),
                    insecure_tcp: *insecure_tcp,
                    bitmaps,
                };
                let name = name.as_deref().unwrap_or(device);
                Box::new(NbdExport::start(
                    &self.nbd,
                    name,
                    dev,
                    opts,
                    &self.nbd_socket,
                )?)
            }
            ExportKind::Fuse { dir } => {
                Box::new(FuseExport::start(&self.fuse, dir, device, dev, ro)?)
            }
            ExportKind::VhostUser { socket, num_queues } => {
                let opts = VhostUserOptions {
                    read_only: ro,
                    num_queues: *num_queues,
                };
                Box::new(VhostUserExport::start(device, socket, dev, opts)?)
            }
            ExportKind::Ublk { id, queues, depth } => {
                let opts = UblkOptions {
                    dev_id: *id,
                    queues: *queues,
                    depth: *depth,
                    read_only: ro,
                };
                let (export, got) = udm_export::start_ublk(device, dev, &opts)?;
                *id = Some(got);
                export
            }
        })
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
        let mut kind = kind.clone();
        let export = match self.start(device, &mut kind, dev, ro) {
            Ok(x) => x,
            Err(e) => {
                self.registry.close_export(dev_id, &id);
                return Err(core_err(e));
            }
        };
        entries.push(Entry {
            id: id.clone(),
            device: device.to_string(),
            dev: dev_id,
            kind,
            read_only,
            export: Some(export),
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
    /// recorded) and marks its id busy until [`Exports::finish`]. Never waits for client I/O
    /// ([`Export::detach`]): a FUSE export is removed here (it refuses with EBUSY while its
    /// file is open instead of waiting), an NBD, ublk or vhost-user export is only unlisted.
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
        let detached = match entries[i].export.as_mut() {
            Some(x) => x.detach().map_err(core_err)?,
            None => Detached::Done,
        };
        let e = entries.remove(i);
        if detached == Detached::Done {
            self.registry.close_export(e.dev, &e.id);
            tracing::info!(export = %e.id, "export removed");
            return Ok(Removal { entry: None });
        }
        self.removing.lock().insert(e.id.clone());
        Ok(Removal { entry: Some(e) })
    }

    /// Second step of a removal: disconnects the clients of an export taken by
    /// [`Exports::take`], waiting for their in-flight requests, and releases the device. Must
    /// not be called with the control lock held.
    pub fn finish(&self, r: Removal) {
        let Some(mut e) = r.entry else { return };
        if let Some(x) = e.export.take() {
            if let Err(err) = x.stop() {
                tracing::warn!(export = %e.id, "export not stopped cleanly: {err}");
            }
        }
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
        let mut v: Vec<ExportRecord> = self
            .entries
            .lock()
            .iter()
            .map(|e| {
                let (kind, location, s) = match &e.export {
                    Some(x) => (x.kind(), x.location(), x.stats()),
                    None => {
                        let (kind, location) = describe(&e.device, &e.kind, &self.nbd_socket);
                        (kind, location, Default::default())
                    }
                };
                ExportRecord {
                    id: e.id.clone(),
                    device: e.device.clone(),
                    kind: kind.into(),
                    location,
                    read_only: e.read_only,
                    clients: s.clients,
                    requests: s.requests,
                    errors: s.errors,
                    bytes_read: s.bytes_read,
                    bytes_written: s.bytes_written,
                    unavailable: None,
                }
            })
            .collect();
        v.extend(self.pending.records(&self.nbd_socket));
        v
    }

    /// Disconnects every client and unmounts every FUSE export (shutdown). The exports stay
    /// recorded, so a restart brings them back. The shared NBD server and FUSE mounts shut
    /// down all at once; then each export stops (bounded each).
    pub fn shutdown(&self) {
        self.nbd.shutdown();
        self.fuse.shutdown();
        let stopping: Vec<(String, Box<dyn Export>)> = self
            .entries
            .lock()
            .iter_mut()
            .filter_map(|e| Some((e.id.clone(), e.export.take()?)))
            .collect();
        for (id, x) in stopping {
            if let Err(err) = x.stop() {
                tracing::warn!(export = %id, "export not stopped cleanly at shutdown: {err}");
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

/// The kind name and location of an export that is not running (pending, or stopped at
/// shutdown); a running one reports its own through [`Export`].
fn describe(device: &str, kind: &ExportKind, nbd_socket: &Path) -> (&'static str, String) {
    match kind {
        ExportKind::Nbd { name, .. } => (
            "nbd",
            udm_export::nbd::unix_uri(name.as_deref().unwrap_or(device), nbd_socket),
        ),
        ExportKind::Fuse { dir } => ("fuse", dir.join(device).display().to_string()),
        ExportKind::Ublk { .. } => ("ublk", String::new()),
        ExportKind::VhostUser { socket, .. } => ("vhost-user", socket.display().to_string()),
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
                let (kind, location) = describe(&p.device, &p.kind, nbd_socket);
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

/// Reads the dirty bitmaps of an NBD export; each must cover the device exactly (a bitmap of
/// another device or size would report wrong blocks) and have a usable name.
fn load_bitmaps(specs: &[BitmapSpec], size: u64) -> Result<Vec<NbdBitmap>, BitmapError> {
    let mut out: Vec<NbdBitmap> = Vec::new();
    for b in specs {
        if b.name.is_empty() || b.name.len() > 255 || b.name.chars().any(char::is_control) {
            return Err(BitmapError::Invalid(format!(
                "bitmap name {:?}: 1 to 255 printable characters",
                b.name
            )));
        }
        if out.iter().any(|o| o.name == b.name) {
            return Err(BitmapError::Invalid(format!(
                "bitmap {:?} given twice",
                b.name
            )));
        }
        let bitmap = DirtyBitmap::load(&b.file)?;
        if bitmap.size() != size {
            return Err(BitmapError::Invalid(format!(
                "{} covers {} bytes, the device has {size}",
                b.file.display(),
                bitmap.size()
            )));
        }
        out.push(NbdBitmap {
            name: b.name.clone(),
            bitmap: Arc::new(bitmap),
        });
    }
    Ok(out)
}
