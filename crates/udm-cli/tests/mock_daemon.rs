//! End-to-end tests of the `udmsetup` and `udm` binaries against a scripted control socket:
//! each test serves canned replies, records the requests the CLI sent, and compares stdout,
//! stderr and the exit status byte for byte. (Tests against the real udmd live with the daemon.)

#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixListener;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use udm_proto::*;

type Handler = Box<dyn Fn(&Request) -> Reply + Send>;

struct Mock {
    _dir: tempfile::TempDir,
    socket: PathBuf,
    seen: Arc<Mutex<Vec<Request>>>,
}

fn mock(handler: Handler) -> Mock {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("control.sock");
    let listener = UnixListener::bind(&socket).unwrap();
    let seen = Arc::new(Mutex::new(Vec::new()));
    let seen2 = seen.clone();
    std::thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(conn) = conn else { return };
            let mut w = conn.try_clone().unwrap();
            let mut r = BufReader::new(conn);
            let mut line = String::new();
            while r.read_line(&mut line).map(|n| n > 0).unwrap_or(false) {
                let env: RequestEnvelope = serde_json::from_str(&line).unwrap();
                assert_eq!(env.version, PROTOCOL_VERSION);
                let reply = handler(&env.request);
                seen2.lock().unwrap().push(env.request);
                let mut out = serde_json::to_vec(&reply).unwrap();
                out.push(b'\n');
                if w.write_all(&out).is_err() {
                    break;
                }
                line.clear();
            }
        }
    });
    Mock {
        _dir: dir,
        socket,
        seen,
    }
}

struct Out {
    code: i32,
    stdout: String,
    stderr: String,
}

fn run(bin: &str, m: &Mock, args: &[&str], stdin: &str) -> Out {
    let mut child = Command::new(bin)
        .arg("--socket")
        .arg(&m.socket)
        .args(args)
        .env("LC_ALL", "C")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(stdin.as_bytes())
        .unwrap();
    let o = child.wait_with_output().unwrap();
    Out {
        code: o.status.code().unwrap_or(-1),
        stdout: String::from_utf8(o.stdout).unwrap(),
        stderr: String::from_utf8(o.stderr).unwrap(),
    }
}

fn setup(m: &Mock, args: &[&str]) -> Out {
    run(env!("CARGO_BIN_EXE_udmsetup"), m, args, "")
}

fn info(name: &str, minor: u32) -> InfoRecord {
    InfoRecord {
        name: name.into(),
        uuid: None,
        major: 253,
        minor,
        suspended: false,
        read_only: false,
        live_present: true,
        inactive_present: false,
        open_count: 0,
        event_nr: 0,
        target_count: 1,
        deferred_remove: false,
        sectors: 2048,
        interposed: false,
        interposers: vec![],
        redirected: 0,
        unavailable: None,
        no_block_device: false,
    }
}

fn refuse(errno: i32, name: &str, msg: &str) -> Reply {
    Reply::Err(ErrorReply {
        errno,
        errno_name: name.into(),
        message: msg.into(),
    })
}

fn standard() -> Handler {
    Box::new(|r| match r {
        Request::Info { name: None } => {
            Reply::Ok(Response::Info(vec![info("zeta", 1), info("alpha", 0)]))
        }
        Request::Info { name: Some(n) } if n == "alpha" => {
            Reply::Ok(Response::Info(vec![info("alpha", 0)]))
        }
        Request::Info { .. } | Request::Table { .. } => {
            refuse(libc::ENXIO, "ENXIO", "no mapped device")
        }
        Request::NameByUuid { uuid } if uuid == "U1" => Reply::Ok(Response::Name("alpha".into())),
        Request::Status { name: None, .. } => Reply::Ok(Response::Lines(vec![
            DeviceLines {
                name: "zeta".into(),
                lines: vec![TableLine {
                    start: 0,
                    len: 8,
                    target_type: "zero".into(),
                    params: String::new(),
                }],
            },
            DeviceLines {
                name: "alpha".into(),
                lines: vec![TableLine {
                    start: 0,
                    len: 2048,
                    target_type: "linear".into(),
                    params: String::new(),
                }],
            },
        ])),
        Request::Create { .. } => Reply::Ok(Response::Info(vec![info("new", 2)])),
        Request::Remove { .. } => refuse(libc::EBUSY, "EBUSY", "device alpha is open (nbd:alpha)"),
        Request::List => Reply::Ok(Response::Devices(vec![])),
        _ => Reply::Ok(Response::Done),
    })
}

#[test]
fn info_all_devices_sorted_long_form() {
    let m = mock(standard());
    let o = setup(&m, &["info"]);
    assert_eq!(o.code, 0, "{}", o.stderr);
    assert!(o
        .stdout
        .starts_with("Name:              alpha\nState:             ACTIVE\n"));
    assert!(o.stdout.ends_with("Number of targets: 1\n\n"));
    assert_eq!(o.stdout.matches("Name:").count(), 2);
}

#[test]
fn status_of_all_devices_is_prefixed_and_keeps_trailing_space() {
    let m = mock(standard());
    let o = setup(&m, &["status"]);
    assert_eq!(o.stdout, "alpha: 0 2048 linear \nzeta: 0 8 zero \n");
}

#[test]
fn missing_device_says_so_and_fails() {
    let m = mock(standard());
    let o = setup(&m, &["info", "nope"]);
    assert_eq!(o.code, 1);
    assert_eq!(o.stdout, "");
    assert_eq!(o.stderr, "Device does not exist.\nCommand failed.\n");
    let o = setup(&m, &["table", "nope"]);
    assert_eq!(o.code, 1);
}

#[test]
fn refusal_names_the_ioctl_and_carries_the_daemon_message() {
    let m = mock(standard());
    let o = setup(&m, &["remove", "alpha"]);
    assert_eq!(o.code, 1);
    assert_eq!(
        o.stderr,
        "device-mapper: remove ioctl on alpha  failed: Device or resource busy\n\
         udmd: device alpha is open (nbd:alpha) [EBUSY]\n\
         Command failed.\n"
    );
}

#[test]
fn uuid_selects_the_device() {
    let m = mock(standard());
    let o = setup(&m, &["-u", "U1", "info", "-c", "--noheadings"]);
    assert_eq!(o.code, 0, "{}", o.stderr);
    assert_eq!(o.stdout, "alpha:253:0:L--w:0:1:0:\n");
}

#[test]
fn create_reads_the_table_from_stdin_and_normalises_it() {
    let m = mock(standard());
    let o = run(
        env!("CARGO_BIN_EXE_udmsetup"),
        &m,
        &["create", "new", "--interpose", "-r"],
        "# a comment\n  0 8 linear vda 0   # trailing\n\n8 8 zero\n",
    );
    assert_eq!(o.code, 0, "{}", o.stderr);
    assert_eq!(o.stdout, "");
    let seen = m.seen.lock().unwrap();
    assert_eq!(
        seen[0],
        Request::Create {
            name: "new".into(),
            uuid: None,
            table: Some("0 8 linear vda 0\n8 8 zero \n".into()),
            read_only: true,
            interpose: true,
            freeze: None,
        }
    );
}

#[test]
fn bad_table_fails_before_contacting_the_daemon() {
    let m = mock(standard());
    let o = setup(&m, &["create", "x", "--table", "0 eight zero"]);
    assert_eq!(o.code, 1);
    assert!(o
        .stderr
        .starts_with("Invalid format on line 1 of table --table"));
    assert!(m.seen.lock().unwrap().is_empty());
}

#[test]
fn json_output_is_the_protocol_records() {
    let m = mock(standard());
    let o = setup(&m, &["--json", "info", "alpha"]);
    let v: Vec<InfoRecord> = serde_json::from_str(&o.stdout).unwrap();
    assert_eq!(v, vec![info("alpha", 0)]);
}

#[test]
fn empty_daemon_has_no_devices() {
    let m = mock(standard());
    assert_eq!(setup(&m, &["ls"]).stdout, "No devices found\n");
    assert_eq!(setup(&m, &["ls", "--tree"]).stdout, "No devices found\n");
}

#[test]
fn unreachable_daemon_is_reported() {
    let dir = tempfile::tempdir().unwrap();
    let o = Command::new(env!("CARGO_BIN_EXE_udmsetup"))
        .args(["--socket"])
        .arg(dir.path().join("none.sock"))
        .arg("ls")
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(1));
    let e = String::from_utf8_lossy(&o.stderr);
    assert!(e.contains("cannot connect to udmd"), "{e}");
    let o = Command::new(env!("CARGO_BIN_EXE_udm"))
        .args(["--socket"])
        .arg(dir.path().join("none.sock"))
        .arg("status")
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&o.stderr).starts_with("udm: cannot connect to udmd"));
}

#[test]
fn every_command_has_help() {
    for c in [
        "create", "remove", "suspend", "resume", "load", "clear", "reload", "rename", "message",
        "ls", "info", "deps", "status", "table", "wait", "targets", "version", "disk", "export",
    ] {
        let o = Command::new(env!("CARGO_BIN_EXE_udmsetup"))
            .args([c, "--help"])
            .output()
            .unwrap();
        assert!(o.status.success(), "{c} --help failed");
        assert!(!o.stdout.is_empty());
    }
    let o = Command::new(env!("CARGO_BIN_EXE_udmsetup"))
        .args(["create", "--help"])
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&o.stdout).contains("Examples:"));
}
