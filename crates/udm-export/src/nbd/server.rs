//! The server object: the export table, the listeners' handles, and the registry of live
//! connections that `remove_export` and `shutdown` use to disconnect clients cleanly. The
//! listeners and connection start-up are `listen.rs`'s.

use super::ctl::ConnCtl;
use super::ctl::PHASE_TRANSMISSION;
use super::export::{Counters, Export, ExportConns, NbdExportInfo};
use super::limits::{NbdLimits, NbdMemory};
use super::session::export_size;
use super::watchdog::Watchdog;
use super::{ListenAddr, NbdError, NbdExportOptions};

mod reaper;
use parking_lot::{Condvar, Mutex, RwLock};
use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};
use udm_io::BlockDevice;

/// The NBD server: a table of named exports served on any number of listeners.
pub struct NbdServer {
    pub(super) exports: RwLock<BTreeMap<String, Arc<Export>>>,
    pub(super) conns: Mutex<HashMap<u64, Arc<ConnCtl>>>,
    pub(super) next_id: AtomicU64,
    pub(super) shut: AtomicBool,
    pub(super) listeners: Mutex<Vec<(ListenAddr, JoinHandle<()>)>>,
    pub(super) watchdog: Arc<Watchdog>,
    pub(super) limits: NbdLimits,
    /// Connections refused over the cap (for rate-limited logging).
    pub(super) refusals: AtomicU64,
    /// The reaper thread (handshake and send timeouts) runs.
    pub(super) reaper: Mutex<bool>,
    pub(super) reaper_cv: Condvar,
}

/// After the drain time and closing the sockets, how long removal still waits for the
/// connection threads (a request parked in a suspended device is left to finish alone).
const CLOSE_WAIT: Duration = Duration::from_secs(1);

impl NbdServer {
    /// A server with no exports and no listeners, with the default [`NbdLimits`].
    pub fn new() -> Arc<NbdServer> {
        Self::with_limits(NbdLimits::default())
    }

    /// A server with no exports and no listeners, with `limits` for every connection.
    pub fn with_limits(limits: NbdLimits) -> Arc<NbdServer> {
        Arc::new(NbdServer {
            exports: RwLock::new(BTreeMap::new()),
            conns: Mutex::new(HashMap::new()),
            next_id: AtomicU64::new(1),
            shut: AtomicBool::new(false),
            listeners: Mutex::new(Vec::new()),
            watchdog: Watchdog::new(),
            limits,
            refusals: AtomicU64::new(0),
            reaper: Mutex::new(false),
            reaper_cv: Condvar::new(),
        })
    }

    /// The limits this server applies.
    pub fn limits(&self) -> &NbdLimits {
        &self.limits
    }

    /// Live connections and the payload memory they hold, summed from per-connection counters
    /// (cheap; meant for monitoring and tests).
    pub fn memory(&self) -> NbdMemory {
        let conns = self.conns.lock();
        let mut m = NbdMemory {
            connections: conns.len(),
            ..NbdMemory::default()
        };
        for c in conns.values() {
            m.inflight_bytes += c.inflight.load(Ordering::Relaxed);
            m.buffered_bytes += c.buffered.load(Ordering::Relaxed);
            m.pooled_bytes += c.pooled.load(Ordering::Relaxed);
        }
        m
    }

    /// Offers `dev` under `name`. `EEXIST` if the name is taken.
    pub fn add_export(
        &self,
        name: &str,
        dev: Arc<dyn BlockDevice>,
        opts: NbdExportOptions,
    ) -> Result<(), NbdError> {
        if name.len() > 4096 {
            return Err(NbdError::InvalidName {
                name: name.chars().take(64).collect(),
                why: "longer than 4096 bytes",
            });
        }
        if name.contains('\0') {
            return Err(NbdError::InvalidName {
                name: name.replace('\0', "\\0"),
                why: "contains NUL",
            });
        }
        if self.is_shut() {
            return Err(NbdError::ShutDown);
        }
        let mut ex = self.exports.write();
        if ex.contains_key(name) {
            return Err(NbdError::ExportExists { name: name.into() });
        }
        ex.insert(
            name.to_string(),
            Arc::new(Export {
                name: name.to_string(),
                dev,
                opts,
                counters: Counters::default(),
                conns: Mutex::new(ExportConns {
                    map: HashMap::new(),
                    removed: false,
                }),
            }),
        );
        tracing::info!(export = name, "NBD export added");
        Ok(())
    }

    /// Withdraws an export: its clients stop being read, in-flight requests get
    /// `NbdLimits::drain_timeout` to complete and be answered, then the sockets are closed in
    /// both directions. Returns within about `drain_timeout` + 1 s whatever the clients or the
    /// device do: a request still parked in a (suspended) device is left to finish on its own
    /// thread, and its reply is dropped.
    pub fn remove_export(&self, name: &str) -> Result<(), NbdError> {
        let export = self
            .exports
            .write()
            .remove(name)
            .ok_or_else(|| NbdError::NoSuchExport { name: name.into() })?;
        let ctls: Vec<Arc<ConnCtl>> = {
            let mut c = export.conns.lock();
            c.removed = true;
            c.map.values().cloned().collect()
        };
        let lingering = self.disconnect(&ctls);
        tracing::info!(
            export = name,
            clients = ctls.len(),
            lingering,
            "NBD export removed"
        );
        Ok(())
    }

    /// Stops `ctls`, waits up to the drain time for them to end, closes the stragglers' sockets
    /// and waits a little more. Returns how many are still running (blocked in the device).
    fn disconnect(&self, ctls: &[Arc<ConnCtl>]) -> usize {
        for c in ctls {
            c.stop();
        }
        let drain = Instant::now() + self.limits.drain_timeout;
        let mut rest: Vec<&Arc<ConnCtl>> =
            ctls.iter().filter(|c| !c.wait_done_until(drain)).collect();
        if rest.is_empty() {
            return 0;
        }
        for c in &rest {
            c.stream.close();
        }
        let end = Instant::now() + CLOSE_WAIT;
        rest.retain(|c| !c.wait_done_until(end));
        if !rest.is_empty() {
            tracing::warn!(
                connections = rest.len(),
                "NBD connections closed with requests still in the device; their replies \
                 will be dropped when the device completes them"
            );
        }
        rest.len()
    }

    /// Every export with its client count and counters.
    pub fn exports(&self) -> Vec<NbdExportInfo> {
        self.exports
            .read()
            .values()
            .map(|e| NbdExportInfo {
                name: e.name.clone(),
                read_only: e.read_only(),
                description: e.opts.description.clone(),
                size_bytes: export_size(e),
                clients: e.conns.lock().map.len(),
                stats: e.counters.snapshot(),
            })
            .collect()
    }
    /// The addresses listened on (TCP port 0 resolved to the bound port).
    pub fn listen_addrs(&self) -> Vec<ListenAddr> {
        self.listeners
            .lock()
            .iter()
            .map(|(a, _)| a.clone())
            .collect()
    }

    pub(crate) fn watchdog(&self) -> &Arc<Watchdog> {
        &self.watchdog
    }

    pub(crate) fn is_shut(&self) -> bool {
        self.shut.load(Ordering::SeqCst)
    }

    /// Finds an export; the empty name selects the only export when there is exactly one.
    pub(crate) fn lookup(&self, name: &str) -> Option<Arc<Export>> {
        let ex = self.exports.read();
        if let Some(e) = ex.get(name) {
            return Some(e.clone());
        }
        if name.is_empty() && ex.len() == 1 {
            return ex.values().next().cloned();
        }
        None
    }

    pub(crate) fn export_list(&self) -> Vec<Arc<Export>> {
        self.exports.read().values().cloned().collect()
    }

    /// Stops the listeners, withdraws every export and disconnects every client as
    /// `remove_export` does, all at once: returns within about `drain_timeout` + 1 s.
    pub fn shutdown(&self) {
        if self.shut.swap(true, Ordering::SeqCst) {
            return;
        }
        let ls: Vec<_> = std::mem::take(&mut *self.listeners.lock());
        for (_, h) in ls {
            let _ = h.join();
        }
        let exports = std::mem::take(&mut *self.exports.write());
        for e in exports.values() {
            e.conns.lock().removed = true;
        }
        let all: Vec<Arc<ConnCtl>> = self.conns.lock().values().cloned().collect();
        // Negotiating clients have nothing in flight: close them now.
        for c in all.iter().filter(|c| !c.is_done()) {
            if c.phase.load(Ordering::SeqCst) != PHASE_TRANSMISSION {
                c.stopping.store(true, Ordering::SeqCst);
                c.stream.close();
            }
        }
        let lingering = self.disconnect(&all);
        tracing::info!(
            exports = exports.len(),
            clients = all.len(),
            lingering,
            "NBD server shut down"
        );
        self.watchdog.stop();
        *self.reaper.lock() = false;
        self.reaper_cv.notify_all();
    }
}
