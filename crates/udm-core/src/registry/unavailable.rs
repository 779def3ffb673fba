//! Devices that cannot be served now (what `persist` restores but cannot open or rebuild).
//!
//! A disk whose backing file cannot be opened at start-up (an unmounted file system, a late iSCSI
//! login) stays in the registry as unavailable: same name, same `major:minor`, its path and flags
//! recorded, a placeholder node that fails every request with ENXIO. A mapped device whose
//! recorded tables cannot be rebuilt (they name an unavailable device) keeps those tables as text
//! ([`Pending`]) and reports why. [`Registry::config`] writes both back verbatim, so a save made
//! while something is unavailable loses nothing, and [`Registry::retry_unavailable`] brings them
//! back in dependency order once the file returns.

use super::{
    implicit, CoreError, DevId, DeviceNode, DiskRecord, Entry, EntryKind, Errno, Inner, NodeKind,
    Registry, Result, ResumeOptions, SuspendFlags, TableConfig, TableLine,
};
use crate::config::DiskConfig;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use udm_io::backend::open::{open_backend, Engine, OpenOptions};
use udm_io::{Bio, BlockDevice, IoError};
use udm_target::table::TableSpec;

/// Recorded tables of a mapped device that are not rebuilt yet.
#[derive(Clone, Debug)]
pub(super) struct Pending {
    /// The recorded live table (`None` once it is live again, or when there was none).
    pub(super) live: Option<TableConfig>,
    /// The recorded inactive table.
    pub(super) inactive: Option<TableConfig>,
    /// Suspended when recorded (applied once the live table is back).
    pub(super) suspended: bool,
    /// Why it could not be rebuilt (the last error).
    pub(super) reason: String,
}

/// Stands in for a disk whose backing file cannot be opened: nothing can be read or written.
struct Missing {
    path: PathBuf,
}

impl BlockDevice for Missing {
    fn size(&self) -> u64 {
        0
    }

    fn submit(&self, bio: Bio<'_>) -> std::result::Result<(), IoError> {
        Err(IoError::errno(
            bio.kind(),
            bio.sector,
            Errno::ENXIO,
            format!("{} is unavailable", self.path.display()),
        ))
    }

    fn describe(&self) -> String {
        format!("{} (unavailable)", self.path.display())
    }
}

/// ENODEV (not ENXIO, which dmsetup reports as "Device does not exist"): the device exists,
/// what it needs does not.
fn unavailable(name: &str, reason: &str) -> CoreError {
    CoreError::new(
        Errno::ENODEV,
        format!("device {name} is unavailable: {reason}"),
    )
}

impl Entry {
    /// Why this device cannot be used now, if it cannot.
    pub(super) fn unavailable_reason(&self) -> Option<String> {
        match &self.kind {
            EntryKind::Disk { unavailable, .. } => unavailable.clone(),
            EntryKind::Mapped(m) => m.pending.as_ref().map(|p| p.reason.clone()),
            EntryKind::Partition { .. } => None,
        }
    }
}

impl Inner {
    /// ENODEV naming the reason when `id` is unavailable: control operations on it would change
    /// (or lose) what is recorded for it.
    pub(super) fn available(&self, id: DevId, name: &str) -> Result<()> {
        match self.entries.get(&id).and_then(Entry::unavailable_reason) {
            Some(r) => Err(unavailable(name, &r)),
            None => Ok(()),
        }
    }

    /// ENODEV when `id` cannot serve I/O: an unavailable disk, or a mapped device whose recorded
    /// live table is not rebuilt. Tables and exports cannot use it.
    pub(super) fn usable(&self, id: DevId, name: &str) -> Result<()> {
        match self.entries.get(&id).map(|e| &e.kind) {
            Some(EntryKind::Disk {
                unavailable: Some(r),
                ..
            }) => Err(unavailable(name, r)),
            Some(EntryKind::Mapped(m)) => match &m.pending {
                Some(p) if p.live.is_some() => Err(unavailable(name, &p.reason)),
                _ => Ok(()),
            },
            _ => Ok(()),
        }
    }

    /// Open count plus recorded exports not opened yet: what `remove` waits for.
    pub(super) fn opens(&self, id: DevId) -> i32 {
        let Some(e) = self.entries.get(&id) else {
            return 0;
        };
        let name = e.node.name();
        e.open_count() + self.expected.values().filter(|d| **d == name).count() as i32
    }

    /// How much is still pending, summed over the pending mapped devices.
    fn pending_weight(&self) -> usize {
        self.entries
            .values()
            .filter_map(|e| e.md()?.pending.as_ref())
            .map(|p| 1 + usize::from(p.live.is_some()) + usize::from(p.inactive.is_some()))
            .sum()
    }

    fn pending_names(&self) -> Vec<String> {
        self.order
            .iter()
            .filter_map(|id| self.entries.get(id))
            .filter(|e| e.md().is_some_and(|m| m.pending.is_some()))
            .map(|e| e.node.name())
            .collect()
    }
}

pub(super) fn open_options(d: &DiskConfig) -> OpenOptions {
    OpenOptions {
        read_only: d.read_only,
        direct: d.direct,
        engine: Engine::Auto,
    }
}

pub(super) fn flags(d: &DiskConfig) -> super::DiskFlags {
    super::DiskFlags {
        read_only: d.read_only,
        direct: d.direct,
        implicit: d.implicit,
    }
}

/// What the state directory records of a disk entry with a backing path (`None` for any other
/// entry).
pub(super) fn disk_config(id: DevId, e: &Entry) -> Option<DiskConfig> {
    match &e.kind {
        EntryKind::Disk {
            path: Some(path),
            read_only,
            direct,
            implicit,
            ..
        } => Some(DiskConfig {
            name: e.node.name(),
            path: path.clone(),
            read_only: *read_only,
            direct: *direct,
            minor: id.minor,
            implicit: *implicit,
        }),
        _ => None,
    }
}

impl Registry {
    /// True when a disk or mapped device is unavailable (the daemon retries then).
    pub fn has_unavailable(&self) -> bool {
        let inner = self.inner.lock();
        inner
            .entries
            .values()
            .any(|e| e.unavailable_reason().is_some())
    }

    /// Tries again to open unavailable disks (only `name` when given) and to rebuild the
    /// recorded tables of unavailable mapped devices, in dependency order (live tables resumed
    /// with their recorded suspend state, then inactive tables). Returns the devices that came
    /// back. With `name`, fails with ENODEV (naming the missing file) when that device is still
    /// unavailable.
    pub fn retry_unavailable(&self, name: Option<&str>) -> Result<Vec<String>> {
        // Every unavailable disk is tried (a named mapped device may need any of them); only
        // the named device's failure is an error.
        let (target, ids) = {
            let inner = self.inner.lock();
            let target = name.map(|n| inner.id_of(n)).transpose()?;
            (target, inner.order.clone())
        };
        let mut back = Vec::new();
        let mut failed = None;
        for id in ids {
            match self.reopen_disk(id) {
                Ok(Some(n)) => back.push(n),
                Ok(None) => {}
                Err(e) if Some(id) == target => failed = Some(e),
                Err(_) => {}
            }
        }
        back.extend(self.rebuild_pending());
        implicit::release_unused(&mut self.inner.lock());
        if let Some(e) = failed {
            return Err(e);
        }
        if let (Some(n), Some(id)) = (name, target) {
            self.inner.lock().available(id, n)?;
        }
        Ok(back)
    }

    /// `disk add` of an unavailable disk's name: with its recorded path (or one resolving to
    /// it), retries it; with another path, EEXIST. `None` when `name` is not an unavailable disk.
    pub(super) fn add_disk_again(&self, name: &str, path: &Path) -> Result<Option<DiskRecord>> {
        let (id, recorded) = {
            let inner = self.inner.lock();
            let Some(id) = inner.names.get(name).copied() else {
                return Ok(None);
            };
            match inner.entries.get(&id).map(|e| &e.kind) {
                Some(EntryKind::Disk {
                    path: Some(p),
                    unavailable: Some(_),
                    ..
                }) => (id, p.clone()),
                _ => return Ok(None),
            }
        };
        let same = recorded == path || std::fs::canonicalize(path).is_ok_and(|c| c == recorded);
        if !same {
            return Err(CoreError::Exists(format!(
                "device {name} already exists (unavailable, backed by {}); remove it with \
                 `udmsetup disk remove {name}` to serve another file under that name",
                recorded.display()
            )));
        }
        self.retry_unavailable(Some(name))?;
        let inner = self.inner.lock();
        Ok(Some(
            Self::disk_record(&inner, id).ok_or_else(|| CoreError::NoDevice(name.to_string()))?,
        ))
    }

    /// The recorded (not rebuilt) table of a slot of an unavailable mapped device, as lines.
    pub(super) fn pending_lines(&self, name: &str, inactive: bool) -> Option<Vec<TableLine>> {
        let inner = self.inner.lock();
        let (_, m) = inner.md_entry(name).ok()?;
        let p = m.pending.as_ref()?;
        let t = if inactive { &p.inactive } else { &p.live };
        let spec = TableSpec::parse(&t.as_ref()?.text).ok()?;
        Some(spec.lines)
    }

    /// Enters a disk that cannot be opened: its name, number and recorded settings, a node
    /// that fails every request.
    pub(super) fn insert_unavailable_disk(&self, d: &DiskConfig, reason: String) -> Result<()> {
        let mut inner = self.inner.lock();
        if inner.names.contains_key(&d.name) {
            return Err(CoreError::Exists(format!(
                "device {} already exists",
                d.name
            )));
        }
        let id = DevId::new(super::DISK_MAJOR, d.minor);
        if inner.entries.contains_key(&id) {
            return Err(CoreError::Exists(format!("{id} is in use")));
        }
        let node = Arc::new(DeviceNode::new(
            id,
            &d.name,
            NodeKind::Disk,
            Arc::new(Missing {
                path: d.path.clone(),
            }),
        ));
        inner.entries.insert(
            id,
            Entry::new(
                node,
                EntryKind::Disk {
                    path: Some(d.path.clone()),
                    read_only: d.read_only,
                    direct: d.direct,
                    partitions: Vec::new(),
                    implicit: d.implicit,
                    unavailable: Some(reason.clone()),
                },
            ),
        );
        inner.names.insert(d.name.clone(), id);
        if !inner.order.contains(&id) {
            inner.order.push(id);
        }
        tracing::warn!(disk = %d.name, %id, "disk unavailable: {reason}");
        Ok(())
    }

    /// Opens an unavailable disk again. `Ok(Some(name))` when it came back, `Ok(None)` when it
    /// was not an unavailable disk; ENODEV with the new reason when it still cannot be opened.
    fn reopen_disk(&self, id: DevId) -> Result<Option<String>> {
        let cfg = {
            let inner = self.inner.lock();
            let Some(e) = inner.entries.get(&id) else {
                return Ok(None);
            };
            if !matches!(
                e.kind,
                EntryKind::Disk {
                    unavailable: Some(_),
                    ..
                }
            ) {
                return Ok(None);
            }
            let Some(cfg) = disk_config(id, e) else {
                return Ok(None);
            };
            cfg
        };
        let backend = match open_backend(&cfg.path, &open_options(&cfg)) {
            Ok(b) => b,
            Err(e) => {
                let reason = e.to_string();
                let mut inner = self.inner.lock();
                if let Some(Entry {
                    kind: EntryKind::Disk { unavailable, .. },
                    ..
                }) = inner.entries.get_mut(&id)
                {
                    *unavailable = Some(reason.clone());
                }
                return Err(unavailable(&cfg.name, &reason));
            }
        };
        {
            // Nothing holds the placeholder (tables and exports refuse it): replace it.
            let mut inner = self.inner.lock();
            inner.entries.remove(&id);
            inner.names.remove(&cfg.name);
        }
        match self.insert_disk(
            &cfg.name,
            Some(cfg.path.clone()),
            backend,
            flags(&cfg),
            Some(cfg.minor),
        ) {
            Ok(_) => {
                tracing::info!(disk = %cfg.name, %id, "unavailable disk is back");
                Ok(Some(cfg.name))
            }
            Err(e) => {
                let reason = format!("cannot enter it again: {e}");
                if let Err(e2) = self.insert_unavailable_disk(&cfg, reason) {
                    tracing::error!(disk = %cfg.name, "unavailable disk lost its entry: {e2}");
                }
                Err(e)
            }
        }
    }

    /// Rebuilds every pending mapped device, repeating while anything progresses (a table
    /// naming another pending device needs that device's live table first). Returns the
    /// devices that are complete again.
    pub(super) fn rebuild_pending(&self) -> Vec<String> {
        let mut back = Vec::new();
        loop {
            let (names, before) = {
                let inner = self.inner.lock();
                (inner.pending_names(), inner.pending_weight())
            };
            if names.is_empty() {
                break;
            }
            for n in names {
                if self.rebuild_one(&n).is_ok() {
                    back.push(n);
                }
            }
            if self.inner.lock().pending_weight() >= before {
                break;
            }
        }
        back
    }

    /// Rebuilds one pending mapped device: live table loaded and resumed, the recorded suspend
    /// state applied, then the inactive table loaded. What fails stays pending with the error.
    fn rebuild_one(&self, name: &str) -> Result<()> {
        let (id, p) = {
            let mut inner = self.inner.lock();
            let id = inner.id_of(name)?;
            (id, inner.md_mut(id)?.pending.take())
        };
        let Some(mut p) = p else {
            return Ok(());
        };
        let r = self.rebuild_steps(name, &mut p);
        if let Err(e) = &r {
            p.reason = e.to_string();
            let mut inner = self.inner.lock();
            if let Ok(m) = inner.md_mut(id) {
                m.pending = Some(p);
            }
        } else {
            tracing::info!(device = name, "unavailable device is back");
        }
        r
    }

    fn rebuild_steps(&self, name: &str, p: &mut Pending) -> Result<()> {
        if let Some(t) = &p.live {
            self.load_recorded(name, t)?;
            if let Err(e) = self.resume(name, &ResumeOptions::default()) {
                if let Err(e2) = self.clear(name) {
                    tracing::error!(device = name, "cannot clear a table that failed: {e2}");
                }
                return Err(e);
            }
            p.live = None;
        }
        if p.suspended {
            self.suspend(name, SuspendFlags::default())?;
            p.suspended = false;
        }
        if let Some(t) = &p.inactive {
            self.load_recorded(name, t)?;
            p.inactive = None;
        }
        Ok(())
    }

    /// Loads a recorded table into the inactive slot of `name`.
    fn load_recorded(&self, name: &str, t: &TableConfig) -> Result<()> {
        let spec = TableSpec::parse(&t.text)?;
        let flags = super::LoadFlags {
            read_only: t.read_only,
            interpose: t.interposed,
        };
        self.load(name, &spec, flags)
    }
}
