//! Default runtime and state directories (DESIGN.md: `$UDM_RUNTIME_DIR`, else `/run/udm` as root,
//! else `$XDG_RUNTIME_DIR/udm`; `$UDM_STATE_DIR`, else `/var/lib/udm` or `$XDG_STATE_HOME/udm`).

use std::path::PathBuf;

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() == 0 }
}

fn home() -> PathBuf {
    std::env::var_os("HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/tmp"))
}

/// Where the control socket and the NBD socket live.
pub fn runtime_dir() -> PathBuf {
    if let Some(d) = std::env::var_os("UDM_RUNTIME_DIR") {
        return PathBuf::from(d);
    }
    if is_root() {
        return PathBuf::from("/run/udm");
    }
    match std::env::var_os("XDG_RUNTIME_DIR") {
        Some(d) => PathBuf::from(d).join("udm"),
        // SAFETY: getuid has no preconditions and cannot fail.
        None => std::env::temp_dir().join(format!("udm-{}", unsafe { libc::getuid() })),
    }
}

/// Where disks, tables and exports are recorded.
pub fn state_dir() -> PathBuf {
    if let Some(d) = std::env::var_os("UDM_STATE_DIR") {
        return PathBuf::from(d);
    }
    if is_root() {
        return PathBuf::from("/var/lib/udm");
    }
    match std::env::var_os("XDG_STATE_HOME") {
        Some(d) => PathBuf::from(d).join("udm"),
        None => home().join(".local/state/udm"),
    }
}

/// The control socket inside a runtime directory.
pub fn control_socket(runtime: &std::path::Path) -> PathBuf {
    runtime.join("control.sock")
}

/// The NBD socket inside a runtime directory.
pub fn nbd_socket(runtime: &std::path::Path) -> PathBuf {
    runtime.join("nbd.sock")
}
