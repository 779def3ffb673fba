//! The kernel's NBD driver as a udmd client (tests/vmlab/kernel-nbd.sh): Debian's nbd-client in a
//! real kernel under QEMU connects over TLS on 127.0.0.1 and over the Unix socket, and ext4,
//! TRIM and FLUSH run on the export. Slow (about 3 minutes), so it runs only with UDM_VMLAB=1.
#![allow(clippy::unwrap_used)] // test helpers outside #[test] fns unwrap too

use std::path::Path;
use std::process::Command;

#[test]
fn kernel_nbd_client() {
    if std::env::var("UDM_VMLAB").ok().as_deref() != Some("1") {
        eprintln!(
            "SKIPPED: kernel NBD client test (set UDM_VMLAB=1 to run it; needs root and qemu)"
        );
        return;
    }
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/vmlab/kernel-nbd.sh");
    let out = Command::new("bash")
        .arg(&script)
        .arg("tls")
        .env("UDM_BIN_DIR", udm_testkit::bin_dir())
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    eprintln!("{text}{}", String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "kernel NBD test failed:\n{text}");
    if let Some(line) = text.lines().find(|l| l.starts_with("SKIPPED")) {
        eprintln!("{line}");
        return;
    }
    assert!(text.contains("kernel-nbd: all passed (tls)"));
}
