//! The server object: the export table, listeners, and the registry of live connections that
//! `remove_export` and `shutdown` use to disconnect clients cleanly.

use super::conn;
use super::limits::{self, NbdLimits, NbdMemory};
use super::watchdog::Watchdog;
use super::{ListenAddr, NbdError, NbdStream, StreamControl};

mod reaper;
use parking_lot::{Condvar, Mutex, RwLock};
use std::collections::{BTreeMap, HashMap};
use std::net::{SocketAddr, TcpListener};
use std::os::unix::io::AsRawFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};
use udm_io::BlockDevice;

/// How an export is offered.
#[derive(Clone, Debug, Default)]
pub struct NbdExportOptions {
    /// Refuse writes (advertised as `NBD_FLAG_READ_ONLY`; writes get `EPERM`).
    pub read_only: bool,
    /// Shown by `nbdinfo --list` and `NBD_INFO_DESCRIPTION`.
    pub description: Option<String>,
    /// Also served over plain (unencrypted, unauthenticated) TCP, on listeners that allow it
    /// ([`TcpSecurity::allow_insecure`](super::TcpSecurity)). Off: TCP clients need TLS.
    pub insecure_tcp: bool,
}

/// Request counters of one export, summed over all its connections (past and present).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct NbdStats {
    /// `NBD_CMD_READ` requests.
    pub reads: u64,
    /// `NBD_CMD_WRITE` requests.
    pub writes: u64,
    /// `NBD_CMD_FLUSH` requests.
    pub flushes: u64,
    /// `NBD_CMD_TRIM` requests.
    pub trims: u64,
    /// `NBD_CMD_WRITE_ZEROES` requests.
    pub write_zeroes: u64,
    /// `NBD_CMD_CACHE` requests.
    pub caches: u64,
    /// `NBD_CMD_BLOCK_STATUS` requests.
    pub block_status: u64,
    /// Requests with an unknown command type.
    pub unknown: u64,
    /// Requests answered with an error.
    pub errors: u64,
    /// Bytes returned by successful reads.
    pub bytes_read: u64,
    /// Bytes stored by successful writes.
    pub bytes_written: u64,
    /// Connections that entered transmission on this export.
    pub connections: u64,
}

/// What `exports()` reports for one export.
#[derive(Clone, Debug)]
pub struct NbdExportInfo {
    /// Export name.
    pub name: String,
    /// Whether writes are refused.
    pub read_only: bool,
    /// Description, if any.
    pub description: Option<String>,
    /// Size in bytes as advertised.
    pub size_bytes: u64,
    /// Connections currently in transmission on it.
    pub clients: usize,
    /// Counters.
    pub stats: NbdStats,
}

#[derive(Default)]
pub(crate) struct Counters {
    pub by_cmd: [AtomicU64; 8],
    pub unknown: AtomicU64,
    pub errors: AtomicU64,
    pub bytes_read: AtomicU64,
    pub bytes_written: AtomicU64,
    pub connections: AtomicU64,
}

impl Counters {
    fn snapshot(&self) -> NbdStats {
        let g = |a: &AtomicU64| a.load(Ordering::Relaxed);
        NbdStats {
            reads: g(&self.by_cmd[0]),
            writes: g(&self.by_cmd[1]),
            flushes: g(&self.by_cmd[3]),
            trims: g(&self.by_cmd[4]),
            caches: g(&self.by_cmd[5]),
            write_zeroes: g(&self.by_cmd[6]),
            block_status: g(&self.by_cmd[7]),
            unknown: g(&self.unknown),
            errors: g(&self.errors),
            bytes_read: g(&self.bytes_read),
            bytes_written: g(&self.bytes_written),
            connections: g(&self.connections),
        }
    }
}

pub(crate) struct ExportConns {
    pub map: HashMap<u64, Arc<ConnCtl>>,
    pub removed: bool,
}

/// One export: the device and its options, counters and connected clients.
pub(crate) struct Export {
    pub name: String,
    pub dev: Arc<dyn BlockDevice>,
    pub opts: NbdExportOptions,
    pub counters: Counters,
    pub conns: Mutex<ExportConns>,
}

impl Export {
    pub fn read_only(&self) -> bool {
        self.opts.read_only || self.dev.read_only()
    }

    /// Registers a connection entering transmission; false if the export is being removed.
    pub fn attach(&self, ctl: &Arc<ConnCtl>) -> bool {
        let mut c = self.conns.lock();
        if c.removed {
            return false;
        }
        c.map.insert(ctl.id, ctl.clone());
        self.counters.connections.fetch_add(1, Ordering::Relaxed);
        true
    }

    pub fn detach(&self, id: u64) {
        self.conns.lock().map.remove(&id);
    }
}

/// Connection phases (`ConnCtl::phase`).
const PHASE_HANDSHAKE: u8 = 0;
const PHASE_TRANSMISSION: u8 = 1;
const PHASE_TIMED_OUT: u8 = 2;

/// Control block of one connection, shared with the server for disconnects, timeouts and the
/// memory gauge.
pub(crate) struct ConnCtl {
    pub id: u64,
    pub stream: Box<dyn StreamControl>,
    /// Which exports the handshake may show, and the STARTTLS upgrade.
    pub security: super::ConnSecurity,
    /// Set when the server wants the connection gone (remove_export / shutdown).
    pub stopping: AtomicBool,
    /// Over the connection cap: only told so, then closed.
    refused: bool,
    /// `PHASE_*`: the reaper closes connections still negotiating after `deadline`.
    phase: AtomicU8,
    /// Watchdog clock (ns) by which the handshake must be over.
    deadline: u64,
    /// Watchdog clock (ns) when the reply write in progress started, 0 when not writing.
    pub write_since: AtomicU64,
    /// Per-connection cap on `inflight` (from `NbdLimits::max_inflight_bytes`).
    pub max_inflight: u64,
    /// Payload bytes admitted and not yet answered.
    pub inflight: AtomicU64,
    /// Payload bytes held in request and reply buffers.
    pub buffered: AtomicU64,
    /// Bytes kept in the connection's buffer pool.
    pub pooled: AtomicU64,
    /// Requests read in transmission.
    pub requests: AtomicU64,
    /// Requests being executed (read, not yet answered).
    pub busy: AtomicU64,
    /// Reaper-only: `requests` at its last look, and when it last changed (watchdog clock).
    idle_seen: AtomicU64,
    idle_since: AtomicU64,
    done: Mutex<bool>,
    done_cv: Condvar,
}

impl ConnCtl {
    /// Asks the connection to stop reading and finish what is in flight.
    pub fn stop(&self) {
        self.stopping.store(true, Ordering::SeqCst);
        self.stream.stop_reading();
    }

    /// Moves to transmission; false if the handshake timed out first.
    pub fn enter_transmission(&self) -> bool {
        self.phase
            .compare_exchange(
                PHASE_HANDSHAKE,
                PHASE_TRANSMISSION,
                Ordering::SeqCst,
                Ordering::SeqCst,
            )
            .is_ok()
    }

    /// Waits for the connection to end, until `deadline`; true if it did.
    fn wait_done_until(&self, deadline: Instant) -> bool {
        let mut d = self.done.lock();
        while !*d {
            if self.done_cv.wait_until(&mut d, deadline).timed_out() {
                return *d;
            }
        }
        true
    }

    fn is_done(&self) -> bool {
        *self.done.lock()
    }

    fn set_done(&self) {
        *self.done.lock() = true;
        self.done_cv.notify_all();
    }
}

/// The NBD server: a table of named exports served on any number of listeners.
pub struct NbdServer {
    exports: RwLock<BTreeMap<String, Arc<Export>>>,
    conns: Mutex<HashMap<u64, Arc<ConnCtl>>>,
    next_id: AtomicU64,
    shut: AtomicBool,
    listeners: Mutex<Vec<(ListenAddr, JoinHandle<()>)>>,
    watchdog: Arc<Watchdog>,
    limits: NbdLimits,
    /// Connections refused over the cap (for rate-limited logging).
    refusals: AtomicU64,
    /// The reaper thread (handshake and send timeouts) runs.
    reaper: Mutex<bool>,
    reaper_cv: Condvar,
}

const ACCEPT_POLL: Duration = Duration::from_millis(200);
/// A refused client gets at most this long to read why.
const REFUSE_TIMEOUT: Duration = Duration::from_secs(2);
/// Refused connections answered at once; beyond this they are closed without a word.
const MAX_REFUSING: usize = 16;
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
                size_bytes: conn::export_size(e),
                clients: e.conns.lock().map.len(),
                stats: e.counters.snapshot(),
            })
            .collect()
    }

    /// Listens on a Unix socket (a stale socket file nobody listens on is replaced) and serves
    /// every connection on its own threads.
    pub fn listen_unix(self: &Arc<Self>, path: &Path) -> Result<(), NbdError> {
        let err = |source| NbdError::Listen {
            addr: path.display().to_string(),
            source,
        };
        let listener = match UnixListener::bind(path) {
            Ok(l) => l,
            Err(e) if e.kind() == std::io::ErrorKind::AddrInUse => {
                if UnixStream::connect(path).is_ok() {
                    return Err(err(e));
                }
                std::fs::remove_file(path).map_err(err)?;
                UnixListener::bind(path).map_err(err)?
            }
            Err(e) => return Err(err(e)),
        };
        listener.set_nonblocking(true).map_err(err)?;
        let me = self.clone();
        let p: PathBuf = path.to_path_buf();
        let h = std::thread::Builder::new()
            .name("nbd-accept".into())
            .spawn(move || {
                me.accept_loop(listener.as_raw_fd(), || match listener.accept() {
                    Ok((s, _)) => Some(s),
                    Err(_) => None,
                });
                let _ = std::fs::remove_file(&p);
            })
            .map_err(err)?;
        self.listeners
            .lock()
            .push((ListenAddr::Unix(path.to_path_buf()), h));
        Ok(())
    }

    /// Listens on a TCP address (`TCP_NODELAY` on every connection). Clients must start TLS
    /// with `security.tls`; without credentials `security.allow_insecure` must be set (the
    /// listener is refused otherwise), and only `insecure_tcp` exports are served in plain.
    pub fn listen_tcp(
        self: &Arc<Self>,
        addr: SocketAddr,
        security: super::TcpSecurity,
    ) -> Result<(), NbdError> {
        let err = |source| NbdError::Listen {
            addr: addr.to_string(),
            source,
        };
        if security.tls.is_none() && !security.allow_insecure {
            return Err(err(std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                "no TLS credentials, and plain TCP was not allowed explicitly",
            )));
        }
        if security.allow_insecure {
            tracing::warn!(%addr, "NBD over plain TCP allowed: exports marked insecure_tcp are served unencrypted and unauthenticated to anyone who can connect");
        }
        let policy = Arc::new(security);
        let listener = TcpListener::bind(addr).map_err(err)?;
        listener.set_nonblocking(true).map_err(err)?;
        let me = self.clone();
        let bound = listener.local_addr().unwrap_or(addr);
        let h = std::thread::Builder::new()
            .name("nbd-accept".into())
            .spawn(move || {
                me.accept_loop(listener.as_raw_fd(), || match listener.accept() {
                    Ok((sock, _)) => Some(super::tls::TcpConn {
                        sock,
                        policy: policy.clone(),
                    }),
                    Err(_) => None,
                })
            })
            .map_err(err)?;
        self.listeners.lock().push((ListenAddr::Tcp(bound), h));
        Ok(())
    }

    /// The addresses listened on (TCP port 0 resolved to the bound port).
    pub fn listen_addrs(&self) -> Vec<ListenAddr> {
        self.listeners
            .lock()
            .iter()
            .map(|(a, _)| a.clone())
            .collect()
    }

    fn accept_loop<S: NbdStream + SetBlocking>(
        self: &Arc<Self>,
        fd: i32,
        mut accept: impl FnMut() -> Option<S>,
    ) {
        while !self.is_shut() {
            let mut pfd = libc::pollfd {
                fd,
                events: libc::POLLIN,
                revents: 0,
            };
            // SAFETY: pfd is a valid pollfd for the duration of the call; nfds is 1.
            let r = unsafe { libc::poll(&mut pfd, 1, ACCEPT_POLL.as_millis() as i32) };
            if r <= 0 || self.is_shut() {
                continue;
            }
            while let Some(s) = accept() {
                if s.set_blocking().is_err() {
                    continue;
                }
                match self.serve_stream(s) {
                    // Counted and logged (rate-limited) when refused.
                    Ok(_) | Err(NbdError::TooManyConnections { .. }) => {}
                    Err(e) => tracing::warn!(error = %e, "cannot serve NBD connection"),
                }
            }
        }
    }

    /// Serves one already-connected stream on a new thread (used by the listeners, and by
    /// tests with `UnixStream::pair()`). Returns the connection thread.
    pub fn serve_stream<S: NbdStream>(
        self: &Arc<Self>,
        stream: S,
    ) -> Result<JoinHandle<()>, NbdError> {
        let (r, w, ctl) = self.register(stream)?;
        self.start_reaper();
        let me = self.clone();
        let ctl2 = ctl.clone();
        std::thread::Builder::new()
            .name("nbd-conn".into())
            .spawn(move || me.run_conn(r, w, ctl2))
            .map_err(|source| {
                self.conns.lock().remove(&ctl.id);
                NbdError::Stream {
                    op: "spawn a thread",
                    source,
                }
            })
    }

    /// Serves one stream on the calling thread until it ends (fuzzing, tests).
    pub fn serve_blocking<S: NbdStream>(self: &Arc<Self>, stream: S) {
        if let Ok((r, w, ctl)) = self.register(stream) {
            self.clone().run_conn(r, w, ctl);
        }
    }

    #[allow(clippy::type_complexity)]
    fn register<S: NbdStream>(
        self: &Arc<Self>,
        stream: S,
    ) -> Result<
        (
            Box<dyn std::io::Read + Send>,
            Box<dyn std::io::Write + Send>,
            Arc<ConnCtl>,
        ),
        NbdError,
    > {
        let security = stream.security().map_err(|source| NbdError::Stream {
            op: "prepare the TLS policy",
            source,
        })?;
        let (r, w, c) = stream.split().map_err(|source| NbdError::Stream {
            op: "split the stream",
            source,
        })?;
        let mut conns = self.conns.lock();
        if self.is_shut() {
            c.close();
            return Err(NbdError::ShutDown);
        }
        let (mut live, mut refusing) = (0, 0);
        for x in conns.values() {
            if x.refused {
                refusing += 1;
            } else if !x.stopping.load(Ordering::Relaxed) {
                live += 1;
            }
        }
        let refused = live >= self.limits.max_connections;
        if refused {
            let n = self.refusals.fetch_add(1, Ordering::Relaxed) + 1;
            if n <= 10 || n % 100 == 0 {
                tracing::warn!(
                    limit = self.limits.max_connections,
                    refused_so_far = n,
                    "too many NBD connections; refusing a client"
                );
            }
            if refusing >= MAX_REFUSING {
                c.close();
                return Err(NbdError::TooManyConnections {
                    limit: self.limits.max_connections,
                });
            }
        }
        let timeout = if refused {
            self.limits.handshake_timeout.min(REFUSE_TIMEOUT)
        } else {
            self.limits.handshake_timeout
        };
        let ctl = Arc::new(ConnCtl {
            id: self.next_id.fetch_add(1, Ordering::Relaxed),
            stream: c,
            security,
            stopping: AtomicBool::new(false),
            refused,
            phase: AtomicU8::new(PHASE_HANDSHAKE),
            deadline: self
                .watchdog
                .now()
                .saturating_add(timeout.as_nanos().min(u128::from(u64::MAX / 2)) as u64),
            write_since: AtomicU64::new(0),
            max_inflight: self.limits.max_inflight_bytes.max(1),
            inflight: AtomicU64::new(0),
            buffered: AtomicU64::new(0),
            pooled: AtomicU64::new(0),
            requests: AtomicU64::new(0),
            busy: AtomicU64::new(0),
            idle_seen: AtomicU64::new(0),
            idle_since: AtomicU64::new(0),
            done: Mutex::new(false),
            done_cv: Condvar::new(),
        });
        conns.insert(ctl.id, ctl.clone());
        Ok((r, w, ctl))
    }

    fn run_conn(
        self: Arc<Self>,
        r: Box<dyn std::io::Read + Send>,
        w: Box<dyn std::io::Write + Send>,
        ctl: Arc<ConnCtl>,
    ) {
        if ctl.refused {
            let mut r = r;
            let mut w = w;
            let msg = format!(
                "too many NBD connections (the server's limit is {}); try again later",
                self.limits.max_connections
            );
            let _ = limits::refuse(&mut r, &mut w, &msg);
        } else {
            conn::run(&self, r, w, &ctl);
        }
        ctl.stream.close();
        self.conns.lock().remove(&ctl.id);
        ctl.set_done();
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

/// Accepted sockets are switched back to blocking mode before serving.
pub(crate) trait SetBlocking {
    fn set_blocking(&self) -> std::io::Result<()>;
}

/// Socket buffer size for accepted connections: a 1 MiB read reply then leaves in one write
/// instead of several wake-ups of writer and client.
const SOCKET_BUFFER: libc::c_int = 4 << 20;

/// Best effort: grows the send and receive buffers of a connection (the FORCE variants pass
/// the sysctl limits when the daemon has CAP_NET_ADMIN; errors leave the defaults).
fn grow_socket_buffers(fd: i32) {
    let size = SOCKET_BUFFER;
    for (force, plain) in [
        (libc::SO_SNDBUFFORCE, libc::SO_SNDBUF),
        (libc::SO_RCVBUFFORCE, libc::SO_RCVBUF),
    ] {
        for opt in [force, plain] {
            // SAFETY: `size` lives across the call and its length is passed; fd is a live socket.
            let r = unsafe {
                libc::setsockopt(
                    fd,
                    libc::SOL_SOCKET,
                    opt,
                    (&size as *const libc::c_int).cast(),
                    std::mem::size_of::<libc::c_int>() as libc::socklen_t,
                )
            };
            if r == 0 {
                break;
            }
        }
    }
}

impl SetBlocking for UnixStream {
    fn set_blocking(&self) -> std::io::Result<()> {
        grow_socket_buffers(std::os::unix::io::AsRawFd::as_raw_fd(self));
        self.set_nonblocking(false)
    }
}

impl SetBlocking for std::net::TcpStream {
    fn set_blocking(&self) -> std::io::Result<()> {
        grow_socket_buffers(std::os::unix::io::AsRawFd::as_raw_fd(self));
        self.set_nonblocking(false)
    }
}
