//! NBD over TLS against real clients (libnbd's nbdinfo/nbdcopy, qemu-io/qemu-img, fio) on an
//! in-process server listening on 127.0.0.1: X.509 and PSK credentials, data checked end to end,
//! plain clients and wrong credentials refused, and the per-export plain-TCP opt-in. Each test
//! skips (loudly) when a tool is missing (apt-get install libnbd-bin qemu-utils fio openssl).
//! The PSK username goes in the URI's user part (`nbds://alice@host`), which every libnbd
//! understands (the `tls-username` query parameter only exists in newer ones).

#![allow(clippy::unwrap_used)] // tests may unwrap (helpers included)

#[path = "nbd_tls/support.rs"]
mod support;
use support::*;

use std::io::Write;
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Command, Output};
use std::sync::Arc;
use std::time::Duration;
use udm_export::nbd::client::{greet, read_option_reply};
use udm_export::nbd::proto::*;
use udm_export::nbd::{NbdServer, TcpSecurity, TlsCreds};
use udm_testkit::pki;

fn have(tool: &str) -> bool {
    let ok = Command::new("sh")
        .arg("-c")
        .arg(format!("command -v {tool}"))
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false);
    if !ok {
        eprintln!("SKIPPED: {tool} is not installed");
    }
    ok
}

/// Runs a client with a deadline (a hung TLS handshake must fail the test, not hang it).
fn run_raw(cmd: &mut Command) -> Output {
    let mut full = Command::new("timeout");
    full.arg("60").arg(cmd.get_program()).args(cmd.get_args());
    if let Some(d) = cmd.get_current_dir() {
        full.current_dir(d);
    }
    full.output().unwrap()
}

fn run(cmd: &mut Command) -> Output {
    let out = run_raw(cmd);
    assert!(
        out.status.success(),
        "{:?} failed: {}\n{}",
        cmd,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

fn fails(cmd: &mut Command) -> String {
    let out = run_raw(cmd);
    assert!(
        !out.status.success(),
        "{:?} should have failed: {}",
        cmd,
        String::from_utf8_lossy(&out.stdout)
    );
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// A 4 MiB pseudo-random file.
fn random_file(path: &Path, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    let data: Vec<u8> = (0..4 << 20)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect();
    std::fs::write(path, &data).unwrap();
    data
}

/// nbdcopy a random file in and out through `uri` and compare.
fn nbdcopy_roundtrip(dir: &Path, uri: &str, seed: u64) {
    let src = dir.join(format!("src-{seed}.img"));
    let back = dir.join(format!("back-{seed}.img"));
    let data = random_file(&src, seed);
    run(Command::new("nbdcopy").args([src.to_str().unwrap(), uri]));
    run(Command::new("nbdcopy").args([uri, back.to_str().unwrap()]));
    let got = std::fs::read(&back).unwrap();
    assert_eq!(got.len(), (SIZE_SECTORS * 512) as usize);
    assert!(got[..data.len()] == data[..], "data read back differs");
    assert!(got[data.len()..].iter().all(|&b| b == 0));
}

fn qemu_io_checks(object: &str, port: u16, export: &str) {
    let opts = format!(
        "driver=nbd,server.type=inet,server.host=127.0.0.1,server.port={port},export={export},tls-creds=tls0"
    );
    let out = run(Command::new("qemu-io").args([
        "--object",
        object,
        "--image-opts",
        &opts,
        "-c",
        "write -P 0x5a 1M 1M",
        "-c",
        "aio_write -P 0x6b 8M 64k",
        "-c",
        "aio_flush",
        "-c",
        "flush",
        "-c",
        "read -P 0x5a 1M 1M",
        "-c",
        "read -P 0x6b 8M 64k",
        "-c",
        "write -P 0x7c 2M 1M",
        "-c",
        "write -z 2M 1M",
        "-c",
        "read -P 0 2M 1M",
    ]));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(!text.contains("failed"), "{text}");
    // Another connection sees it.
    let out = run(Command::new("qemu-io").args([
        "--object",
        object,
        "--image-opts",
        &opts,
        "-c",
        "read -P 0x5a 1M 1M",
    ]));
    assert!(!String::from_utf8_lossy(&out.stdout).contains("failed"));
}

#[test]
fn psk_with_libnbd_and_qemu() {
    if !have("nbdinfo") || !have("nbdcopy") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let s = psk_server(dir.path(), false);
    let keys = psk_dir(dir.path(), "alice", KEY).join("keys.psk");
    let uri = |export: &str| {
        format!(
            "nbds://alice@127.0.0.1:{}/{export}?tls-psk-file={}",
            s.port,
            keys.display()
        )
    };
    let out = run(Command::new("nbdinfo").arg(uri("vol")));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains(&format!("{}", SIZE_SECTORS * 512)), "{text}");
    let out = run(Command::new("nbdinfo").args(["--list", &uri("")]));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("vol") && text.contains("open"), "{text}");
    nbdcopy_roundtrip(dir.path(), &uri("vol"), 7);
    if have("qemu-io") {
        let d = psk_dir(dir.path(), "alice", KEY);
        qemu_io_checks(
            &format!(
                "tls-creds-psk,id=tls0,dir={},username=alice,endpoint=client",
                d.display()
            ),
            s.port,
            "vol",
        );
    }
    if have("qemu-img") {
        let d = psk_dir(dir.path(), "alice", KEY);
        let src = dir.path().join("q.img");
        random_file(&src, 99);
        let opts = format!(
            "driver=nbd,server.type=inet,server.host=127.0.0.1,server.port={},export=open,tls-creds=tls0",
            s.port
        );
        let object = format!(
            "tls-creds-psk,id=tls0,dir={},username=alice,endpoint=client",
            d.display()
        );
        run(Command::new("qemu-img").args([
            "convert",
            "-n",
            "-f",
            "raw",
            "--object",
            &object,
            "--target-image-opts",
            src.to_str().unwrap(),
            &opts,
        ]));
        let back = dir.path().join("q-back.img");
        run(Command::new("qemu-img").args([
            "convert",
            "--object",
            &object,
            "--image-opts",
            &opts,
            "-O",
            "raw",
            back.to_str().unwrap(),
        ]));
        let a = std::fs::read(&src).unwrap();
        let b = std::fs::read(&back).unwrap();
        assert!(b[..a.len()] == a[..], "qemu-img round trip differs");
    }
}

#[test]
fn psk_wrong_key_or_user_fails() {
    if !have("nbdinfo") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let s = psk_server(dir.path(), false);
    let wrong = KEY.replace('9', "8");
    for (user, key) in [("alice", wrong.as_str()), ("mallory", KEY)] {
        let keys = psk_dir(dir.path(), user, key).join("keys.psk");
        fails(Command::new("nbdinfo").arg(format!(
            "nbds://{user}@127.0.0.1:{}/vol?tls-psk-file={}",
            s.port,
            keys.display()
        )));
    }
}

#[test]
fn x509_with_libnbd_qemu_and_fio() {
    if !have("openssl") || !have("nbdinfo") || !have("nbdcopy") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let p = pki(dir.path());
    let s = serve(TcpSecurity {
        tls: Some(Arc::new(TlsCreds::x509_dir(&p.server, true).unwrap())),
        allow_insecure: false,
    });
    let uri = format!(
        "nbds://127.0.0.1:{}/vol?tls-certificates={}",
        s.port,
        p.client.display()
    );
    let out = run(Command::new("nbdinfo").arg(&uri));
    assert!(String::from_utf8_lossy(&out.stdout).contains(&format!("{}", SIZE_SECTORS * 512)));
    nbdcopy_roundtrip(dir.path(), &uri, 11);
    if have("qemu-io") {
        qemu_io_checks(
            &format!(
                "tls-creds-x509,id=tls0,dir={},endpoint=client",
                p.client.display()
            ),
            s.port,
            "vol",
        );
    }
    // fio's nbd engine never calls nbd_set_uri_allow_local_file, so libnbd refuses
    // `tls-certificates` in its URI. libnbd then takes its default directory, which for a
    // non-root user is $HOME/.pki/libnbd: run fio as nobody with the client's credentials there.
    // (From that directory libnbd presents no client certificate, so this server does not ask
    // for one.)
    if have("fio") && have("setpriv") {
        let s = serve(TcpSecurity {
            tls: Some(Arc::new(TlsCreds::x509_dir(&p.server, false).unwrap())),
            allow_insecure: false,
        });
        use std::os::unix::fs::PermissionsExt;
        let home = tempfile::Builder::new()
            .prefix("udm-fio-home")
            .tempdir()
            .unwrap();
        let pkidir = home.path().join(".pki").join("libnbd");
        std::fs::create_dir_all(&pkidir).unwrap();
        for f in ["ca-cert.pem", "client-cert.pem", "client-key.pem"] {
            std::fs::copy(p.client.join(f), pkidir.join(f)).unwrap();
        }
        for d in [home.path(), &home.path().join(".pki"), &pkidir] {
            std::os::unix::fs::chown(d, Some(65534), Some(65534)).unwrap();
            std::fs::set_permissions(d, std::fs::Permissions::from_mode(0o700)).unwrap();
        }
        for f in std::fs::read_dir(&pkidir).unwrap() {
            std::os::unix::fs::chown(f.unwrap().path(), Some(65534), Some(65534)).unwrap();
        }
        let out = run_raw(
            Command::new("setpriv")
                .args(["--reuid=65534", "--regid=65534", "--clear-groups", "fio"])
                .env("HOME", home.path())
                .current_dir(home.path())
                .args([
                    "--name=tls",
                    "--ioengine=nbd",
                    &format!("--uri=nbds://127.0.0.1:{}/vol", s.port),
                    "--rw=randwrite",
                    "--bs=4k",
                    "--size=4M",
                    "--iodepth=8",
                    "--verify=crc32c",
                    "--do_verify=1",
                    "--verify_fatal=1",
                    "--verify_state_save=0",
                    "--output-format=terse",
                ]),
        );
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "fio over TLS (X.509) failed: {err}");
        let terse = String::from_utf8_lossy(&out.stdout);
        assert!(terse.contains(";tls;"), "fio printed no result: {terse}");
    } else {
        eprintln!("SKIPPED fio over TLS: fio or setpriv missing");
    }
}

#[test]
fn x509_untrusted_peer_fails() {
    if !have("openssl") || !have("nbdinfo") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let p = pki(dir.path());
    let s = serve(TcpSecurity {
        tls: Some(Arc::new(TlsCreds::x509_dir(&p.server, true).unwrap())),
        allow_insecure: false,
    });
    // A client certificate from another CA, and none at all, are refused.
    for d in [&p.stranger, &p.anonymous] {
        fails(Command::new("nbdinfo").arg(format!(
            "nbds://127.0.0.1:{}/vol?tls-certificates={}",
            s.port,
            d.display()
        )));
    }
    // A client that does not trust the server's CA refuses the server.
    let other = dir.path().join("other-ca");
    fails(Command::new("nbdinfo").arg(format!(
        "nbds://127.0.0.1:{}/vol?tls-certificates={}",
        s.port,
        other.display()
    )));
}

#[test]
fn plain_client_gets_tls_required_and_sees_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let s = psk_server(dir.path(), false);
    let mut c = tcp(s.port);
    greet(&mut c).unwrap();
    let requests = [
        (OPT_LIST, Vec::new()),
        (OPT_INFO, info_request_data("vol", &[INFO_NAME])),
        (OPT_GO, info_request_data("open", &[])),
        (OPT_STRUCTURED_REPLY, Vec::new()),
        (
            OPT_LIST_META_CONTEXT,
            meta_request_data("vol", &[META_BASE_ALLOCATION]),
        ),
    ];
    for (opt, data) in requests {
        c.write_all(&option_request(opt, &data)).unwrap();
        let (o, typ, msg) = read_option_reply(&mut c).unwrap();
        assert_eq!((o, typ), (opt, REP_ERR_TLS_REQD), "option {opt}");
        let text = String::from_utf8_lossy(&msg);
        assert!(!text.contains("vol") && !text.contains("open"), "{text}");
    }
    // NBD_OPT_EXPORT_NAME cannot be refused politely: the server hangs up.
    c.write_all(&option_request(OPT_EXPORT_NAME, b"vol"))
        .unwrap();
    let mut buf = [0u8; 1];
    assert_eq!(std::io::Read::read(&mut c, &mut buf).unwrap_or(0), 0);
    // Real plain clients fail too.
    if have("nbdinfo") {
        fails(Command::new("nbdinfo").arg(format!("nbd://127.0.0.1:{}/vol", s.port)));
        fails(Command::new("nbdinfo").args(["--list", &format!("nbd://127.0.0.1:{}", s.port)]));
    }
    if have("qemu-io") {
        fails(Command::new("qemu-io").args([
            "-f",
            "raw",
            &format!("nbd://127.0.0.1:{}/vol", s.port),
            "-c",
            "read 0 4k",
        ]));
    }
}

#[test]
fn plain_tcp_needs_an_explicit_opt_in() {
    let server = NbdServer::new();
    let e = server
        .listen_tcp(
            SocketAddr::from(([127, 0, 0, 1], 0)),
            TcpSecurity::default(),
        )
        .unwrap_err();
    assert!(e.to_string().contains("TLS"), "{e}");
    server.shutdown();
}

#[test]
fn insecure_listener_serves_only_marked_exports() {
    let s = serve(TcpSecurity {
        tls: None,
        allow_insecure: true,
    });
    let names: Vec<String> = udm_export::nbd::client::list(tcp(s.port))
        .unwrap()
        .into_iter()
        .map(|(n, _)| n)
        .collect();
    assert_eq!(names, ["open"]);
    let mut c = tcp(s.port);
    greet(&mut c).unwrap();
    c.write_all(&option_request(OPT_GO, &info_request_data("vol", &[])))
        .unwrap();
    let (_, typ, msg) = read_option_reply(&mut c).unwrap();
    assert_eq!(typ, REP_ERR_UNKNOWN, "{}", String::from_utf8_lossy(&msg));
    c.write_all(&option_request(OPT_STARTTLS, &[])).unwrap();
    let (_, typ, _) = read_option_reply(&mut c).unwrap();
    assert_eq!(typ, REP_ERR_UNSUP);
    let mut cl = udm_export::nbd::client::Client::connect(tcp(s.port), "open", true).unwrap();
    cl.write(0, &[0x42; 4096]).unwrap();
    cl.flush().unwrap();
    if have("nbdinfo") {
        run(Command::new("nbdinfo").arg(format!("nbd://127.0.0.1:{}/open", s.port)));
        fails(Command::new("nbdinfo").arg(format!("nbd://127.0.0.1:{}/vol", s.port)));
    }
}

#[test]
fn selective_tls_serves_marked_exports_plain_and_the_rest_after_starttls() {
    if !have("nbdinfo") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let s = psk_server(dir.path(), true);
    let keys = psk_dir(dir.path(), "alice", KEY).join("keys.psk");
    let mut c = tcp(s.port);
    greet(&mut c).unwrap();
    c.write_all(&option_request(OPT_GO, &info_request_data("vol", &[])))
        .unwrap();
    assert_eq!(read_option_reply(&mut c).unwrap().1, REP_ERR_TLS_REQD);
    // A name that does not exist gets the same answer: a plain client learns no names.
    c.write_all(&option_request(OPT_INFO, &info_request_data("nope", &[])))
        .unwrap();
    assert_eq!(read_option_reply(&mut c).unwrap().1, REP_ERR_TLS_REQD);
    let names: Vec<String> = udm_export::nbd::client::list(tcp(s.port))
        .unwrap()
        .into_iter()
        .map(|(n, _)| n)
        .collect();
    assert_eq!(names, ["open"]);
    run(Command::new("nbdinfo").arg(format!("nbd://127.0.0.1:{}/open", s.port)));
    fails(Command::new("nbdinfo").arg(format!("nbd://127.0.0.1:{}/vol", s.port)));
    run(Command::new("nbdinfo").arg(format!(
        "nbds://alice@127.0.0.1:{}/vol?tls-psk-file={}",
        s.port,
        keys.display()
    )));
}

#[test]
fn unix_socket_stays_plain_and_refuses_starttls() {
    let dir = tempfile::tempdir().unwrap();
    let s = psk_server(dir.path(), false);
    let sock = dir.path().join("nbd.sock");
    s.server.listen_unix(&sock).unwrap();
    let mut c = std::os::unix::net::UnixStream::connect(&sock).unwrap();
    c.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    greet(&mut c).unwrap();
    c.write_all(&option_request(OPT_STARTTLS, &[])).unwrap();
    assert_eq!(read_option_reply(&mut c).unwrap().1, REP_ERR_UNSUP);
    let names: Vec<String> =
        udm_export::nbd::client::list(std::os::unix::net::UnixStream::connect(&sock).unwrap())
            .unwrap()
            .into_iter()
            .map(|(n, _)| n)
            .collect();
    assert_eq!(names, ["open", "vol"]);
}

#[test]
fn starttls_forgets_plain_state_pipelines_and_is_cut_by_remove_export() {
    let dir = tempfile::tempdir().unwrap();
    let s = psk_server(dir.path(), true);
    let mut c = tcp(s.port);
    greet(&mut c).unwrap();
    // Structured replies negotiated in plain text are forgotten by STARTTLS.
    c.write_all(&option_request(OPT_STRUCTURED_REPLY, &[]))
        .unwrap();
    assert_eq!(read_option_reply(&mut c).unwrap().1, REP_ACK);
    let mut t = starttls(c);
    t.write_all(&option_request(
        OPT_SET_META_CONTEXT,
        &meta_request_data("vol", &[META_BASE_ALLOCATION]),
    ))
    .unwrap();
    assert_eq!(read_option_reply(&mut t).unwrap().1, REP_ERR_INVALID);
    // A second STARTTLS inside TLS is refused.
    t.write_all(&option_request(OPT_STARTTLS, &[])).unwrap();
    assert_eq!(read_option_reply(&mut t).unwrap().1, REP_ERR_INVALID);
    let mut cl = client_after_starttls(t, "vol");
    // Pipelined writes and reads (the server's reader and writers run concurrently on the
    // one TLS session).
    let n = 128u64;
    let block = |i: u64| vec![(i * 7 + 1) as u8; 65536];
    for i in 0..n {
        cl.send(CMD_WRITE, 0, i * 65536, 65536, &block(i)).unwrap();
    }
    for _ in 0..n {
        let (_, r) = cl.recv(|_| None).unwrap();
        assert_eq!(r, udm_export::nbd::client::Reply::Ok(Vec::new()));
    }
    cl.flush().unwrap();
    let mut handles = std::collections::HashMap::new();
    for i in 0..n {
        handles.insert(cl.send(CMD_READ, 0, i * 65536, 65536, &[]).unwrap(), i);
    }
    for _ in 0..n {
        let (h, r) = cl.recv(|_| Some(65536)).unwrap();
        assert_eq!(r, udm_export::nbd::client::Reply::Ok(block(handles[&h])));
    }
    // Removing the export disconnects the idle TLS client promptly.
    let server = s.server.clone();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || tx.send(server.remove_export("vol")).unwrap());
    rx.recv_timeout(Duration::from_secs(10))
        .expect("remove_export hung on a TLS connection")
        .unwrap();
    assert!(
        cl.read(0, 512).is_err(),
        "the removed export still answered"
    );
}

#[test]
fn shutdown_cuts_a_client_stalled_in_the_tls_handshake() {
    let dir = tempfile::tempdir().unwrap();
    let s = psk_server(dir.path(), false);
    let _c = starttls_agreed(s.port);
    // No ClientHello follows.
    let server = s.server.clone();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        server.shutdown();
        tx.send(()).unwrap();
    });
    rx.recv_timeout(Duration::from_secs(10))
        .expect("shutdown hung on a connection in the TLS handshake");
}
