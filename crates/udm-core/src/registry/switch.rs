//! Table switches (`resume` with an inactive table, `create`, `remove`) and the quiesce of the
//! devices an interposer is attached to or detached from.
//!
//! A switch can wait without bound: the interposed devices drain their in-flight I/O, which may
//! be parked in a suspended device below, and only a `resume` of that device releases it. So a
//! switch is planned under the registry lock (validations, the interposer rules, and marks that
//! make conflicting operations fail with EBUSY), carried out without it (freeze, hold, drain,
//! write-back settling, the mapped device's own suspend and the new table's preresume), and
//! committed — or rolled back — with the lock taken again briefly. Queries (`info`, `status`,
//! `ls`, `table`) and the `resume` that releases parked I/O never wait behind a drain.

use super::{
    interpose, CoreError, DevId, DeviceNode, EntryKind, HookSpec, Inner, LiveTable, LoadFlags,
    MappedDevice, Registry, Result, ResumeOptions, SuspendFlags, TableSlot, TableSpec,
};
use crate::freeze::Frozen;
use crate::gate::Flow;
use parking_lot::MutexGuard;
use std::collections::HashSet;
use std::sync::Arc;
use std::time::{Duration, Instant};
use udm_io::BlockDevice;

/// Devices taking part in switches now running without the registry lock.
#[derive(Clone, Default)]
pub(super) struct Switches {
    /// Mapped devices whose table is being switched (or whose interposers are being detached
    /// before removal): their suspend state, slots and openers must not change meanwhile.
    owners: HashSet<DevId>,
    /// Devices whose entry gate a switch holds closed: a gate serves one switch at a time.
    held: HashSet<DevId>,
    /// Mapped devices whose interposers are detached before their removal: nothing may open
    /// them meanwhile.
    removing: HashSet<DevId>,
}

/// A switch planned under the registry lock, carried out without it.
struct Plan {
    id: DevId,
    name: String,
    md: Arc<MappedDevice>,
    /// The interposed devices to quiesce (empty when the interposers do not change).
    nodes: Vec<Arc<DeviceNode>>,
    /// The interposer is suspended: requests it already took wait inside it and are not drained.
    suspended: bool,
    change: Change,
}

enum Change {
    /// Makes the inactive table (this one) live.
    Swap(Arc<LiveTable>),
    /// Detaches every interposer of the live table (this one), which stays live.
    Detach(Arc<LiveTable>),
}

fn busy_switching(name: &str) -> CoreError {
    CoreError::Busy(format!(
        "device {name}: a table switch of it is in progress; try again when it completes"
    ))
}

impl Inner {
    /// EBUSY while `id` is the mapped device of a switch in progress.
    pub(super) fn not_switching(&self, id: DevId, name: &str) -> Result<()> {
        if self.switches.owners.contains(&id) {
            return Err(busy_switching(name));
        }
        Ok(())
    }

    /// EBUSY while `id` is being removed (its interposers detach): it cannot be opened.
    pub(super) fn not_removing(&self, id: DevId, name: &str) -> Result<()> {
        if self.switches.removing.contains(&id) {
            return Err(CoreError::Busy(format!("device {name} is being removed")));
        }
        Ok(())
    }

    /// EBUSY while a switch holds the gate of `id` (it is being interposed or released).
    fn not_held(&self, id: DevId) -> Result<()> {
        if self.switches.held.contains(&id) {
            let name = self
                .entries
                .get(&id)
                .map(|e| e.node.name())
                .unwrap_or_else(|| id.to_string());
            return Err(CoreError::Busy(format!(
                "device {name}: an interposer switch on it is in progress; try again when it completes"
            )));
        }
        Ok(())
    }

    /// Plans a switch of mapped device `id` that quiesces `devs` (none when its interposers do
    /// not change) and marks it, so conflicting operations get EBUSY until it ends. EBUSY
    /// (nothing marked) when another switch holds one of `devs`.
    fn plan(
        &mut self,
        id: DevId,
        name: &str,
        md: Arc<MappedDevice>,
        devs: &[DevId],
        change: Change,
    ) -> Result<Plan> {
        for d in devs {
            self.not_held(*d)?;
        }
        let plan = Plan {
            id,
            name: name.to_string(),
            suspended: md.is_suspended(),
            md,
            nodes: self.nodes_of(devs),
            change,
        };
        self.mark(&plan);
        Ok(plan)
    }

    fn mark(&mut self, p: &Plan) {
        self.switches.owners.insert(p.id);
        if matches!(p.change, Change::Detach(_)) {
            self.switches.removing.insert(p.id);
        }
        self.switches.held.extend(p.nodes.iter().map(|n| n.id()));
    }

    fn unmark(&mut self, p: &Plan) {
        self.switches.owners.remove(&p.id);
        self.switches.removing.remove(&p.id);
        for n in &p.nodes {
            self.switches.held.remove(&n.id());
        }
    }

    /// The nodes of `devs` (the interposed devices of a switch).
    fn nodes_of(&self, devs: &[DevId]) -> Vec<Arc<DeviceNode>> {
        devs.iter()
            .filter_map(|d| self.entries.get(d).map(|e| e.node.clone()))
            .collect()
    }
}

/// Holds new I/O at each node's entry and waits for the I/O in flight. Requests already
/// redirected into the interposer drain too, unless it is suspended (then they wait inside it
/// and run on its new table after the resume).
fn quiesce(nodes: &[Arc<DeviceNode>], suspended: bool) {
    let flows: &[Flow] = if suspended {
        &[Flow::Direct]
    } else {
        &[Flow::Direct, Flow::Redirected]
    };
    for n in nodes {
        n.gate().close();
        let waited = n.gate().drain(flows);
        tracing::debug!(device = %n.name(), ?waited, "interposed device quiesced");
    }
}

/// Releases the I/O [`quiesce`] held.
fn release(nodes: &[Arc<DeviceNode>]) {
    for n in nodes {
        n.gate().open();
    }
}

impl Plan {
    /// The quiesce step of every switch, run without the registry lock: holds the interposed
    /// devices' new I/O and drains what is in flight. Returns when the hold began.
    fn hold(&self) -> Instant {
        let since = Instant::now();
        quiesce(&self.nodes, self.suspended);
        since
    }

    /// Under the lock again: the held devices take the hooks of the live tables as they are
    /// now (attached or detached by the commit).
    fn rehook(&self, inner: &Inner) {
        for n in &self.nodes {
            n.set_hooks(inner.live_hooks_on(n.id()));
        }
    }

    /// Ends a switch that held I/O since `since`: held I/O goes on, the stall is recorded, the
    /// marks go. Returns how long I/O was held.
    fn end(&self, registry: &Registry, inner: &mut Inner, since: Instant) -> Duration {
        release(&self.nodes);
        let held = since.elapsed();
        if !self.nodes.is_empty() {
            registry.record_stall(held);
        }
        inner.unmark(self);
        held
    }

    /// Abandons a swap after its hold: held I/O goes on through the old table, the device is
    /// resumed unless it was suspended before, the marks go.
    fn abort(&self, inner: &mut Inner) {
        release(&self.nodes);
        if !self.suspended {
            self.md.unsuspend();
        }
        inner.unmark(self);
    }
}

impl Registry {
    /// `suspend`: holds new I/O and drains in-flight I/O. A no-op when already suspended.
    pub fn suspend(&self, name: &str, flags: SuspendFlags) -> Result<()> {
        let md = {
            let inner = self.inner.lock();
            let (id, m) = inner.md_entry(name)?;
            inner.available(id, name)?;
            inner.not_switching(id, name)?;
            m.md.clone()
        };
        let _ = flags; // The synchronous data path has no requeue list: noflush and lockfs change nothing.
        let start = Instant::now();
        md.suspend();
        tracing::info!(
            device = name,
            ms = start.elapsed().as_secs_f64() * 1e3,
            "suspended"
        );
        Ok(())
    }

    /// `resume`: makes the inactive table live (suspending first), attaching and detaching
    /// interposers with a quiesced switch, then releases held I/O. Without an inactive table it
    /// only releases held I/O, which it may do while other devices' switches wait for that I/O.
    pub fn resume(&self, name: &str, opts: &ResumeOptions) -> Result<()> {
        let plan = {
            let mut inner = self.inner.lock();
            let (id, m) = inner.md_entry(name)?;
            inner.available(id, name)?;
            inner.not_switching(id, name)?;
            let md = m.md.clone();
            let Some(inactive) = m.inactive.as_ref() else {
                // Marked like a switch: a table swap must not start while the old table resumes.
                inner.switches.owners.insert(id);
                drop(inner);
                let r = Self::unsuspend(name, &md);
                self.inner.lock().switches.owners.remove(&id);
                return r;
            };
            let new = inactive.live.clone();
            let new_hooks = inactive.hooks.clone();
            let old_hooks: Vec<HookSpec> =
                m.live.as_ref().map(|l| l.hooks.clone()).unwrap_or_default();
            interpose::check_attach(id, name, &new_hooks, &inner.live_interposers())?;
            let mut devs: Vec<DevId> = Vec::new();
            if old_hooks != new_hooks {
                devs = old_hooks.iter().chain(&new_hooks).map(|h| h.dev).collect();
                devs.sort();
                devs.dedup();
            }
            inner.plan(id, name, md, &devs, Change::Swap(new))?
        };
        let frozen = match (&opts.freeze, plan.nodes.is_empty()) {
            (Some(mp), false) => match Frozen::freeze(mp) {
                Ok(f) => Some(f),
                Err(e) => {
                    self.inner.lock().unmark(&plan);
                    return Err(e);
                }
            },
            _ => None,
        };
        let r = self.swap(plan);
        drop(frozen);
        r
    }

    /// Releases the I/O a suspend holds (resume without an inactive table).
    fn unsuspend(name: &str, md: &MappedDevice) -> Result<()> {
        if md.is_suspended() {
            if let Some(l) = md.live() {
                l.table
                    .preresume()
                    .map_err(|e| CoreError::new(e.errno, format!("{name}: {}", e.msg)))?;
                l.table.resume();
            }
            md.unsuspend();
        }
        Ok(())
    }

    /// Carries out a planned table swap: quiesce and suspend without the registry lock, then
    /// commit under it (or roll back when the new table's preresume fails).
    fn swap(&self, plan: Plan) -> Result<()> {
        let Change::Swap(new) = &plan.change else {
            return Err(CoreError::invalid("not a table swap"));
        };
        let held_since = plan.hold();
        let quiesced = held_since.elapsed();
        plan.md.suspend();
        let suspended = held_since.elapsed().saturating_sub(quiesced);
        if let Err(e) = new.table.preresume() {
            // Abort: the old table stays live, the new one inactive.
            plan.abort(&mut self.inner.lock());
            return Err(CoreError::new(
                e.errno,
                format!("{}: preresume failed: {}", plan.name, e.msg),
            ));
        }
        let mut inner = self.inner.lock();
        let slot = inner.md_mut(plan.id).ok().and_then(|m| m.inactive.take());
        let new_slot = match slot {
            Some(s) if Arc::ptr_eq(&s.live, new) => s,
            other => {
                // Cannot happen: the marks refuse load, clear and remove meanwhile.
                if let (Some(s), Ok(m)) = (other, inner.md_mut(plan.id)) {
                    m.inactive = Some(s);
                }
                plan.abort(&mut inner);
                return Err(CoreError::invalid(format!(
                    "{}: the inactive table changed during the switch",
                    plan.name
                )));
            }
        };
        let attached = new_slot.hooks.len();
        plan.md.set_live(Some(new.clone()));
        let old: Option<TableSlot> = inner
            .md_mut(plan.id)
            .ok()
            .and_then(|m| m.live.replace(new_slot));
        if let Some(o) = &old {
            Self::release_slot(&mut inner, plan.id, o);
        }
        plan.rehook(&inner);
        new.table.resume();
        plan.md.unsuspend();
        let held = plan.end(self, &mut inner, held_since);
        tracing::debug!(
            device = plan.name,
            quiesce_ms = quiesced.as_secs_f64() * 1e3,
            suspend_ms = suspended.as_secs_f64() * 1e3,
            held_ms = held.as_secs_f64() * 1e3,
            "switch phases"
        );
        self.run_deferred(inner);
        // The old table is destroyed without the registry lock.
        let detached = old.as_ref().map_or(0, |o| o.hooks.len());
        drop(old);
        tracing::info!(
            device = plan.name,
            attached,
            detached,
            "resumed with new table"
        );
        Ok(())
    }

    /// Detaches every interposer of `id`, leaving its live table in place: the interposed
    /// devices are quiesced and the interposer's acknowledged writes settled without the
    /// registry lock. Returns the lock taken again, and EBUSY (nothing done) when another
    /// switch holds one of those devices. The caller has checked that `id` is not in a switch.
    fn detach_all<'a>(
        &'a self,
        mut inner: MutexGuard<'a, Inner>,
        id: DevId,
    ) -> (MutexGuard<'a, Inner>, Result<()>) {
        let Some(e) = inner.entries.get(&id) else {
            return (inner, Ok(()));
        };
        let Some(m) = e.md() else {
            return (inner, Ok(()));
        };
        let Some(live) = m.live.as_ref().filter(|l| !l.hooks.is_empty()) else {
            return (inner, Ok(()));
        };
        let devs: Vec<DevId> = live.hooks.iter().map(|h| h.dev).collect();
        let (name, md, change) = (
            e.node.name(),
            m.md.clone(),
            Change::Detach(live.live.clone()),
        );
        let plan = match inner.plan(id, &name, md, &devs, change) {
            Ok(p) => p,
            Err(e) => return (inner, Err(e)),
        };
        drop(inner);
        // Writes the interposer acknowledged but still holds must be on the device before its
        // I/O stops passing through the interposer. Most are settled first, while I/O still
        // flows, so the settle with the devices quiesced only has what arrived meanwhile.
        let start = Instant::now();
        if let Change::Detach(t) = &plan.change {
            t.table.drain_writeback();
        }
        let presettle = start.elapsed();
        let held_since = plan.hold();
        let quiesced = held_since.elapsed();
        if let Change::Detach(t) = &plan.change {
            t.table.drain_writeback();
        }
        let settled = held_since.elapsed().saturating_sub(quiesced);
        let mut inner = self.inner.lock();
        if let Some(l) = inner.md_mut(id).ok().and_then(|m| m.live.as_mut()) {
            l.hooks.clear();
        }
        plan.rehook(&inner);
        let held = plan.end(self, &mut inner, held_since);
        tracing::debug!(
            device = plan.name,
            presettle_ms = presettle.as_secs_f64() * 1e3,
            quiesce_ms = quiesced.as_secs_f64() * 1e3,
            settle_ms = settled.as_secs_f64() * 1e3,
            held_ms = held.as_secs_f64() * 1e3,
            "interposers detached"
        );
        (inner, Ok(()))
    }

    /// `remove`: EBUSY while open (unless `deferred`: removed at last close); `force` first
    /// swaps in an error table of the same size.
    pub fn remove(&self, name: &str, force: bool, deferred: bool) -> Result<()> {
        let mut inner = self.inner.lock();
        let (id, m) = inner.md_entry(name)?;
        inner.not_switching(id, name)?;
        inner.not_held(id)?;
        let open = inner.opens(id);
        if open > 0 {
            if deferred {
                inner.md_mut(id)?.deferred_remove = true;
                return Ok(());
            }
            if force {
                let size = m.md.size();
                drop(inner);
                if size > 0 {
                    let spec = TableSpec::parse(&format!("0 {size} error"))?;
                    self.load(name, &spec, LoadFlags::default())?;
                    self.resume(name, &ResumeOptions::default())?;
                }
                inner = self.inner.lock();
                inner.not_switching(id, name)?;
                inner.not_held(id)?;
                let open = inner.opens(id);
                if open > 0 {
                    let holders = inner.holders_of(id);
                    return Err(CoreError::Busy(format!(
                        "device {name} is still open ({}); its table was replaced by an error table",
                        holders.join(", ")
                    )));
                }
            } else {
                let holders = inner.holders_of(id);
                return Err(CoreError::Busy(format!(
                    "device {name} is in use by {}",
                    holders.join(", ")
                )));
            }
        }
        // Openers are refused while the interposers detach (the device is marked), so it is
        // still unused when the lock is back.
        let (inner, detached) = self.detach_all(inner, id);
        detached?;
        let inner = self.remove_detached(inner, id);
        self.run_deferred(inner);
        Ok(())
    }

    /// Removes `id`, whose interposers are detached: its name and number go at once; its
    /// table's suspend hooks (which settle write-back to the devices below, and so may wait for
    /// a `resume` of one of them) run without the lock; its claims are released after them.
    /// Returns the lock taken again.
    fn remove_detached<'a>(
        &'a self,
        mut inner: MutexGuard<'a, Inner>,
        id: DevId,
    ) -> MutexGuard<'a, Inner> {
        let Some(entry) = inner.entries.remove(&id) else {
            return inner;
        };
        let name = entry.node.name();
        inner.names.remove(&name);
        inner.order.retain(|x| *x != id);
        let EntryKind::Mapped(m) = entry.kind else {
            return inner;
        };
        drop(inner);
        if let Some(l) = m.live.as_ref() {
            if !m.md.is_suspended() {
                l.live.table.presuspend();
                l.live.table.postsuspend();
            }
        }
        m.md.set_live(None);
        m.md.unsuspend();
        m.md.events().raise();
        let mut inner = self.inner.lock();
        for slot in [&m.live, &m.inactive].into_iter().flatten() {
            Self::release_slot(&mut inner, id, slot);
        }
        tracing::info!(device = %name, "removed");
        drop(inner);
        // The tables are destroyed without the lock.
        drop(m);
        self.inner.lock()
    }

    /// Completes the deferred removals that are due (no opener left), detaching their
    /// interposers and settling their tables without the lock. Consumes the lock.
    pub(super) fn run_deferred<'a>(&'a self, mut inner: MutexGuard<'a, Inner>) {
        let mut postponed: HashSet<DevId> = HashSet::new();
        loop {
            let due = inner.entries.iter().find_map(|(id, e)| {
                let due = e.open_count() == 0
                    && e.md().is_some_and(|m| m.deferred_remove)
                    && !inner.expected.values().any(|d| *d == e.node.name())
                    && !inner.switches.owners.contains(id)
                    && !inner.switches.held.contains(id)
                    && !postponed.contains(id);
                due.then_some(*id)
            });
            let Some(id) = due else {
                return;
            };
            let has_hooks = inner
                .entries
                .get(&id)
                .and_then(|e| e.md())
                .and_then(|m| m.live.as_ref())
                .is_some_and(|l| !l.hooks.is_empty());
            if has_hooks {
                // Detached without the lock; the loop then checks it is still due.
                let (guard, detached) = self.detach_all(inner, id);
                inner = guard;
                if let Err(e) = detached {
                    // Another switch holds a device it interposes; that switch runs the
                    // deferred removals again when it completes.
                    tracing::debug!(%id, "deferred remove postponed: {e}");
                    postponed.insert(id);
                }
                continue;
            }
            inner = self.remove_detached(inner, id);
        }
    }
}
