//! The server object: the export table, listeners, and the registry of live connections that
//! `remove_export` and `shutdown` use to disconnect clients cleanly.

use super::conn;
use super::{ListenAddr, NbdError, NbdStream, StreamControl};
use parking_lot::{Condvar, Mutex, RwLock};
use std::collections::{BTreeMap, HashMap};
use std::net::{SocketAddr, TcpListener};
use std::os::unix::io::AsRawFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;
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

/// Control block of one connection, shared with the server for disconnects.
pub(crate) struct ConnCtl {
    pub id: u64,
    pub stream: Box<dyn StreamControl>,
    /// Which exports the handshake may show, and the STARTTLS upgrade.
    pub security: super::ConnSecurity,
    /// Set when the server wants the connection gone (remove_export / shutdown).
    pub stopping: AtomicBool,
    done: Mutex<bool>,
    done_cv: Condvar,
}

impl ConnCtl {
    /// Asks the connection to stop reading and finish what is in flight.
    pub fn stop(&self) {
        self.stopping.store(true, Ordering::SeqCst);
        self.stream.stop_reading();
    }

    fn wait_done(&self) {
        let mut d = self.done.lock();
        while !*d {
            self.done_cv.wait(&mut d);
        }
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
    watchdog: Arc<conn::Watchdog>,
}

const ACCEPT_POLL: Duration = Duration::from_millis(200);

impl NbdServer {
    /// A server with no exports and no listeners.
    pub fn new() -> Arc<NbdServer> {
        Arc::new(NbdServer {
            exports: RwLock::new(BTreeMap::new()),
            conns: Mutex::new(HashMap::new()),
            next_id: AtomicU64::new(1),
            shut: AtomicBool::new(false),
            listeners: Mutex::new(Vec::new()),
            watchdog: conn::Watchdog::new(),
        })
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

    /// Withdraws an export: its clients stop being read, in-flight requests complete and are
    /// answered, then their sockets are shut. Returns when all of them are gone.
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
        for c in &ctls {
            c.stop();
        }
        for c in &ctls {
            c.wait_done();
        }
        tracing::info!(export = name, clients = ctls.len(), "NBD export removed");
        Ok(())
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
                if let Err(e) = self.serve_stream(s) {
                    tracing::warn!(error = %e, "cannot serve NBD connection");
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
        &self,
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
        let ctl = Arc::new(ConnCtl {
            id: self.next_id.fetch_add(1, Ordering::Relaxed),
            stream: c,
            security,
            stopping: AtomicBool::new(false),
            done: Mutex::new(false),
            done_cv: Condvar::new(),
        });
        let mut conns = self.conns.lock();
        if self.is_shut() {
            ctl.stream.close();
            return Err(NbdError::ShutDown);
        }
        conns.insert(ctl.id, ctl.clone());
        Ok((r, w, ctl))
    }

    fn run_conn(
        self: Arc<Self>,
        r: Box<dyn std::io::Read + Send>,
        w: Box<dyn std::io::Write + Send>,
        ctl: Arc<ConnCtl>,
    ) {
        conn::run(&self, r, w, &ctl);
        ctl.stream.close();
        self.conns.lock().remove(&ctl.id);
        ctl.set_done();
    }

    pub(crate) fn watchdog(&self) -> &Arc<conn::Watchdog> {
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

    /// Stops the listeners, disconnects every client cleanly (as `remove_export` does) and
    /// drops connections still negotiating. Exports are withdrawn.
    pub fn shutdown(&self) {
        if self.shut.swap(true, Ordering::SeqCst) {
            return;
        }
        let ls: Vec<_> = std::mem::take(&mut *self.listeners.lock());
        for (_, h) in ls {
            let _ = h.join();
        }
        let names: Vec<String> = self.exports.read().keys().cloned().collect();
        for n in names {
            let _ = self.remove_export(&n);
        }
        let rest: Vec<Arc<ConnCtl>> = self.conns.lock().values().cloned().collect();
        for c in &rest {
            c.stopping.store(true, Ordering::SeqCst);
            c.stream.close();
        }
        for c in &rest {
            c.wait_done();
        }
        self.watchdog.stop();
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
