//! Real NBD clients against udmd itself (issue 13, item 3): qemu-io, qemu-img, nbdinfo,
//! nbdcopy and fio talk to udmd's exports of a mapped device, an interposed device and a
//! snapshot with its origin, over the Unix socket and over TCP with TLS (PSK). Writes (large,
//! unaligned, FUA, parallel), WRITE_ZEROES, TRIM, FLUSH and BLOCK_STATUS are all exercised and
//! checked where they land: in the backing file, in the interposer, in the snapshot. fio's nbd
//! engine cannot take a PSK file, so its TLS run uses X.509 from libnbd's default place. The
//! in-house client shares the protocol code with the server, so it cannot catch a protocol
//! mistake that both make; these clients can. Skips (loudly) without the clients
//! (scripts/deps.sh).

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests may panic on setup failures

#[path = "real_clients/support.rs"]
mod support;

use udm_testkit::{have, pki, Udmd};

use support::{
    fio_verify_x509, have_clients, run, run_fails, same, source, sparse_disk, Srv, Via, BOTH, MIB,
    SECTORS, SIZE,
};

/// One connection's worth of qemu-io: a large write, an unaligned one across a MiB edge,
/// WRITE_ZEROES with and without unmap over written data, TRIM, a FUA write, parallel writes
/// and FLUSH, each read back (qemu-io verifies the patterns).
const SCRIPT: &[&str] = &[
    "write -P 0xa5 0 1M",
    "read -P 0xa5 0 1M",
    "write -P 0x11 1023k 3k",
    "read -P 0x11 1023k 3k",
    "write -P 0x3c 2M 192k",
    "write -z 2M 64k",
    "read -P 0 2M 64k",
    "read -P 0x3c 2112k 128k",
    "write -P 0x3d 3M 1M",
    "write -z -u 3M 1M",
    "read -P 0 3M 1M",
    "write -P 0x5d 4M 1M",
    "discard 4M 1M",
    "write -f -P 0x99 5M 4k",
    "aio_write -P 0x77 6M 64k",
    "aio_write -P 0x78 7M 64k",
    "aio_flush",
    "flush",
    "read -P 0x99 5M 4k",
    "read -P 0x77 6M 64k",
    "read -P 0x78 7M 64k",
];

/// What [`SCRIPT`] leaves behind, as (offset, length, byte); the trimmed MiB is undefined.
const SCRIPT_RESULT: &[(u64, u64, u8)] = &[
    (0, 1023 << 10, 0xa5),
    (1023 << 10, 3 << 10, 0x11),
    (2 * MIB, 64 << 10, 0),
    ((2 << 20) + (64 << 10), 128 << 10, 0x3c),
    (3 * MIB, MIB, 0),
    (5 * MIB, 4 << 10, 0x99),
    (6 * MIB, 64 << 10, 0x77),
    (7 * MIB, 64 << 10, 0x78),
];

/// Checks that `img` (a device's or a backing file's bytes) holds what [`SCRIPT`] wrote.
fn check_script(img: &[u8], what: &str) {
    for &(off, len, byte) in SCRIPT_RESULT {
        let r = &img[off as usize..(off + len) as usize];
        if let Some(i) = r.iter().position(|b| *b != byte) {
            panic!(
                "{what}: byte {} is {:#x}, qemu-io wrote {byte:#x} there",
                off + i as u64,
                r[i]
            );
        }
    }
}

/// The map of a sparse file with data only in [8M, 12M).
fn sparse_map() -> Vec<(u64, u64, bool)> {
    vec![
        (0, 8 * MIB, false),
        (8 * MIB, 4 * MIB, true),
        (12 * MIB, SIZE - 12 * MIB, false),
    ]
}

#[test]
fn mapped_device_with_real_clients() {
    if !have_clients("mapped_device_with_real_clients") {
        return;
    }
    let s = Srv::start();
    let (img, a) = sparse_disk(&s.d, "a", 3);
    s.d.ok(&[
        "create",
        "vol",
        "--table",
        &format!("0 {SECTORS} linear a 0"),
    ]);
    s.d.ok(&["export", "add", "vol", "--nbd"]);
    s.offers_all("vol");
    // BLOCK_STATUS passes the backing file's holes up through the linear target.
    assert_eq!(s.agreed_map("vol"), sparse_map());
    for via in BOTH {
        same(
            &s.copy_out(via, "vol"),
            &a,
            &format!("vol read over {via:?}"),
        );
    }
    for (seed, via) in (10..).zip(BOTH) {
        s.qemu_io(via, "vol", SCRIPT);
        let what = format!("a.img after qemu-io on vol over {via:?}");
        check_script(&std::fs::read(&img).unwrap(), &what);
        let (src, data) = source(s.d.dir.path(), seed);
        s.copy_in(via, "vol", &src);
        same(&s.copy_out(via, "vol"), &data, &format!("vol over {via:?}"));
        let what = format!("a.img after nbdcopy into vol over {via:?}");
        same(&std::fs::read(&img).unwrap(), &data, &what);
    }
    s.fio_verify("vol");
}

#[test]
fn interposed_device_with_real_clients() {
    if !have_clients("interposed_device_with_real_clients") {
        return;
    }
    let s = Srv::start();
    let (img, b) = sparse_disk(&s.d, "b", 4);
    let cow = s.d.path("b.cow");
    s.d.ok(&[
        "disk",
        "add",
        "bcow",
        "--file",
        cow.to_str().unwrap(),
        "--create",
        "48M",
    ]);
    s.d.ok(&["export", "add", "b", "--nbd"]);
    assert_eq!(s.agreed_map("b"), sparse_map());
    // The interposer diverts b's I/O into a snapshot of b: its writes go to the COW store.
    // A write into one of b's holes makes the snapshot's block status (data there, from the
    // COW) differ from b's own file (still a hole).
    let table = format!("0 {SECTORS} snapshot [interpose]b bcow P 8");
    s.d.ok(&["create", "ip", "--interpose", "--table", &table]);
    s.d.ok(&["export", "add", "ip", "--nbd"]);
    s.offers_all("b");
    s.qemu_io(Via::Unix, "ip", &["write -P 0x3c 20M 64k"]);
    let ip_map = s.agreed_map("ip");
    assert_ne!(ip_map, sparse_map(), "the test cannot tell the two apart");
    assert_eq!(
        s.agreed_map("b"),
        ip_map,
        "BLOCK_STATUS of an interposed device must come from its interposer"
    );
    for (seed, via) in (20..).zip(BOTH) {
        s.qemu_io(via, "b", SCRIPT);
        check_script(
            &s.copy_out(via, "ip"),
            &format!("the interposer after qemu-io on b over {via:?}"),
        );
        let (src, data) = source(s.d.dir.path(), seed);
        s.copy_in(via, "b", &src);
        same(&s.copy_out(via, "b"), &data, &format!("b over {via:?}"));
        same(
            &s.copy_out(via, "ip"),
            &data,
            &format!("ip after nbdcopy into b over {via:?}"),
        );
    }
    s.fio_verify("b");
    same(
        &std::fs::read(&img).unwrap(),
        &b,
        "b.img (every write to b went into the interposer)",
    );
    // Detached, b is itself again.
    s.d.ok(&["export", "remove", "nbd:ip"]);
    s.d.ok(&["remove", "ip"]);
    assert_eq!(s.agreed_map("b"), sparse_map());
    same(
        &s.copy_out(Via::Tls, "b"),
        &b,
        "b after the interposer left",
    );
}

#[test]
fn snapshot_and_its_origin_with_real_clients() {
    if !have_clients("snapshot_and_its_origin_with_real_clients") {
        return;
    }
    let s = Srv::start();
    let img = s.d.disk("c", SIZE, 5);
    let c = std::fs::read(&img).unwrap();
    s.d.ok(&["export", "add", "c", "--nbd"]);
    let o = s.d.udm(&[
        "snapshot",
        "take",
        "c",
        "--cow",
        s.d.path("c.cow").to_str().unwrap(),
        "--size",
        "48M",
        "--export",
        "nbd",
    ]);
    assert!(
        o.status.success(),
        "snapshot take: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    s.offers_all("c");
    for (seed, via) in (30..).zip(BOTH) {
        // c now runs through its snapshot-origin interposer: every write copies out first.
        s.qemu_io(via, "c", SCRIPT);
        let what = format!("c.img after qemu-io on c over {via:?}");
        check_script(&std::fs::read(&img).unwrap(), &what);
        let (src, data) = source(s.d.dir.path(), seed);
        s.copy_in(via, "c", &src);
        same(&s.copy_out(via, "c"), &data, &format!("c over {via:?}"));
        let what = format!("c.img after nbdcopy into c over {via:?}");
        same(&std::fs::read(&img).unwrap(), &data, &what);
        // The snapshot still shows the point in time, and is read-only.
        same(
            &s.copy_out(via, "c-snap"),
            &c,
            &format!("c-snap over {via:?}"),
        );
        let mut w = vec!["qemu-io".to_string()];
        w.extend(s.qemu_image(via, "c-snap"));
        w.extend(["-c".into(), "write -P 1 0 4k".into()]);
        let err = run_fails(&w);
        assert!(
            err.contains("Permission denied"),
            "qemu-io over {via:?}: {err}"
        );
        let info = run(&["nbdinfo", "--json", &s.uri(via, "c-snap")]);
        assert!(info.contains("\"is_read_only\": true"), "{info}");
    }
    s.agreed_map("c");
    s.agreed_map("c-snap");
    s.fio_verify("c");
    same(&s.copy_out(Via::Tls, "c-snap"), &c, "c-snap after fio on c");
}

#[test]
fn fio_over_tls_on_mapped_and_interposed_devices() {
    let test = "fio_over_tls_on_mapped_and_interposed_devices";
    if !have("fio", test) || !have("openssl", test) || !have("setpriv", test) {
        return;
    }
    let certs = tempfile::tempdir().unwrap();
    pki(certs.path());
    let server = certs.path().join("server");
    let d = Udmd::start_with(&[
        "--nbd-listen",
        "127.0.0.1:0",
        "--tls-creds",
        server.to_str().unwrap(),
    ]);
    let port = d.tcp_port();
    d.disk("a", SIZE, 6);
    d.ok(&[
        "create",
        "vol",
        "--table",
        &format!("0 {SECTORS} linear a 0"),
    ]);
    d.ok(&["export", "add", "vol", "--nbd"]);
    let (img, b) = sparse_disk(&d, "b", 7);
    let cow = d.path("b.cow");
    d.ok(&[
        "disk",
        "add",
        "bcow",
        "--file",
        cow.to_str().unwrap(),
        "--create",
        "48M",
    ]);
    d.ok(&["export", "add", "b", "--nbd"]);
    let table = format!("0 {SECTORS} snapshot [interpose]b bcow P 8");
    d.ok(&["create", "ip", "--interpose", "--table", &table]);
    for export in ["vol", "b"] {
        fio_verify_x509(port, export, &certs.path().join("client"));
    }
    same(
        &std::fs::read(&img).unwrap(),
        &b,
        "b.img (fio's writes to b went into the interposer)",
    );
}
