//! Export lifecycle through udmd (issue "Exports", deliverable 4): a connected NBD client keeps
//! working while its device is suspended (requests wait), reloaded (the new table takes effect)
//! or interposed; removing the export disconnects it cleanly; exports come back after a restart;
//! exports are holders in the claim rules.

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests may panic on setup failures

use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};
use udm_export::nbd::client::{Client, Reply};
use udm_testkit::{fill_pattern, Udmd};

fn pattern(seed: u8, sector: u64, len: usize) -> Vec<u8> {
    let mut v = vec![0u8; len];
    fill_pattern(&mut v, sector, seed);
    v
}

#[test]
fn nbd_client_survives_suspend_reload_interpose_and_sees_clean_removal() {
    let mut d = Udmd::start();
    d.disk("a", 8 << 20, 1);
    d.disk("b", 8 << 20, 2);
    d.ok(&["create", "vol", "--table", "0 8192 linear a 0"]);
    d.ok(&["export", "add", "vol", "--nbd"]);
    let mut c = Client::connect(UnixStream::connect(d.nbd_socket()).unwrap(), "vol", true).unwrap();
    assert_eq!(c.read(0, 512).unwrap(), Reply::Ok(pattern(1, 0, 512)));
    // Suspended: the request waits and completes after resume.
    d.ok(&["suspend", "vol"]);
    let sock = d.nbd_socket();
    let t = std::thread::spawn(move || {
        let mut c2 = Client::connect(UnixStream::connect(sock).unwrap(), "vol", false).unwrap();
        let start = Instant::now();
        let r = c2.read(512, 512).unwrap();
        (start.elapsed(), r)
    });
    std::thread::sleep(Duration::from_millis(300));
    assert!(!t.is_finished(), "a read on a suspended device must wait");
    // Reload while suspended: the held request and the next ones see the new table.
    d.ok(&["load", "vol", "--table", "0 8192 linear b 0"]);
    d.ok(&["resume", "vol"]);
    let (waited, r) = t.join().unwrap();
    assert!(waited >= Duration::from_millis(250));
    assert_eq!(
        r,
        Reply::Ok(pattern(2, 1, 512)),
        "the held read ran on the new table"
    );
    assert_eq!(c.read(0, 512).unwrap(), Reply::Ok(pattern(2, 0, 512)));
    // Interposed under the client: reads pass through a delay interposer.
    d.ok(&[
        "create",
        "slow",
        "--interpose",
        "--table",
        "0 8192 delay vol 0 100",
    ]);
    let start = Instant::now();
    assert_eq!(c.read(0, 512).unwrap(), Reply::Ok(pattern(2, 0, 512)));
    assert!(
        start.elapsed() >= Duration::from_millis(90),
        "the read went through the interposer"
    );
    d.ok(&["remove", "slow"]);
    // Claims: the exported device cannot be claimed by a plain table; a held device cannot be exported.
    let e = d.fails(&["create", "x", "--table", "0 8192 linear vol 0"]);
    assert!(
        e.contains("export nbd:vol") && e.contains("--interpose"),
        "{e}"
    );
    let e = d.fails(&["export", "add", "b", "--nbd"]);
    assert!(e.contains("held by mapped device vol"), "{e}");
    // Counters and clients are listed.
    let list = d.ok(&["export", "list"]);
    assert!(list.contains("nbd:vol"), "{list}");
    let j: serde_json::Value = serde_json::from_str(&d.ok(&["--json", "export", "list"])).unwrap();
    assert!(
        j[0]["clients"].as_u64().unwrap() >= 1 && j[0]["requests"].as_u64().unwrap() >= 4,
        "{j}"
    );
    // Removing the export disconnects the client cleanly: the next request fails, the device is free.
    d.ok(&["export", "remove", "nbd:vol"]);
    assert!(c.read(0, 512).is_err(), "the client must be disconnected");
    d.ok(&["create", "x", "--table", "0 8192 linear vol 0"]);
    d.ok(&["remove", "x"]);
    // Exports come back after a restart.
    d.ok(&["export", "add", "vol", "--nbd", "--read-only"]);
    d.crash_and_restart();
    let mut c =
        Client::connect(UnixStream::connect(d.nbd_socket()).unwrap(), "vol", false).unwrap();
    assert_eq!(c.read(0, 512).unwrap(), Reply::Ok(pattern(2, 0, 512)));
    assert!(
        matches!(c.write(0, &[0u8; 512]).unwrap(), Reply::Err(_)),
        "read-only export refuses writes"
    );
}
