//! `udmd`: the udm daemon. Serves disks and mapped devices, exports them over NBD, FUSE and ublk,
//! and takes control requests from `udmsetup` and `udm` on a Unix socket.

mod control;
mod dirs;
mod exports;
mod restore;
mod shutdown;
mod state;

use anyhow::{bail, Context, Result};
use clap::Parser;
use control::Daemon;
use parking_lot::Mutex;
use std::net::SocketAddr;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::io::AsRawFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use udm_core::registry::{LoadFlags, ResumeOptions};
use udm_core::Registry;
use udm_export::nbd::{ListenAddr, NbdLimits, NbdServer, TcpSecurity, TlsCreds};
use udm_proto::paths;

/// udmd — user-space device-mapper daemon with live interposition.
///
/// With no options it serves the control socket and the NBD socket in the runtime directory
/// ($UDM_RUNTIME_DIR, else /run/udm as root, else $XDG_RUNTIME_DIR/udm) and restores what was set
/// up before from the state directory ($UDM_STATE_DIR, else /var/lib/udm or $XDG_STATE_HOME/udm).
#[derive(Parser, Debug)]
#[command(version, about, long_about)]
struct Args {
    /// Runtime directory (control.sock, nbd.sock).
    #[arg(long, env = "UDM_RUNTIME_DIR")]
    runtime_dir: Option<PathBuf>,
    /// State directory (state.json).
    #[arg(long, env = "UDM_STATE_DIR")]
    state_dir: Option<PathBuf>,
    /// Also serve NBD on TCP at ADDR:PORT or PORT (127.0.0.1 unless an address is given).
    /// Clients must use TLS (NBD_OPT_STARTTLS): give --tls-creds or --tls-psk.
    #[arg(long, value_name = "ADDR:PORT")]
    nbd_listen: Option<String>,
    /// X.509 credentials for NBD over TCP: a directory holding ca-cert.pem, server-cert.pem
    /// and server-key.pem (the layout of qemu, libnbd and nbdkit).
    #[arg(
        long,
        value_name = "DIR",
        conflicts_with = "tls_psk",
        requires = "nbd_listen"
    )]
    tls_creds: Option<PathBuf>,
    /// With --tls-creds: require a client certificate signed by ca-cert.pem.
    #[arg(long, requires = "tls_creds")]
    tls_verify_peer: bool,
    /// Pre-shared keys for NBD over TCP: a file of `username:hexkey` lines (psktool, nbdkit).
    #[arg(long, value_name = "FILE", requires = "nbd_listen")]
    tls_psk: Option<PathBuf>,
    /// Serve NBD exports added with `--insecure-tcp` over plain TCP: unencrypted and
    /// unauthenticated, to anyone who can reach the port. Other exports are served over TCP
    /// only with TLS (--tls-creds or --tls-psk), or not at all.
    #[arg(long, requires = "nbd_listen")]
    nbd_insecure_tcp: bool,
    /// Create mapped devices at start-up, in the concise syntax of the kernel's `dm-mod.create=`:
    /// `name,uuid,minor,flags,table[,table...][;name,...]`; flags `ro`, `rw`, `ro+interpose`,
    /// `rw+interpose`. Devices that already exist (restored from the state) are left alone.
    #[arg(long, value_name = "CONCISE")]
    create: Vec<String>,
    /// Seconds between attempts to reopen unavailable disks (a backing file that was missing at
    /// start-up) and bring back what depends on them.
    #[arg(
        long,
        env = "UDM_RETRY_INTERVAL",
        default_value_t = 3,
        value_name = "SECS"
    )]
    retry_interval: u64,
    /// NBD connections served at once (Unix and TCP together); the next client is told why it
    /// is refused and disconnected.
    #[arg(long, default_value_t = NbdLimits::default().max_connections, value_name = "N")]
    nbd_max_connections: usize,
    /// Request and reply payload MiB one NBD connection may hold; beyond it the server stops
    /// reading that client's requests until replies drain.
    #[arg(long, default_value_t = NbdLimits::default().max_inflight_bytes >> 20, value_name = "MIB")]
    nbd_max_inflight_mib: u64,
    /// Seconds an NBD client has from connecting to the start of transmission.
    #[arg(long, default_value_t = NbdLimits::default().handshake_timeout.as_secs(), value_name = "SECS")]
    nbd_handshake_timeout: u64,
    /// Seconds a reply write to an NBD client may make no progress (the client stopped reading)
    /// before the client is disconnected; 0 waits forever (removal and shutdown still cut it).
    #[arg(long, default_value_t = 60, value_name = "SECS")]
    nbd_send_timeout: u64,
    /// MiB of acknowledged origin writes a snapshot origin may hold in memory while their
    /// chunks are copied (1..=4096): more smooths bursts of first writes, less bounds memory.
    #[arg(long, default_value_t = udm_target::writeback::MAX_HELD_BYTES as u64 >> 20, value_name = "MIB")]
    snapshot_writeback_mib: u64,
    /// Log filter (tracing EnvFilter syntax), e.g. `info`, `udm_core=debug`.
    #[arg(long, env = "UDM_LOG", default_value = "info")]
    log: String,
}

fn parse_listen(s: &str) -> Result<SocketAddr> {
    if let Ok(port) = s.parse::<u16>() {
        return Ok(SocketAddr::from(([127, 0, 0, 1], port)));
    }
    if let Ok(a) = s.parse::<SocketAddr>() {
        return Ok(a);
    }
    if let Some(port) = s.strip_prefix(':').and_then(|p| p.parse::<u16>().ok()) {
        return Ok(SocketAddr::from(([127, 0, 0, 1], port)));
    }
    bail!("--nbd-listen {s:?}: expected PORT, :PORT or ADDR:PORT")
}

/// The TCP listener's security from the flags; refuses plain TCP unless asked for explicitly.
fn tcp_security(args: &Args) -> Result<TcpSecurity> {
    let tls = match (&args.tls_creds, &args.tls_psk) {
        (Some(dir), _) => Some(
            TlsCreds::x509_dir(dir, args.tls_verify_peer)
                .with_context(|| format!("--tls-creds {}", dir.display()))?,
        ),
        (None, Some(f)) => {
            Some(TlsCreds::psk_file(f).with_context(|| format!("--tls-psk {}", f.display()))?)
        }
        (None, None) => None,
    };
    if tls.is_none() && !args.nbd_insecure_tcp {
        bail!(
            "--nbd-listen without TLS credentials: NBD over TCP would be readable and writable by \
             anyone who can reach the port. Give --tls-creds DIR (X.509) or --tls-psk FILE, or \
             --nbd-insecure-tcp to serve exports added with `--insecure-tcp` in plain text"
        );
    }
    if args.nbd_insecure_tcp {
        tracing::warn!(
            "--nbd-insecure-tcp: exports added with --insecure-tcp are served over plain TCP, \
             UNENCRYPTED AND UNAUTHENTICATED, to anyone who can reach the port"
        );
    }
    if let Some(t) = &tls {
        tracing::info!(credentials = ?t, "NBD over TCP requires TLS");
    }
    Ok(TcpSecurity {
        tls: tls.map(Arc::new),
        allow_insecure: args.nbd_insecure_tcp,
    })
}

/// The NBD server's limits from the flags.
fn nbd_limits(args: &Args) -> Result<NbdLimits> {
    use std::time::Duration;
    if args.nbd_max_connections == 0 || args.nbd_max_inflight_mib == 0 {
        bail!("--nbd-max-connections and --nbd-max-inflight-mib must be at least 1");
    }
    Ok(NbdLimits {
        max_connections: args.nbd_max_connections,
        max_inflight_bytes: args.nbd_max_inflight_mib.saturating_mul(1 << 20),
        handshake_timeout: Duration::from_secs(args.nbd_handshake_timeout.max(1)),
        send_timeout: (args.nbd_send_timeout > 0)
            .then(|| Duration::from_secs(args.nbd_send_timeout)),
        ..NbdLimits::default()
    })
}

/// Takes an exclusive lock in the runtime directory so two daemons never serve the same state.
fn lock_runtime(dir: &Path) -> Result<std::fs::File> {
    let path = dir.join("udmd.lock");
    let f = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .with_context(|| format!("opening {}", path.display()))?;
    // SAFETY: flock on a valid fd has no memory-safety preconditions.
    if unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
        bail!(
            "another udmd is already running with runtime directory {}",
            dir.display()
        );
    }
    Ok(f)
}

fn bind_socket(path: &Path) -> Result<UnixListener> {
    if path.exists() {
        if UnixStream::connect(path).is_ok() {
            bail!("{} is in use by a running daemon", path.display());
        }
        std::fs::remove_file(path).with_context(|| format!("removing stale {}", path.display()))?;
    }
    let l = UnixListener::bind(path).with_context(|| format!("binding {}", path.display()))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
    Ok(l)
}

fn apply_create(registry: &Registry, spec: &str) -> Result<()> {
    let devices = udm_target::table::ConciseDevice::parse_list(spec)
        .with_context(|| format!("--create {spec:?}"))?;
    for d in devices {
        if registry.info(&d.name).is_ok() {
            tracing::info!(device = %d.name, "--create: device exists already (restored); left alone");
            continue;
        }
        let flags = LoadFlags {
            read_only: d.read_only,
            interpose: d.interpose,
        };
        registry
            .create(
                &d.name,
                d.uuid.as_deref(),
                d.minor,
                Some((&d.table, flags)),
                &ResumeOptions::default(),
            )
            .with_context(|| format!("--create {}", d.name))?;
        tracing::info!(device = %d.name, "created at start-up");
    }
    Ok(())
}

fn main() -> Result<()> {
    let args = Args::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_new(&args.log).unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    // Checked before anything is set up: a misconfigured listener must not start.
    let tcp = match &args.nbd_listen {
        Some(l) => Some((parse_listen(l)?, tcp_security(&args)?)),
        None => None,
    };
    let runtime = args.runtime_dir.clone().unwrap_or_else(paths::runtime_dir);
    let state_dir = args.state_dir.clone().unwrap_or_else(paths::state_dir);
    dirs::prepare(&runtime, dirs::is_shared_tmp_fallback(&runtime))?;
    dirs::prepare(&state_dir, false)?;
    let _lock = lock_runtime(&runtime)?;
    let control_path = paths::control_socket(&runtime);
    let nbd_path = paths::nbd_socket(&runtime);

    let registry = Arc::new(Registry::new());
    let st = state::load(&state_dir)?;
    if !(1..=4096).contains(&args.snapshot_writeback_mib) {
        bail!(
            "--snapshot-writeback-mib must be 1..=4096, got {}",
            args.snapshot_writeback_mib
        );
    }
    udm_target::writeback::set_held_limit((args.snapshot_writeback_mib as usize) << 20);
    let nbd = NbdServer::with_limits(nbd_limits(&args)?);
    let daemon = Arc::new(Daemon {
        registry: registry.clone(),
        exports: exports::Exports::new(registry.clone(), nbd.clone(), nbd_path.clone()),
        state_dir: state_dir.clone(),
        change: Mutex::new(()),
    });
    // Nothing recorded is dropped: what cannot be opened is kept as unavailable and retried.
    restore::restore(&daemon, &st);
    for c in &args.create {
        apply_create(&registry, c)?;
    }
    daemon.save()?;
    // Started after the first save: its own saves take the change lock.
    restore::spawn_retry(
        daemon.clone(),
        std::time::Duration::from_secs(args.retry_interval.max(1)),
    )?;

    // NBD: Unix socket always, TCP when asked.
    if nbd_path.exists() {
        std::fs::remove_file(&nbd_path).ok();
    }
    nbd.listen_unix(&nbd_path)
        .with_context(|| format!("NBD socket {}", nbd_path.display()))?;
    std::fs::set_permissions(&nbd_path, std::fs::Permissions::from_mode(0o600))?;
    if let Some((addr, security)) = tcp {
        nbd.listen_tcp(addr, security)
            .with_context(|| format!("NBD TCP listener {addr}"))?;
        for a in nbd.listen_addrs() {
            if let ListenAddr::Tcp(bound) = a {
                tracing::info!(addr = %bound, "NBD listening on TCP");
            }
        }
    }
    let listener = bind_socket(&control_path)?;
    let d = daemon.clone();
    std::thread::Builder::new()
        .name("udm-accept".into())
        .spawn(move || control::serve(d, listener))?;
    tracing::info!(control = %control_path.display(), nbd = %nbd_path.display(), state = %state_dir.display(), "udmd ready");

    let mut signals = signal_hook::iterator::Signals::new([
        signal_hook::consts::SIGTERM,
        signal_hook::consts::SIGINT,
    ])?;
    if let Some(sig) = signals.forever().next() {
        tracing::info!(
            signal = sig,
            "shutting down: draining exports and flushing devices"
        );
    }
    // Every step is bounded: SIGTERM finishes in every state (a client parked on a suspended
    // device, an interposer holding a device's flush, a control change waiting for I/O).
    control::refuse_changes();
    let guard = daemon.change.try_lock_for(SHUTDOWN_CHANGE_WAIT);
    if guard.is_none() {
        tracing::warn!("shutdown: a control change is still running; not waiting for it");
    }
    let d = daemon.clone();
    shutdown::bounded(
        "disconnecting export clients",
        SHUTDOWN_EXPORTS_WAIT,
        move || d.exports.shutdown(),
    );
    let registry_free = shutdown::flush_all(&registry);
    if guard.is_some() && registry_free {
        let d = daemon.clone();
        let saved = shutdown::within(SHUTDOWN_CHANGE_WAIT, move || d.save());
        match saved {
            Some(Ok(())) => {}
            Some(Err(e)) => tracing::error!("cannot record state at shutdown: {e:#}"),
            None => tracing::error!(
                "state not recorded at shutdown: the registry is blocked by a control \
                 operation waiting for held I/O (the state of the last change stays)"
            ),
        }
    }
    std::fs::remove_file(&control_path).ok();
    std::fs::remove_file(&nbd_path).ok();
    tracing::info!("udmd stopped");
    // Threads stuck on held I/O must not be waited for by destructors.
    std::process::exit(0)
}

/// How long shutdown waits for a running control change before going on without it.
const SHUTDOWN_CHANGE_WAIT: std::time::Duration = std::time::Duration::from_secs(1);
/// How long shutdown waits for export clients to be disconnected.
const SHUTDOWN_EXPORTS_WAIT: std::time::Duration = std::time::Duration::from_secs(5);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn listen_addresses() {
        assert_eq!(
            parse_listen("10809").unwrap(),
            "127.0.0.1:10809".parse().unwrap()
        );
        assert_eq!(
            parse_listen(":10809").unwrap(),
            "127.0.0.1:10809".parse().unwrap()
        );
        assert_eq!(
            parse_listen("0.0.0.0:1").unwrap(),
            "0.0.0.0:1".parse().unwrap()
        );
        assert!(parse_listen("x").is_err());
    }
}
