//! Kernel cross-check of the snapshot COW format (tests/vmlab/snapshot-crosscheck.sh): boots a
//! real kernel under QEMU, both directions, chunk sizes 8 and 32. Slow (a few minutes), so it
//! runs only with UDM_VMLAB=1.
#![allow(clippy::unwrap_used)] // test helpers outside #[test] fns unwrap too

use std::path::Path;
use std::process::Command;

#[test]
fn kernel_crosscheck() {
    if std::env::var("UDM_VMLAB").ok().as_deref() != Some("1") {
        eprintln!(
            "SKIPPED: snapshot kernel cross-check (set UDM_VMLAB=1 to run it; needs root and qemu)"
        );
        return;
    }
    let script =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/vmlab/snapshot-crosscheck.sh");
    let out = Command::new("bash").arg(&script).output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    eprintln!("{text}{}", String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "cross-check failed:\n{text}");
    assert!(text.contains("all match"));
}
