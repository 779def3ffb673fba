//! `udm snapshot take --cow PATH` on a PATH that already holds a persistent store (left by an
//! earlier snapshot) makes a new point in time: the old store's exceptions must not be loaded
//! into the new snapshot (they hold the origin's data of the earlier point), as lvcreate wipes
//! a new snapshot's COW header; a COW that a live snapshot uses is refused untouched.
#![allow(clippy::unwrap_used)] // test code

use udm_export::nbd::client::Reply;
use udm_testkit::Udmd;

#[test]
fn a_reused_cow_file_starts_a_new_point_in_time() {
    const SIZE: u64 = 8 << 20;
    let d = Udmd::start();
    d.disk("vol", SIZE, 9);
    d.ok(&["export", "add", "vol", "--nbd"]);
    let mut c = d.nbd_client("vol");
    d.take_snapshot("vol", "vol.cow", &[]);
    // First writes to the first 1 MiB: the store records their chunks' old data.
    assert_eq!(c.write(0, &[0x11; 1 << 20]).unwrap(), Reply::Ok(Vec::new()));
    assert_eq!(c.flush().unwrap(), Reply::Ok(Vec::new()));
    let o = d.udm(&["snapshot", "drop", "vol-snap"]);
    assert!(
        o.status.success(),
        "drop: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    assert!(d.path("vol.cow").exists(), "drop keeps the COW file");
    // The second point, on the same COW file.
    let at_take = udm_testkit::read_whole(&mut c, SIZE);
    d.take_snapshot("vol", "vol.cow", &["--export", "nbd"]);
    assert_eq!(c.write(0, &[0x22; 2 << 20]).unwrap(), Reply::Ok(Vec::new()));
    assert_eq!(c.flush().unwrap(), Reply::Ok(Vec::new()));
    let mut snap = d.nbd_client("vol-snap");
    let got = udm_testkit::read_whole(&mut snap, SIZE);
    let first_diff = got.iter().zip(&at_take).position(|(a, b)| a != b);
    assert!(
        first_diff.is_none(),
        "the snapshot differs from the origin at its take, first at byte {first_diff:?}"
    );
    let status = d.ok(&["status", "vol-snap"]);
    let used: u64 = status
        .split_whitespace()
        .nth(3)
        .and_then(|u| u.split('/').next())
        .and_then(|u| u.parse().ok())
        .unwrap_or_else(|| panic!("status: {status}"));
    assert!(
        used < 4096 + 64,
        "the new store holds only this point's 2 MiB of copies (+ metadata): {status}"
    );
    // A COW in use by a live snapshot is refused before anything is written to it.
    let cow = d.path("vol.cow");
    let o = d.udm(&[
        "snapshot",
        "take",
        "vol",
        "--name",
        "other",
        "--cow",
        cow.to_str().unwrap(),
    ]);
    assert!(!o.status.success(), "a live snapshot's COW was taken again");
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("already served"), "{err}");
    assert!(
        udm_testkit::read_whole(&mut snap, SIZE) == at_take,
        "the live snapshot changed"
    );
}
