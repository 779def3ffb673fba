//! Mapped devices' lifecycle under their names: `create`, `clear`, `rename` and
//! `rename --setuuid` (loading is in `build`, switching and removal in `switch`).

use super::*;

impl Registry {
    /// `create`: a device with no table, then load + resume if a table is given (removing the
    /// device again if either fails, as libdm does).
    pub fn create(
        &self,
        name: &str,
        uuid: Option<&str>,
        minor: Option<u32>,
        table: Option<(&TableSpec, LoadFlags)>,
        opts: &ResumeOptions,
    ) -> Result<InfoRecord> {
        DevName::new(name).map_err(|e| CoreError::invalid(e.to_string()))?;
        if let Some(u) = uuid {
            check_uuid(u)?;
        }
        {
            let mut inner = self.inner.lock();
            if inner.names.contains_key(name) {
                return Err(CoreError::Exists(format!("device {name} already exists")));
            }
            if let Some(u) = uuid {
                inner.uuid_free(u)?;
            }
            let minor = match minor {
                Some(m) if inner.entries.contains_key(&DevId::new(DM_MAJOR, m)) => {
                    return Err(CoreError::Exists(format!("minor {m} is in use")))
                }
                Some(m) => m,
                None => inner.free_minor(DM_MAJOR, 1),
            };
            let id = DevId::new(DM_MAJOR, minor);
            let md = Arc::new(MappedDevice::new(id, name));
            let node = Arc::new(DeviceNode::new(id, name, NodeKind::Mapped, md.clone()));
            inner.entries.insert(
                id,
                Entry::new(
                    node,
                    EntryKind::Mapped(Box::new(MdState {
                        md,
                        uuid: uuid.map(str::to_string),
                        live: None,
                        inactive: None,
                        deferred_remove: false,
                        pending: None,
                        loaded_once: false,
                    })),
                ),
            );
            inner.names.insert(name.to_string(), id);
            inner.order.push(id);
        }
        if let Some((spec, flags)) = table {
            let r = self
                .load(name, spec, flags)
                .and_then(|_| self.resume(name, opts));
            if let Err(e) = r {
                if let Err(e2) = self.remove(name, false, false) {
                    tracing::error!(
                        device = name,
                        "could not remove device after failed create: {e2}"
                    );
                }
                return Err(e);
            }
        }
        self.info(name)
    }

    /// `clear`: destroys the inactive table.
    pub fn clear(&self, name: &str) -> Result<()> {
        let mut inner = self.inner.lock();
        let (id, _) = inner.md_entry(name)?;
        inner.available(id, name)?;
        inner.not_switching(id, name)?;
        if let Some(old) = inner.md_mut(id)?.inactive.take() {
            Self::release_slot(&mut inner, id, &old);
        }
        self.run_deferred(inner);
        Ok(())
    }

    /// `rename`.
    pub fn rename(&self, name: &str, new: &str) -> Result<()> {
        DevName::new(new).map_err(|e| CoreError::invalid(e.to_string()))?;
        let mut inner = self.inner.lock();
        let (id, m) = inner.md_entry(name)?;
        let md = m.md.clone();
        inner.available(id, name)?;
        if inner.names.contains_key(new) {
            return Err(CoreError::Exists(format!("device {new} already exists")));
        }
        inner.names.remove(name);
        inner.names.insert(new.to_string(), id);
        if let Some(e) = inner.entries.get(&id) {
            e.node.set_name(new);
        }
        md.set_name(new);
        md.events().raise();
        Ok(())
    }

    /// `rename --setuuid`: only when the device has no uuid yet.
    pub fn set_uuid(&self, name: &str, uuid: &str) -> Result<()> {
        let mut inner = self.inner.lock();
        let (id, m) = inner.md_entry(name)?;
        inner.available(id, name)?;
        if m.uuid.is_some() {
            return Err(CoreError::invalid(format!(
                "device {name} already has a uuid; it cannot be changed"
            )));
        }
        check_uuid(uuid)?;
        inner.uuid_free(uuid)?;
        let md = inner.md_mut(id)?;
        md.uuid = Some(uuid.to_string());
        md.md.events().raise();
        Ok(())
    }
}
