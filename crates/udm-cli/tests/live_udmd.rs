//! udmsetup against a real udmd, when one has been built into the same target directory
//! (`cargo build -p udm-daemon`); otherwise the test says SKIPPED. Outputs are compared byte
//! for byte with dmsetup's formats.

#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output};
use std::time::{Duration, Instant};

struct Daemon {
    child: Child,
    dir: tempfile::TempDir,
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn udmd_path() -> Option<PathBuf> {
    let me = PathBuf::from(env!("CARGO_BIN_EXE_udmsetup"));
    let p = me.parent()?.join("udmd");
    p.exists().then_some(p)
}

fn start(udmd: &Path) -> Daemon {
    let dir = tempfile::tempdir().unwrap();
    let run = dir.path().join("run");
    let state = dir.path().join("state");
    std::fs::create_dir_all(&run).unwrap();
    std::fs::create_dir_all(&state).unwrap();
    let child = Command::new(udmd)
        .arg("--runtime-dir")
        .arg(&run)
        .arg("--state-dir")
        .arg(&state)
        .args(["--log", "warn"])
        .spawn()
        .unwrap();
    let d = Daemon { child, dir };
    let sock = run.join("control.sock");
    let t = Instant::now();
    while !sock.exists() {
        assert!(t.elapsed() < Duration::from_secs(20), "udmd did not start");
        std::thread::sleep(Duration::from_millis(50));
    }
    d
}

fn udmsetup(d: &Daemon, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_udmsetup"))
        .arg("--socket")
        .arg(d.dir.path().join("run/control.sock"))
        .args(args)
        .env("LC_ALL", "C")
        .output()
        .unwrap()
}

fn ok(d: &Daemon, args: &[&str]) -> String {
    let o = udmsetup(d, args);
    assert!(
        o.status.success(),
        "udmsetup {args:?} failed: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8(o.stdout).unwrap()
}

#[test]
fn dmsetup_formats_against_real_udmd() {
    let Some(udmd) = udmd_path() else {
        eprintln!(
            "SKIPPED: udmd is not built in this target directory (cargo build -p udm-daemon)"
        );
        return;
    };
    let d = start(&udmd);
    let img = d.dir.path().join("a.img");
    let img_s = img.to_str().unwrap();
    assert_eq!(ok(&d, &["ls"]), "No devices found\n");
    ok(
        &d,
        &["disk", "add", "vda", "--file", img_s, "--create", "1M"],
    );
    ok(&d, &["create", "lin", "--table", "0 1024 linear vda 0"]);
    ok(&d, &["create", "z", "--table", "0 8 zero\n8 8 error"]);

    let ls = ok(&d, &["ls"]);
    let lines: Vec<&str> = ls.lines().collect();
    assert_eq!(lines.len(), 2);
    assert!(
        lines[0].starts_with("lin\t(") && lines[1].starts_with("z\t("),
        "{ls}"
    );

    assert_eq!(ok(&d, &["table", "z"]), "0 8 zero \n8 8 error \n");
    let t = ok(&d, &["table"]);
    assert!(
        t.starts_with("lin: 0 1024 linear ") && t.ends_with("z: 0 8 zero \nz: 8 8 error \n"),
        "{t}"
    );
    assert_eq!(ok(&d, &["status", "lin"]), "0 1024 linear \n");

    let info = ok(&d, &["info", "z"]);
    assert!(info.starts_with("Name:              z\nState:             ACTIVE\nRead Ahead:        256\nTables present:    LIVE\n"), "{info}");
    assert!(info.contains("Number of targets: 2\n") && info.ends_with("\n\n"));
    let cols = ok(
        &d,
        &["info", "-c", "--noheadings", "-o", "name,attr,segments"],
    );
    assert_eq!(cols, "lin:L--w:1\nz:L--w:2\n");

    assert_eq!(
        ok(&d, &["deps", "-o", "devname", "lin"]),
        "1 dependencies\t: (vda)\n"
    );

    ok(&d, &["suspend", "lin"]);
    assert!(ok(&d, &["info", "lin"]).contains("State:             SUSPENDED\n"));
    ok(&d, &["load", "lin", "--table", "0 512 zero"]);
    assert!(ok(&d, &["info", "lin"]).contains("Tables present:    LIVE & INACTIVE\n"));
    assert_eq!(ok(&d, &["table", "--inactive", "lin"]), "0 512 zero \n");
    ok(&d, &["resume", "lin"]);
    assert_eq!(ok(&d, &["table", "lin"]), "0 512 zero \n");

    // Interposition shows in info and in the tree.
    ok(
        &d,
        &[
            "create",
            "ip",
            "--interpose",
            "--table",
            "0 1024 linear vda 0",
        ],
    );
    let info = ok(&d, &["info", "ip"]);
    assert!(
        info.contains("Interposer:        vda 0+1024 attached\nRedirected:        "),
        "{info}"
    );
    let tree = ok(&d, &["ls", "--tree"]);
    assert!(
        tree.contains("ip (") && tree.contains(" [interposes vda]\n `- ("),
        "{tree}"
    );

    // Errors: missing device, and dmsetup's ioctl line with the daemon's message.
    let o = udmsetup(&d, &["info", "nope"]);
    assert_eq!(o.status.code(), Some(1));
    assert_eq!(
        String::from_utf8_lossy(&o.stderr),
        "Device does not exist.\nCommand failed.\n"
    );
    let o = udmsetup(&d, &["create", "bad", "--table", "0 8 nosuchtarget"]);
    assert_eq!(o.status.code(), Some(1));
    let e = String::from_utf8_lossy(&o.stderr);
    assert!(
        // libdm's create is DEV_CREATE, then a table load by name and number (the lowest
        // free minor) that fails; dmsetup names that ioctl.
        e.starts_with(
            "device-mapper: reload ioctl on bad (253:3) failed: Invalid argument\nudmd: "
        ),
        "{e}"
    );

    ok(&d, &["remove", "ip", "lin", "z"]);
    assert_eq!(ok(&d, &["ls"]), "No devices found\n");
    ok(&d, &["disk", "remove", "vda"]);
}
