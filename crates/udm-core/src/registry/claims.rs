//! Claims: who holds a device. A (non-interposed) table claims its devices for the
//! device-mapper holder class, an export holds its device as a mount does, an interposed table
//! only shares it; recorded exports not served yet count as openers.

use super::*;

pub(super) fn holder_text(inner: &Inner, h: &Holder) -> String {
    match h {
        Holder::Table(id) => match inner.entries.get(id) {
            Some(e) => format!("mapped device {}", e.node.name()),
            None => format!("mapped device {id}"),
        },
        Holder::Export(x) => format!("export {x}"),
    }
}

impl Inner {
    pub(super) fn holders_of(&self, id: DevId) -> Vec<String> {
        let mut ids = vec![id];
        if let Some(Entry {
            kind: EntryKind::Disk { partitions, .. },
            ..
        }) = self.entries.get(&id)
        {
            ids.extend(partitions.iter().copied());
        }
        let mut out: Vec<String> = Vec::new();
        for i in ids {
            if let Some(e) = self.entries.get(&i) {
                for h in &e.holders {
                    let t = holder_text(self, h);
                    if !out.contains(&t) {
                        out.push(t);
                    }
                }
                if e.shared > 0 {
                    out.push(format!("{} shared open(s) by interposed tables", e.shared));
                }
                let name = e.node.name();
                for (h, _) in self.expected.iter().filter(|(_, d)| **d == name) {
                    out.push(format!("export {h} (recorded, not served yet)"));
                }
            }
        }
        out
    }
}

impl Registry {
    /// The node of a device, for an export: claims it like a mount does. EBUSY when mapped
    /// devices hold it (their tables claim it).
    pub fn open_export(&self, name: &str, holder: &str) -> Result<Arc<DeviceNode>> {
        let mut inner = self.inner.lock();
        let id = inner.id_of(name)?;
        inner.usable(id, name)?;
        inner.not_removing(id, name)?;
        let holders = inner
            .entries
            .get(&id)
            .map(|e| e.holders.clone())
            .unwrap_or_default();
        if let Some(h) = holders.iter().find(|h| matches!(h, Holder::Table(_))) {
            return Err(CoreError::Busy(format!(
                "device {name} is held by {}; export that mapped device instead",
                holder_text(&inner, h)
            )));
        }
        if let Some(m) = inner.entries.get(&id).and_then(|e| e.md()) {
            if m.deferred_remove && inner.expected.get(holder).is_none_or(|d| d != name) {
                return Err(CoreError::Busy(format!(
                    "device {name} is scheduled for deferred removal"
                )));
            }
        }
        let e = inner.entries.get_mut(&id).ok_or_else(|| nodev(name))?;
        e.holders.push(Holder::Export(holder.to_string()));
        let node = e.node.clone();
        inner.expected.remove(holder);
        Ok(node)
    }

    /// Releases an export's hold. Completes a deferred removal when it was the last user.
    pub fn close_export(&self, id: DevId, holder: &str) {
        let mut inner = self.inner.lock();
        if let Some(e) = inner.entries.get_mut(&id) {
            if let Some(i) = e
                .holders
                .iter()
                .position(|h| *h == Holder::Export(holder.to_string()))
            {
                e.holders.remove(i);
            }
        }
        self.run_deferred(inner);
    }

    pub(super) fn release_slot(inner: &mut Inner, me: DevId, slot: &TableSlot) {
        for u in &slot.uses {
            if let Some(e) = inner.entries.get_mut(&u.dev) {
                if slot.interposed {
                    e.shared = e.shared.saturating_sub(1);
                } else if let Some(i) = e.holders.iter().position(|h| *h == Holder::Table(me)) {
                    e.holders.remove(i);
                }
            }
        }
        implicit::release_unused(inner);
    }

    /// Announces a recorded export of `device` (by its holder id) before it is opened: until
    /// [`Registry::open_export`] opens it (or [`Registry::forget_export`]), it counts as an
    /// opener, so a recorded deferred removal neither refuses it nor completes without it.
    pub fn expect_export(&self, device: &str, holder: &str) {
        self.inner
            .lock()
            .expected
            .insert(holder.to_string(), device.to_string());
    }

    /// Drops an announced export that will not be opened (it was removed while pending).
    pub fn forget_export(&self, holder: &str) {
        let mut inner = self.inner.lock();
        inner.expected.remove(holder);
        self.run_deferred(inner);
    }
}
