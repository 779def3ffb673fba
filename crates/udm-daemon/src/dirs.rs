//! The runtime and state directories: created private (0700) when missing, checked but never
//! chmod-ed when they exist (`--runtime-dir /tmp` must not lock down /tmp).

use anyhow::{bail, Context, Result};
use std::os::unix::fs::{DirBuilderExt, MetadataExt, PermissionsExt};
use std::path::Path;

/// The predictable fallback runtime directory in a shared /tmp (`udm_proto::paths`): anyone
/// could have created it first, so it is held to stricter rules.
pub fn is_shared_tmp_fallback(p: &Path) -> bool {
    // SAFETY: getuid has no preconditions and cannot fail.
    let uid = unsafe { libc::getuid() };
    p == std::env::temp_dir().join(format!("udm-{uid}"))
}

fn euid() -> u32 {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() }
}

/// Makes sure `p` is a directory udmd may keep its sockets or state in.
///
/// A missing directory is created with mode 0700 (its parents with the default mode). An
/// existing one keeps its mode; it must be owned by our uid and not writable by group or
/// others (otherwise another user could replace our sockets or state files). With
/// `private` (the /tmp fallback) the directory itself must not be a symlink and must have no
/// group or other permissions at all.
pub fn prepare(p: &Path, private: bool) -> Result<()> {
    if let Some(parent) = p.parent().filter(|q| !q.as_os_str().is_empty()) {
        std::fs::create_dir_all(parent)
            .with_context(|| format!("creating {}", parent.display()))?;
    }
    match std::fs::DirBuilder::new().mode(0o700).create(p) {
        Ok(()) => {
            // Ours: the umask must not widen or narrow it.
            std::fs::set_permissions(p, std::fs::Permissions::from_mode(0o700))
                .with_context(|| format!("setting permissions of {}", p.display()))?;
            return check(p, private);
        }
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
        Err(e) => return Err(e).with_context(|| format!("creating {}", p.display())),
    }
    check(p, private)
}

fn check(p: &Path, private: bool) -> Result<()> {
    let lmd =
        std::fs::symlink_metadata(p).with_context(|| format!("inspecting {}", p.display()))?;
    if private && lmd.file_type().is_symlink() {
        bail!(
            "{} is a symbolic link; udmd does not follow it in a shared directory (remove it, or \
             set UDM_RUNTIME_DIR / --runtime-dir to a directory of your own)",
            p.display()
        );
    }
    let md = std::fs::metadata(p).with_context(|| format!("inspecting {}", p.display()))?;
    if !md.is_dir() {
        bail!("{} exists and is not a directory", p.display());
    }
    let me = euid();
    if md.uid() != me {
        bail!(
            "{} is owned by uid {}, not by udmd's uid {me}: another user could replace its \
             sockets or state; use a directory of your own (udmd creates a missing one with mode \
             0700)",
            p.display(),
            md.uid()
        );
    }
    let mode = md.mode() & 0o7777;
    let bad = if private { 0o077 } else { 0o022 };
    if mode & bad != 0 {
        bail!(
            "{} has mode {mode:04o}: {} by other users, so it cannot hold udmd's sockets or state; \
             udmd does not change the mode of an existing directory: use a dedicated directory \
             (udmd creates a missing one with mode 0700), or `chmod go-{}` it yourself",
            p.display(),
            if private {
                "accessible"
            } else {
                "writable"
            },
            if private { "rwx" } else { "w" },
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mode(p: &Path) -> u32 {
        std::fs::metadata(p).unwrap().mode() & 0o7777
    }

    #[test]
    fn creates_private_and_leaves_existing_modes_alone() {
        let t = tempfile::tempdir().unwrap();
        let new = t.path().join("a/b/run");
        prepare(&new, false).unwrap();
        assert_eq!(mode(&new), 0o700);
        // An existing private-enough directory keeps its mode.
        let ok = t.path().join("ok");
        std::fs::create_dir(&ok).unwrap();
        std::fs::set_permissions(&ok, std::fs::Permissions::from_mode(0o755)).unwrap();
        prepare(&ok, false).unwrap();
        assert_eq!(mode(&ok), 0o755);
        // A shared one is refused and left as it was.
        let shared = t.path().join("shared");
        std::fs::create_dir(&shared).unwrap();
        std::fs::set_permissions(&shared, std::fs::Permissions::from_mode(0o1777)).unwrap();
        let e = prepare(&shared, false).unwrap_err().to_string();
        assert!(e.contains("mode 1777"), "{e}");
        assert_eq!(mode(&shared), 0o1777);
    }

    #[test]
    fn private_fallback_refuses_symlinks_and_open_modes() {
        let t = tempfile::tempdir().unwrap();
        let target = t.path().join("target");
        std::fs::create_dir(&target).unwrap();
        std::fs::set_permissions(&target, std::fs::Permissions::from_mode(0o700)).unwrap();
        let link = t.path().join("udm-link");
        std::os::unix::fs::symlink(&target, &link).unwrap();
        let e = prepare(&link, true).unwrap_err().to_string();
        assert!(e.contains("symbolic link"), "{e}");
        // Following it is fine for a directory given explicitly.
        prepare(&link, false).unwrap();
        std::fs::set_permissions(&target, std::fs::Permissions::from_mode(0o750)).unwrap();
        let e = prepare(&target, true).unwrap_err().to_string();
        assert!(e.contains("mode 0750"), "{e}");
        prepare(&target, false).unwrap();
        assert_eq!(mode(&target), 0o750);
    }

    #[test]
    fn refuses_a_directory_of_another_user() {
        if euid() != 0 {
            eprintln!("SKIPPED refuses_a_directory_of_another_user: needs root to chown");
            return;
        }
        let t = tempfile::tempdir().unwrap();
        let d = t.path().join("theirs");
        std::fs::create_dir(&d).unwrap();
        std::os::unix::fs::chown(&d, Some(65534), None).unwrap();
        let e = prepare(&d, false).unwrap_err().to_string();
        assert!(e.contains("owned by uid 65534"), "{e}");
    }
}
