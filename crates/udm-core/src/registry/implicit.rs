//! Implicit disks: a table may name an absolute path to a file or block device that is not a
//! udm disk (`snapshot o /srv/vol.cow P 8`). It is opened as a disk on demand, under a generated
//! name (`auto-vol.cow`), listed by `disk list`, held by the table like any disk, recorded in the
//! state (so a restart opens it again), and released — closed and forgotten — when no table
//! uses it any more.

use super::{BuildCtx, DevId, DeviceNode, Entry, EntryKind, Errno, Inner, NodeKind, DISK_MAJOR};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use udm_io::backend::open::{open_backend, BackendError, Engine, OpenOptions};
use udm_target::TargetError;
use udm_types::errno::HasErrno;
use udm_types::DevName;

/// A disk opened for a table being built; entered into the registry with the table.
pub(super) struct ImplicitDisk {
    id: DevId,
    name: String,
    path: PathBuf,
    read_only: bool,
    node: Arc<DeviceNode>,
}

/// Opens read-write, or read-only when the file or device refuses writes.
fn open(path: &Path) -> Result<(Arc<dyn udm_io::BlockDevice>, bool), BackendError> {
    let rw = OpenOptions {
        read_only: false,
        direct: false,
        engine: Engine::Auto,
    };
    match open_backend(path, &rw) {
        Err(BackendError::Permission { .. }) => {
            let ro = OpenOptions {
                read_only: true,
                ..rw
            };
            open_backend(path, &ro).map(|b| (b, true))
        }
        r => r.map(|b| (b, false)),
    }
}

impl BuildCtx<'_> {
    /// Resolves a path no device is registered for: an absolute path is opened as an implicit
    /// disk; anything else (a name, `/dev/mapper/NAME`) is ENODEV.
    pub(super) fn open_implicit(&mut self, path: &str) -> Result<DevId, TargetError> {
        let p = Path::new(path);
        // `/dev/mapper/NAME` and `/dev/udm/NAME` name udm devices, never files.
        let udm_name = ["/dev/mapper/", "/dev/udm/"]
            .iter()
            .any(|pre| path.starts_with(pre));
        if !p.is_absolute() || udm_name {
            return Err(TargetError::new(
                Errno::ENODEV,
                format!(
                    "device {path} not found (add it with `udmsetup disk add`, or name a file \
                     or block device by its absolute path)"
                ),
            ));
        }
        let canon = std::fs::canonicalize(p).map_err(|e| {
            TargetError::new(Errno::from_io(&e), format!("cannot open {path}: {e}"))
        })?;
        if let Some(d) = self.implicit.iter().find(|d| d.path == canon) {
            return Ok(d.id);
        }
        let (backend, read_only) =
            open(&canon).map_err(|e| TargetError::new(e.errno(), format!("cannot open {e}")))?;
        let taken = |id: DevId| {
            self.inner.entries.contains_key(&id) || self.implicit.iter().any(|d| d.id == id)
        };
        let mut minor = 0;
        while taken(DevId::new(DISK_MAJOR, minor)) {
            minor += 16;
        }
        let id = DevId::new(DISK_MAJOR, minor);
        let name = self.implicit_name(&canon, minor);
        let node = Arc::new(DeviceNode::new(id, &name, NodeKind::Disk, backend));
        self.implicit.push(ImplicitDisk {
            id,
            name,
            path: canon,
            read_only,
            node,
        });
        Ok(id)
    }

    /// `auto-BASENAME`, or `auto-BASENAME-MINOR` when that name is taken.
    fn implicit_name(&self, path: &Path, minor: u32) -> String {
        let base: String = path
            .file_name()
            .map(|f| f.to_string_lossy().chars().take(100).collect())
            .unwrap_or_default();
        let free = |n: &str| {
            DevName::new(n).is_ok()
                && !self.inner.names.contains_key(n)
                && !self.implicit.iter().any(|d| d.name == n)
        };
        [format!("auto-{base}"), format!("auto-{base}-{minor}")]
            .into_iter()
            .find(|n| free(n))
            .unwrap_or_else(|| format!("auto-{minor}"))
    }

    /// The node of a disk this build opened.
    pub(super) fn implicit_node(&self, id: DevId) -> Option<Arc<DeviceNode>> {
        self.implicit
            .iter()
            .find(|d| d.id == id)
            .map(|d| d.node.clone())
    }
}

impl ImplicitDisk {
    /// The number the disk gets.
    pub(super) fn id(&self) -> DevId {
        self.id
    }
}

/// Enters the disks a successfully built table opened.
pub(super) fn enter(inner: &mut Inner, disks: Vec<ImplicitDisk>) {
    for d in disks {
        tracing::info!(disk = %d.name, id = %d.id, path = %d.path.display(), "implicit disk opened for a table");
        inner.entries.insert(
            d.id,
            Entry::new(
                d.node,
                EntryKind::Disk {
                    path: Some(d.path),
                    read_only: d.read_only,
                    direct: false,
                    partitions: Vec::new(),
                    implicit: true,
                    unavailable: None,
                },
            ),
        );
        inner.names.insert(d.name, d.id);
        inner.order.push(d.id);
    }
}

/// True when a table not rebuilt yet names the disk (by path or name): it must stay recorded.
fn named_by_pending(inner: &Inner, name: &str, path: &Path) -> bool {
    let path = path.to_string_lossy();
    inner
        .entries
        .values()
        .filter_map(|e| e.md()?.pending.as_ref())
        .flat_map(|p| p.live.iter().chain(p.inactive.iter()))
        .flat_map(|t| t.text.split_whitespace())
        .map(|w| w.strip_prefix("[interpose]").unwrap_or(w))
        .any(|w| w == name || w == path)
}

/// Closes and forgets implicit disks no table holds, opens shared or interposes.
pub(super) fn release_unused(inner: &mut Inner) {
    let unused: Vec<(DevId, String)> = inner
        .entries
        .iter()
        .filter_map(|(id, e)| match &e.kind {
            EntryKind::Disk {
                implicit: true,
                path: Some(path),
                ..
            } if e.holders.is_empty()
                && e.shared == 0
                && inner.live_hooks_on(*id).is_empty()
                && !named_by_pending(inner, &e.node.name(), path) =>
            {
                Some((*id, e.node.name()))
            }
            _ => None,
        })
        .collect();
    for (id, name) in unused {
        inner.entries.remove(&id);
        inner.names.remove(&name);
        inner.order.retain(|x| *x != id);
        tracing::info!(disk = %name, %id, "implicit disk released: no table uses it");
    }
}

/// True when the disks a table opened can still be entered: no device took their numbers,
/// names or paths while the table was built without the registry lock.
pub(super) fn still_free(inner: &Inner, disks: &[ImplicitDisk]) -> bool {
    disks.iter().all(|d| {
        !inner.entries.contains_key(&d.id)
            && !inner.names.contains_key(&d.name)
            && inner.resolve(&d.path.to_string_lossy()).is_none()
    })
}
