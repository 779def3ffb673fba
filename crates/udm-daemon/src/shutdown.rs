//! Shutdown that always finishes: every step that may wait for a client or for I/O held by a
//! suspended device runs on its own thread with a deadline, and a flush is abandoned only when
//! its device is held (it is suspended, or its I/O goes through a suspended device).

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};
use udm_core::registry::DeviceKindRecord as DeviceKind;
use udm_core::Registry;
use udm_io::{Bio, BlockDevice};
use udm_types::DevId;

/// After this long a flush still running is checked for being held by a suspended device.
const HELD_GRACE: Duration = Duration::from_secs(1);
/// How often a flush that is not held is reported as still running.
const REPORT_EVERY: Duration = Duration::from_secs(10);
/// How long a registry query may take before the registry is considered blocked (a control
/// operation holding it while it waits for I/O that a suspended device holds).
const REGISTRY_WAIT: Duration = Duration::from_millis(1500);

/// Runs `f` on its own thread and returns its result if it comes within `deadline`.
pub fn within<T: Send + 'static>(
    deadline: Duration,
    f: impl FnOnce() -> T + Send + 'static,
) -> Option<T> {
    let (tx, rx) = mpsc::channel();
    std::thread::Builder::new()
        .name("udm-shutdown".into())
        .spawn(move || {
            let _ = tx.send(f());
        })
        .ok()?;
    rx.recv_timeout(deadline).ok()
}

/// Runs `f` on its own thread and waits at most `deadline` for it; returns false (and logs)
/// when it did not finish. The thread is left behind: the process is about to exit.
pub fn bounded(what: &str, deadline: Duration, f: impl FnOnce() + Send + 'static) -> bool {
    let done = within(deadline, f).is_some();
    if !done {
        tracing::warn!(
            "shutdown: {what} did not finish within {} s (a client request or a control \
             operation is probably waiting for I/O held by a suspended device); going on \
             without it",
            deadline.as_secs()
        );
    }
    done
}

/// Which devices' I/O paths pass through a suspended device.
struct Holds {
    names: HashMap<DevId, String>,
    ids: HashMap<String, DevId>,
    suspended: BTreeSet<DevId>,
    /// Devices a device's I/O goes to (its table's devices).
    deps: HashMap<DevId, Vec<DevId>>,
    /// Interposers of a device (I/O to the device enters them first).
    interposers: HashMap<DevId, Vec<DevId>>,
}

impl Holds {
    fn new(registry: &Registry) -> Holds {
        let mut h = Holds {
            names: HashMap::new(),
            ids: HashMap::new(),
            suspended: BTreeSet::new(),
            deps: HashMap::new(),
            interposers: HashMap::new(),
        };
        // The listing names devices by `major:minor`, as the protocol does.
        let ids =
            |v: &[String]| -> Vec<DevId> { v.iter().filter_map(|x| x.parse().ok()).collect() };
        for d in registry.devices() {
            let id = DevId::new(d.major, d.minor);
            if d.kind == DeviceKind::Mapped && registry.info(&d.name).is_ok_and(|i| i.suspended) {
                h.suspended.insert(id);
            }
            for x in ids(&d.interposes) {
                h.interposers.entry(x).or_default().push(id);
            }
            h.deps.insert(id, ids(&d.deps));
            h.names.insert(id, d.name.clone());
            h.ids.insert(d.name, id);
        }
        h
    }

    /// Why I/O to `name` cannot complete now, if it cannot.
    fn held(&self, name: &str) -> Option<String> {
        let id = *self.ids.get(name)?;
        self.held_id(id, &mut BTreeSet::new())
    }

    fn held_id(&self, id: DevId, seen: &mut BTreeSet<DevId>) -> Option<String> {
        if !seen.insert(id) {
            return None;
        }
        let name = |d: &DevId| self.names.get(d).cloned().unwrap_or_else(|| d.to_string());
        if self.suspended.contains(&id) {
            return Some(format!("{} is suspended", name(&id)));
        }
        for p in self.interposers.get(&id).into_iter().flatten() {
            if let Some(why) = self.held_id(*p, seen) {
                return Some(format!("its interposer {}: {why}", name(p)));
            }
        }
        for d in self.deps.get(&id).into_iter().flatten() {
            if let Some(why) = self.held_id(*d, seen) {
                return Some(format!("{} below it: {why}", name(d)));
            }
        }
        None
    }
}

/// Flushes every device so that what clients wrote is durable before the daemon exits. Each
/// flush runs on its own thread. Suspended devices are not flushed (they are recorded as
/// suspended and come back so). A flush still running after a moment is abandoned, with a
/// warning saying why, when the device's I/O is held by a suspended device (nothing can
/// release it during shutdown); any other flush is waited for as long as it takes. Returns
/// false when the registry itself is blocked (then nothing more can be done with it).
pub fn flush_all(registry: &Arc<Registry>) -> bool {
    let reg = registry.clone();
    let Some(devices) = within(REGISTRY_WAIT, move || flush_candidates(&reg)) else {
        tracing::error!(
            "shutdown: the registry is blocked by a control operation waiting for held I/O; \
             no device is flushed"
        );
        return false;
    };
    let (tx, rx) = mpsc::channel::<(String, Result<(), String>)>();
    let mut pending = BTreeSet::new();
    for (name, node) in devices {
        let tx = tx.clone();
        let n = name.clone();
        let spawned = std::thread::Builder::new()
            .name("udm-flush".into())
            .spawn(move || {
                let r = node.submit(Bio::flush()).map_err(|e| e.to_string());
                let _ = tx.send((n, r));
            });
        match spawned {
            Ok(_) => {
                pending.insert(name);
            }
            Err(e) => tracing::error!(device = %name, "not flushed: cannot start a thread: {e}"),
        }
    }
    drop(tx);
    let start = Instant::now();
    let mut reported: BTreeMap<String, Instant> = BTreeMap::new();
    while !pending.is_empty() {
        match rx.recv_timeout(Duration::from_millis(100)) {
            Ok((name, r)) => {
                pending.remove(&name);
                if let Err(e) = r {
                    tracing::warn!(device = %name, "flush at shutdown failed: {e}");
                }
            }
            Err(mpsc::RecvTimeoutError::Timeout) => {
                if start.elapsed() < HELD_GRACE {
                    continue;
                }
                let reg = registry.clone();
                let Some(holds) = within(REGISTRY_WAIT, move || Holds::new(&reg)) else {
                    tracing::error!(
                        devices = ?pending,
                        "not flushed at shutdown: the registry is blocked by a control \
                         operation waiting for held I/O"
                    );
                    return false;
                };
                pending.retain(|name| match holds.held(name) {
                    Some(why) => {
                        tracing::warn!(
                            device = %name,
                            "not flushed at shutdown: its I/O is held ({why}); data it has not \
                             written yet is not durable"
                        );
                        false
                    }
                    None => {
                        let last = reported.entry(name.clone()).or_insert(start);
                        if last.elapsed() >= REPORT_EVERY {
                            tracing::info!(device = %name, "shutdown: still flushing");
                            *last = Instant::now();
                        }
                        true
                    }
                });
            }
            Err(mpsc::RecvTimeoutError::Disconnected) => break,
        }
    }
    true
}

/// Devices to flush: all but suspended mapped devices (recorded as suspended) and mapped
/// devices without a live table.
fn flush_candidates(registry: &Registry) -> Vec<(String, Arc<udm_core::node::DeviceNode>)> {
    let mut out = Vec::new();
    for d in registry.devices() {
        let Ok(node) = registry.node(&d.name) else {
            continue;
        };
        if d.kind == DeviceKind::Mapped {
            match registry.info(&d.name) {
                Ok(i) if i.suspended => {
                    tracing::info!(device = %d.name, "suspended: not flushed (recorded as suspended)");
                    continue;
                }
                Ok(i) if !i.live_present => continue,
                Ok(_) => {}
                Err(_) => continue,
            }
        }
        out.push((d.name, node));
    }
    out
}
