//! Certificates for the X.509 TLS tests, made with the openssl command: a CA and a server
//! and a client certificate it signed, in the directory layout qemu and libnbd read.

use std::path::Path;
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

/// A CA and, in `dir/server` and `dir/client`, certificates it signed (qemu/libnbd layout).
pub fn pki(dir: &Path) {
    let ec = [
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:P-256",
        "-nodes",
    ];
    let mut ca = vec!["req", "-x509"];
    ca.extend(ec);
    ca.extend([
        "-keyout",
        "ca-key.pem",
        "-out",
        "ca-cert.pem",
        "-days",
        "2",
        "-subj",
        "/CN=udm test CA",
        "-addext",
        "basicConstraints=critical,CA:TRUE",
        "-addext",
        "keyUsage=critical,keyCertSign,cRLSign",
    ]);
    openssl(dir, &ca);
    for (who, usage) in [("server", "serverAuth"), ("client", "clientAuth")] {
        let d = dir.join(who);
        std::fs::create_dir_all(&d).expect("certificate directory");
        std::fs::copy(dir.join("ca-cert.pem"), d.join("ca-cert.pem"))
            .expect("copy the CA certificate");
        std::fs::write(
            d.join("ext"),
            format!(
                "subjectAltName=DNS:localhost,IP:127.0.0.1\nextendedKeyUsage={usage}\n\
                 basicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature,keyEncipherment\n"
            ),
        )
        .expect("extension file");
        let key = format!("{who}/{who}-key.pem");
        let mut req = vec!["req"];
        req.extend(ec);
        req.extend(["-keyout", &key, "-out", "req.csr", "-subj", "/CN=localhost"]);
        openssl(dir, &req);
        let cert = format!("{who}/{who}-cert.pem");
        let ext = format!("{who}/ext");
        openssl(
            dir,
            &[
                "x509",
                "-req",
                "-in",
                "req.csr",
                "-CA",
                "ca-cert.pem",
                "-CAkey",
                "ca-key.pem",
                "-CAcreateserial",
                "-out",
                &cert,
                "-days",
                "2",
                "-extfile",
                &ext,
            ],
        );
    }
}
