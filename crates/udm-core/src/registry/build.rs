//! Table construction: resolves the devices a table names, checks their claims, and applies
//! the interposer rules of an `--interpose` table (decided in `interpose`).

use super::*;

impl BuildCtx<'_> {
    /// Records that the table uses `node` for `[begin, begin+len)`.
    fn use_device(
        &mut self,
        id: DevId,
        node: Arc<DeviceNode>,
        begin: u64,
        len: u64,
        marked: bool,
    ) -> DevRef {
        let idx = match self.uses.iter().position(|u| u.dev == id) {
            Some(i) => i,
            None => {
                self.uses.push(DevUse {
                    dev: id,
                    access: Arc::new(NodeAccess::new(node.clone())),
                });
                self.uses.len() - 1
            }
        };
        self.opens.push((idx, begin, len, marked));
        DevRef {
            id,
            name: node.name(),
            dev: self.uses[idx].access.clone(),
        }
    }
}

/// The table-construction context: resolves devices, checks claims, records uses.
pub(super) struct BuildCtx<'a> {
    pub(super) inner: &'a Inner,
    pub(super) me: DevId,
    pub(super) me_name: String,
    pub(super) read_only: bool,
    pub(super) interposed: bool,
    pub(super) events: EventSink,
    pub(super) env: Arc<TargetEnv>,
    pub(super) uses: Vec<DevUse>,
    /// Every device opening of the table's targets.
    pub(super) opens: Vec<interpose::Open>,
    /// Disks opened on demand for absolute paths; entered into the registry when the table is.
    pub(super) implicit: Vec<implicit::ImplicitDisk>,
}

impl TableContext for BuildCtx<'_> {
    fn get_device(
        &mut self,
        begin: u64,
        len: u64,
        path: &str,
    ) -> std::result::Result<DevRef, TargetError> {
        let (marked, path) = match path.strip_prefix('[') {
            Some(rest) => match rest.split_once(']') {
                Some(("interpose", p)) => (true, p),
                Some((opt, _)) => {
                    return Err(TargetError::invalid(format!(
                        "unknown device path option [{opt}] (only [interpose] is known)"
                    )))
                }
                None => {
                    return Err(TargetError::invalid(format!(
                        "unterminated '[' in device path {path:?}"
                    )))
                }
            },
            None => (false, path),
        };
        if marked {
            self.interposed = true;
        }
        let id = match self.inner.resolve(path) {
            Some(id) => id,
            None => self.open_implicit(path)?,
        };
        if let Some(node) = self.implicit_node(id) {
            return Ok(self.use_device(id, node, begin, len, marked));
        }
        if id == self.me {
            return Err(TargetError::invalid(format!(
                "table of {} references its own device",
                self.me_name
            )));
        }
        let entry =
            self.inner.entries.get(&id).ok_or_else(|| {
                TargetError::new(Errno::ENODEV, format!("device {path} not found"))
            })?;
        self.inner
            .usable(id, path)
            .and_then(|()| self.inner.not_removing(id, path))
            .map_err(|e| TargetError::new(e.errno(), e.to_string()))?;
        if !self.interposed {
            if let Some(h) = entry
                .holders
                .iter()
                .find(|h| matches!(h, Holder::Export(_)))
            {
                return Err(TargetError::new(
                    Errno::EBUSY,
                    format!(
                        "device {} ({id}) is in use by {}; use --interpose to attach a mapped device to a device in use",
                        entry.node.name(),
                        holder_text(self.inner, h)
                    ),
                ));
            }
        }
        Ok(self.use_device(id, entry.node.clone(), begin, len, marked))
    }

    fn events(&self) -> EventSink {
        self.events.clone()
    }

    fn env(&self) -> Arc<TargetEnv> {
        self.env.clone()
    }

    fn read_only(&self) -> bool {
        self.read_only
    }
}

impl Registry {
    pub(super) fn build(
        &self,
        inner: &Inner,
        id: DevId,
        name: &str,
        md: &Arc<MappedDevice>,
        spec: &TableSpec,
        flags: LoadFlags,
    ) -> Result<(TableSlot, Vec<implicit::ImplicitDisk>)> {
        let events = md.events().clone();
        let mut ctx = BuildCtx {
            inner,
            me: id,
            me_name: name.to_string(),
            read_only: flags.read_only,
            interposed: flags.interpose,
            events: EventSink::new(move || events.raise()),
            env: self.env.clone(),
            uses: Vec::new(),
            opens: Vec::new(),
            implicit: Vec::new(),
        };
        let table = Table::build(spec, &self.targets, &mut ctx)?;
        let interposed = ctx.interposed;
        let mut hooks = Vec::new();
        if interposed {
            let devs: Vec<DevId> = ctx.uses.iter().map(|u| u.dev).collect();
            hooks = interpose::pick(&ctx.opens, &devs);
            let target = |idx: usize| interpose::Target {
                name: ctx.uses[idx].access.node().name(),
                size: ctx.uses[idx].access.size(),
            };
            interpose::check(id, name, &hooks, target, &inner.live_interposers())?;
            for (idx, _) in &hooks {
                ctx.uses[*idx].access.set_bypass(true);
            }
        }
        // The recorded text (state.json): dmsetup's form, one newline-terminated line each.
        let text = spec.to_string();
        let slot = TableSlot {
            config: TableConfig {
                text,
                read_only: flags.read_only,
                interposed,
            },
            live: Arc::new(LiveTable {
                table,
                read_only: flags.read_only,
            }),
            uses: ctx.uses,
            hooks: hooks.into_iter().map(|(_, h)| h).collect(),
            interposed,
        };
        Ok((slot, ctx.implicit))
    }
}

/// How often `load` builds a table again when the registry changed under the build.
const BUILD_ATTEMPTS: usize = 3;

impl Registry {
    /// `load`/`reload`: constructs the table into the inactive slot (replacing any previous
    /// one). Target constructors may read their devices (a snapshot reads its COW), which can
    /// wait for a `resume`: the table is built on a view of the registry without the lock, and
    /// entered under it only if what the build relied on is unchanged (else it is built again).
    pub fn load(&self, name: &str, spec: &TableSpec, flags: LoadFlags) -> Result<()> {
        for _ in 0..BUILD_ATTEMPTS {
            let (id, md, view) = {
                let inner = self.inner.lock();
                let (id, m) = inner.md_entry(name)?;
                let md = m.md.clone();
                inner.available(id, name)?;
                inner.not_switching(id, name)?;
                (id, md, inner.clone())
            };
            let (slot, opened) = self.build(&view, id, name, &md, spec, flags)?;
            drop(view);
            let mut inner = self.inner.lock();
            // Looked up by number: a rename meanwhile does not matter, a removal does.
            match inner.entries.get(&id).and_then(|e| e.md()) {
                Some(m) if Arc::ptr_eq(&m.md, &md) => {}
                _ => return Err(nodev(name)),
            }
            inner.available(id, name)?;
            inner.not_switching(id, name)?;
            let opened_ids: Vec<DevId> = opened.iter().map(implicit::ImplicitDisk::id).collect();
            if !unchanged(&inner, id, &slot, &opened_ids) || !implicit::still_free(&inner, &opened)
            {
                tracing::debug!(device = name, "devices changed while the table was built");
                continue;
            }
            implicit::enter(&mut inner, opened);
            // Claims and shared opens of the new table.
            for u in &slot.uses {
                if let Some(e) = inner.entries.get_mut(&u.dev) {
                    if slot.interposed {
                        e.shared += 1;
                    } else {
                        e.holders.push(Holder::Table(id));
                    }
                }
            }
            let m = inner.md_mut(id)?;
            m.loaded_once = true;
            let old = m.inactive.replace(slot);
            if let Some(old) = &old {
                Self::release_slot(&mut inner, id, old);
            }
            drop(inner);
            // The replaced table is destroyed without the lock.
            drop(old);
            tracing::info!(device = name, "table loaded into the inactive slot");
            return Ok(());
        }
        Err(CoreError::Busy(format!(
            "{name}: the devices its table uses kept changing while it was built; try again"
        )))
    }
}

/// True when what a table built on a view relied on still holds: each device it uses is the
/// same node, usable, not being removed, not exported unless the table is
/// interposed; its interposers overlap no other.
fn unchanged(inner: &Inner, me: DevId, slot: &TableSlot, opened: &[DevId]) -> bool {
    let uses_ok = slot.uses.iter().all(|u| {
        if opened.contains(&u.dev) {
            // A disk the build opened itself: checked by `implicit::still_free`.
            return true;
        }
        let Some(e) = inner.entries.get(&u.dev) else {
            return false;
        };
        Arc::ptr_eq(&e.node, u.access.node())
            && inner.usable(u.dev, "").is_ok()
            && inner.not_removing(u.dev, "").is_ok()
            && (slot.interposed || !e.holders.iter().any(|h| matches!(h, Holder::Export(_))))
    });
    let live = inner.live_interposers();
    uses_ok
        && slot
            .hooks
            .iter()
            .all(|h| interpose::overlapping(&live, me, h).is_none())
}
