//! NBD over TCP through udmd (issue "Trustworthy daemon", item 6): `--nbd-listen` needs TLS
//! credentials or an explicit `--nbd-insecure-tcp`; with `--tls-psk` real clients (nbdinfo,
//! nbdcopy) read and write over TLS and plain clients are refused; with `--nbd-insecure-tcp`
//! only exports added with `--insecure-tcp` are reachable in plain text, also after a restart.
//! Skips (loudly) without nbdinfo/nbdcopy (apt-get install libnbd-bin).

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests may panic on setup failures

use std::net::TcpStream;
use std::path::Path;
use std::process::Command;
use std::time::Duration;
use udm_export::nbd::client::{greet, list, read_option_reply, Client, Reply};
use udm_export::nbd::proto::{info_request_data, option_request, OPT_GO, REP_ERR_TLS_REQD};
use udm_testkit::{bin, fill_pattern, have, pki, Udmd};

const KEY: &str = "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";

fn tcp(port: u16) -> TcpStream {
    let s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s
}

/// Runs a tool with a 60 s deadline; returns (success, stdout, stderr).
fn tool(args: &[&str]) -> (bool, String, String) {
    let o = Command::new("timeout")
        .arg("60")
        .args(args)
        .output()
        .unwrap();
    (
        o.status.success(),
        String::from_utf8_lossy(&o.stdout).into_owned(),
        String::from_utf8_lossy(&o.stderr).into_owned(),
    )
}

#[test]
fn nbd_listen_without_tls_is_refused_at_start() {
    let dir = tempfile::tempdir().unwrap();
    let o = Command::new("timeout")
        .arg("20")
        .arg(bin("udmd"))
        .arg("--runtime-dir")
        .arg(dir.path().join("run"))
        .arg("--state-dir")
        .arg(dir.path().join("state"))
        .args(["--nbd-listen", "127.0.0.1:0"])
        .env("RUST_BACKTRACE", "0")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success(), "udmd started without TLS: {err}");
    assert!(
        err.contains("--tls-creds") && err.contains("--nbd-insecure-tcp"),
        "{err}"
    );
}

#[test]
fn psk_clients_read_and_write_plain_clients_are_refused() {
    if !have("nbdinfo", "tls psk") || !have("nbdcopy", "tls psk") {
        return;
    }
    let keys_dir = tempfile::tempdir().unwrap();
    let keys = keys_dir.path().join("keys.psk");
    std::fs::write(&keys, format!("alice:{KEY}\n")).unwrap();
    let d = Udmd::start_with(&[
        "--nbd-listen",
        "127.0.0.1:0",
        "--tls-psk",
        keys.to_str().unwrap(),
    ]);
    let port = d.tcp_port();
    d.disk("a", 8 << 20, 3);
    d.ok(&["create", "vol", "--table", "0 16384 linear a 0"]);
    d.ok(&["export", "add", "vol", "--nbd"]);
    let uri = format!(
        "nbds://alice@127.0.0.1:{port}/vol?tls-psk-file={}",
        keys.display()
    );
    let (ok, out, err) = tool(&["nbdinfo", &uri]);
    assert!(ok && out.contains("8388608"), "{out}{err}");
    // Write a pattern through TLS, read the device back through TLS and compare.
    let src = d.path("src.img");
    let mut data = vec![0u8; 8 << 20];
    for (i, s) in data.chunks_mut(512).enumerate() {
        fill_pattern(s, i as u64, 9);
    }
    std::fs::write(&src, &data).unwrap();
    let (ok, _, err) = tool(&["nbdcopy", src.to_str().unwrap(), &uri]);
    assert!(ok, "nbdcopy in: {err}");
    let back = d.path("back.img");
    let (ok, _, err) = tool(&["nbdcopy", &uri, back.to_str().unwrap()]);
    assert!(ok, "nbdcopy out: {err}");
    assert!(std::fs::read(&back).unwrap() == data, "data differs");
    // The Unix socket sees the same data.
    let mut c = Client::connect(
        std::os::unix::net::UnixStream::connect(d.nbd_socket()).unwrap(),
        "vol",
        false,
    )
    .unwrap();
    assert_eq!(
        c.read(4096, 512).unwrap(),
        Reply::Ok(data[4096..4608].to_vec())
    );
    // Plain TCP: refused, nothing listed.
    let (ok, _, _) = tool(&["nbdinfo", &format!("nbd://127.0.0.1:{port}/vol")]);
    assert!(!ok, "a plain client was served");
    let mut s = tcp(port);
    greet(&mut s).unwrap();
    std::io::Write::write_all(
        &mut s,
        &option_request(OPT_GO, &info_request_data("vol", &[])),
    )
    .unwrap();
    assert_eq!(read_option_reply(&mut s).unwrap().1, REP_ERR_TLS_REQD);
    // A wrong key fails.
    let bad = keys_dir.path().join("bad.psk");
    std::fs::write(&bad, format!("alice:{}\n", KEY.replace('0', "f"))).unwrap();
    let (ok, _, _) = tool(&[
        "nbdinfo",
        &format!(
            "nbds://alice@127.0.0.1:{port}/vol?tls-psk-file={}",
            bad.display()
        ),
    ]);
    assert!(!ok, "a wrong key was accepted");
}

fn names(port: u16) -> Vec<String> {
    list(tcp(port))
        .unwrap()
        .into_iter()
        .map(|(n, _)| n)
        .collect()
}

fn plain_read(port: u16, name: &str) -> Option<Vec<u8>> {
    let mut c = Client::connect(tcp(port), name, false).ok()?;
    match c.read(0, 512).ok()? {
        Reply::Ok(v) => Some(v),
        _ => None,
    }
}

#[test]
fn insecure_tcp_is_per_export_and_survives_restart() {
    let mut d = Udmd::start_with(&["--nbd-listen", "127.0.0.1:0", "--nbd-insecure-tcp"]);
    assert!(
        d.log().contains("UNENCRYPTED"),
        "no loud warning:\n{}",
        d.log()
    );
    d.disk("a", 4 << 20, 4);
    d.disk("b", 4 << 20, 5);
    d.ok(&["export", "add", "a", "--nbd"]);
    d.ok(&["export", "add", "b", "--nbd", "--insecure-tcp"]);
    for round in 0..2 {
        let port = d.tcp_port();
        assert_eq!(names(port), ["b"], "round {round}");
        assert!(
            plain_read(port, "a").is_none(),
            "round {round}: a served in plain"
        );
        let mut want = vec![0u8; 512];
        fill_pattern(&mut want, 0, 5);
        assert_eq!(plain_read(port, "b"), Some(want), "round {round}");
        if have("nbdinfo", "insecure tcp") {
            assert!(tool(&["nbdinfo", &format!("nbd://127.0.0.1:{port}/b")]).0);
            assert!(!tool(&["nbdinfo", &format!("nbd://127.0.0.1:{port}/a")]).0);
        }
        // Both stay reachable on the Unix socket.
        assert!(Client::connect(
            std::os::unix::net::UnixStream::connect(d.nbd_socket()).unwrap(),
            "a",
            false
        )
        .is_ok());
        d.restart();
    }
    let state = std::fs::read_to_string(d.state().join("state.json")).unwrap();
    assert!(state.contains("insecure_tcp"), "{state}");
}

#[test]
fn x509_with_client_certificates() {
    if !have("openssl", "tls x509") || !have("nbdinfo", "tls x509") {
        return;
    }
    let pki_dir = tempfile::tempdir().unwrap();
    pki(pki_dir.path());
    let server = pki_dir.path().join("server");
    let d = Udmd::start_with(&[
        "--nbd-listen",
        "127.0.0.1:0",
        "--tls-creds",
        server.to_str().unwrap(),
        "--tls-verify-peer",
    ]);
    let port = d.tcp_port();
    d.disk("a", 4 << 20, 6);
    d.ok(&["export", "add", "a", "--nbd"]);
    let with = |dir: &Path| {
        tool(&[
            "nbdinfo",
            &format!(
                "nbds://127.0.0.1:{port}/a?tls-certificates={}",
                dir.display()
            ),
        ])
    };
    let (ok, out, err) = with(&pki_dir.path().join("client"));
    assert!(ok && out.contains("4194304"), "{out}{err}");
    // The server's own directory has no client certificate: refused by --tls-verify-peer.
    assert!(!with(&server).0, "a client without certificate was served");
}
