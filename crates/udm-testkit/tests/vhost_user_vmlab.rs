//! A VM on a udm device (tests/vmlab/vhost-user-blk.sh): udmd on the host serves a
//! vhost-user-blk export, QEMU boots a real kernel with it as a virtio-blk disk, the guest makes
//! and checks an ext4 filesystem, and while a writer runs the host attaches and detaches an
//! interposer and takes a snapshot of the guest-frozen filesystem, then checks the snapshot.
//! Slow (minutes under TCG), so it runs only with UDM_VMLAB=1.
#![allow(clippy::unwrap_used)] // test helpers outside #[test] fns unwrap too

use std::path::Path;
use std::process::Command;

#[test]
fn vm_on_a_vhost_user_blk_export() {
    if std::env::var("UDM_VMLAB").ok().as_deref() != Some("1") {
        eprintln!(
            "SKIPPED: vhost-user-blk VM test (set UDM_VMLAB=1 to run it; needs root and qemu)"
        );
        return;
    }
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/vmlab/vhost-user-blk.sh");
    let out = Command::new("bash")
        .arg(&script)
        .env("UDM_BIN_DIR", udm_testkit::bin_dir())
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    eprintln!("{text}{}", String::from_utf8_lossy(&out.stderr));
    assert!(
        out.status.success(),
        "vhost-user-blk VM test failed:\n{text}"
    );
    if let Some(line) = text.lines().find(|l| l.starts_with("SKIPPED")) {
        eprintln!("{line}");
        return;
    }
    assert!(text.contains("vhost-user-blk: all passed"));
}
