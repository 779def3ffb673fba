//! `udm backup` (issue 11): a chain of one full and five incremental backups of a device under
//! fio verify load, with `kill -9` of udmd between writes and the next backup; each point
//! restored and compared byte for byte with the snapshot it was taken from (kept with
//! `--keep-snapshot` and read over NBD), checked by qemu-img; the dirty bitmap as nbdinfo
//! reads it; a resumed interrupted backup; discards that make an incremental smaller; and bad
//! input refused with its errno and nothing written.

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests may panic on setup failures

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use udm_export::nbd::client::Reply;
use udm_testkit::{bin, have, Udmd};

const SIZE: u64 = 64 << 20;

/// Runs `udm --json ARGS`; returns the `result` of its `done` line.
fn backup_json(d: &Udmd, args: &[&str]) -> serde_json::Value {
    let text = d.udm_json_out(args);
    let last = text.lines().last().expect("output");
    let v: serde_json::Value = serde_json::from_str(last).expect("JSON line");
    assert_eq!(v["event"], "done", "{text}");
    v["result"].clone()
}

/// `udm backup incremental --auto` where an incremental is impossible: a full point `n`.
fn auto_takes_a_full_backup(d: &Udmd, dir: &Path, n: u64) {
    let p = backup_json(
        d,
        &["backup", "incremental", "vol", "--to", s(dir), "--auto"],
    );
    assert_eq!(
        (p["n"].as_u64(), p["kind"].as_str()),
        (Some(n), Some("full")),
        "{p}"
    );
}

/// `udm backup full vol --to DIR` stopped (exit 75) right after the progress record that
/// follows `clusters` data clusters, as a kill would stop it.
fn full_interrupted_after(d: &Udmd, dir: &Path, clusters: u32) {
    let o = Command::new(bin("udm"))
        .env("UDM_RUNTIME_DIR", d.runtime())
        .env("UDM_STATE_DIR", d.state())
        .env("UDM_BACKUP_TEST_ABORT_AFTER", clusters.to_string())
        .args(["backup", "full", "vol", "--to", s(dir)])
        .output()
        .unwrap();
    assert_eq!(
        o.status.code(),
        Some(75),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// Copies NBD export `name` into `to` with udm's own NBD client.
fn save_export(d: &Udmd, name: &str, to: &Path) {
    let mut c = d.nbd_client(name);
    let size = c.export.size;
    let mut out = Vec::with_capacity(size as usize);
    let mut pos = 0;
    while pos < size {
        let n = (size - pos).min(4 << 20);
        match c.read(pos, n as u32).unwrap() {
            Reply::Ok(b) => out.extend_from_slice(&b),
            r => panic!("read of {name} at {pos}: {r:?}"),
        }
        pos += n;
    }
    std::fs::write(to, out).unwrap();
}

/// fio writing random blocks with verification while it runs (and checks at its end).
fn fio_load(d: &Udmd, seconds: u32, seed: u32) -> Child {
    Command::new("fio")
        .current_dir(d.path(""))
        .args([
            "--verify_state_save=0",
            "--name=load",
            "--ioengine=nbd",
            &format!("--uri={}", d.nbd_uri("vol")),
            "--rw=randwrite",
            "--bsrange=4k-64k",
            "--size=48M",
            "--offset=8M",
            "--iodepth=4",
            "--time_based",
            &format!("--runtime={seconds}"),
            "--verify=crc32c",
            "--verify_backlog=64",
            "--verify_fatal=1",
            &format!("--randseed={seed}"),
            "--output-format=terse",
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("fio")
}

fn wait_ok(c: Child, what: &str) {
    let o = c.wait_with_output().unwrap();
    assert!(
        o.status.success(),
        "{what} failed: {}\n{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
}

/// Dirty bytes of the kept snapshot's `qemu:dirty-bitmap:backup-vol`, as nbdinfo maps it.
fn nbdinfo_dirty(d: &Udmd) -> u64 {
    let o = Command::new("nbdinfo")
        .args([
            "--json",
            "--map=qemu:dirty-bitmap:backup-vol",
            &d.nbd_uri("vol-backup"),
        ])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    v.as_array()
        .unwrap()
        .iter()
        .filter(|x| x["type"].as_u64().unwrap() & 1 == 1)
        .map(|x| x["length"].as_u64().unwrap())
        .sum()
}

#[test]
fn chain_under_fio_load_with_kill9_restores_every_point() {
    if !have("fio", "backup chain") {
        return;
    }
    let mut d = Udmd::start();
    d.disk("vol", SIZE, 7);
    d.ok(&["export", "add", "vol", "--nbd"]);
    let dir = d.path("bk");
    let mut snaps: Vec<PathBuf> = Vec::new();
    for n in 0..6u32 {
        // Writes under verification run while the point is taken.
        let load = fio_load(&d, 3, 100 + n);
        std::thread::sleep(std::time::Duration::from_millis(800));
        let kind = if n == 0 { "full" } else { "incremental" };
        let p = backup_json(
            &d,
            &["backup", kind, "vol", "--to", s(&dir), "--keep-snapshot"],
        );
        assert_eq!(p["n"], n, "{p}");
        assert_eq!(p["kind"], kind, "{p}");
        // The snapshot the point was read from, byte for byte.
        let img = d.path(&format!("snap-{n}.raw"));
        save_export(&d, "vol-backup", &img);
        let changed = p["changed_bytes"].as_u64().unwrap();
        let stored = p["data_bytes"].as_u64().unwrap() + p["zero_bytes"].as_u64().unwrap();
        if n > 0 {
            assert!(changed < SIZE, "an incremental copies what changed: {p}");
            assert!(stored <= changed, "{p}");
            if have("nbdinfo", "dirty bitmap of the kept snapshot") {
                assert_eq!(nbdinfo_dirty(&d), changed, "{p}");
            }
        }
        let o = d.udm(&["snapshot", "drop", "vol-backup"]);
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        wait_ok(load, &format!("fio verify load during point {n}"));
        snaps.push(img);
        if n == 2 || n == 4 {
            // Writes acknowledged, then udmd killed before the next backup.
            let mut c = d.nbd_client("vol");
            for b in 0..16u64 {
                let data = vec![n as u8 ^ b as u8; 4096];
                assert!(matches!(c.write(b * 65536, &data), Ok(Reply::Ok(_))));
            }
            drop(c);
            d.kill9();
            d.restart();
        }
    }
    let list = backup_json_list(&d, &dir);
    assert_eq!(list["points"].as_array().unwrap().len(), 6);
    for (n, snap) in snaps.iter().enumerate() {
        let out = d.path(&format!("restored-{n}.raw"));
        let r = backup_json(
            &d,
            &[
                "backup",
                "restore",
                s(&dir),
                "--point",
                &n.to_string(),
                "--to",
                s(&out),
            ],
        );
        assert_eq!(r["point"], n as u64);
        assert!(
            std::fs::read(&out).unwrap() == std::fs::read(snap).unwrap(),
            "point {n} restored differs from its snapshot"
        );
        let v = backup_json(
            &d,
            &["backup", "verify", s(&dir), "--point", &n.to_string()],
        );
        assert_eq!(v["digest"], list["points"][n]["digest"]);
        if have("qemu-img", "qemu-img reads the chain") {
            let img = dir.join(format!("point-{n}.qcow2"));
            let c = Command::new("qemu-img")
                .args(["check", s(&img)])
                .output()
                .unwrap();
            assert!(c.status.success(), "{}", String::from_utf8_lossy(&c.stdout));
            let c = Command::new("qemu-img")
                .args(["compare", "-F", "raw", s(&img), s(snap)])
                .output()
                .unwrap();
            assert!(
                c.status.success(),
                "point {n}: {}",
                String::from_utf8_lossy(&c.stdout)
            );
        }
    }
}

fn backup_json_list(d: &Udmd, dir: &Path) -> serde_json::Value {
    serde_json::from_str(&d.udm_json_out(&["backup", "list", s(dir)])).unwrap()
}

#[test]
fn interrupted_backup_resumes_and_discards_shrink_the_next_point() {
    let d = Udmd::start();
    d.disk("vol", SIZE, 3);
    d.ok(&["export", "add", "vol", "--nbd"]);
    let dir = d.path("bk");
    // Interrupted after 100 of its 1024 data clusters (as a kill would, right after a
    // progress record), then run again: it continues with the same snapshot.
    full_interrupted_after(&d, &dir, 100);
    assert!(dir.join("partial.json").exists());
    assert!(dir.join("point-0.qcow2.part").exists());
    let mut c = d.nbd_client("vol");
    // Written after the snapshot: not in point 0.
    assert!(matches!(c.write(0, &[0xee; 4096]), Ok(Reply::Ok(_))));
    let p = backup_json(&d, &["backup", "full", "vol", "--to", s(&dir)]);
    assert_eq!(p["n"], 0);
    assert_eq!(p["data_bytes"], SIZE);
    assert!(!dir.join("partial.json").exists());
    let r0 = d.path("r0.raw");
    backup_json(&d, &["backup", "restore", s(&dir), "--to", s(&r0)]);
    let orig = d.path("vol.img");
    let (a, b) = (std::fs::read(&r0).unwrap(), std::fs::read(&orig).unwrap());
    assert_eq!(&a[4096..], &b[4096..]);
    assert_ne!(
        &a[..4096],
        &b[..4096],
        "the write after the snapshot is not in point 0"
    );

    // fstrim-like discards of 16 MiB: the next point stores them as zero clusters, not data.
    let trim = c.call(udm_export::nbd::proto::CMD_TRIM, 0, 16 << 20, 16 << 20, &[]);
    assert!(matches!(trim, Ok(Reply::Ok(_))), "{trim:?}");
    drop(c);
    let p = backup_json(&d, &["backup", "incremental", "vol", "--to", s(&dir)]);
    assert_eq!(p["n"], 1);
    assert!(p["zero_bytes"].as_u64().unwrap() >= 16 << 20, "{p}");
    assert!(p["data_bytes"].as_u64().unwrap() <= 64 << 10, "{p}");
    assert!(p["image_bytes"].as_u64().unwrap() < 1 << 20, "{p}");
    let r1 = d.path("r1.raw");
    backup_json(&d, &["backup", "restore", s(&dir), "--to", s(&r1)]);
    assert!(std::fs::read(&r1).unwrap() == std::fs::read(&orig).unwrap());
}

#[test]
fn bad_input_is_refused_with_nothing_written() {
    let d = Udmd::start();
    d.disk("vol", 16 << 20, 5);
    d.disk("other", 16 << 20, 6);
    let dir = d.path("bk");
    let e = d.udm_fails(&["backup", "incremental", "vol", "--to", s(&dir)]);
    assert!(
        e.contains("udm track start vol") && e.contains("[ENOENT]"),
        "{e}"
    );
    assert!(!dir.join("backup.json").exists());
    // --auto: a full backup instead (and tracking starts).
    let p = backup_json(
        &d,
        &["backup", "incremental", "vol", "--to", s(&dir), "--auto"],
    );
    assert_eq!(p["kind"], "full");
    // A directory of another device.
    let e = d.udm_fails(&["backup", "full", "other", "--to", s(&dir)]);
    assert!(
        e.contains("holds backups of vol") && e.contains("[EINVAL]"),
        "{e}"
    );
    // Tracking restarted: writes in between are unknown, so an incremental is refused.
    let o = d.udm(&["track", "stop", "vol"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let o = d.udm(&["track", "start", "vol"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let e = d.udm_fails(&["backup", "incremental", "vol", "--to", s(&dir)]);
    assert!(e.contains("restarted since point 0"), "{e}");
    auto_takes_a_full_backup(&d, &dir, 1);
    let p = backup_json(&d, &["backup", "incremental", "vol", "--to", s(&dir)]);
    assert_eq!(p["n"], 2);
    // Restore refusals: a missing point, an existing file, a point that does not exist.
    let out = d.path("out.raw");
    let e = d.udm_fails(&[
        "backup",
        "restore",
        s(&dir),
        "--point",
        "7",
        "--to",
        s(&out),
    ]);
    assert!(e.contains("no point 7") && e.contains("[ENOENT]"), "{e}");
    std::fs::rename(dir.join("point-1.qcow2"), d.path("moved.qcow2")).unwrap();
    let e = d.udm_fails(&["backup", "restore", s(&dir), "--to", s(&out)]);
    assert!(e.contains("[ENOENT]"), "{e}");
    assert!(!out.exists(), "nothing written on a missing point");
    std::fs::rename(d.path("moved.qcow2"), dir.join("point-1.qcow2")).unwrap();
    std::fs::write(&out, b"keep").unwrap();
    let e = d.udm_fails(&["backup", "restore", s(&dir), "--to", s(&out)]);
    assert!(e.contains("--force") && e.contains("[EEXIST]"), "{e}");
    assert_eq!(std::fs::read(&out).unwrap(), b"keep");
    // Damage: a flipped byte in point 1's data is found by verify, naming the cluster.
    let img = dir.join("point-1.qcow2");
    let mut b = std::fs::read(&img).unwrap();
    let at = b.len() - 1000;
    b[at] ^= 0xff;
    std::fs::write(&img, &b).unwrap();
    let e = d.udm_fails(&["backup", "verify", s(&dir), "--point", "2"]);
    assert!(e.contains("cluster") && e.contains("[EILSEQ]"), "{e}");
    // Damaged sums of the last point: the next incremental fails after taking its snapshot,
    // and leaves neither the snapshot nor a partial point behind.
    let sums = dir.join("point-2.sums");
    let mut b = std::fs::read(&sums).unwrap();
    b[30] ^= 1;
    std::fs::write(&sums, &b).unwrap();
    let e = d.udm_fails(&["backup", "incremental", "vol", "--to", s(&dir)]);
    assert!(e.contains("[EILSEQ]"), "{e}");
    let snaps = d.udm(&["--json", "snapshot", "list"]);
    assert_eq!(
        String::from_utf8_lossy(&snaps.stdout).trim(),
        "[]",
        "no snapshot left"
    );
    assert!(!dir.join("partial.json").exists());
    // A damaged manifest.
    std::fs::write(dir.join("backup.json"), b"{").unwrap();
    let e = d.udm_fails(&["backup", "list", s(&dir)]);
    assert!(e.contains("damaged"), "{e}");
}

/// Interposers stack: with an era target interposing `vol` and a snapshot-origin interposing
/// the era device, a client's writes to `vol` reach the snapshot-origin (which copies the old
/// data out), so a snapshot of the tracked device is a point in time. Before stacking, the
/// redirected writes skipped the second interposer and the snapshot followed the live data.
#[test]
fn snapshot_of_a_tracked_device_is_a_point_in_time() {
    let d = Udmd::start();
    let img = d.disk("vol", 8 << 20, 9);
    d.ok(&["export", "add", "vol", "--nbd"]);
    let o = d.udm(&["track", "start", "vol"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let before = std::fs::read(&img).unwrap();
    d.take_snapshot("vol-era", "cow", &["--name", "s", "--export", "nbd"]);
    let mut c = d.nbd_client("vol");
    for b in 0..64u64 {
        let data = vec![0xa0 ^ b as u8; 65536];
        assert!(matches!(c.write(b * 131072, &data), Ok(Reply::Ok(_))));
    }
    drop(c);
    let snap = d.path("s.raw");
    save_export(&d, "s", &snap);
    assert!(
        std::fs::read(&snap).unwrap() == before,
        "the snapshot changed with the origin"
    );
    assert_ne!(
        std::fs::read(&img).unwrap(),
        before,
        "the writes reached the device"
    );
}

/// A device that grows: the next incremental is refused (EINVAL: what changed beyond the old
/// end is unknown), `--auto` takes a full backup and restarts tracking over the whole device,
/// and incrementals continue from there.
#[test]
fn size_change_needs_a_full_backup() {
    let d = Udmd::start();
    let img = d.disk("d0", 32 << 20, 4);
    d.ok(&["create", "vol", "--table", "0 32768 linear d0 0"]);
    let dir = d.path("bk");
    let p = backup_json(&d, &["backup", "full", "vol", "--to", s(&dir)]);
    assert_eq!(p["data_bytes"], 16 << 20);
    d.ok(&["load", "vol", "--table", "0 65536 linear d0 0"]);
    d.ok(&["resume", "vol"]);
    let e = d.udm_fails(&["backup", "incremental", "vol", "--to", s(&dir)]);
    assert!(e.contains("size change") && e.contains("[EINVAL]"), "{e}");
    auto_takes_a_full_backup(&d, &dir, 1);
    let p = backup_json(&d, &["backup", "incremental", "vol", "--to", s(&dir)]);
    assert_eq!(
        (p["n"].as_u64(), p["kind"].as_str()),
        (Some(2), Some("incremental"))
    );
    let out = d.path("r.raw");
    backup_json(&d, &["backup", "restore", s(&dir), "--to", s(&out)]);
    assert!(std::fs::read(&out).unwrap() == std::fs::read(&img).unwrap());
}

/// An unfinished point whose progress record lost its sums (a crash between the two files)
/// is discarded and taken again, not left blocking every later run.
#[test]
fn an_unusable_partial_point_is_discarded_and_taken_again() {
    let d = Udmd::start();
    let img = d.disk("vol", 16 << 20, 8);
    let dir = d.path("bk");
    full_interrupted_after(&d, &dir, 50);
    // Another device's backup into this directory is refused, not finished as this one.
    d.disk("other", 16 << 20, 9);
    let e = d.udm_fails(&["backup", "full", "other", "--to", s(&dir)]);
    assert!(
        e.contains("unfinished backup of vol") && e.contains("[EINVAL]"),
        "{e}"
    );
    std::fs::remove_file(dir.join(".partial.sums")).unwrap();
    let p = backup_json(&d, &["backup", "full", "vol", "--to", s(&dir)]);
    assert_eq!(p["n"], 0);
    assert!(!dir.join("partial.json").exists());
    let out = d.path("r.raw");
    backup_json(&d, &["backup", "restore", s(&dir), "--to", s(&out)]);
    assert!(std::fs::read(&out).unwrap() == std::fs::read(&img).unwrap());
    let snaps = d.udm(&["--json", "snapshot", "list"]);
    assert_eq!(
        String::from_utf8_lossy(&snaps.stdout).trim(),
        "[]",
        "no snapshot left"
    );
}
