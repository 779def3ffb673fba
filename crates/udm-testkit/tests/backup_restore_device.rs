//! `udm backup restore DIR --to NAME` where NAME is a udm disk or a partition of one: refused
//! without `--force` (EEXIST, nothing written), written over NBD with it, and never taken for
//! a file of that name in the working directory.
#![allow(clippy::unwrap_used)] // test code

use std::path::Path;
use udm_testkit::Udmd;

const SIZE: u64 = 16 << 20;

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// A DOS partition table with one Linux partition of `sectors` from sector 2048.
fn write_mbr(path: &Path, sectors: u32) {
    use std::os::unix::fs::FileExt;
    let mut mbr = [0u8; 512];
    let e = &mut mbr[446..462];
    e[4] = 0x83;
    e[8..12].copy_from_slice(&2048u32.to_le_bytes());
    e[12..16].copy_from_slice(&sectors.to_le_bytes());
    mbr[510] = 0x55;
    mbr[511] = 0xaa;
    std::fs::OpenOptions::new()
        .write(true)
        .open(path)
        .unwrap()
        .write_all_at(&mbr, 0)
        .unwrap();
}

#[test]
fn restore_to_a_disk_or_partition_needs_force_and_writes_the_device() {
    let d = Udmd::start();
    let vol = d.disk("vol", SIZE, 3);
    d.ok(&["export", "add", "vol", "--nbd"]);
    let dir = d.path("bk");
    let o = d.udm(&["backup", "full", "vol", "--to", s(&dir)]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let want = std::fs::read(&vol).unwrap();

    // A disk.
    let other = d.disk("other", SIZE, 7);
    let before = std::fs::read(&other).unwrap();
    let e = d.udm_fails(&["backup", "restore", s(&dir), "--to", "other"]);
    assert!(e.contains("udm device") && e.contains("[EEXIST]"), "{e}");
    assert!(
        std::fs::read(&other).unwrap() == before,
        "written without --force"
    );
    let o = d.udm(&["backup", "restore", s(&dir), "--to", "other", "--force"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(
        std::fs::read(&other).unwrap() == want,
        "the disk holds the point"
    );

    // A partition (pd1: 20 MiB from 1 MiB of a 24 MiB disk).
    let pd = d.disk("pd", 24 << 20, 9);
    write_mbr(&pd, 40960);
    d.ok(&["disk", "remove", "pd"]);
    d.ok(&["disk", "add", "pd", "--file", s(&pd)]);
    let e = d.udm_fails(&["backup", "restore", s(&dir), "--to", "pd1"]);
    assert!(e.contains("udm device") && e.contains("[EEXIST]"), "{e}");
    let o = d.udm(&["backup", "restore", s(&dir), "--to", "pd1", "--force"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let got = std::fs::read(&pd).unwrap();
    assert!(
        got[1 << 20..(1 << 20) + SIZE as usize] == want[..],
        "the partition holds the point"
    );
    assert!(
        !Path::new("pd1").exists() && !d.path("pd1").exists(),
        "no file named pd1"
    );
}
