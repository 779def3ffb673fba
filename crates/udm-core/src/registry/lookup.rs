//! Names and numbers: finding a device by name, number or path, free minors and uuids, and
//! the interposers live on a device. Reads of the registry state, under the caller's lock.

use super::*;

pub(super) fn nodev(name: &str) -> CoreError {
    CoreError::NoDevice(name.to_string())
}

/// EINVAL unless `uuid` has dm's length (1 to 128 characters).
pub(super) fn check_uuid(uuid: &str) -> Result<()> {
    if uuid.is_empty() || uuid.len() > 128 {
        return Err(CoreError::invalid(format!(
            "uuid {uuid:?} must be 1 to 128 characters"
        )));
    }
    Ok(())
}

impl Inner {
    pub(super) fn id_of(&self, name: &str) -> Result<DevId> {
        self.names.get(name).copied().ok_or_else(|| nodev(name))
    }

    pub(super) fn entry(&self, name: &str) -> Result<&Entry> {
        let id = self.id_of(name)?;
        self.entries.get(&id).ok_or_else(|| nodev(name))
    }

    pub(super) fn md_entry(&self, name: &str) -> Result<(DevId, &MdState)> {
        let id = self.id_of(name)?;
        match self.entries.get(&id).and_then(|e| e.md()) {
            Some(m) => Ok((id, m)),
            None => Err(nodev(name)),
        }
    }

    /// EEXIST when a mapped device already has `uuid`.
    pub(super) fn uuid_free(&self, uuid: &str) -> Result<()> {
        if self
            .entries
            .values()
            .any(|e| e.md().is_some_and(|m| m.uuid.as_deref() == Some(uuid)))
        {
            return Err(CoreError::Exists(format!(
                "a device with uuid {uuid} already exists"
            )));
        }
        Ok(())
    }

    pub(super) fn md_mut(&mut self, id: DevId) -> Result<&mut MdState> {
        self.entries
            .get_mut(&id)
            .and_then(|e| e.md_mut())
            .ok_or_else(|| nodev(&id.to_string()))
    }

    pub(super) fn free_minor(&self, major: u32, step: u32) -> u32 {
        let mut m = 0;
        while self.entries.contains_key(&DevId::new(major, m)) {
            m += step;
        }
        m
    }

    /// Resolves a device named in a table: udm name, `major:minor`, `/dev/mapper/NAME`,
    /// `/dev/udm/NAME`, or the backing path of a disk.
    pub(super) fn resolve(&self, path: &str) -> Option<DevId> {
        if let Some(id) = self.names.get(path) {
            return Some(*id);
        }
        if let Ok(id) = path.parse::<DevId>() {
            return self.entries.contains_key(&id).then_some(id);
        }
        for prefix in ["/dev/mapper/", "/dev/udm/"] {
            if let Some(n) = path.strip_prefix(prefix) {
                return self.names.get(n).copied();
            }
        }
        let p = Path::new(path);
        let canon = std::fs::canonicalize(p).ok();
        self.entries.iter().find_map(|(id, e)| match &e.kind {
            EntryKind::Disk { path: Some(dp), .. }
                if dp == p || canon.as_deref().is_some_and(|c| c == dp) =>
            {
                Some(*id)
            }
            _ => None,
        })
    }

    /// Hooks currently attached to `dev`, derived from the live tables of every mapped device.
    pub(super) fn live_hooks_on(&self, dev: DevId) -> Vec<Hook> {
        let mut out = Vec::new();
        for e in self.entries.values() {
            if let Some(m) = e.md() {
                if let Some(l) = &m.live {
                    for h in l.hooks.iter().filter(|h| h.dev == dev) {
                        out.push(Hook {
                            start: h.start,
                            end: h.start + h.len,
                            md: m.md.clone(),
                            node: Some(e.node.clone()),
                        });
                    }
                }
            }
        }
        out
    }

    /// The live interposers of every mapped device.
    pub(super) fn live_interposers(&self) -> Vec<interpose::LiveHook> {
        let mut out = Vec::new();
        for (id, e) in &self.entries {
            if let Some(l) = e.md().and_then(|m| m.live.as_ref()) {
                out.extend(l.hooks.iter().map(|h| interpose::LiveHook {
                    owner: *id,
                    owner_name: e.node.name(),
                    hook: *h,
                }));
            }
        }
        out
    }
}
