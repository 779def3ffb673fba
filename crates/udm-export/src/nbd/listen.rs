//! Listeners and connection start-up of a server: the accept loops (Unix and TCP), the
//! connection cap, the control block of each new connection, and the thread that runs its
//! handshake ([`super::conn`]) and transmission to the end.

use super::conn;
use super::ctl::{ConnCtl, PHASE_HANDSHAKE};
use super::limits;
use super::server::NbdServer;
use super::{ListenAddr, NbdError, NbdStream, SetBlocking};
use parking_lot::{Condvar, Mutex};
use std::net::{SocketAddr, TcpListener};
use std::os::unix::io::AsRawFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

/// How often an accept loop checks whether the server shut down.
const ACCEPT_POLL: Duration = Duration::from_millis(200);
/// A refused client gets at most this long to read why.
const REFUSE_TIMEOUT: Duration = Duration::from_secs(2);
/// Refused connections answered at once; beyond this they are closed without a word.
const MAX_REFUSING: usize = 16;

impl NbdServer {
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
