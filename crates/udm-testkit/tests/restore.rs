//! A restart never erases configuration (issue "Trustworthy daemon", item 5): a backing file
//! missing at start-up leaves its disk, the tables naming it (a snapshot stack, an interposer)
//! and their NBD exports recorded and listed as unavailable with the reason; they come back when
//! the file does (next start, the periodic retry, or `udmsetup disk retry`). Item 10a: a table
//! naming an absolute path opens it on demand, across restarts, and releases it after `remove`.

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests may panic on setup failures

use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::time::{Duration, Instant};
use udm_export::nbd::client::{Client, Reply};
use udm_testkit::{fill_pattern, Udmd};

const SECTORS: u64 = 16384;

fn pattern(seed: u8, sector: u64, len: usize) -> Vec<u8> {
    let mut v = vec![0u8; len];
    fill_pattern(&mut v, sector, seed);
    v
}

fn state(d: &Udmd) -> serde_json::Value {
    let text = std::fs::read_to_string(d.state().join("state.json")).unwrap();
    serde_json::from_str(&text).unwrap()
}

fn json(d: &Udmd, args: &[&str]) -> serde_json::Value {
    let mut a = vec!["--json"];
    a.extend_from_slice(args);
    serde_json::from_str(&d.ok(&a)).unwrap()
}

fn nbd(d: &Udmd, name: &str) -> std::io::Result<Client<UnixStream>> {
    Client::connect(UnixStream::connect(d.nbd_socket())?, name, false)
}

/// d0 (data) + c0 (COW); lin on d0; origin + snap (a persistent snapshot of lin); trace
/// interposing d0; origin and snap exported over NBD. A write through the origin after the
/// snapshot, so the two differ at sector 0. Returns d0's path.
fn stack(d: &Udmd) -> PathBuf {
    let d0 = d.disk("d0", SECTORS * 512, 1);
    let c0 = d.path("c0.img");
    d.ok(&[
        "disk",
        "add",
        "c0",
        "--file",
        c0.to_str().unwrap(),
        "--create",
        "4M",
    ]);
    d.ok(&["create", "lin", "--table", "0 16384 linear d0 0"]);
    d.ok(&["create", "origin", "--table", "0 16384 snapshot-origin lin"]);
    d.ok(&["create", "snap", "--table", "0 16384 snapshot lin c0 P 8"]);
    d.ok(&[
        "create",
        "trace",
        "--interpose",
        "--table",
        "0 16384 delay d0 0 0",
    ]);
    d.ok(&["export", "add", "origin", "--nbd"]);
    d.ok(&["export", "add", "snap", "--nbd"]);
    let mut c = nbd(d, "origin").unwrap();
    assert!(matches!(c.write(0, &[0xab; 4096]).unwrap(), Reply::Ok(_)));
    assert!(matches!(c.flush().unwrap(), Reply::Ok(_)));
    check_data(d);
    d0
}

/// Both exports serve the full size and the right data.
fn check_data(d: &Udmd) {
    let mut o = nbd(d, "origin").unwrap();
    assert_eq!(o.export.size, SECTORS * 512);
    assert_eq!(o.read(0, 512).unwrap(), Reply::Ok(vec![0xab; 512]));
    assert_eq!(o.read(8 * 512, 512).unwrap(), Reply::Ok(pattern(1, 8, 512)));
    let mut s = nbd(d, "snap").unwrap();
    assert_eq!(s.export.size, SECTORS * 512);
    assert_eq!(s.read(0, 512).unwrap(), Reply::Ok(pattern(1, 0, 512)));
    assert_eq!(
        s.read(9000 * 512, 512).unwrap(),
        Reply::Ok(pattern(1, 9000, 512))
    );
}

/// Everything is listed as unavailable with the reason naming the missing file, the exports are
/// not served, operations fail with ENODEV naming the file, and the record is unchanged.
fn check_unavailable(d: &Udmd, missing: &str, recorded: &serde_json::Value) {
    assert_eq!(&state(d), recorded, "state.json lost configuration");
    let disks = d.ok(&["disk", "list"]);
    let line = disks.lines().find(|l| l.starts_with("d0 ")).unwrap();
    assert!(
        line.contains("unavailable") && line.contains(missing),
        "{disks}"
    );
    let j = json(d, &["disk", "list"]);
    let d0 = j.as_array().unwrap().iter().find(|x| x["name"] == "d0");
    assert!(
        d0.unwrap()["unavailable"]
            .as_str()
            .unwrap()
            .contains(missing),
        "{j}"
    );
    let ls = d.ok(&["ls"]);
    for n in ["lin", "origin", "snap", "trace"] {
        let l = ls
            .lines()
            .find(|l| l.starts_with(&format!("{n}\t")))
            .unwrap();
        assert!(l.contains("unavailable"), "{ls}");
    }
    let info = d.ok(&["info", "snap"]);
    assert!(
        info.contains("Unavailable:") && info.contains("lin"),
        "{info}"
    );
    let info = d.ok(&["info", "lin"]);
    assert!(info.contains(missing), "{info}");
    let j = json(d, &["info", "origin"]);
    assert!(j[0]["unavailable"].is_string(), "{j}");
    let j = json(d, &["ls"]);
    assert!(
        j.as_array()
            .unwrap()
            .iter()
            .any(|x| x["name"] == "trace" && x["unavailable"].is_string()),
        "{j}"
    );
    let st = String::from_utf8_lossy(&d.udm(&["status"]).stdout).into_owned();
    // d0, the four mapped devices and the two exports.
    assert!(st.contains("unavailable: 7 "), "{st}");
    let ex = d.ok(&["export", "list"]);
    assert!(
        ex.contains("nbd:origin") && ex.contains("unavailable"),
        "{ex}"
    );
    // The recorded table is still shown.
    assert!(
        d.ok(&["table", "snap"]).contains("snapshot lin c0 P 8"),
        "{}",
        d.ok(&["table", "snap"])
    );
    assert!(
        nbd(d, "origin").is_err(),
        "an unavailable export is not served"
    );
    let e = d.fails(&["suspend", "lin"]);
    assert!(e.contains(missing) && e.contains("ENODEV"), "{e}");
    let e = d.fails(&["create", "x", "--table", "0 8 linear d0 0"]);
    assert!(e.contains(missing), "{e}");
    // Failures changed nothing recorded.
    assert_eq!(&state(d), recorded);
}

fn check_back(d: &Udmd, recorded: &serde_json::Value) {
    let j = json(d, &["disk", "list"]);
    assert!(
        j.as_array()
            .unwrap()
            .iter()
            .all(|x| x["unavailable"].is_null()),
        "{j}"
    );
    let j = json(d, &["info"]);
    assert!(
        j.as_array()
            .unwrap()
            .iter()
            .all(|x| x["unavailable"].is_null() && x["live_present"] == true),
        "{j}"
    );
    let info = d.ok(&["info", "trace"]);
    assert!(info.contains("attached"), "{info}");
    check_data(d);
    assert_eq!(&state(d), recorded);
}

/// udmd started with `args`, with the [`stack`] recorded and then restarted with d0's file
/// moved away: everything is kept as unavailable. Returns the daemon, d0's path, where the file
/// is now and the recorded state.
fn restarted_without_d0(args: &[&str]) -> (Udmd, PathBuf, PathBuf, serde_json::Value) {
    let mut d = Udmd::start_with(args);
    let d0 = stack(&d);
    let recorded = state(&d);
    assert!(d.stop());
    let away = d.path("d0.away");
    std::fs::rename(&d0, &away).unwrap();
    d.restart();
    check_unavailable(&d, d0.to_str().unwrap(), &recorded);
    (d, d0, away, recorded)
}

fn wait_until(what: &str, timeout: Duration, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn missing_backing_file_at_start_keeps_everything_until_it_returns() {
    let (mut d, d0, away, recorded) = restarted_without_d0(&[]);
    // A second start while still missing loses nothing either.
    d.crash_and_restart();
    check_unavailable(&d, d0.to_str().unwrap(), &recorded);
    assert!(d.stop());
    std::fs::rename(&away, &d0).unwrap();
    d.restart();
    check_back(&d, &recorded);
}

#[test]
fn returning_file_is_picked_up_by_the_periodic_retry() {
    let (d, d0, away, recorded) = restarted_without_d0(&["--retry-interval", "1"]);
    std::fs::rename(&away, &d0).unwrap();
    wait_until("the exports to come back", Duration::from_secs(20), || {
        nbd(&d, "snap").is_ok()
    });
    check_back(&d, &recorded);
}

#[test]
fn returning_file_is_picked_up_by_disk_retry() {
    let (mut d, d0, away, recorded) = restarted_without_d0(&["--retry-interval", "3600"]);
    let e = d.fails(&["disk", "retry", "d0"]);
    assert!(e.contains(d0.to_str().unwrap()), "{e}");
    std::fs::rename(&away, &d0).unwrap();
    d.ok(&["disk", "retry", "d0"]);
    check_back(&d, &recorded);
    // Dropping a device that cannot be built works while it is unavailable.
    assert!(d.stop());
    std::fs::rename(&d0, &away).unwrap();
    d.restart();
    let e = d.fails(&["remove", "snap"]);
    assert!(e.contains("nbd:snap") && e.contains("EBUSY"), "{e}");
    d.ok(&["export", "remove", "nbd:snap"]);
    d.ok(&["remove", "snap"]);
    assert!(d.fails(&["info", "snap"]).contains("not exist"));
    std::fs::rename(&away, &d0).unwrap();
    d.ok(&["disk", "retry"]);
    assert!(!d.ok(&["ls"]).contains("snap"));
    assert_eq!(
        nbd(&d, "origin").unwrap().read(0, 512).unwrap(),
        Reply::Ok(vec![0xab; 512])
    );
}

#[test]
fn absolute_path_in_a_table_is_opened_on_demand_and_released() {
    let mut d = Udmd::start();
    let o = d.path("o.img");
    udm_testkit::write_pattern_file(&o, SECTORS * 512, 5);
    let cow = d.path("s.cow");
    std::fs::write(&cow, vec![0u8; 4 << 20]).unwrap();
    let (o, cow) = (o.to_str().unwrap(), cow.to_str().unwrap());
    d.ok(&["create", "v", "--table", &format!("0 16384 linear {o} 0")]);
    d.ok(&[
        "create",
        "s",
        "--table",
        &format!("0 16384 snapshot v {cow} P 8"),
    ]);
    d.ok(&["export", "add", "s", "--nbd"]);
    let list = d.ok(&["disk", "list"]);
    assert!(
        list.contains(o) && list.contains(cow) && list.contains("[implicit]"),
        "{list}"
    );
    let j = json(&d, &["disk", "list"]);
    let disks = j.as_array().unwrap();
    assert_eq!(disks.len(), 2, "{j}");
    assert!(disks.iter().all(|x| x["implicit"] == true), "{j}");
    assert!(state(&d)["registry"]["disks"].as_array().unwrap().len() == 2);
    let read = |d: &Udmd| nbd(d, "s").unwrap().read(100 * 512, 512).unwrap();
    assert_eq!(read(&d), Reply::Ok(pattern(5, 100, 512)));
    // Survives a restart (and a crash).
    d.restart();
    assert_eq!(read(&d), Reply::Ok(pattern(5, 100, 512)));
    d.crash_and_restart();
    assert_eq!(read(&d), Reply::Ok(pattern(5, 100, 512)));
    assert!(d.ok(&["disk", "list"]).contains("[implicit]"));
    // Released once no table names it.
    d.ok(&["export", "remove", "nbd:s"]);
    d.ok(&["remove", "s"]);
    let list = d.ok(&["disk", "list"]);
    assert!(!list.contains(cow) && list.contains(o), "{list}");
    d.ok(&["remove", "v"]);
    assert_eq!(d.ok(&["disk", "list"]), "No disks found\n");
    assert!(state(&d)["registry"]["disks"]
        .as_array()
        .unwrap()
        .is_empty());
    d.restart();
    assert_eq!(d.ok(&["disk", "list"]), "No disks found\n");
}

#[test]
fn returning_file_is_picked_up_by_disk_add_of_the_same_disk() {
    let (d, d0, away, recorded) = restarted_without_d0(&["--retry-interval", "3600"]);
    // Another file under the recorded name is refused; the recorded file brings it all back.
    let other = d.path("other.img");
    std::fs::write(&other, vec![0u8; 4096]).unwrap();
    let e = d.fails(&["disk", "add", "d0", "--file", other.to_str().unwrap()]);
    assert!(e.contains("already exists"), "{e}");
    std::fs::rename(&away, &d0).unwrap();
    d.ok(&["disk", "add", "d0", "--file", d0.to_str().unwrap()]);
    check_back(&d, &recorded);
}
