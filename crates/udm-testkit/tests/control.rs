//! dmsetup output formats, bad input, and restart/crash recovery through udmd + udmsetup.

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests may panic on setup failures

use udm_testkit::Udmd;

const MIB: u64 = 1 << 20;

fn setup(d: &Udmd) {
    d.disk("a", 8 * MIB, 1);
    d.disk("b", 8 * MIB, 2);
    d.ok(&[
        "create",
        "lin",
        "--table",
        "0 1000 linear a 0\n1000 1000 linear b 0",
    ]);
    d.ok(&[
        "create",
        "st",
        "--table",
        "0 2048 striped 2 8 a 4096 b 4096",
    ]);
    d.ok(&["create", "z", "-u", "UUID-Z", "--table", "0 100 zero"]);
}

#[test]
fn formats_match_dmsetup() {
    let d = Udmd::start();
    assert_eq!(d.ok(&["ls"]), "No devices found\n");
    setup(&d);
    assert_eq!(d.ok(&["ls"]), "lin\t(253:0)\nst\t(253:1)\nz\t(253:2)\n");
    assert_eq!(
        d.ok(&["info", "z"]),
        "Name:              z\nState:             ACTIVE\nRead Ahead:        256\nTables present:    LIVE\n\
         Open count:        0\nEvent number:      0\nMajor, minor:      253, 2\nNumber of targets: 1\nUUID: UUID-Z\n\n"
    );
    d.ok(&["suspend", "lin"]);
    assert!(d
        .ok(&["info", "lin"])
        .contains("State:             SUSPENDED\n"));
    d.ok(&["resume", "lin"]);
    d.ok(&["load", "lin", "--table", "0 2000 zero"]);
    assert!(d
        .ok(&["info", "lin"])
        .contains("Tables present:    LIVE & INACTIVE\n"));
    assert_eq!(d.ok(&["table", "--inactive", "lin"]), "0 2000 zero \n");
    d.ok(&["clear", "lin"]);
    assert!(d.ok(&["info", "lin"]).contains("Tables present:    LIVE\n"));
    d.ok(&["create", "empty", "--notable"]);
    // No table ever loaded: as in the kernel, no block device yet, so no read-ahead (and
    // dmsetup's `open failed` on stderr), no dm-N name, and a concise line without a table.
    let o = d.udmsetup(&["info", "empty"]);
    let info = String::from_utf8_lossy(&o.stdout);
    assert!(info.contains("Tables present:    None\n"), "{info}");
    assert!(!info.contains("Read Ahead:"), "{info}");
    assert_eq!(
        String::from_utf8_lossy(&o.stderr),
        "/dev/mapper/empty: open failed: No such device or address\n"
    );
    assert_eq!(d.ok(&["table", "--concise", "empty"]), "empty,,3,rw\n");
    assert!(d
        .ok(&["ls", "-o", "blkdevname"])
        .contains("empty\t(253:3)\n"));
    let o = d.udmsetup(&["info", "-c", "-o", "name,blkdevname"]);
    assert_eq!(o.status.code(), Some(1));
    assert!(!String::from_utf8_lossy(&o.stdout).contains("empty"));
    assert_eq!(
        String::from_utf8_lossy(&o.stderr),
        "Could not resolve block device name for 253:3.\n\
         _do_report_object: report function failed for field blkdevname\nCommand failed.\n"
    );
    // Once a table was loaded the block device stays, even with the table cleared.
    d.ok(&["load", "empty", "--table", "0 8 zero"]);
    d.ok(&["clear", "empty"]);
    assert!(d
        .ok(&["info", "empty"])
        .contains("Read Ahead:        256\n"));
    assert_eq!(d.ok(&["table", "--concise", "empty"]), "empty,,3,rw\n");
    d.ok(&["remove", "empty"]);
    let cols = d.ok(&["info", "-c"]);
    let mut lines = cols.lines();
    assert!(lines
        .next()
        .unwrap_or_default()
        .starts_with("Name             Maj Min Stat Open Targ Event  UUID"));
    assert!(lines
        .next()
        .unwrap_or_default()
        .starts_with("lin              253   0 L--w    0    2      0"));
    assert_eq!(
        d.ok(&["table"]),
        "lin: 0 1000 linear 8:0 0\nlin: 1000 1000 linear 8:16 0\nst: 0 2048 striped 2 8 8:0 4096 8:16 4096\nz: 0 100 zero \n"
    );
    assert_eq!(d.ok(&["status", "st"]), "0 2048 striped 2 8:0 8:16 1 AA\n");
    assert_eq!(d.ok(&["status", "z"]), "0 100 zero \n");
    // The kernel's order: the device the table added last comes first.
    assert_eq!(d.ok(&["deps", "lin"]), "2 dependencies\t: (8, 16) (8, 0)\n");
    assert_eq!(
        d.ok(&["deps", "-o", "devname", "lin"]),
        "2 dependencies\t: (b) (a)\n"
    );
    // -v: the device's info first, as dmsetup's _deps prints it.
    let v = d.ok(&["-v", "deps", "lin"]);
    assert!(
        v.starts_with("Name:              lin\n")
            && v.ends_with("Number of targets: 2\n\n2 dependencies\t: (8, 16) (8, 0)\n"),
        "{v}"
    );
    let targets = d.ok(&["targets"]);
    for t in [
        "linear           v1.5.0",
        "striped          v1.7.0",
        "zero             v1.2.0",
        "error            v1.7.0",
        "delay            v1.5.0",
        "flakey           v1.5.0",
        "snapshot         v1.16.0",
    ] {
        assert!(
            targets.lines().any(|l| l == t),
            "targets lacks {t:?}:\n{targets}"
        );
    }
    // ls --tree in the C locale uses ASCII.
    let o = std::process::Command::new(udm_testkit::bin("udmsetup"))
        .env("UDM_RUNTIME_DIR", d.runtime())
        .env("LANG", "C")
        .env("LC_ALL", "C")
        .args(["ls", "--tree"])
        .output()
        .unwrap();
    let tree = String::from_utf8_lossy(&o.stdout);
    assert!(
        tree.starts_with("lin (253:0)\n |- (8:16)\n `- (8:0)\n"),
        "{tree}"
    );
    // Interposition shows in the tree and in info.
    d.ok(&[
        "create",
        "ip",
        "--interpose",
        "--table",
        "0 2000 linear lin 0",
    ]);
    let o = std::process::Command::new(udm_testkit::bin("udmsetup"))
        .env("UDM_RUNTIME_DIR", d.runtime())
        .env("LC_ALL", "C")
        .args(["ls", "--tree"])
        .output()
        .unwrap();
    let tree = String::from_utf8_lossy(&o.stdout);
    assert!(tree.contains("ip (253:3) [interposes lin]"), "{tree}");
    let info = d.ok(&["info", "ip"]);
    assert!(
        info.contains("Interposer:        lin 0+2000 attached\n"),
        "{info}"
    );
    // --json on read commands.
    let j: serde_json::Value = serde_json::from_str(&d.ok(&["--json", "info", "ip"])).unwrap();
    assert_eq!(j[0]["interposers"][0]["device"], "lin");
    for cmd in [
        &["--json", "ls"][..],
        &["--json", "table"],
        &["--json", "status"],
        &["--json", "deps", "lin"],
        &["--json", "targets"],
        &["--json", "version"],
        &["--json", "disk", "list"],
        &["--json", "export", "list"],
    ] {
        let out = d.ok(cmd);
        serde_json::from_str::<serde_json::Value>(&out)
            .unwrap_or_else(|e| panic!("{cmd:?}: {e}: {out}"));
    }
    // table --concise
    assert!(d
        .ok(&["table", "--concise", "z"])
        .starts_with("z,UUID-Z,2,rw,0 100 zero"));
}

fn sha(p: &std::path::Path) -> Vec<u8> {
    std::fs::read(p).unwrap_or_default()
}

#[test]
fn bad_input_gets_clear_errors_and_changes_nothing() {
    let d = Udmd::start();
    setup(&d);
    d.ok(&["export", "add", "lin", "--nbd"]);
    let files = [d.path("a.img"), d.path("b.img")];
    let before: Vec<Vec<u8>> = files.iter().map(|f| sha(f)).collect();
    let state_before = std::fs::read_to_string(d.state().join("state.json")).unwrap();
    let big = format!("0 {} linear a 0", 99_999_999);
    let erange = "0 16384 zero\n16384 16 linear a 0".to_string();
    let cases: Vec<(Vec<&str>, &str)> = vec![
        (vec!["create", "x", "--table", "0 10 linear a"], "EINVAL"),
        (vec!["create", "x", "--table", "0 10 nosuch a 0"], "EINVAL"),
        (vec!["create", "x", "--table", "10 10 linear a 0"], "EINVAL"),
        (
            vec![
                "create",
                "x",
                "--table",
                "0 10 linear a 0\n20 10 linear a 0",
            ],
            "EINVAL",
        ),
        (vec!["create", "x", "--table", "0 0 linear a 0"], "EINVAL"),
        (
            vec!["create", "x", "--table", "0 10 linear nosuch 0"],
            "ENODEV",
        ),
        (vec!["create", "x", "--table", &big], "EINVAL"),
        (
            vec!["create", "x", "--table", "0 10 linear a notanumber"],
            "EINVAL",
        ),
        (
            vec!["create", "x", "--table", "0 10 striped 2 8 a 0 b 0"],
            "EINVAL",
        ),
        (vec!["create", "x", "--table", "0 16 striped 0 8"], "EINVAL"),
        (
            vec!["create", "x", "--table", "0 16 striped 2 8 a 0"],
            "EINVAL",
        ),
        (vec!["create", "x", "--table", "0 16 delay a 0"], "EINVAL"),
        (
            vec!["create", "x", "--table", "0 16 delay a 0 abc"],
            "EINVAL",
        ),
        (
            vec!["create", "x", "--table", "0 16 flakey a 0 0 0"],
            "EINVAL",
        ),
        (
            vec!["create", "x", "--table", "0 16 flakey a 0 1 1 1 bogus"],
            "EINVAL",
        ),
        (
            vec![
                "create",
                "x",
                "--table",
                "0 16 flakey a 0 1 1 5 corrupt_bio_byte 0 r 1 0",
            ],
            "EINVAL",
        ),
        (vec!["create", "x", "--table", "0 16 zero extra"], "EINVAL"),
        (
            vec!["create", "x", "--table", "0 16 linear [bogus]a 0"],
            "EINVAL",
        ),
        (
            vec!["create", "x", "--interpose", "--table", &erange],
            "ERANGE",
        ),
        (
            vec![
                "create",
                "x",
                "--interpose",
                "--table",
                "0 8 linear a 0\n8 8 linear a 8",
            ],
            "EALREADY",
        ),
        (vec!["create", "a/b", "--table", "0 16 zero"], "EINVAL"),
        (vec!["create", "lin", "--table", "0 16 zero"], "EBUSY"),
        (
            vec!["create", "x", "-u", "UUID-Z", "--table", "0 16 zero"],
            "EBUSY",
        ),
        (
            vec!["create", "x", "--table", "abc def"],
            "Invalid format on line 1",
        ),
        (vec!["create", "x", "--table", "0 16 linear x 0"], "EINVAL"),
        (vec!["create", "x", "--table", "0 16 linear lin 0"], "EBUSY"),
        // dmsetup says "Device does not exist." for info and status only; other commands
        // report the failed ioctl (libdm names the device as `<name> <uuid>`).
        (
            vec!["remove", "nosuch"],
            "remove ioctl on nosuch  failed: No such device or address",
        ),
        (
            vec!["suspend", "nosuch"],
            "suspend ioctl on nosuch  failed: No such device or address",
        ),
        (
            vec!["resume", "nosuch"],
            "resume ioctl on nosuch  failed: No such device or address",
        ),
        (vec!["rename", "lin", "z"], "EBUSY"),
        (vec!["rename", "z", "--setuuid", "OTHER"], "EINVAL"),
        (vec!["message", "lin", "0", "foo"], "EINVAL"),
        (vec!["message", "lin", "999999", "foo"], "EINVAL"),
        (
            vec!["load", "lin", "--table", "0 16 linear a 0\n0 16 zero"],
            "EINVAL",
        ),
        (
            vec!["disk", "add", "c", "--file", "/nonexistent/dir/c.img"],
            "ENOENT",
        ),
        (vec!["disk", "remove", "a"], "EBUSY"),
        (
            vec!["export", "add", "nosuch", "--nbd"],
            "Device does not exist.",
        ),
        (vec!["export", "add", "a", "--nbd"], "EBUSY"),
        (vec!["export", "remove", "nbd:nosuch"], "ENOENT"),
        (vec!["remove", "lin"], "EBUSY"),
        (
            vec!["wait", "nosuch"],
            "waitevent ioctl on nosuch  failed: No such device or address",
        ),
    ];
    assert!(cases.len() >= 30);
    for (args, want) in &cases {
        let err = d.fails(args);
        let want = if want.starts_with('E') {
            format!("[{want}]")
        } else {
            want.to_string()
        };
        assert!(
            err.contains(&want),
            "udmsetup {args:?}: expected {want}, got:\n{err}"
        );
        assert!(
            err.lines().count() >= 2,
            "udmsetup {args:?}: the error must say what is wrong:\n{err}"
        );
        assert!(!err.contains("panicked"), "{err}");
    }
    // CLI-level usage errors.
    for args in [
        &["create"][..],
        &["nosuchcommand"],
        &["message", "lin", "notasector", "x"],
        &["disk", "add", "c"],
    ] {
        let o = d.udmsetup(args);
        assert!(!o.status.success(), "{args:?} should fail");
        assert!(!o.stderr.is_empty(), "{args:?} should explain");
    }
    // A table that fails leaves no device behind; the daemon keeps serving; nothing stored changed.
    assert_eq!(d.ok(&["ls"]), "lin\t(253:0)\nst\t(253:1)\nz\t(253:2)\n");
    assert_eq!(
        d.ok(&["table", "lin"]),
        "0 1000 linear 8:0 0\n1000 1000 linear 8:16 0\n"
    );
    let after: Vec<Vec<u8>> = files.iter().map(|f| sha(f)).collect();
    assert!(before == after, "backing files changed");
    assert_eq!(
        std::fs::read_to_string(d.state().join("state.json")).unwrap(),
        state_before
    );
}

fn snapshot_of(d: &Udmd) -> Vec<String> {
    let mut v = Vec::new();
    for args in [
        &["ls"][..],
        &["table"],
        &["table", "--inactive"],
        &["status"],
        &["deps"],
        &["disk", "list"],
        &["export", "list"],
    ] {
        v.push(d.ok(args));
    }
    // info without event numbers (they restart at 0, as after a reboot).
    v.push(
        d.ok(&["info"])
            .lines()
            .filter(|l| !l.starts_with("Event number"))
            .collect::<Vec<_>>()
            .join("\n"),
    );
    v
}

#[test]
fn kill9_and_restart_restore_everything() {
    let mut d = Udmd::start();
    setup(&d);
    d.ok(&[
        "create",
        "ip",
        "--interpose",
        "--table",
        "0 2000 delay lin 0 1",
    ]);
    d.ok(&["load", "st", "--table", "0 2048 zero"]);
    d.ok(&["suspend", "z"]);
    d.ok(&["export", "add", "lin", "--nbd"]);
    d.ok(&["rename", "st", "stripes"]);
    let before = snapshot_of(&d);
    d.crash_and_restart();
    assert_eq!(snapshot_of(&d), before, "state after kill -9 differs");
    assert!(d.ok(&["info", "z"]).contains("SUSPENDED"));
    assert!(d
        .ok(&["info", "ip"])
        .contains("Interposer:        lin 0+2000 attached"));
    // The restored export serves data through the restored interposer.
    let s = std::os::unix::net::UnixStream::connect(d.nbd_socket()).unwrap();
    let mut c = udm_export::nbd::client::Client::connect(s, "lin", false).unwrap();
    assert!(matches!(
        c.read(0, 4096).unwrap(),
        udm_export::nbd::client::Reply::Ok(_)
    ));
    assert!(d
        .ok(&["--json", "info", "ip"])
        .contains("\"redirected\": 1"));
    // A graceful restart too.
    d.restart();
    assert_eq!(
        snapshot_of(&d),
        before,
        "state after SIGTERM restart differs"
    );
    // --create start-up tables (concise syntax, with the interposed flag) on top of the state.
    drop(d);
    let d = Udmd::start_with(&[
        "--create",
        "boot,,,ro,0 100 zero;ipb,,,rw+interpose,0 100 zero",
    ]);
    assert!(d.ok(&["info", "boot"]).contains("(READ-ONLY)"));
    assert_eq!(d.ok(&["table", "ipb"]), "0 100 zero \n");
}

#[test]
fn remove_force_deferred_and_wait_events() {
    let d = Udmd::start();
    setup(&d);
    d.ok(&["export", "add", "lin", "--nbd"]);
    // --deferred: marked while open, removed at last close; @cancel_deferred_remove undoes it.
    d.ok(&["remove", "--deferred", "lin"]);
    assert!(d.ok(&["info", "lin"]).contains("(DEFERRED REMOVE)"));
    d.ok(&["message", "lin", "0", "@cancel_deferred_remove"]);
    assert!(!d.ok(&["info", "lin"]).contains("DEFERRED"));
    d.ok(&["remove", "--deferred", "lin"]);
    d.ok(&["export", "remove", "nbd:lin"]);
    assert!(
        d.fails(&["info", "lin"]).contains("Device does not exist."),
        "removed at last close"
    );
    // --force on an open device: the table becomes an error table, the device stays (EBUSY).
    d.ok(&["export", "add", "st", "--nbd"]);
    let e = d.fails(&["remove", "--force", "st"]);
    assert!(e.contains("[EBUSY]"), "{e}");
    assert_eq!(d.ok(&["table", "st"]), "0 2048 error \n");
    let mut c = udm_export::nbd::client::Client::connect(
        std::os::unix::net::UnixStream::connect(d.nbd_socket()).unwrap(),
        "st",
        false,
    )
    .unwrap();
    assert_eq!(
        c.read(0, 512).unwrap(),
        udm_export::nbd::client::Reply::Err(5),
        "clients now get EIO"
    );
    // wait: returns when the event number moves (rename raises an event).
    let ev: u32 = d
        .ok(&["--json", "info", "z"])
        .split("\"event_nr\": ")
        .nth(1)
        .unwrap()
        .split(',')
        .next()
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    let rt = d.runtime();
    let waiter = std::thread::spawn(move || {
        std::process::Command::new(udm_testkit::bin("udmsetup"))
            .env("UDM_RUNTIME_DIR", rt)
            .args(["--json", "wait", "z", &ev.to_string()])
            .output()
            .unwrap()
    });
    // The waiter sleeps until the event: it is still waiting a moment later.
    std::thread::sleep(std::time::Duration::from_millis(500));
    assert!(
        !waiter.is_finished(),
        "wait returned before the event number moved: {:?}",
        waiter
            .join()
            .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
    );
    d.ok(&["rename", "z", "z2"]);
    let o = udm_testkit::join_within(waiter, std::time::Duration::from_secs(20), "wait");
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert!(
        v["event_nr"].as_u64().is_some_and(|n| n != u64::from(ev)),
        "wait returned an unmoved event number (was {ev}): {v}"
    );
    let o = d.udmsetup(&["wait", "z2", &ev.to_string()]);
    assert!(
        o.status.success(),
        "wait on a moved event number returns at once"
    );
}

/// `remove --force` of an interposer held open by an NBD client, through udmd, as dmsetup does
/// it: the table becomes an error table and the device stays for its opener (EBUSY), whose
/// reads now fail with EIO. The error table interposes nothing, so the interposed disk's own
/// NBD client reaches the disk directly again. Once the client and its export are gone, a
/// plain remove succeeds.
#[test]
fn remove_force_of_an_interposer_held_by_an_nbd_client() {
    use std::os::unix::fs::FileExt;
    use udm_export::nbd::client::{Client, Reply};
    let d = Udmd::start();
    let img = d.disk("a", 8 * MIB, 1);
    d.ok(&[
        "create",
        "ip",
        "--interpose",
        "--table",
        "0 2048 linear a 0",
    ]);
    d.ok(&["export", "add", "ip", "--nbd"]);
    d.ok(&["export", "add", "a", "--nbd"]);
    let connect = |name: &str| {
        let s = std::os::unix::net::UnixStream::connect(d.nbd_socket()).unwrap();
        Client::connect(s, name, false).unwrap()
    };
    let (mut held, mut direct) = (connect("ip"), connect("a"));
    assert_eq!(direct.write(0, &[0x11; 512]).unwrap(), Reply::Ok(vec![]));
    assert!(
        d.ok(&["status", "ip"]).contains("linear"),
        "interposer live before the remove"
    );
    let e = d.fails(&["remove", "--force", "ip"]);
    assert!(e.contains("[EBUSY]") && e.contains("error table"), "{e}");
    assert_eq!(d.ok(&["table", "ip"]), "0 2048 error \n");
    assert_eq!(
        held.read(0, 512).unwrap(),
        Reply::Err(5),
        "the interposer's client gets EIO"
    );
    assert_eq!(direct.write(512, &[0x22; 512]).unwrap(), Reply::Ok(vec![]));
    assert_eq!(direct.flush().unwrap(), Reply::Ok(vec![]));
    assert_eq!(
        direct.read(0, 1024).unwrap(),
        Reply::Ok([[0x11u8; 512], [0x22; 512]].concat()),
        "the disk's client reaches the disk, not the error table"
    );
    let mut on_disk = [0u8; 1024];
    std::fs::File::open(&img)
        .unwrap()
        .read_exact_at(&mut on_disk, 0)
        .unwrap();
    assert_eq!(on_disk[512..], [0x22; 512], "written to a.img directly");
    held.disconnect().unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    while d.udmsetup(&["export", "remove", "nbd:ip"]).status.code() != Some(0) {
        assert!(
            std::time::Instant::now() < deadline,
            "export remove nbd:ip kept failing"
        );
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    d.ok(&["remove", "ip"]);
    assert!(d.fails(&["info", "ip"]).contains("Device does not exist."));
}
