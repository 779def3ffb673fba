//! A trustworthy daemon (issue "Trustworthy daemon"): no control operation blocks the one that
//! would release it, SIGTERM finishes in every state, directories are not chmod-ed behind the
//! user's back, control lines are bounded, an unrecorded change is reported as applied with a
//! warning, `export remove DEVICE` works, and FUSE memory locking ends with the last mount.
//! Every wait is bounded: a hang fails the test.

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests may panic on setup failures

use std::io::{BufRead, BufReader, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};
use udm_testkit::{
    bin, join_within, parked_below, parked_read, udmsetup_bg, ParkedRead, Udmd, CREATE_IP_OVER_O,
};

fn ok(o: &Output, what: &str) {
    assert!(
        o.status.success(),
        "{what} failed: {}{}",
        String::from_utf8_lossy(&o.stderr),
        String::from_utf8_lossy(&o.stdout)
    );
}

/// SIGTERM must end the daemon cleanly within 10 s.
fn stop_within_10s(d: &mut Udmd) {
    let start = Instant::now();
    let clean = d.stop();
    let took = start.elapsed();
    assert!(
        clean && took < Duration::from_secs(10),
        "SIGTERM: clean exit {clean} after {took:?} (must be < 10 s); log:\n{}",
        d.log()
    );
}

/// Disk `f0` <- `lin`, exported over NBD and suspended, with a READ of `lin` parked in it.
fn parked_in_lin(d: &Udmd) -> ParkedRead {
    d.disk("f0", 4 << 20, 1);
    d.ok(&["create", "lin", "--table", "0 8192 linear f0 0"]);
    d.ok(&["export", "add", "lin", "--nbd"]);
    d.ok(&["suspend", "lin"]);
    parked_read(d, "lin")
}

/// Item 1: `export remove` of an export whose client has a READ parked on a suspended device
/// must not keep `resume` (which releases the READ) from running; the removal then completes,
/// and a concurrent add of the same id meanwhile is refused with EBUSY.
#[test]
fn export_remove_with_a_parked_request_does_not_block_resume() {
    let mut d = Udmd::start();
    let _parked = parked_in_lin(&d);
    let remove = udmsetup_bg(&d, &["export", "remove", "nbd:lin"]);
    std::thread::sleep(Duration::from_millis(300));
    if !remove.is_finished() {
        // Still tearing down: the id is busy, and the export is no longer listed.
        let add = join_within(
            udmsetup_bg(&d, &["export", "add", "lin", "--nbd"]),
            Duration::from_secs(5),
            "export add during a removal",
        );
        assert!(!add.status.success(), "export add during removal succeeded");
        let err = String::from_utf8_lossy(&add.stderr);
        assert!(
            err.contains("EBUSY") && err.contains("being removed"),
            "{err}"
        );
        let list = d.ok(&["export", "list"]);
        assert!(!list.contains("nbd:lin"), "{list}");
    }
    let resume = join_within(
        udmsetup_bg(&d, &["resume", "lin"]),
        Duration::from_secs(2),
        "resume while an export removal waits for the parked request",
    );
    ok(&resume, "resume");
    let removed = join_within(remove, Duration::from_secs(10), "export remove");
    ok(&removed, "export remove");
    assert!(!d.ok(&["export", "list"]).contains("nbd:lin"));
    // The id is free again.
    d.ok(&["export", "add", "lin", "--nbd"]);
    stop_within_10s(&mut d);
}

/// Item 2: SIGTERM with an interposer suspended over an exported device: the device's flush is
/// held by the interposer; shutdown gives up on it (saying why) and exits, and the suspended
/// interposer comes back suspended.
#[test]
fn sigterm_with_a_suspended_interposer_finishes_and_keeps_it_suspended() {
    let mut d = Udmd::start();
    d.disk("f0", 4 << 20, 1);
    d.ok(&["create", "o", "--table", "0 8192 linear f0 0"]);
    d.ok(&["export", "add", "o", "--nbd"]);
    d.ok(&CREATE_IP_OVER_O);
    d.ok(&["suspend", "ip"]);
    stop_within_10s(&mut d);
    let log = d.log();
    assert!(
        log.contains("not flushed at shutdown") && log.contains("ip is suspended"),
        "the abandoned flush must be logged with its reason:\n{log}"
    );
    d.restart();
    let info = d.ok(&["info", "ip"]);
    assert!(info.contains("SUSPENDED"), "{info}");
    d.ok(&["resume", "ip"]);
    stop_within_10s(&mut d);
}

/// Item 2: SIGTERM while an NBD client's request is parked on a suspended device.
#[test]
fn sigterm_with_a_parked_nbd_request_finishes() {
    let mut d = Udmd::start();
    let _parked = parked_in_lin(&d);
    let pid = d.pid().unwrap() as i32;
    let start = Instant::now();
    // SAFETY: kill with a valid pid and signal number.
    unsafe { libc::kill(pid, libc::SIGTERM) };
    std::thread::sleep(Duration::from_millis(300));
    // A change during shutdown is refused at once (or udmd is gone already), never applied
    // and then lost or left hanging.
    let create = join_within(
        udmsetup_bg(&d, &["create", "late", "--table", "0 8 zero"]),
        Duration::from_secs(3),
        "a change during shutdown",
    );
    assert!(!create.status.success());
    let err = String::from_utf8_lossy(&create.stderr);
    assert!(err.contains("ESHUTDOWN") || err.contains("udmd"), "{err}");
    stop_within_10s(&mut d);
    assert!(start.elapsed() < Duration::from_secs(10));
    d.restart();
    assert!(!d.udmsetup(&["info", "late"]).status.success());
    let info = d.ok(&["info", "lin"]);
    assert!(info.contains("SUSPENDED"), "{info}");
    assert!(d.ok(&["export", "list"]).contains("nbd:lin"));
}

/// Item 2: SIGTERM finishes even while a control operation is stuck inside the registry:
/// attaching an interposer to `o` drains `o`, whose in-flight READ is parked on the suspended
/// `low` below it (at the time of writing the registry holds its lock during that drain, so
/// `resume low` cannot run either).
#[test]
fn sigterm_with_a_control_operation_stuck_on_held_io_finishes() {
    let mut d = Udmd::start();
    let _parked = parked_below(&d);
    let create = udmsetup_bg(&d, &CREATE_IP_OVER_O);
    std::thread::sleep(Duration::from_millis(500));
    let resume = udmsetup_bg(&d, &["resume", "low"]);
    std::thread::sleep(Duration::from_millis(500));
    stop_within_10s(&mut d);
    // Both end with the daemon at the latest.
    join_within(create, Duration::from_secs(5), "create after udmd exited");
    join_within(resume, Duration::from_secs(5), "resume after udmd exited");
}

/// Runs udmd with `args` expecting it to fail at start-up; returns its stderr.
fn udmd_fails(args: &[&str]) -> String {
    let mut c = Command::new(bin("udmd"))
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if let Some(st) = c.try_wait().unwrap() {
            assert!(!st.success(), "udmd {args:?} started");
            break;
        }
        if Instant::now() > deadline {
            let _ = c.kill();
            let _ = c.wait();
            panic!("udmd {args:?} was expected to refuse to start but is running");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let mut s = String::new();
    std::io::Read::read_to_string(&mut c.stderr.take().unwrap(), &mut s).unwrap();
    s
}

fn mode(p: &Path) -> u32 {
    std::fs::metadata(p).unwrap().permissions().mode() & 0o7777
}

/// Item 7: an existing shared directory is refused, not chmod-ed; a created one is 0700; an
/// existing private-enough one keeps its mode.
#[test]
fn runtime_and_state_directories_are_not_chmodded() {
    let t = tempfile::tempdir().unwrap();
    let shared = t.path().join("shared");
    std::fs::create_dir(&shared).unwrap();
    std::fs::set_permissions(&shared, std::fs::Permissions::from_mode(0o1777)).unwrap();
    let state = t.path().join("state");
    let err = udmd_fails(&[
        "--runtime-dir",
        shared.to_str().unwrap(),
        "--state-dir",
        state.to_str().unwrap(),
    ]);
    assert!(err.contains("mode 1777"), "{err}");
    assert_eq!(mode(&shared), 0o1777, "udmd changed the mode of {shared:?}");
    let err = udmd_fails(&[
        "--runtime-dir",
        t.path().join("run").to_str().unwrap(),
        "--state-dir",
        shared.to_str().unwrap(),
    ]);
    assert!(err.contains("mode 1777"), "{err}");
    assert_eq!(mode(&shared), 0o1777);

    // Created by udmd: 0700. Existing and ours, 0755: left as it is.
    let mut d = Udmd::start();
    assert_eq!(mode(&d.runtime()), 0o700);
    assert_eq!(mode(&d.state()), 0o700);
    d.stop();
    std::fs::set_permissions(d.state(), std::fs::Permissions::from_mode(0o755)).unwrap();
    d.restart();
    assert_eq!(mode(&d.state()), 0o755);
}

fn reply_line(s: &UnixStream) -> String {
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut line = String::new();
    BufReader::new(s).read_line(&mut line).unwrap();
    line
}

/// Item 7: an over-long control line gets an error reply and the connection is closed without
/// buffering it; a non-UTF-8 line gets an EINVAL reply and the connection goes on.
#[test]
fn control_lines_are_bounded_and_checked() {
    let d = Udmd::start();
    let sock = d.runtime().join("control.sock");
    let s = UnixStream::connect(&sock).unwrap();
    s.set_write_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut w = s.try_clone().unwrap();
    let writer = std::thread::spawn(move || {
        let chunk = vec![b'x'; 64 << 10];
        let mut sent = 0usize;
        while sent < (8 << 20) {
            if w.write_all(&chunk).is_err() {
                return sent;
            }
            sent += chunk.len();
        }
        sent
    });
    let line = reply_line(&s);
    assert!(
        line.contains("EMSGSIZE") && line.contains("longer than 1 MiB"),
        "{line}"
    );
    let sent = join_within(writer, Duration::from_secs(10), "writing an over-long line");
    assert!(sent < (8 << 20), "udmd kept reading an over-long line");

    let mut s = UnixStream::connect(&sock).unwrap();
    s.write_all(b"\xff\xfe{}\n").unwrap();
    let line = reply_line(&s);
    assert!(line.contains("EINVAL") && line.contains("UTF-8"), "{line}");
    s.write_all(b"{\"version\":1,\"request\":{\"op\":\"version\"}}\n")
        .unwrap();
    let line = reply_line(&s);
    assert!(line.starts_with("{\"ok\""), "{line}");
    // The daemon is fine.
    d.ok(&["version"]);
}

/// Item 7: a change applied but not recorded is reported as applied with a warning; the next
/// change records everything.
#[test]
fn unrecorded_change_is_applied_with_a_warning_and_recorded_later() {
    let mut d = Udmd::start();
    let img = d.path("a.img");
    udm_testkit::write_pattern_file(&img, 1 << 20, 1);
    // The temporary state file cannot be created while a directory has its name.
    let blocker = d.state().join(".state.json.tmp");
    std::fs::create_dir(&blocker).unwrap();
    let o = d.udmsetup(&["disk", "add", "a", "--file", img.to_str().unwrap()]);
    ok(&o, "disk add with an unwritable state");
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("warning") && err.contains("could not be recorded"),
        "{err}"
    );
    assert!(d.ok(&["disk", "list"]).contains('a'));
    std::fs::remove_dir(&blocker).unwrap();
    let o = d.udmsetup(&["create", "v", "--table", "0 2048 linear a 0"]);
    ok(&o, "create");
    assert!(
        o.stderr.is_empty(),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    d.crash_and_restart();
    assert!(d.ok(&["info", "v"]).contains("ACTIVE"));
}

/// Item 10b: `export remove DEVICE` when the device has exactly one export; several are
/// refused with their ids.
#[test]
fn export_remove_by_device_name() {
    let d = Udmd::start();
    d.disk("f0", 1 << 20, 1);
    d.ok(&["create", "vol", "--table", "0 2048 linear f0 0"]);
    d.ok(&["export", "add", "vol", "--nbd"]);
    d.ok(&["export", "remove", "vol"]);
    assert!(!d.ok(&["export", "list"]).contains("nbd:vol"));
    d.ok(&["export", "add", "vol", "--nbd"]);
    d.ok(&["export", "add", "vol", "--nbd", "--name", "other"]);
    let err = d.fails(&["export", "remove", "vol"]);
    assert!(
        err.contains("nbd:vol") && err.contains("nbd:other"),
        "{err}"
    );
    d.ok(&["export", "remove", "nbd:other"]);
    d.ok(&["export", "remove", "vol"]);
    let err = d.fails(&["export", "remove", "vol"]);
    assert!(err.contains("no export vol"), "{err}");
}

fn locked_kb(pid: i32) -> u64 {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    s.lines()
        .find_map(|l| l.strip_prefix("VmLck:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap()
}

/// Item 4: memory is locked while a FUSE export exists and unlocked when the last one goes.
#[test]
fn fuse_memory_lock_ends_with_the_last_mount() {
    let t = "fuse_memory_lock_ends_with_the_last_mount";
    if !udm_testkit::root(t) {
        return;
    }
    if !Path::new("/dev/fuse").exists() {
        eprintln!("SKIPPED {t}: no /dev/fuse");
        return;
    }
    let d = Udmd::start();
    d.disk("f0", 1 << 20, 1);
    d.ok(&["create", "vol", "--table", "0 2048 linear f0 0"]);
    let pid = d.pid().unwrap() as i32;
    assert_eq!(locked_kb(pid), 0);
    let mnt = d.path("mnt");
    std::fs::create_dir(&mnt).unwrap();
    let o = d.udmsetup(&["export", "add", "vol", "--fuse", mnt.to_str().unwrap()]);
    if !o.status.success() {
        eprintln!(
            "SKIPPED {t}: FUSE mount failed: {}",
            String::from_utf8_lossy(&o.stderr)
        );
        return;
    }
    assert!(locked_kb(pid) > 0, "FUSE export did not lock memory");
    let id = format!("fuse:{}", mnt.join("vol").display());
    d.ok(&["export", "remove", &id]);
    assert_eq!(
        locked_kb(pid),
        0,
        "memory still locked after the last FUSE export went"
    );
}

/// `udmd` as `uid` (via setpriv when we are root and `uid` differs) with `env`.
fn udmd_as(uid: u32, env: &[(&str, &Path)]) -> Command {
    // SAFETY: geteuid has no preconditions.
    let me = unsafe { libc::geteuid() };
    let mut c = if uid == me {
        Command::new(bin("udmd"))
    } else {
        let mut c = Command::new("setpriv");
        c.arg(format!("--reuid={uid}"))
            .arg(format!("--regid={uid}"))
            .arg("--clear-groups")
            .arg(bin("udmd"));
        c
    };
    c.env_remove("UDM_RUNTIME_DIR")
        .env_remove("XDG_RUNTIME_DIR")
        .env_remove("UDM_STATE_DIR")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    for (k, v) in env {
        c.env(k, v);
    }
    c
}

fn output_within(mut c: Command, limit: Duration) -> (Option<std::process::ExitStatus>, String) {
    let mut child = c.spawn().unwrap();
    let deadline = Instant::now() + limit;
    let st = loop {
        if let Some(st) = child.try_wait().unwrap() {
            break Some(st);
        }
        if Instant::now() > deadline {
            break None;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    if st.is_none() {
        // SAFETY: kill with a valid pid and signal number.
        unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
        let _ = child.wait();
    }
    let mut s = String::new();
    std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut s).unwrap();
    (st, s)
}

/// Item 7: the fallback runtime directory `$TMPDIR/udm-<uid>` (no UDM_RUNTIME_DIR, no
/// XDG_RUNTIME_DIR, not root) is created 0700, and an existing one that is a symlink or open
/// to others is refused.
#[test]
fn fallback_runtime_dir_in_shared_tmp_is_checked() {
    let t = "fallback_runtime_dir_in_shared_tmp_is_checked";
    // SAFETY: geteuid has no preconditions.
    let me = unsafe { libc::geteuid() };
    let uid = if me == 0 { 65534 } else { me };
    if me == 0 && !udm_testkit::have("setpriv", t) {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    std::fs::set_permissions(tmp.path(), std::fs::Permissions::from_mode(0o1777)).unwrap();
    let state = tmp.path().join("state");
    std::fs::create_dir(&state).unwrap();
    std::os::unix::fs::chown(&state, Some(uid), Some(uid)).unwrap();
    let env = [("TMPDIR", tmp.path()), ("UDM_STATE_DIR", state.as_path())];
    let fallback = tmp.path().join(format!("udm-{uid}"));

    // A symlink planted by someone else (here: to a directory the daemon's user owns).
    let target = tmp.path().join("elsewhere");
    std::fs::create_dir(&target).unwrap();
    std::os::unix::fs::chown(&target, Some(uid), Some(uid)).unwrap();
    std::fs::set_permissions(&target, std::fs::Permissions::from_mode(0o700)).unwrap();
    std::os::unix::fs::symlink(&target, &fallback).unwrap();
    let (st, err) = output_within(udmd_as(uid, &env), Duration::from_secs(10));
    assert!(st.is_some_and(|s| !s.success()), "udmd ran: {err}");
    assert!(err.contains("symbolic link"), "{err}");
    assert!(std::fs::read_dir(&target).unwrap().next().is_none());
    std::fs::remove_file(&fallback).unwrap();

    // Open to others.
    std::fs::create_dir(&fallback).unwrap();
    std::os::unix::fs::chown(&fallback, Some(uid), Some(uid)).unwrap();
    std::fs::set_permissions(&fallback, std::fs::Permissions::from_mode(0o755)).unwrap();
    let (st, err) = output_within(udmd_as(uid, &env), Duration::from_secs(10));
    assert!(st.is_some_and(|s| !s.success()), "udmd ran: {err}");
    assert!(err.contains("mode 0755"), "{err}");
    assert_eq!(mode(&fallback), 0o755);
    std::fs::remove_dir(&fallback).unwrap();

    // Missing: created private, and udmd serves (it is still running at the deadline).
    let (st, err) = output_within(udmd_as(uid, &env), Duration::from_secs(3));
    assert!(st.is_none(), "udmd exited: {err}");
    let md = std::fs::symlink_metadata(&fallback).unwrap();
    assert!(md.is_dir());
    assert_eq!(std::os::unix::fs::MetadataExt::uid(&md), uid);
    assert_eq!(mode(&fallback), 0o700);
}

/// Item 7, the client's side: `udmsetup` sends nothing to a control socket served by another
/// user than root or itself (a daemon, or a trap, in a predictable shared directory).
#[test]
fn udmsetup_refuses_a_socket_served_by_another_user() {
    let t = "udmsetup_refuses_a_socket_served_by_another_user";
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("SKIPPED {t}: needs root to run a udmd as another user");
        return;
    }
    if !udm_testkit::have("setpriv", t) {
        return;
    }
    let uid = 65534;
    let tmp = tempfile::tempdir().unwrap();
    std::fs::set_permissions(tmp.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let (run, state) = (tmp.path().join("run"), tmp.path().join("state"));
    for d in [&run, &state] {
        std::fs::create_dir(d).unwrap();
        std::os::unix::fs::chown(d, Some(uid), Some(uid)).unwrap();
    }
    let env = [
        ("UDM_RUNTIME_DIR", run.as_path()),
        ("UDM_STATE_DIR", &state),
    ];
    let mut udmd = udmd_as(uid, &env).spawn().unwrap();
    let sock = run.join("control.sock");
    let deadline = Instant::now() + Duration::from_secs(10);
    while !sock.exists() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    let out = Command::new(bin("udmsetup"))
        .arg("ls")
        .env("UDM_RUNTIME_DIR", &run)
        .output()
        .unwrap();
    let _ = udmd.kill();
    let _ = udmd.wait();
    assert!(
        sock.exists(),
        "udmd as uid {uid} did not serve {}",
        sock.display()
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success(),
        "udmsetup talked to uid {uid}'s socket"
    );
    assert!(
        err.contains("refusing to talk") && err.contains("uid 65534"),
        "{err}"
    );
}
