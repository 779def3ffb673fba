//! An NBD export as the daemon holds it (`NbdExport`, an `Export`): its kind and `nbd+unix`
//! URI as `export list` shows them, its counters (every request kind counted once, errors and
//! bytes), and its removal. Written against mutants cargo-mutants found missed in
//! `nbd/handle.rs`, which only the daemon's tests had driven.

#![allow(clippy::unwrap_used)] // tests may unwrap (helpers included)

use std::os::unix::net::UnixStream;
use std::sync::Arc;
use std::time::{Duration, Instant};
use udm_export::nbd::client::{Client, Reply};
use udm_export::nbd::proto::*;
use udm_export::nbd::{unix_uri, NbdExport, NbdExportOptions, NbdServer};
use udm_export::{Export, ExportStats};
use udm_io::backend::mem::MemDevice;

#[test]
fn an_nbd_export_names_itself_and_counts_every_request() {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("nbd.sock");
    let server = NbdServer::new();
    server.listen_unix(&sock).unwrap();
    let dev = Arc::new(MemDevice::new(2048));
    let ex = NbdExport::start(&server, "vol1", dev, NbdExportOptions::default(), &sock).unwrap();
    assert_eq!(ex.kind(), "nbd");
    assert_eq!(
        ex.location(),
        format!("nbd+unix:///vol1?socket={}", sock.display())
    );
    assert_eq!(ex.location(), unix_uri("vol1", &sock));

    let s = UnixStream::connect(&sock).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    let mut c = Client::connect(s, "vol1", true).unwrap();
    assert_eq!(c.write(0, &[7; 4096]).unwrap(), Reply::Ok(vec![]));
    assert_eq!(c.read(0, 2048).unwrap(), Reply::Ok(vec![7; 2048]));
    assert_eq!(c.flush().unwrap(), Reply::Ok(vec![]));
    assert_eq!(
        c.call(CMD_TRIM, 0, 8192, 4096, &[]).unwrap(),
        Reply::Ok(vec![])
    );
    assert_eq!(
        c.call(CMD_WRITE_ZEROES, 0, 16384, 4096, &[]).unwrap(),
        Reply::Ok(vec![])
    );
    assert_eq!(
        c.call(CMD_CACHE, 0, 0, 4096, &[]).unwrap(),
        Reply::Ok(vec![])
    );
    assert!(matches!(
        c.block_status(0, 65536, 0).unwrap(),
        Reply::Extents(_)
    ));
    // An unknown command: counted, and an error.
    assert!(matches!(c.call(42, 0, 0, 512, &[]).unwrap(), Reply::Err(_)));
    let want = ExportStats {
        clients: 1,
        requests: 8,
        errors: 1,
        bytes_read: 2048,
        bytes_written: 4096,
    };
    // Counted as each reply leaves: maybe just after the client has it.
    let t = Instant::now();
    while ex.stats() != want && t.elapsed() < Duration::from_secs(5) {
        std::thread::sleep(Duration::from_millis(5));
    }
    assert_eq!(ex.stats(), want);
    // A client counts while connected, not after it has gone.
    let s2 = UnixStream::connect(&sock).unwrap();
    s2.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    let c2 = Client::connect(s2, "vol1", true).unwrap();
    assert_eq!(ex.stats().clients, 2);
    c2.disconnect().unwrap();
    let t = Instant::now();
    while ex.stats().clients != 1 && t.elapsed() < Duration::from_secs(5) {
        std::thread::sleep(Duration::from_millis(5));
    }
    assert_eq!(ex.stats().clients, 1, "a client that left is still counted");

    // Removed: gone from the server, its client cut.
    Box::new(ex).stop().unwrap();
    assert!(server.exports().is_empty());
    assert!(c.read(0, 512).is_err(), "the client outlived its export");
    // A second export stopped after the server shut down: nothing left to do, no error.
    let ex2 = NbdExport::start(
        &server,
        "vol2",
        Arc::new(MemDevice::new(64)),
        NbdExportOptions::default(),
        &sock,
    )
    .unwrap();
    server.shutdown();
    Box::new(ex2).stop().unwrap();
}

/// The server reports the limits it was given; export names up to 4096 bytes are accepted.
#[test]
fn limits_and_export_name_length() {
    let limits = udm_export::nbd::NbdLimits {
        max_connections: 3,
        drain_timeout: Duration::from_millis(300),
        ..udm_export::nbd::NbdLimits::default()
    };
    let server = NbdServer::with_limits(limits.clone());
    assert_eq!(server.limits(), &limits);
    let dev = || Arc::new(MemDevice::new(8));
    let opts = NbdExportOptions::default;
    server.add_export(&"n".repeat(4096), dev(), opts()).unwrap();
    assert!(server.add_export(&"m".repeat(4097), dev(), opts()).is_err());
    server.shutdown();
}

/// The empty export name selects the only export (as qemu-nbd's default); any other name must
/// match, even when there is only one export to pick.
#[test]
fn the_empty_name_picks_the_only_export_and_no_other_name_does() {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("nbd.sock");
    let server = NbdServer::new();
    server.listen_unix(&sock).unwrap();
    server
        .add_export(
            "disk",
            Arc::new(MemDevice::new(8)),
            NbdExportOptions::default(),
        )
        .unwrap();
    let conn = |name: &str| {
        let s = UnixStream::connect(&sock).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
        Client::connect(s, name, false)
    };
    let mut c = conn("").unwrap();
    assert_eq!(c.read(0, 512).unwrap(), Reply::Ok(vec![0; 512]));
    assert!(
        conn("nosuch").is_err(),
        "an unknown name got the only export"
    );
    server
        .add_export(
            "other",
            Arc::new(MemDevice::new(8)),
            NbdExportOptions::default(),
        )
        .unwrap();
    assert!(
        conn("").is_err(),
        "the empty name picked one of two exports"
    );
    server.shutdown();
}
