//! Helpers shared by the integration tests: a loop device that detaches itself, and tool checks.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::Command;

/// True when `tool` runs (`tool --version` exits, whatever its status).
pub fn have_tool(tool: &str) -> bool {
    Command::new(tool).arg("--version").output().is_ok()
}

/// True when running as root.
pub fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

/// A loop device attached to a file, detached on drop (also when a test panics).
pub struct LoopDev {
    pub path: PathBuf,
}

impl LoopDev {
    /// `losetup -f --show [extra...] file`; `None` (after printing why) when that is impossible.
    pub fn attach(file: &Path, extra: &[&str]) -> Option<LoopDev> {
        if !is_root() {
            eprintln!("SKIPPED: loop-device test needs root");
            return None;
        }
        if !have_tool("losetup") {
            eprintln!("SKIPPED: losetup is not installed (util-linux / mount package)");
            return None;
        }
        let out = Command::new("losetup")
            .args(["-f", "--show"])
            .args(extra)
            .arg(file)
            .output()
            .ok()?;
        if !out.status.success() {
            eprintln!(
                "SKIPPED: losetup failed: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            );
            return None;
        }
        let path = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
        Some(LoopDev { path })
    }

    /// `loop3` for `/dev/loop3`.
    pub fn name(&self) -> String {
        self.path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default()
    }
}

impl Drop for LoopDev {
    fn drop(&mut self) {
        for _ in 0..50 {
            match Command::new("losetup").arg("-d").arg(&self.path).status() {
                Ok(s) if s.success() => return,
                _ => std::thread::sleep(std::time::Duration::from_millis(100)),
            }
        }
        eprintln!("WARNING: could not detach {}", self.path.display());
    }
}
