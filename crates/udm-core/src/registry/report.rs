//! Reports: what `info`, `ls --tree` and `disk list` show, built under the lock from the
//! registry state (never waiting for I/O). The report types are udm-proto's records, defined
//! once: the registry fills them and udmd sends them as they are.

use super::*;
pub use udm_proto::{
    DeviceKindRecord, DeviceRecord, DiskRecord, InfoRecord, InterposerRecord, PartitionRecord,
};

impl Registry {
    /// Every device (disks, partitions, mapped), for `ls --tree`.
    pub fn devices(&self) -> Vec<DeviceRecord> {
        let inner = self.inner.lock();
        let devs = |ids: &mut dyn Iterator<Item = DevId>| ids.map(|d| d.to_string()).collect();
        inner
            .entries
            .iter()
            .map(|(id, e)| {
                let no_block_device = e.md().is_some_and(MdState::no_block_device);
                let (kind, deps, interposes) = match &e.kind {
                    EntryKind::Disk { .. } => (DeviceKindRecord::Disk, vec![], vec![]),
                    EntryKind::Partition { parent } => (
                        DeviceKindRecord::Partition,
                        vec![parent.to_string()],
                        vec![],
                    ),
                    EntryKind::Mapped(m) => {
                        let deps = m
                            .live
                            .as_ref()
                            // The kernel's deps order (see `deps`): newest first.
                            .map(|l| devs(&mut l.uses.iter().rev().map(|u| u.dev)))
                            .unwrap_or_default();
                        let ip = m
                            .live
                            .as_ref()
                            .map(|l| devs(&mut l.hooks.iter().map(|h| h.dev)))
                            .unwrap_or_default();
                        (DeviceKindRecord::Mapped, deps, ip)
                    }
                };
                DeviceRecord {
                    name: e.node.name(),
                    major: id.major,
                    minor: id.minor,
                    kind,
                    deps,
                    interposes,
                    unavailable: e.unavailable_reason(),
                    no_block_device,
                }
            })
            .collect()
    }

    /// `info`.
    pub fn info(&self, name: &str) -> Result<InfoRecord> {
        let inner = self.inner.lock();
        let (id, m) = inner.md_entry(name)?;
        let e = inner.entries.get(&id).ok_or_else(|| nodev(name))?;
        let live = m.live.as_ref();
        let shown = live.or(m.inactive.as_ref());
        let interposers = shown
            .map(|s| {
                s.hooks
                    .iter()
                    .map(|h| InterposerRecord {
                        device: inner
                            .entries
                            .get(&h.dev)
                            .map(|e| e.node.name())
                            .unwrap_or_default(),
                        dev: h.dev.to_string(),
                        start: h.start,
                        len: h.len,
                        attached: live.is_some(),
                    })
                    .collect()
            })
            .unwrap_or_default();
        Ok(InfoRecord {
            name: e.node.name(),
            uuid: m.uuid.clone(),
            major: id.major,
            minor: id.minor,
            suspended: m.md.is_suspended(),
            read_only: live.is_some_and(|l| l.config.read_only),
            live_present: live.is_some(),
            inactive_present: m.inactive.is_some(),
            open_count: e.open_count(),
            event_nr: m.md.events().current(),
            target_count: live.map_or(0, |l| l.live.table.target_count() as u32),
            deferred_remove: m.deferred_remove,
            sectors: m.md.size(),
            interposed: live.is_some_and(|l| l.interposed),
            interposers,
            redirected: m.md.redirected(),
            unavailable: m.pending.as_ref().map(|p| p.reason.clone()),
            no_block_device: m.no_block_device(),
        })
    }

    /// The listing of disk `id` (`None` when it is not a disk).
    pub(super) fn disk_record(inner: &Inner, id: DevId) -> Option<DiskRecord> {
        let e = inner.entries.get(&id)?;
        let EntryKind::Disk {
            path,
            read_only,
            direct,
            partitions,
            implicit,
            unavailable,
        } = &e.kind
        else {
            return None;
        };
        let parts = partitions
            .iter()
            .filter_map(|p| {
                let pe = inner.entries.get(p)?;
                let NodeKind::Partition { number, start, .. } = pe.node.kind() else {
                    return None;
                };
                Some(PartitionRecord {
                    name: pe.node.name(),
                    dev: p.to_string(),
                    number: *number,
                    start: *start,
                    sectors: pe.node.size(),
                })
            })
            .collect();
        Some(DiskRecord {
            name: e.node.name(),
            dev: id.to_string(),
            path: path.clone(),
            sectors: e.node.size(),
            read_only: *read_only,
            direct: *direct,
            partitions: parts,
            holders: inner.holders_of(id),
            unavailable: unavailable.clone(),
            implicit: *implicit,
        })
    }
}
