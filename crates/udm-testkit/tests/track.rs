//! `udm track` (issue 11, deliverables 3 and 5): change tracking on a device in use, through
//! an interposed era target. A client connected before tracking starts has its writes
//! tracked; a checkpoint starts a new era and later writes count from it; after `kill -9` of
//! udmd between acknowledged writes the era table comes back and every block written since
//! the checkpoint is reported (over-reporting allowed, under-reporting never); `stop` removes
//! the era device while clients stay connected; bad input is a clear error with its errno.

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests may panic on setup failures

use rand::{Rng, SeedableRng};
use std::collections::BTreeSet;
use std::os::unix::net::UnixStream;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use udm_export::nbd::client::{Client, Reply};
use udm_testkit::Udmd;

const SIZE: u64 = 16 << 20;
const BLOCK: u64 = 4096;

fn udm_json(d: &Udmd, args: &[&str]) -> serde_json::Value {
    serde_json::from_str(&d.udm_json_out(args)).expect("JSON output")
}

fn start_fails(d: &Udmd, meta: &str, block_size: &str) -> String {
    let args = [
        "track",
        "start",
        "vol",
        "--meta",
        meta,
        "--block-size",
        block_size,
    ];
    d.udm_fails(&args)
}

/// The blocks `udm track status --since ERA` reports written.
fn written_since(d: &Udmd, since: u64) -> BTreeSet<u64> {
    let v = udm_json(
        d,
        &["track", "status", "vol", "--since", &since.to_string()],
    );
    assert_eq!(v["since"], since);
    let mut out = BTreeSet::new();
    for r in v["written"].as_array().expect("written ranges") {
        let (a, b) = (r[0].as_u64().unwrap(), r[1].as_u64().unwrap());
        out.extend(a..b);
    }
    assert_eq!(v["written_blocks"], out.len() as u64, "{v}");
    out
}

fn write_ok(c: &mut Client<UnixStream>, blk: u64) {
    let data = vec![blk as u8 ^ 0x5a; BLOCK as usize];
    assert!(matches!(c.write(blk * BLOCK, &data), Ok(Reply::Ok(_))));
}

fn start(d: &Udmd) {
    let meta = d.path("vol.era");
    let v = udm_json(
        d,
        &[
            "track",
            "start",
            "vol",
            "--meta",
            meta.to_str().unwrap(),
            "--block-size",
            "4K",
        ],
    );
    assert_eq!(v["era_device"], "vol-era");
    assert_eq!(v["block_sectors"], 8);
    assert!(meta.exists());
}

#[test]
fn tracking_survives_kill9_and_stop_keeps_clients() {
    let mut d = Udmd::start();
    d.disk("vol", SIZE, 3);
    d.ok(&["export", "add", "vol", "--nbd"]);
    // Connected before tracking starts: its writes are tracked all the same.
    let mut c = d.nbd_client("vol");
    start(&d);
    let st = udm_json(&d, &["track", "status", "vol"]);
    assert_eq!(st["block_sectors"], 8);
    assert_eq!(st["nr_blocks"], SIZE / BLOCK);
    assert_eq!(st["written_blocks"], 0, "{st}");
    assert!(st["meta_used"].as_u64().unwrap() > 0, "{st}");
    for b in [1, 5, 100] {
        write_ok(&mut c, b);
    }
    assert_eq!(written_since(&d, 1), BTreeSet::from([1, 5, 100]));

    // A backup point: writes after it count from the new era, not the blocks before.
    let cp = udm_json(&d, &["track", "checkpoint", "vol"]);
    let era = cp["era"].as_u64().unwrap();
    assert!(era > 1, "{cp}");
    for b in [7, 200] {
        write_ok(&mut c, b);
    }
    assert_eq!(written_since(&d, era), BTreeSet::from([7, 200]));
    assert_eq!(written_since(&d, 1), BTreeSet::from([1, 5, 7, 100, 200]));
    drop(c);

    // kill -9 between acknowledged writes, several times at random moments: after each
    // restart the era table is back, every block acknowledged and flushed since the checkpoint
    // is reported, and so is every block whose content changed (writes to unmarked blocks are
    // acknowledged while their bits commit: unflushed ones may be lost at the kill, as with
    // any volatile write cache, but never land unrecorded).
    let mut want: BTreeSet<u64> = BTreeSet::from([7, 200]);
    let mut rng = rand::rngs::StdRng::seed_from_u64(0x7ac4);
    for round in 0..5 {
        let acked: Arc<Mutex<Vec<u64>>> = Arc::default();
        let mut c = d.nbd_client("vol");
        let (a, seed) = (acked.clone(), rng.gen::<u64>());
        let writer = std::thread::spawn(move || {
            let mut r = rand::rngs::StdRng::seed_from_u64(seed);
            let mut unflushed = Vec::new();
            loop {
                let blk = r.gen_range(0..SIZE / BLOCK);
                match c.write(blk * BLOCK, &vec![0xc0 + round as u8; BLOCK as usize]) {
                    Ok(Reply::Ok(_)) => unflushed.push(blk),
                    Err(_) => return Ok(()),
                    Ok(e) => return Err(format!("write of {blk} got an error reply: {e:?}")),
                }
                if unflushed.len() == 4 {
                    match c.flush() {
                        Ok(Reply::Ok(_)) => a.lock().unwrap().append(&mut unflushed),
                        Err(_) => return Ok(()),
                        Ok(e) => return Err(format!("flush got an error reply: {e:?}")),
                    }
                }
            }
        });
        let deadline = Instant::now() + Duration::from_secs(20);
        while acked.lock().unwrap().len() < 20 {
            assert!(Instant::now() < deadline, "round {round}: no progress");
            assert!(!writer.is_finished(), "round {round}: writer stopped");
            std::thread::sleep(Duration::from_millis(1));
        }
        std::thread::sleep(Duration::from_millis(rng.gen_range(0..30)));
        d.crash_and_restart();
        writer.join().unwrap().unwrap();
        want.extend(acked.lock().unwrap().iter());
        let got = written_since(&d, era);
        let missing: Vec<_> = want.difference(&got).collect();
        assert!(
            missing.is_empty(),
            "round {round}: acknowledged writes not reported since era {era}: {missing:?}"
        );
        assert!(
            !got.contains(&1) && !got.contains(&5),
            "round {round}: before the checkpoint"
        );
        let mut c = d.nbd_client("vol");
        for chunk in 0..SIZE >> 20 {
            let Ok(Reply::Ok(data)) = c.read(chunk << 20, 1 << 20) else {
                panic!("round {round}: read after restart");
            };
            for (i, blk) in data.chunks(BLOCK as usize).enumerate() {
                let b = (chunk << 20) / BLOCK + i as u64;
                let changed = (0..=round as u8).any(|r| blk.iter().all(|&x| x == 0xc0 + r));
                assert!(
                    !changed || got.contains(&b),
                    "round {round}: block {b} changed on the device but is not reported"
                );
            }
        }
    }
    let st = udm_json(&d, &["track", "status", "vol"]);
    assert_eq!(st["era_device"], "vol-era");

    // stop: the era device goes, a connected client keeps writing and reading.
    let mut c = d.nbd_client("vol");
    write_ok(&mut c, 9);
    let o = d.udm(&["track", "stop", "vol"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(!d.ok(&["ls"]).contains("vol-era"));
    write_ok(&mut c, 10);
    let data = c.read(10 * BLOCK, BLOCK as u32).expect("read after stop");
    assert!(matches!(data, Reply::Ok(ref v) if v[..] == vec![10u8 ^ 0x5a; BLOCK as usize][..]));
    assert!(d.path("vol.era").exists(), "stop keeps the metadata file");
    let e = d.udm_fails(&["track", "status", "vol"]);
    assert!(e.contains("not tracked") && e.contains("[ENOENT]"), "{e}");
}

#[test]
fn bad_input_is_a_clear_error() {
    let d = Udmd::start();
    d.disk("vol", SIZE, 1);
    let meta = d.path("vol.era");
    let meta = meta.to_str().unwrap();
    let e = d.udm_fails(&["track", "start", "nope", "--meta", meta]);
    assert!(
        e.contains("nope does not exist") && e.contains("[ENXIO]"),
        "{e}"
    );
    let e = d.udm_fails(&["track", "status", "vol"]);
    assert!(
        e.contains("vol is not tracked") && e.contains("[ENOENT]"),
        "{e}"
    );
    let e = d.udm_fails(&["track", "checkpoint", "nope"]);
    assert!(e.contains("[ENXIO]"), "{e}");
    let e = start_fails(&d, meta, "5000");
    assert!(
        e.contains("--block-size 5000") && e.contains("[EINVAL]"),
        "{e}"
    );
    assert!(!d.path("vol.era").exists(), "nothing created on bad input");
    start(&d);
    let e = d.udm_fails(&["track", "start", "vol", "--meta", meta]);
    assert!(
        e.contains("tracked already") && e.contains("[EEXIST]"),
        "{e}"
    );
    // The same metadata with another block size: the era target refuses, nothing is left.
    let o = d.udm(&["track", "stop", "vol"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let e = start_fails(&d, meta, "8K");
    assert!(e.contains("[EINVAL]"), "{e}");
    assert!(!d.ok(&["ls"]).contains("vol-era"));
    assert!(
        d.path("vol.era").exists(),
        "an existing metadata file is kept on failure"
    );
    let o = d.udm(&["track", "stop", "vol", "--delete"]);
    assert!(!o.status.success(), "stop of an untracked device fails");
    start(&d);
    let o = d.udm(&["track", "stop", "vol", "--delete"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(
        !d.path("vol.era").exists(),
        "--delete removes the metadata file"
    );
}

/// Without `--meta` the metadata goes to STATE_DIR/track/DEV.era (the CLI's default state
/// directory, here from `UDM_STATE_DIR`), and `status` prints its place and the counts.
#[test]
fn default_metadata_file_and_human_status() {
    let d = Udmd::start();
    d.disk("vol", SIZE, 2);
    d.ok(&["export", "add", "vol", "--nbd"]);
    let state = d.path("cli-state");
    let udm = |args: &[&str]| {
        let o = std::process::Command::new(udm_testkit::bin("udm"))
            .env("UDM_RUNTIME_DIR", d.runtime())
            .env("UDM_STATE_DIR", &state)
            .args(args)
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(o.status.success(), "udm {args:?}: {err}");
        String::from_utf8_lossy(&o.stdout).into_owned()
    };
    let out = udm(&["track", "start", "vol"]);
    let meta = state.join("track/vol.era");
    assert!(out.contains(&meta.display().to_string()), "{out}");
    assert!(out.contains("128-sector blocks"), "64K by default: {out}");
    assert!(meta.exists());
    let mut c = d.nbd_client("vol");
    write_ok(&mut c, 0);
    write_ok(&mut c, 40); // 4K blocks 0 and 40: 64K blocks 0 and 2
    let out = udm(&["track", "status", "vol"]);
    assert!(out.contains("written since era 1: 2/256 blocks"), "{out}");
    assert!(
        out.contains(&format!("vol-era-meta ({})", meta.display())),
        "{out}"
    );
    udm(&["track", "stop", "vol", "--delete"]);
    assert!(!meta.exists());
    write_ok(&mut c, 41);
}
