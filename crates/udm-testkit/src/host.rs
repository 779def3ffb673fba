//! Host helpers for tests that need tools or privileges: where a tool is (PATH, then the sbin
//! directories an ordinary user's PATH lacks), root, and a loop device that detaches itself.
//! Each prints a loud `SKIPPED` line when a test cannot run.

use std::path::{Path, PathBuf};
use std::process::Command;

/// Searched after PATH: sbin tools (sfdisk, losetup, blockdev) run for anyone but are missing
/// from an ordinary user's PATH on Debian.
const SBIN: [&str; 3] = ["/usr/sbin", "/sbin", "/usr/local/sbin"];

/// Where `tool` is: in the directories of `path` (a PATH value), then in [`SBIN`].
pub fn find_tool_in(tool: &str, path: &str) -> Option<PathBuf> {
    use std::os::unix::fs::PermissionsExt;
    path.split(':')
        .filter(|d| !d.is_empty())
        .chain(SBIN)
        .map(|d| Path::new(d).join(tool))
        .find(|p| {
            std::fs::metadata(p).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        })
}

/// Where `tool` is, on PATH or in an sbin directory.
pub fn tool_path(tool: &str) -> Option<PathBuf> {
    find_tool_in(tool, &std::env::var("PATH").unwrap_or_default())
}

/// True when `tool` is installed (see [`tool_path`]).
pub fn have_tool(tool: &str) -> bool {
    tool_path(tool).is_some()
}

/// A command running `tool` from wherever [`tool_path`] finds it.
pub fn tool_cmd(tool: &str) -> Command {
    Command::new(tool_path(tool).unwrap_or_else(|| PathBuf::from(tool)))
}

/// True when running as root.
pub fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

/// A loop device attached to a file, detached on drop (also when a test panics).
pub struct LoopDev {
    /// `/dev/loopN`.
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
        let out = tool_cmd("losetup")
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
            match tool_cmd("losetup").arg("-d").arg(&self.path).status() {
                Ok(s) if s.success() => return,
                _ => std::thread::sleep(std::time::Duration::from_millis(100)),
            }
        }
        eprintln!("WARNING: could not detach {}", self.path.display());
    }
}
