//! The ublk export on a real kernel (tests/vmlab/kernel-ublk.sh): Debian's Linux 6.12 under QEMU
//! with ublk_drv; udmd inside exports a device as /dev/ublkbN, which carries ext4 through
//! writes, TRIM, FLUSH, an interposer, a frozen live snapshot under a writer, removal with a
//! request parked in a suspended device, SIGTERM + restart and kill -9 + restart. Slow (about 3
//! minutes), so it runs only with UDM_VMLAB=1, and only when the binaries have the ublk feature.
#![allow(clippy::unwrap_used)] // test helpers outside #[test] fns unwrap too

use std::path::Path;
use std::process::Command;

#[test]
fn kernel_ublk_export() {
    if std::env::var("UDM_VMLAB").ok().as_deref() != Some("1") {
        eprintln!("SKIPPED: kernel ublk test (set UDM_VMLAB=1 to run it; needs root and qemu)");
        return;
    }
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/vmlab/kernel-ublk.sh");
    let out = Command::new("bash")
        .arg(&script)
        .env("UDM_BIN_DIR", udm_testkit::bin_dir())
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    eprintln!("{text}{}", String::from_utf8_lossy(&out.stderr));
    if let Some(line) = text.lines().find(|l| l.starts_with("SKIPPED")) {
        eprintln!("{line}");
        assert!(out.status.success());
        return;
    }
    assert!(out.status.success(), "kernel ublk test failed:\n{text}");
    assert!(text.contains("kernel-ublk: all passed"));
}
