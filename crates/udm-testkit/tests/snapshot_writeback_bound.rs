//! udmd's `--snapshot-writeback-mib`: out-of-range values are refused at start with a message
//! naming the flag, and a snapshot taken under the smallest bound (1 MiB) keeps its point in
//! time while many times that much is written to its origin.
#![allow(clippy::unwrap_used)] // test code

use std::process::Command;
use udm_export::nbd::client::Reply;
use udm_testkit::Udmd;

#[test]
fn out_of_range_bounds_are_refused() {
    for bad in ["0", "4097"] {
        let out = Command::new(udm_testkit::bin_dir().join("udmd"))
            .args(["--snapshot-writeback-mib", bad])
            .env("UDM_RUNTIME_DIR", "/nonexistent/never-created")
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            !out.status.success(),
            "--snapshot-writeback-mib {bad} accepted"
        );
        assert!(
            err.contains("--snapshot-writeback-mib must be 1..=4096"),
            "{bad}: {err}"
        );
    }
}

#[test]
fn a_one_mib_bound_keeps_the_snapshot_point_in_time() {
    const SIZE: u64 = 16 << 20;
    let d = Udmd::start_with(&["--snapshot-writeback-mib", "1"]);
    let img = d.disk("vol", SIZE, 5);
    d.ok(&["export", "add", "vol", "--nbd"]);
    let before = std::fs::read(&img).unwrap();
    d.take_snapshot("vol", "vol.cow", &["--export", "nbd"]);
    // 8 MiB of first writes in 256 KiB requests: eight times the bound.
    let mut c = d.nbd_client("vol");
    let mut model = before.clone();
    for i in 0..32u64 {
        let off = i * (512 << 10);
        let data = vec![(i as u8) ^ 0x5a; 256 << 10];
        assert_eq!(c.write(off, &data).unwrap(), Reply::Ok(Vec::new()));
        model[off as usize..off as usize + data.len()].copy_from_slice(&data);
    }
    assert_eq!(c.flush().unwrap(), Reply::Ok(Vec::new()));
    let mut snap = d.nbd_client("vol-snap");
    assert!(
        udm_testkit::read_whole(&mut snap, SIZE) == before,
        "the snapshot changed"
    );
    assert!(
        udm_testkit::read_whole(&mut c, SIZE) == model,
        "the origin lost writes"
    );
}
