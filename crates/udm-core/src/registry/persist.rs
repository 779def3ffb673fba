//! Persistence: the configuration the state directory records ([`Registry::config`]) and
//! replaying it ([`Registry::restore`]) without losing any of it; what cannot be opened or
//! rebuilt yet is kept as unavailable (see `unavailable`).

use super::unavailable::{disk_config, flags, open_options, Pending};
use super::{implicit, EntryKind, Registry, ResumeOptions};
use crate::config::{MappedConfig, RegistryConfig};
use udm_io::backend::open::open_backend;

impl Registry {
    /// What to record in the state directory.
    pub fn config(&self) -> RegistryConfig {
        let inner = self.inner.lock();
        let mut cfg = RegistryConfig::default();
        for id in &inner.order {
            let Some(e) = inner.entries.get(id) else {
                continue;
            };
            if let Some(disk) = disk_config(*id, e) {
                cfg.disks.push(disk);
            } else if let EntryKind::Mapped(m) = &e.kind {
                // Tables not rebuilt yet are recorded exactly as they were read.
                cfg.mapped.push(MappedConfig {
                    name: e.node.name(),
                    uuid: m.uuid.clone(),
                    minor: id.minor,
                    live: m
                        .pending
                        .as_ref()
                        .and_then(|p| p.live.clone())
                        .or_else(|| m.live.as_ref().map(|s| s.config.clone())),
                    inactive: m
                        .pending
                        .as_ref()
                        .and_then(|p| p.inactive.clone())
                        .or_else(|| m.inactive.as_ref().map(|s| s.config.clone())),
                    suspended: match &m.pending {
                        Some(p) if p.live.is_some() => p.suspended,
                        _ => m.md.is_suspended(),
                    },
                    deferred_remove: m.deferred_remove,
                });
            }
        }
        cfg
    }

    /// Replays a recorded configuration without dropping any of it: a disk that cannot be
    /// opened is kept as unavailable, a mapped device whose tables cannot be rebuilt keeps them
    /// recorded (see the module documentation). Returns one message per item not (yet)
    /// restored; [`Registry::retry_unavailable`] retries them.
    pub fn restore(&self, cfg: &RegistryConfig) -> Vec<String> {
        let mut problems = Vec::new();
        for d in &cfg.disks {
            let r = match open_backend(&d.path, &open_options(d)) {
                Ok(b) => self
                    .insert_disk(&d.name, Some(d.path.clone()), b, flags(d), Some(d.minor))
                    .map(|_| ()),
                Err(e) => {
                    let reason = e.to_string();
                    problems.push(format!("disk {} is unavailable: {reason}", d.name));
                    self.insert_unavailable_disk(d, reason)
                }
            };
            if let Err(e) = r {
                problems.push(format!("disk {}: {e}", d.name));
            }
        }
        for m in &cfg.mapped {
            if let Err(e) = self.create(
                &m.name,
                m.uuid.as_deref(),
                Some(m.minor),
                None,
                &ResumeOptions::default(),
            ) {
                problems.push(format!("device {}: {e}", m.name));
                continue;
            }
            if m.live.is_some() || m.inactive.is_some() || m.suspended {
                let mut inner = self.inner.lock();
                if let Ok(id) = inner.id_of(&m.name) {
                    if let Ok(md) = inner.md_mut(id) {
                        md.pending = Some(Pending {
                            live: m.live.clone(),
                            inactive: m.inactive.clone(),
                            suspended: m.suspended,
                            reason: "not restored yet".into(),
                        });
                    }
                }
            }
        }
        self.rebuild_pending();
        let mut inner = self.inner.lock();
        for m in &cfg.mapped {
            let Ok(id) = inner.id_of(&m.name) else {
                continue;
            };
            if let Ok(md) = inner.md_mut(id) {
                md.deferred_remove = m.deferred_remove;
                if let Some(p) = &md.pending {
                    problems.push(format!("device {} is unavailable: {}", m.name, p.reason));
                }
            }
        }
        implicit::release_unused(&mut inner);
        problems
    }
}
