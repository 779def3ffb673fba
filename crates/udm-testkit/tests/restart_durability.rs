//! What a restart keeps. A graceful stop (SIGTERM) flushes every device, so writes a client
//! made without a flush (held in memory by a snapshot origin's write-back) are on disk after
//! it. The state file is replaced atomically, so a `kill -9` in the middle of a save (or a
//! reader at any moment) finds the configuration before the change or after it, whole.

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests may panic on setup failures

use rand::{Rng, SeedableRng};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use udm_export::nbd::client::Reply;
use udm_proto::Request;
use udm_testkit::Udmd;

const SIZE: u64 = 16 << 20;
/// Written without a flush before each stop, [`HELD_WRITES`] times, each time to chunks the
/// snapshot has not copied yet: every write is held by the origin's write-back when it is
/// acknowledged.
const WRITE: usize = 64 << 10;
const HELD_WRITES: usize = 4;
/// Delay of every write to the COW: the write-back still holds the data when SIGTERM comes.
const COW_DELAY_MS: u32 = 300;

#[test]
fn graceful_restart_keeps_unflushed_snapshot_origin_writes() {
    let mut d = Udmd::start();
    let img = d.disk("vol", SIZE, 9);
    udm_testkit::write_pattern_file(&d.path("cow.img"), SIZE, 0);
    d.ok(&[
        "disk",
        "add",
        "cow",
        "--file",
        d.path("cow.img").to_str().unwrap(),
    ]);
    // The snapshot as `udm snapshot take` makes it, with its COW behind a delay.
    let sectors = SIZE / 512;
    let delay = format!("0 {sectors} delay cow 0 0 cow 0 {COW_DELAY_MS}");
    d.ok(&["create", "slowcow", "--table", &delay]);
    let origin = format!("0 {sectors} snapshot-origin vol");
    d.ok(&["create", "vol-origin", "--interpose", "--table", &origin]);
    d.ok(&["suspend", "vol-origin"]);
    let snap = format!("0 {sectors} snapshot vol slowcow P 8");
    d.ok(&["create", "vol-snap", "--interpose", "--table", &snap]);
    d.ok(&["resume", "vol-origin"]);
    d.ok(&["export", "add", "vol", "--nbd"]);
    d.ok(&["export", "add", "vol-snap", "--nbd"]);
    let point_in_time = std::fs::read(&img).unwrap();
    let mut want = point_in_time.clone();
    let mut rng = rand::rngs::StdRng::seed_from_u64(0x7e57);
    let mut slots: Vec<usize> = (0..SIZE as usize / WRITE).collect();
    for round in 0..2 {
        let mut c = d.nbd_client("vol");
        for _ in 0..HELD_WRITES {
            let at = slots.swap_remove(rng.gen_range(0..slots.len())) * WRITE;
            let mut data = vec![0u8; WRITE];
            rng.fill(&mut data[..]);
            assert!(matches!(c.write(at as u64, &data).unwrap(), Reply::Ok(_)));
            want[at..at + WRITE].copy_from_slice(&data);
        }
        // No flush: SIGTERM right away, while the write-back still holds the data.
        assert!(d.stop(), "udmd did not stop cleanly; log:\n{}", d.log());
        drop(c);
        d.restart();
        let got = udm_testkit::read_whole(&mut d.nbd_client("vol"), SIZE);
        if let Some(first) = got.iter().zip(&want).position(|(a, b)| a != b) {
            panic!("round {round}: an acknowledged write is lost over a graceful restart (first difference at byte {first})");
        }
        assert!(
            udm_testkit::read_whole(&mut d.nbd_client("vol-snap"), SIZE) == point_in_time,
            "round {round}: the snapshot is not the point-in-time image"
        );
    }
}

/// Devices in the recorded state, so that a save takes a while (a save in place would leave a
/// torn file for long enough to be seen).
const DEVICES: usize = 200;

/// The mapped device names recorded in state.json, or why the file is not a whole state.
fn recorded_names(state: &Path) -> Result<Vec<String>, String> {
    let text = std::fs::read(state.join("state.json")).map_err(|e| e.to_string())?;
    let v: serde_json::Value = serde_json::from_slice(&text)
        .map_err(|e| format!("state.json does not parse ({} bytes): {e}", text.len()))?;
    let mapped = v["registry"]["mapped"]
        .as_array()
        .ok_or_else(|| format!("state.json has no mapped devices: {v}"))?;
    Ok(mapped
        .iter()
        .filter_map(|m| m["name"].as_str().map(String::from))
        .collect())
}

/// Checks that the recorded state is the configuration before or after a rename of `d0`
/// (to `x0` and back; the others, `d1`..., never change); returns `d0`'s recorded name.
fn check_recorded(state: &Path, when: &str) -> Result<String, String> {
    let mut names = recorded_names(state).map_err(|e| format!("{when}: {e}"))?;
    names.sort_by_key(|n| n[1..].parse::<usize>().unwrap_or(usize::MAX));
    let first = names.first().cloned().unwrap_or_default();
    let rest_ok = names.len() == DEVICES
        && names[1..]
            .iter()
            .enumerate()
            .all(|(i, n)| *n == format!("d{}", i + 1));
    if (first == "d0" || first == "x0") && rest_ok {
        Ok(first)
    } else {
        Err(format!(
            "{when}: state.json holds neither the old nor the new configuration: {} devices, \
             first {first:?}",
            names.len()
        ))
    }
}

#[test]
fn state_json_is_whole_at_every_kill_during_saves() {
    // d0 is created once (`--create` makes what is missing at every start).
    let create: Vec<String> = (1..DEVICES)
        .map(|i| format!("d{i},,,rw,0 8 zero"))
        .collect();
    let mut d = Udmd::start_with(&["--create", &create.join(";")]);
    d.ok(&["create", "d0", "--table", "0 8 zero"]);
    let mut rng = rand::rngs::StdRng::seed_from_u64(0x57a7e);
    let mut name = check_recorded(&d.state(), "at start").unwrap_or_else(|e| panic!("{e}"));
    let mut saves = 0;
    for kill in 0..30 {
        // Renames back and forth, one save each, until the daemon dies; meanwhile a reader
        // finds the file whole every time it looks.
        let stop = Arc::new(AtomicBool::new(false));
        let torn: Arc<Mutex<Option<String>>> = Arc::default();
        let mut ctl = d.client();
        let renamer = {
            let mut name = name.clone();
            std::thread::spawn(move || {
                let mut n = 0;
                loop {
                    let new = if name == "d0" { "x0" } else { "d0" };
                    let r = ctl.call(Request::Rename {
                        name: name.clone(),
                        new_name: Some(new.into()),
                        set_uuid: None,
                    });
                    match r {
                        Ok(_) => {}
                        Err(udm_proto::ClientError::Refused(e)) => {
                            panic!("rename of {name} refused: {e:?}")
                        }
                        Err(_) => return n, // the daemon was killed
                    }
                    name = new.into();
                    n += 1;
                }
            })
        };
        let reader = {
            let (stop, torn) = (stop.clone(), torn.clone());
            let state = d.state();
            std::thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    if let Err(e) = check_recorded(&state, "while saving") {
                        *torn.lock().unwrap() = Some(e);
                        return;
                    }
                }
            })
        };
        std::thread::sleep(Duration::from_millis(rng.gen_range(20..200)));
        stop.store(true, Ordering::Relaxed);
        reader.join().unwrap();
        d.kill9();
        saves += renamer.join().unwrap();
        if let Some(e) = torn.lock().unwrap().take() {
            panic!("kill {kill}: {e}");
        }
        name = check_recorded(&d.state(), &format!("after kill {kill}"))
            .unwrap_or_else(|e| panic!("{e}"));
        d.crash_and_restart();
        assert!(
            d.ok(&["info", &name]).contains("ACTIVE"),
            "after kill {kill}: {name} recorded but not restored"
        );
    }
    assert!(saves >= 30, "only {saves} saves in 30 rounds");
}
