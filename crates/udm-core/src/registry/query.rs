//! Queries (`ls`, `table`, `status`, `deps`, events; `info` and listings are in `report`) and
//! messages: they take the registry lock only briefly and never wait for I/O, so they answer
//! while a switch drains.

use super::*;

impl Registry {
    /// Looks a mapped device up by uuid.
    pub fn name_by_uuid(&self, uuid: &str) -> Option<String> {
        let inner = self.inner.lock();
        inner
            .entries
            .values()
            .find(|e| e.md().is_some_and(|m| m.uuid.as_deref() == Some(uuid)))
            .map(|e| e.node.name())
    }

    /// Mapped devices sorted by name (`ls`).
    pub fn list_mapped(&self) -> Vec<(String, DevId)> {
        let inner = self.inner.lock();
        let mut v: Vec<(String, DevId)> = inner
            .entries
            .iter()
            .filter(|(_, e)| e.md().is_some())
            .map(|(id, e)| (e.node.name(), *id))
            .collect();
        v.sort();
        v
    }

    fn slot(m: &MdState, inactive: bool) -> Option<&TableSlot> {
        if inactive {
            m.inactive.as_ref()
        } else {
            m.live.as_ref()
        }
    }

    /// `table` (`--inactive` for the inactive slot). Empty when the slot is empty.
    pub fn table(&self, name: &str, inactive: bool) -> Result<Vec<TableLine>> {
        if let Some(recorded) = self.pending_lines(name, inactive) {
            return Ok(recorded);
        }
        self.lines(name, inactive, Table::table_lines)
    }

    /// `status`.
    pub fn status(&self, name: &str, inactive: bool) -> Result<Vec<TableLine>> {
        self.lines(name, inactive, Table::status_lines)
    }

    /// Lines of one slot's table; the registry lock is released before the targets are asked
    /// (status may take a target's own locks).
    fn lines(
        &self,
        name: &str,
        inactive: bool,
        get: fn(&Table) -> Vec<TableLine>,
    ) -> Result<Vec<TableLine>> {
        let table = {
            let inner = self.inner.lock();
            let (_, m) = inner.md_entry(name)?;
            Self::slot(m, inactive).map(|s| s.live.clone())
        };
        Ok(table.map(|t| get(&t.table)).unwrap_or_default())
    }

    /// `deps`: devices the table uses, as (number, name), in the kernel's order: the most
    /// recently added first (dm-table.c puts each new device at the head of `t->devices`).
    pub fn deps(&self, name: &str, inactive: bool) -> Result<Vec<(DevId, String)>> {
        let inner = self.inner.lock();
        let (_, m) = inner.md_entry(name)?;
        Ok(Self::slot(m, inactive)
            .map(|s| {
                s.uses
                    .iter()
                    .rev()
                    .map(|u| {
                        (
                            u.dev,
                            inner
                                .entries
                                .get(&u.dev)
                                .map(|e| e.node.name())
                                .unwrap_or_default(),
                        )
                    })
                    .collect()
            })
            .unwrap_or_default())
    }

    /// `message`: to the target at `sector` of the live table, or to the core for `@` messages.
    pub fn message(&self, name: &str, sector: u64, argv: &[String]) -> Result<Option<String>> {
        let (id, table) = {
            let inner = self.inner.lock();
            let (id, m) = inner.md_entry(name)?;
            inner.available(id, name)?;
            (id, m.live.as_ref().map(|s| s.live.clone()))
        };
        match argv.first().map(String::as_str) {
            Some("@cancel_deferred_remove") => {
                let mut inner = self.inner.lock();
                inner.not_switching(id, name)?;
                let m = inner.md_mut(id)?;
                if !m.deferred_remove {
                    return Err(CoreError::new(
                        Errno::ENXIO,
                        format!("device {name} is not scheduled for deferred removal"),
                    ));
                }
                m.deferred_remove = false;
                return Ok(None);
            }
            Some(s) if s.starts_with('@') => {
                return Err(CoreError::invalid(format!("unsupported core message {s}")));
            }
            None => return Err(CoreError::invalid("empty message")),
            _ => {}
        }
        let table =
            table.ok_or_else(|| CoreError::invalid(format!("device {name} has no live table")))?;
        table
            .table
            .message(sector, argv)
            .map_err(|e| CoreError::new(e.errno, e.msg))
    }

    /// The event counter of a device (`wait` sleeps on it without holding the registry).
    pub fn events(&self, name: &str) -> Result<Arc<Events>> {
        let inner = self.inner.lock();
        Ok(inner.md_entry(name)?.1.md.events().clone())
    }

    /// Waits until the event number of `name` differs from `seen` (or `timeout`).
    pub fn wait_event(&self, name: &str, seen: u32, timeout: Duration) -> Result<u32> {
        let ev = self.events(name)?;
        Ok(ev.wait(seen, timeout))
    }
}
