//! Disks: adding them (with their partitions), listing and removing them.

use super::*;

impl Registry {
    /// Adds a disk backed by a file or block device, and its partitions.
    pub fn add_disk(&self, name: &str, path: &Path, opts: &DiskOptions) -> Result<DiskRecord> {
        DevName::new(name).map_err(|e| CoreError::invalid(e.to_string()))?;
        // `disk add` of an unavailable disk's name and path brings it (and its dependents) back.
        if let Some(info) = self.add_disk_again(name, path)? {
            return Ok(info);
        }
        if let Some(bytes) = opts.create {
            udm_io::backend::file::FileDevice::create(path, bytes).map_err(|e| {
                CoreError::new(
                    Errno::from_io(&e),
                    format!("cannot create {}: {e}", path.display()),
                )
            })?;
        }
        let path = std::fs::canonicalize(path).map_err(|e| {
            CoreError::new(
                Errno::from_io(&e),
                format!("cannot open {}: {e}", path.display()),
            )
        })?;
        {
            let inner = self.inner.lock();
            if inner.names.contains_key(name) {
                return Err(CoreError::Exists(format!("device {name} already exists")));
            }
            if let Some(id) = inner.resolve(&path.to_string_lossy()) {
                return Err(CoreError::Exists(format!(
                    "{} is already served as {}",
                    path.display(),
                    inner
                        .entries
                        .get(&id)
                        .map(|e| e.node.name())
                        .unwrap_or_default()
                )));
            }
        }
        let oo = OpenOptions {
            read_only: opts.read_only,
            direct: opts.direct,
            engine: Engine::Auto,
        };
        let backend =
            open_backend(&path, &oo).map_err(|e| CoreError::new(e.errno(), e.to_string()))?;
        let flags = DiskFlags {
            read_only: opts.read_only,
            direct: opts.direct,
            implicit: false,
        };
        self.insert_disk(name, Some(path), backend, flags, None)
    }

    /// Adds a disk from any block device (memory devices in tests, embedders' own backends).
    pub fn add_disk_device(&self, name: &str, dev: Arc<dyn BlockDevice>) -> Result<DiskRecord> {
        DevName::new(name).map_err(|e| CoreError::invalid(e.to_string()))?;
        let ro = dev.read_only();
        let flags = DiskFlags {
            read_only: ro,
            ..DiskFlags::default()
        };
        self.insert_disk(name, None, dev, flags, None)
    }

    pub(super) fn insert_disk(
        &self,
        name: &str,
        path: Option<PathBuf>,
        backend: Arc<dyn BlockDevice>,
        flags: DiskFlags,
        minor: Option<u32>,
    ) -> Result<DiskRecord> {
        let DiskFlags {
            read_only,
            direct,
            implicit,
        } = flags;
        // A file a table names by path is used whole: its partitions are not served.
        let parts = if implicit {
            Vec::new()
        } else {
            udm_io::partition::read_partitions(backend.as_ref()).unwrap_or_else(|e| {
                tracing::warn!(disk = name, "partition table ignored: {e}");
                Vec::new()
            })
        };
        let mut inner = self.inner.lock();
        if inner.names.contains_key(name) {
            return Err(CoreError::Exists(format!("device {name} already exists")));
        }
        let minor = minor
            .filter(|m| !inner.entries.contains_key(&DevId::new(DISK_MAJOR, *m)))
            .unwrap_or_else(|| inner.free_minor(DISK_MAJOR, 16));
        let id = DevId::new(DISK_MAJOR, minor);
        let node = Arc::new(DeviceNode::new(id, name, NodeKind::Disk, backend));
        let mut part_ids = Vec::new();
        for p in &parts {
            let pid = if p.number < 16 {
                DevId::new(DISK_MAJOR, minor + p.number)
            } else {
                DevId::new(EXT_MAJOR, inner.free_minor(EXT_MAJOR, 1))
            };
            let pname = udm_io::slice::partition_name(name, p.number);
            if inner.names.contains_key(&pname) {
                tracing::warn!("partition name {pname} is taken; partition skipped");
                continue;
            }
            let slice = match udm_io::slice::SliceDevice::for_partition(node.clone(), name, p) {
                Ok(s) => s,
                Err(e) => {
                    tracing::warn!("partition {pname} skipped: {e}");
                    continue;
                }
            };
            let pnode = Arc::new(DeviceNode::new(
                pid,
                &pname,
                NodeKind::Partition {
                    parent: id,
                    number: p.number,
                    start: p.start,
                },
                Arc::new(slice),
            ));
            inner
                .entries
                .insert(pid, Entry::new(pnode, EntryKind::Partition { parent: id }));
            inner.names.insert(pname, pid);
            part_ids.push(pid);
        }
        inner.entries.insert(
            id,
            Entry::new(
                node,
                EntryKind::Disk {
                    path,
                    read_only,
                    direct,
                    partitions: part_ids,
                    implicit,
                    unavailable: None,
                },
            ),
        );
        inner.names.insert(name.to_string(), id);
        // A revived disk keeps its place in the creation order.
        if !inner.order.contains(&id) {
            inner.order.push(id);
        }
        tracing::info!(disk = name, %id, partitions = parts.len(), "disk added");
        Self::disk_record(&inner, id).ok_or_else(|| nodev(name))
    }

    /// Removes a disk: EBUSY while it or a partition is held, open or interposed.
    pub fn remove_disk(&self, name: &str) -> Result<()> {
        let mut inner = self.inner.lock();
        let id = inner.id_of(name)?;
        let Some(Entry {
            kind: EntryKind::Disk { partitions, .. },
            ..
        }) = inner.entries.get(&id)
        else {
            return Err(CoreError::invalid(format!(
                "{name} is not a disk (use `udmsetup remove` for mapped devices)"
            )));
        };
        let partitions = partitions.clone();
        let holders = inner.holders_of(id);
        if !holders.is_empty() {
            return Err(CoreError::Busy(format!(
                "disk {name} is in use by {}",
                holders.join(", ")
            )));
        }
        for d in std::iter::once(id).chain(partitions.iter().copied()) {
            if !inner.live_hooks_on(d).is_empty() {
                return Err(CoreError::Busy(format!("disk {name} is interposed")));
            }
        }
        for d in std::iter::once(id).chain(partitions) {
            if let Some(e) = inner.entries.remove(&d) {
                inner.names.remove(&e.node.name());
            }
        }
        inner.order.retain(|x| *x != id);
        Ok(())
    }

    /// Every disk.
    pub fn disks(&self) -> Vec<DiskRecord> {
        let inner = self.inner.lock();
        inner
            .order
            .iter()
            .filter_map(|id| Self::disk_record(&inner, *id))
            .collect()
    }
}
