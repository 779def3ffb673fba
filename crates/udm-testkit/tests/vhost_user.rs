//! vhost-user-blk export through udmd (issue 9, deliverable 2), driven on the host by
//! rust-vmm's vhost-user frontend: the handshake a VMM does (owner, features, protocol
//! features, queue count, config space), listing, claims, persistence across a restart, and
//! removal and SIGTERM that stay bounded while a frontend is connected. Guest I/O through a real
//! QEMU and Linux virtio-blk driver is tests/vmlab/vhost-user-blk.sh (vhost_user_vmlab.rs).

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests may panic on setup failures

use std::path::Path;
use std::time::{Duration, Instant};
use udm_testkit::Udmd;
use vhost::vhost_user::message::{VhostUserConfigFlags, VhostUserProtocolFeatures};
use vhost::vhost_user::{Frontend, VhostUserFrontend};
use vhost::VhostBackend;
use virtio_bindings::virtio_blk::*;

/// What a VMM learns at attach: (features, queues, capacity in sectors, num_queues field).
fn handshake(sock: &Path) -> (Frontend, u64, u64, u64, u16) {
    let mut f = Frontend::connect(sock, 8).expect("connect");
    f.set_owner().expect("set_owner");
    let features = f.get_features().expect("get_features");
    f.set_features(features).expect("set_features");
    let pf = f.get_protocol_features().expect("protocol features");
    assert!(pf.contains(VhostUserProtocolFeatures::CONFIG | VhostUserProtocolFeatures::MQ));
    f.set_protocol_features(pf).expect("set protocol features");
    let queues = f.get_queue_num().expect("queue num");
    let (_, cfg) = f
        .get_config(0, 60, VhostUserConfigFlags::WRITABLE, &[0u8; 60])
        .expect("get_config");
    let capacity = u64::from_le_bytes(cfg[0..8].try_into().unwrap());
    let nq = u16::from_le_bytes(cfg[34..36].try_into().unwrap());
    (f, features, queues, capacity, nq)
}

#[test]
fn vhost_user_export_handshake_listing_claims_restart_and_bounded_removal() {
    let mut d = Udmd::start();
    d.disk("a", 8 << 20, 1);
    d.ok(&["create", "vol", "--table", "0 8192 linear a 0"]);
    let sock = d.path("vol.sock");
    let s = sock.to_str().unwrap();
    let out = d.ok(&[
        "export",
        "add",
        "vol",
        "--vhost-user",
        s,
        "--num-queues",
        "2",
    ]);
    assert!(out.contains(&format!("vhost-user:{s}")), "{out}");
    let (f, features, queues, capacity, nq) = handshake(&sock);
    for bit in [
        VIRTIO_BLK_F_FLUSH,
        VIRTIO_BLK_F_DISCARD,
        VIRTIO_BLK_F_WRITE_ZEROES,
        VIRTIO_BLK_F_MQ,
    ] {
        assert_ne!(features & (1 << bit), 0, "feature {bit}: {features:#x}");
    }
    assert_eq!(features & (1 << VIRTIO_BLK_F_RO), 0);
    assert_eq!((queues, capacity, nq), (2, 8192, 2));

    let list = d.ok(&["export", "list"]);
    assert!(list.contains("vhost-user") && list.contains(s), "{list}");
    let j: serde_json::Value = serde_json::from_str(&d.ok(&["--json", "export", "list"])).unwrap();
    assert_eq!(j[0]["clients"].as_u64(), Some(1), "{j}");
    // The export holds its device like the other exports.
    let e = d.fails(&["create", "x", "--table", "0 8192 linear vol 0"]);
    assert!(e.contains(&format!("export vhost-user:{s}")), "{e}");
    // A second export on the same socket is refused.
    let e = d.fails(&["export", "add", "a", "--vhost-user", s]);
    assert!(e.contains("exists") || e.contains("in use"), "{e}");

    // SIGTERM with the frontend still connected is bounded, and the export comes back.
    let t = Instant::now();
    d.restart();
    assert!(t.elapsed() < Duration::from_secs(10), "{:?}", t.elapsed());
    drop(f);
    let list = d.ok(&["export", "list"]);
    assert!(list.contains(s), "{list}");
    let (f, _, queues, capacity, _) = handshake(&sock);
    assert_eq!((queues, capacity), (2, 8192));

    // Removal with the frontend connected is bounded and removes the socket.
    let t = Instant::now();
    d.ok(&["export", "remove", &format!("vhost-user:{s}")]);
    assert!(t.elapsed() < Duration::from_secs(5), "{:?}", t.elapsed());
    assert!(!sock.exists());
    drop(f);
    d.ok(&["create", "x", "--table", "0 8192 linear vol 0"]);
    d.ok(&["remove", "x"]);

    // Read-only export: the RO feature, no discard.
    d.ok(&["export", "add", "vol", "--vhost-user", s, "-r"]);
    let (_f, features, queues, _, _) = handshake(&sock);
    assert_ne!(features & (1 << VIRTIO_BLK_F_RO), 0);
    assert_eq!(features & (1 << VIRTIO_BLK_F_DISCARD), 0);
    assert_eq!(queues, 1);
    d.assert_no_panic("end");
}
