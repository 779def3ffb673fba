//! Helpers of the real-client tests: a udmd serving NBD on its Unix socket and on TCP with
//! TLS-PSK, the way each client names an export over either, and the clients themselves run
//! with a deadline (qemu-io, qemu-img, nbdinfo, nbdcopy, fio).

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests may panic on setup failures

use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use udm_testkit::{have, Udmd};

pub const MIB: u64 = 1 << 20;
/// Size of every device these tests export.
pub const SIZE: u64 = 32 * MIB;
/// Sectors of [`SIZE`].
pub const SECTORS: u64 = SIZE / 512;
const KEY: &str = "5e1f0a2b3c4d5e6f708192a3b4c5d6e7f8091a2b3c4d5e6f708192a3b4c5d6e7";

/// True when every client is installed; otherwise one loud SKIPPED line names the missing one.
pub fn have_clients(test: &str) -> bool {
    ["qemu-io", "qemu-img", "nbdinfo", "nbdcopy", "fio"]
        .iter()
        .all(|t| have(t, test))
}

/// How a client reaches udmd.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Via {
    /// The Unix socket in the runtime directory.
    Unix,
    /// `--nbd-listen 127.0.0.1:0` with `--tls-psk` (user alice).
    Tls,
}

/// Both ways, in the order the tests use them.
pub const BOTH: [Via; 2] = [Via::Unix, Via::Tls];

/// A udmd with a Unix socket and a TLS-PSK TCP listener.
pub struct Srv {
    pub d: Udmd,
    port: u16,
    /// Holds `keys.psk` (qemu's `tls-creds-psk` takes the directory, libnbd the file).
    psk: tempfile::TempDir,
}

impl Srv {
    pub fn start() -> Srv {
        let psk = tempfile::tempdir().unwrap();
        let keys = psk.path().join("keys.psk");
        std::fs::write(&keys, format!("alice:{KEY}\n")).unwrap();
        let d = Udmd::start_with(&[
            "--nbd-listen",
            "127.0.0.1:0",
            "--tls-psk",
            keys.to_str().unwrap(),
        ]);
        let port = d.tcp_port();
        Srv { d, port, psk }
    }

    /// A libnbd URI (nbdinfo, nbdcopy, fio).
    pub fn uri(&self, via: Via, export: &str) -> String {
        match via {
            Via::Unix => self.d.nbd_uri(export),
            Via::Tls => format!(
                "nbds://alice@127.0.0.1:{}/{export}?tls-psk-file={}",
                self.port,
                self.psk.path().join("keys.psk").display()
            ),
        }
    }

    /// qemu's `[--object CREDS] --image-opts OPTS` for an export.
    pub fn qemu_image(&self, via: Via, export: &str) -> Vec<String> {
        match via {
            Via::Unix => vec![
                "--image-opts".into(),
                format!(
                    "driver=nbd,server.type=unix,server.path={},export={export}",
                    self.d.nbd_socket().display()
                ),
            ],
            Via::Tls => vec![
                "--object".into(),
                format!(
                    "tls-creds-psk,id=tls0,dir={},username=alice,endpoint=client",
                    self.psk.path().display()
                ),
                "--image-opts".into(),
                format!(
                    "driver=nbd,server.type=inet,server.host=127.0.0.1,server.port={},export={export},tls-creds=tls0",
                    self.port
                ),
            ],
        }
    }

    /// Runs qemu-io commands in one connection; every command must succeed and every pattern
    /// must verify.
    pub fn qemu_io(&self, via: Via, export: &str, cmds: &[&str]) {
        let mut args = vec!["qemu-io".to_string()];
        args.extend(self.qemu_image(via, export));
        for c in cmds {
            args.extend(["-c".to_string(), c.to_string()]);
        }
        let (out, err) = run_full(&args);
        assert!(
            !out.contains("failed") && !err.contains("failed"),
            "qemu-io {via:?} {export}: {out}{err}"
        );
    }

    /// Checks over both ways that the export offers FLUSH, FUA, TRIM and WRITE_ZEROES, so the
    /// clients send them rather than emulate them.
    pub fn offers_all(&self, export: &str) {
        for via in BOTH {
            let out = run(&["nbdinfo", "--json", &self.uri(via, export)]);
            let v: serde_json::Value = serde_json::from_str(&out).unwrap();
            let ex = &v["exports"][0];
            for cap in ["can_flush", "can_fua", "can_trim", "can_zero"] {
                assert_eq!(ex[cap], true, "{export} over {via:?}: {cap}\n{out}");
            }
            assert_eq!(ex["export-size"], SIZE, "{out}");
        }
    }

    /// `nbdinfo --map` of an export as runs of (offset, length, data).
    pub fn map(&self, via: Via, export: &str) -> Vec<(u64, u64, bool)> {
        let out = run(&["nbdinfo", "--map", "--json", &self.uri(via, export)]);
        let v: serde_json::Value = serde_json::from_str(&out).unwrap();
        let runs = v.as_array().unwrap().iter().map(|e| {
            let n = |k: &str| e[k].as_u64().unwrap_or_else(|| panic!("{k} in {e}"));
            (n("offset"), n("length"), n("type") & 1 == 0)
        });
        merge(runs, &out)
    }

    /// `qemu-img map --output=json` of an export as runs of (offset, length, data).
    pub fn qemu_map(&self, via: Via, export: &str) -> Vec<(u64, u64, bool)> {
        let mut args = vec!["qemu-img".to_string(), "map".into(), "--output=json".into()];
        args.extend(self.qemu_image(via, export));
        let out = run(&args);
        let v: serde_json::Value = serde_json::from_str(&out).unwrap();
        let runs = v.as_array().unwrap().iter().map(|e| {
            let n = |k: &str| e[k].as_u64().unwrap_or_else(|| panic!("{k} in {e}"));
            (n("start"), n("length"), e["data"].as_bool() == Some(true))
        });
        merge(runs, &out)
    }

    /// Both tools' maps of an export over both ways; all four must agree. Returns that map.
    pub fn agreed_map(&self, export: &str) -> Vec<(u64, u64, bool)> {
        let want = self.map(Via::Unix, export);
        for via in BOTH {
            assert_eq!(
                self.map(via, export),
                want,
                "nbdinfo --map of {export} over {via:?}"
            );
            assert_eq!(
                self.qemu_map(via, export),
                want,
                "qemu-img map of {export} over {via:?} differs from nbdinfo --map"
            );
        }
        want
    }

    /// nbdcopy of a whole export into a file; returns its bytes.
    pub fn copy_out(&self, via: Via, export: &str) -> Vec<u8> {
        let f = self.d.path(&format!("out-{export}-{via:?}.img"));
        run(&["nbdcopy", &self.uri(via, export), f.to_str().unwrap()]);
        let v = std::fs::read(&f).unwrap();
        std::fs::remove_file(&f).unwrap();
        v
    }

    /// nbdcopy of `src` (a sparse file: its holes go out as zero requests) into an export,
    /// flushed at the end (a snapshot origin acknowledges writes before they reach the disk;
    /// only FLUSH promises they did).
    pub fn copy_in(&self, via: Via, export: &str, src: &Path) {
        run(&[
            "nbdcopy",
            "--flush",
            "--requests=16",
            src.to_str().unwrap(),
            &self.uri(via, export),
        ]);
    }

    /// fio's nbd engine: random writes of 4-128 KiB at [16M, 24M), read back and verified.
    /// Unix socket only: the nbd engine hands libnbd a URI without allowing it to read local
    /// files, so `tls-psk-file` cannot reach it.
    pub fn fio_verify(&self, export: &str) {
        let out = run(&[
            "fio",
            "--name=verify",
            "--ioengine=nbd",
            &format!("--uri={}", self.uri(Via::Unix, export)),
            "--rw=randwrite",
            "--bsrange=4k-128k",
            "--offset=16M",
            "--size=8M",
            "--iodepth=8",
            "--verify=crc32c",
            "--do_verify=1",
            "--verify_fatal=1",
            "--verify_state_save=0",
        ]);
        assert!(
            out.contains("err= 0") && !out.contains("verify: bad"),
            "fio {export}: {out}"
        );
    }
}

/// fio's nbd engine over TLS with X.509: random writes of 4-128 KiB at [16M, 24M), verified.
/// The engine cannot pass `tls-certificates` in its URI, so libnbd looks in its default place,
/// `$HOME/.pki/libnbd` for a user other than root: fio runs as nobody with the CA there (and so
/// presents no client certificate; the daemon must not ask for one).
pub fn fio_verify_x509(port: u16, export: &str, client: &Path) {
    use std::os::unix::fs::PermissionsExt;
    let home = tempfile::Builder::new()
        .prefix("udm-fio-home")
        .tempdir()
        .unwrap();
    let pkidir = home.path().join(".pki").join("libnbd");
    std::fs::create_dir_all(&pkidir).unwrap();
    std::fs::copy(client.join("ca-cert.pem"), pkidir.join("ca-cert.pem")).unwrap();
    let ca = pkidir.join("ca-cert.pem");
    for p in [home.path(), &home.path().join(".pki"), &pkidir, &ca] {
        std::os::unix::fs::chown(p, Some(65534), Some(65534)).unwrap();
        let mode = if p == ca.as_path() { 0o600 } else { 0o700 };
        std::fs::set_permissions(p, std::fs::Permissions::from_mode(mode)).unwrap();
    }
    let o = Command::new("timeout")
        .args([
            "120",
            "setpriv",
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
        ])
        .args(["fio", "--name=tls", "--ioengine=nbd"])
        .arg(format!("--uri=nbds://127.0.0.1:{port}/{export}"))
        .args([
            "--rw=randwrite",
            "--bsrange=4k-128k",
            "--offset=16M",
            "--size=8M",
        ])
        .args([
            "--iodepth=8",
            "--verify=crc32c",
            "--do_verify=1",
            "--verify_fatal=1",
        ])
        .args(["--verify_state_save=0", "--output-format=terse"])
        .env("HOME", home.path())
        .current_dir(home.path())
        .output()
        .unwrap();
    let (out, err) = (
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr),
    );
    assert!(o.status.success(), "fio over TLS on {export}: {out}{err}");
    assert!(out.contains(";tls;"), "fio printed no result: {out}{err}");
}

/// Merges adjacent runs of the same kind and checks they tile `[0, SIZE)`.
fn merge(runs: impl Iterator<Item = (u64, u64, bool)>, raw: &str) -> Vec<(u64, u64, bool)> {
    let mut out: Vec<(u64, u64, bool)> = Vec::new();
    let mut next = 0;
    for (off, len, data) in runs {
        assert_eq!(off, next, "map has a gap or overlap: {raw}");
        next = off + len;
        match out.last_mut() {
            Some(last) if last.2 == data => last.1 += len,
            _ => out.push((off, len, data)),
        }
    }
    assert_eq!(next, SIZE, "map does not cover the device: {raw}");
    out
}

/// Runs a client with a 120 s deadline; it must succeed. Returns stdout.
pub fn run<S: AsRef<str>>(args: &[S]) -> String {
    run_full(args).0
}

/// Runs a client with a 120 s deadline; it must succeed. Returns stdout and stderr.
pub fn run_full<S: AsRef<str>>(args: &[S]) -> (String, String) {
    let args: Vec<&str> = args.iter().map(AsRef::as_ref).collect();
    let o = Command::new("timeout")
        .arg("120")
        .args(&args)
        .output()
        .unwrap();
    let (out, err) = (
        String::from_utf8_lossy(&o.stdout).into_owned(),
        String::from_utf8_lossy(&o.stderr).into_owned(),
    );
    assert!(
        o.status.success(),
        "{args:?} failed ({}): {out}{err}",
        o.status
    );
    (out, err)
}

/// Runs a client that must fail; returns its stderr.
pub fn run_fails<S: AsRef<str>>(args: &[S]) -> String {
    let args: Vec<&str> = args.iter().map(AsRef::as_ref).collect();
    let o = Command::new("timeout")
        .arg("120")
        .args(&args)
        .output()
        .unwrap();
    assert!(!o.status.success(), "{args:?} succeeded");
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// A disk `name` added to `d` over `NAME.img`, a [`sparse_file`] with data in [8, 12) MiB
/// only; returns the image's path and content.
pub fn sparse_disk(d: &Udmd, name: &str, seed: u8) -> (PathBuf, Vec<u8>) {
    let img = d.path(&format!("{name}.img"));
    let data = sparse_file(&img, seed, 8 * MIB, 12 * MIB);
    d.ok(&["disk", "add", name, "--file", img.to_str().unwrap()]);
    (img, data)
}

/// A sparse file of [`SIZE`] with data (from `seed`) only in `[from, to)`.
pub fn sparse_file(p: &Path, seed: u8, from: u64, to: u64) -> Vec<u8> {
    let f = std::fs::File::create(p).unwrap();
    f.set_len(SIZE).unwrap();
    let mut img = vec![0u8; SIZE as usize];
    udm_testkit::fill_pattern(&mut img[from as usize..to as usize], from / 512, seed);
    f.write_all_at(&img[from as usize..to as usize], from)
        .unwrap();
    f.sync_all().unwrap();
    img
}

/// A source for nbdcopy: random-looking MiBs with every third MiB left a hole.
pub fn source(dir: &Path, seed: u8) -> (PathBuf, Vec<u8>) {
    let p = dir.join(format!("src-{seed}.img"));
    let f = std::fs::File::create(&p).unwrap();
    f.set_len(SIZE).unwrap();
    let mut img = vec![0u8; SIZE as usize];
    for (i, mib) in img.chunks_mut(MIB as usize).enumerate() {
        if i % 3 != 1 {
            udm_testkit::fill_pattern(mib, (i as u64) * MIB / 512, seed);
            f.write_all_at(mib, i as u64 * MIB).unwrap();
        }
    }
    (p, img)
}

/// Panics naming the first differing 512-byte sector.
pub fn same(got: &[u8], want: &[u8], what: &str) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    if let Some(i) = got
        .chunks(512)
        .zip(want.chunks(512))
        .position(|(g, w)| g != w)
    {
        let head = |b: &[u8]| format!("{:02x?}", &b[i * 512..i * 512 + 16]);
        panic!(
            "{what}: sector {i} differs: starts {} where {} was expected",
            head(got),
            head(want)
        );
    }
}
