//! Running a kernel test script of `tests/vmlab/` (a real Linux under QEMU via
//! `../shared/vmlab/run.sh`) from a Rust test: only with `UDM_VMLAB=1` (scripts/test.sh sets it
//! when a qemu-system can be prepared), with the binaries under test (`UDM_BIN_DIR`), and with
//! the script's own SKIPPED line passed on.

use std::path::Path;
use std::process::Command;

/// Runs `tests/vmlab/SCRIPT ARGS...`. Prints SKIPPED and returns `None` without
/// `UDM_VMLAB=1` or when the script itself skips; otherwise the test fails unless the script
/// succeeds and prints `done`. Returns the script's standard output.
pub fn run_script(what: &str, script: &str, args: &[&str], done: &str) -> Option<String> {
    if std::env::var("UDM_VMLAB").ok().as_deref() != Some("1") {
        eprintln!("SKIPPED: {what} (set UDM_VMLAB=1 to run it; needs root and qemu)");
        return None;
    }
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../tests/vmlab")
        .join(script);
    let out = match Command::new("bash")
        .arg(&path)
        .args(args)
        .env("UDM_BIN_DIR", crate::bin_dir())
        .output()
    {
        Ok(o) => o,
        Err(e) => panic!("{what}: cannot run {}: {e}", path.display()),
    };
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    eprintln!("{text}{}", String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "{what} failed:\n{text}");
    if let Some(line) = text.lines().find(|l| l.starts_with("SKIPPED")) {
        eprintln!("{line}");
        return None;
    }
    assert!(text.contains(done), "{what}: no `{done}` in:\n{text}");
    Some(text)
}
