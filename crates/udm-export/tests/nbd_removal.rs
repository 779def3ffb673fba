//! Removing an export ends its connections over Unix sockets and TCP alike: an idle client's
//! blocked read is cut at once (the socket's read side is shut), not at the end of the drain
//! time; a client that reads no reply has its socket closed once the drain time is over, so
//! the thread stuck writing to it ends too. And the Unix socket itself: a stale one is replaced,
//! a live one left alone. Written against mutants cargo-mutants found missed in the sockets'
//! `StreamControl` (`stop_reading`, `close`) and `listen_unix`.

#![allow(clippy::unwrap_used)] // tests may unwrap (helpers included)

#[path = "nbd_hostile/support.rs"]
mod support;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::os::unix::net::UnixStream;
use std::sync::Arc;
use std::time::Duration;
use support::*;
use udm_export::nbd::client::Client;
use udm_export::nbd::proto::*;
use udm_export::nbd::{NbdExportOptions, NbdLimits, TcpSecurity};
use udm_io::backend::mem::MemDevice;
use udm_testkit::ends_within;

const MIB: u64 = 1 << 20;

/// A server with export `disk` (64 MiB of memory) on a Unix socket and on TCP (localhost, no
/// TLS).
fn setup(limits: NbdLimits) -> (Env, u16, Arc<MemDevice>) {
    let e = env(limits, &[]);
    let opts = NbdExportOptions {
        insecure_tcp: true,
        ..NbdExportOptions::default()
    };
    let dev = Arc::new(MemDevice::new(64 * MIB / 512));
    e.server.add_export("disk", dev.clone(), opts).unwrap();
    e.server
        .listen_tcp(
            SocketAddr::from(([127, 0, 0, 1], 0)),
            TcpSecurity {
                tls: None,
                allow_insecure: true,
            },
        )
        .unwrap();
    let port = udm_testkit::nbd_tcp_port(&e.server);
    (e, port, dev)
}

fn tcp(port: u16) -> TcpStream {
    let s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    s
}

/// Both clients see their connection end within 5 s.
fn assert_both_cut(unix: UnixStream, tcp: TcpStream) {
    assert!(
        ends_within(unix, Duration::from_secs(5)),
        "Unix client not cut"
    );
    assert!(
        ends_within(tcp, Duration::from_secs(5)),
        "TCP client not cut"
    );
}

#[test]
fn removal_cuts_idle_clients_at_once() {
    // A drain time far longer than the bound below: only shutting the read side ends them.
    let (e, port, _) = setup(NbdLimits {
        drain_timeout: Duration::from_secs(60),
        ..NbdLimits::default()
    });
    let unix = stream(&e.sock);
    let _u = Client::connect(unix.try_clone().unwrap(), "disk", false).unwrap();
    let tcp = tcp(port);
    let _t = Client::connect(tcp.try_clone().unwrap(), "disk", true).unwrap();
    let server = e.server.clone();
    bounded(
        "remove_export with idle clients",
        Duration::from_secs(10),
        move || server.remove_export("disk").unwrap(),
    );
    assert_both_cut(unix, tcp);
}

/// Shutting the server down closes clients still negotiating at once (they have nothing in
/// flight), whatever the drain and handshake times.
#[test]
fn shutdown_closes_negotiating_clients_at_once() {
    let (e, port, _) = setup(NbdLimits {
        drain_timeout: Duration::from_secs(60),
        handshake_timeout: Duration::from_secs(60),
        ..NbdLimits::default()
    });
    let mut unix = stream(&e.sock);
    let mut tcp = tcp(port);
    let mut greeting = [0u8; 18];
    unix.read_exact(&mut greeting).unwrap();
    tcp.read_exact(&mut greeting).unwrap();
    let server = e.server.clone();
    bounded("shutdown", Duration::from_secs(10), move || {
        server.shutdown()
    });
    assert_both_cut(unix, tcp);
}

#[test]
fn removal_closes_tcp_clients_that_read_no_reply() {
    let (e, port, dev) = setup(NbdLimits {
        drain_timeout: Duration::from_millis(200),
        send_timeout: None,
        ..NbdLimits::default()
    });
    // Pipelined 1 MiB reads, never a reply read: the socket fills, a thread blocks writing.
    let mut s = tcp(port);
    let _c = Client::connect(s.try_clone().unwrap(), "disk", false).unwrap();
    let mut reqs = Vec::new();
    for i in 0..64u64 {
        reqs.extend_from_slice(&request(CMD_READ, i, (i % 64) * MIB, 1 << 20));
    }
    s.write_all(&reqs).unwrap();
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(e.server.memory().connections, 1);
    // From now on a read takes 400 ms: when the drain time is over and the socket closed, a
    // read is still in the device; the connection ends when it does.
    dev.set_latency(Duration::from_millis(400));
    s.write_all(&request(CMD_READ, 99, 0, 4096)).unwrap();
    let server = e.server.clone();
    bounded("remove_export", Duration::from_secs(10), move || {
        server.remove_export("disk").unwrap()
    });
    // The stuck write fails at the close, the device's read ends, and so does the connection,
    // before the removal returns (it waits a little for that).
    assert_eq!(e.server.memory().connections, 0, "removal returned first");
}

/// A stale socket file (left by a crashed daemon, nobody listening) is replaced; a socket
/// another server listens on is not taken over.
#[test]
fn a_stale_unix_socket_is_replaced_a_live_one_is_not() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("nbd.sock");
    drop(std::os::unix::net::UnixListener::bind(&path).unwrap());
    assert!(path.exists());
    let a = udm_export::nbd::NbdServer::new();
    a.add_export(
        "disk",
        Arc::new(MemDevice::new(64)),
        NbdExportOptions::default(),
    )
    .unwrap();
    a.listen_unix(&path).unwrap();
    let b = udm_export::nbd::NbdServer::new();
    assert!(b.listen_unix(&path).is_err(), "took over a live socket");
    let mut c = Client::connect(stream(&path), "disk", false).unwrap();
    assert_eq!(
        c.read(0, 512).unwrap(),
        udm_export::nbd::client::Reply::Ok(vec![0; 512])
    );
    a.shutdown();
    b.shutdown();
}
