//! Certificates for the X.509 TLS tests, made with the openssl command: CAs and certificates
//! they signed, in the directory layout qemu and libnbd read (`ca-cert.pem`,
//! `{server,client}-{cert,key}.pem`).

use std::path::{Path, PathBuf};
use std::process::Command;

fn openssl(dir: &Path, args: &[&str]) {
    let o = Command::new("openssl")
        .current_dir(dir)
        .args(args)
        .output()
        .expect("spawn openssl");
    assert!(
        o.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&o.stderr)
    );
}

/// `openssl req` making a new P-256 key (unencrypted), with `args` saying what else to write.
fn new_key(dir: &Path, args: &[&str]) {
    let mut all = vec![
        "req",
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:P-256",
        "-nodes",
    ];
    all.extend_from_slice(args);
    openssl(dir, &all);
}

/// A CA in `dir/name` (ca-cert.pem, ca-key.pem).
pub fn make_ca(dir: &Path, name: &str) -> PathBuf {
    let d = dir.join(name);
    std::fs::create_dir_all(&d).expect("certificate files");
    new_key(
        &d,
        &[
            "-x509",
            "-keyout",
            "ca-key.pem",
            "-out",
            "ca-cert.pem",
            "-days",
            "2",
            "-subj",
            &format!("/CN={name}"),
            "-addext",
            "basicConstraints=critical,CA:TRUE",
            "-addext",
            "keyUsage=critical,keyCertSign,cRLSign",
        ],
    );
    d
}

/// Issues `out/{prefix}-cert.pem` and `-key.pem` signed by the CA in `ca`, and copies the CA
/// certificate to `out/ca-cert.pem` (the qemu/libnbd layout).
pub fn issue(ca: &Path, out: &Path, prefix: &str, usage: &str) {
    std::fs::create_dir_all(out).expect("certificate files");
    std::fs::copy(ca.join("ca-cert.pem"), out.join("ca-cert.pem")).expect("certificate files");
    let ext = out.join(format!("{prefix}.ext"));
    std::fs::write(
        &ext,
        format!(
            "subjectAltName=DNS:localhost,IP:127.0.0.1\nextendedKeyUsage={usage}\n\
             basicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature,keyEncipherment\n"
        ),
    )
    .expect("certificate files");
    let key = out.join(format!("{prefix}-key.pem"));
    let csr = out.join(format!("{prefix}.csr"));
    let cert = out.join(format!("{prefix}-cert.pem"));
    new_key(
        out,
        &[
            "-keyout",
            key.to_str().expect("certificate files"),
            "-out",
            csr.to_str().expect("certificate files"),
            "-subj",
            "/CN=localhost",
        ],
    );
    openssl(
        out,
        &[
            "x509",
            "-req",
            "-in",
            csr.to_str().expect("certificate files"),
            "-CA",
            ca.join("ca-cert.pem").to_str().expect("certificate files"),
            "-CAkey",
            ca.join("ca-key.pem").to_str().expect("certificate files"),
            "-CAcreateserial",
            "-out",
            cert.to_str().expect("certificate files"),
            "-days",
            "2",
            "-extfile",
            ext.to_str().expect("certificate files"),
        ],
    );
}

/// Credential directories made by [`pki`].
pub struct Pki {
    /// Server certificate and key.
    pub server: PathBuf,
    /// Client certificate and key from the same CA.
    pub client: PathBuf,
    /// Client credentials from another CA.
    pub stranger: PathBuf,
    /// Trusts the right CA but has no client certificate.
    pub anonymous: PathBuf,
}

/// A CA (`dir/ca`) and another (`dir/other-ca`), and the directories of [`Pki`].
pub fn pki(dir: &Path) -> Pki {
    let ca = make_ca(dir, "ca");
    let other = make_ca(dir, "other-ca");
    let p = Pki {
        server: dir.join("server"),
        client: dir.join("client"),
        stranger: dir.join("stranger"),
        anonymous: dir.join("anonymous"),
    };
    issue(&ca, &p.server, "server", "serverAuth");
    issue(&ca, &p.client, "client", "clientAuth");
    issue(&other, &p.stranger, "client", "clientAuth");
    std::fs::create_dir_all(&p.anonymous).expect("certificate files");
    std::fs::copy(ca.join("ca-cert.pem"), p.anonymous.join("ca-cert.pem"))
        .expect("certificate files");
    p
}
